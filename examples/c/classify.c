/*
 * classify: a PoolFormer classifier from C, through libpoolformer_edge.
 *
 *   classify MODEL.onnx [IMAGE.ppm]
 *
 * Loads MODEL, makes a frame (a binary PPM, P6 with maxval 255, if given, else a
 * deterministic 320x240 test pattern), classifies it as interleaved RGB8 and again as
 * YUYV (converted here from the same pixels, BT.601 limited range) and prints each
 * top 5 as `index probability label` lines. Every status is checked; on failure the
 * library's message is printed and the exit code is 1.
 *
 * Build (see docs/c-api.md):
 *   cc -Iinclude examples/c/classify.c target/release/libpoolformer_edge.a <native libs> -o classify
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pfe.h"

#define TOP 5

/* Prints what failed, the status name and the library's message for this thread. */
static int report(const char *what, PfeStatus status)
{
    char message[512];
    size_t needed = 0;
    /* The copy variant, with the pointer variant when the message does not fit. */
    if (pfe_last_error_copy(message, sizeof message, &needed) == PFE_STATUS_OK) {
        fprintf(stderr, "classify: %s failed: %s: %s\n", what, pfe_status_name(status), message);
    } else {
        fprintf(stderr, "classify: %s failed: %s: %s\n", what, pfe_status_name(status),
                pfe_last_error());
    }
    return 1;
}

typedef struct {
    uint8_t *pixels; /* interleaved RGB8, rows `stride` bytes apart */
    uint32_t width;
    uint32_t height;
    size_t stride;
    size_t len;
} Frame;

/* Rows padded to a stride that is not a multiple of 3, as camera drivers may. */
static int frame_alloc(Frame *f, uint32_t width, uint32_t height)
{
    f->width = width;
    f->height = height;
    f->stride = 3 * (size_t)width + 5;
    f->len = f->stride * height;
    f->pixels = calloc(f->len, 1);
    return f->pixels != NULL;
}

/* Smooth gradients, a disc and integer hash noise: the same on every platform (the
 * Rust test tests/c_example.rs computes the same pixels). */
static void make_pattern(Frame *f)
{
    uint32_t x, y;
    for (y = 0; y < f->height; y++) {
        for (x = 0; x < f->width; x++) {
            uint8_t *p = f->pixels + y * f->stride + 3 * x;
            uint32_t h = (x * 73856093u) ^ (y * 19349663u);
            long dx = (long)x - 200, dy = (long)y - 110;
            int in_disc = dx * dx + dy * dy < 60 * 60;
            h ^= h >> 13;
            h *= 0x5bd1e995u;
            h ^= h >> 15;
            p[0] = (uint8_t)(in_disc ? 220 : (x * 255) / f->width);
            p[1] = (uint8_t)(in_disc ? 40 + (h & 31) : (y * 255) / f->height);
            p[2] = (uint8_t)(((x + 2 * y) & 255) / 2 + (h & 63));
        }
    }
}

/* Skips whitespace and # comments in a PPM header. */
static int ppm_skip(FILE *in)
{
    int c;
    while ((c = fgetc(in)) != EOF) {
        if (c == '#') {
            while ((c = fgetc(in)) != EOF && c != '\n') {
            }
        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            ungetc(c, in);
            return 1;
        }
    }
    return 0;
}

static int read_ppm(const char *path, Frame *f)
{
    unsigned width, height, maxval;
    uint32_t y;
    int ok = 0;
    FILE *in = fopen(path, "rb");
    if (!in) {
        perror(path);
        return 0;
    }
    if (fgetc(in) == 'P' && fgetc(in) == '6' && ppm_skip(in) && fscanf(in, "%u", &width) == 1 &&
        ppm_skip(in) && fscanf(in, "%u", &height) == 1 && ppm_skip(in) &&
        fscanf(in, "%u", &maxval) == 1 && maxval == 255 && fgetc(in) != EOF && width > 0 &&
        height > 0 && width <= 16384 && height <= 16384 && frame_alloc(f, width, height)) {
        ok = 1;
        for (y = 0; y < f->height && ok; y++) {
            ok = fread(f->pixels + y * f->stride, 3, width, in) == width;
        }
    }
    if (!ok) {
        fprintf(stderr, "classify: %s is not a binary PPM (P6, maxval 255)\n", path);
    }
    fclose(in);
    return ok;
}

/* BT.601 limited-range YCbCr of an RGB pixel, in integers (all sums stay non-negative). */
static uint8_t luma(int r, int g, int b)
{
    return (uint8_t)(((66 * r + 129 * g + 25 * b + 128) >> 8) + 16);
}
static uint8_t cb(int r, int g, int b)
{
    return (uint8_t)((-38 * r - 74 * g + 112 * b + 128 + (128 << 8)) >> 8);
}
static uint8_t cr(int r, int g, int b)
{
    return (uint8_t)((112 * r - 94 * g - 18 * b + 128 + (128 << 8)) >> 8);
}

/* RGB8 → YUYV: Y0 U Y1 V per pixel pair, chroma from the pair's average (the first
 * pixel alone at the end of an odd row). Packed rows of 4 * ceil(width / 2) bytes. */
static uint8_t *to_yuyv(const Frame *f, size_t *stride, size_t *len)
{
    uint32_t x, y;
    uint8_t *out;
    *stride = 4 * (((size_t)f->width + 1) / 2);
    *len = *stride * f->height;
    out = malloc(*len);
    if (!out) {
        return NULL;
    }
    for (y = 0; y < f->height; y++) {
        for (x = 0; x < f->width; x += 2) {
            const uint8_t *a = f->pixels + y * f->stride + 3 * x;
            const uint8_t *b = x + 1 < f->width ? a + 3 : a;
            int r = (a[0] + b[0] + 1) / 2, g = (a[1] + b[1] + 1) / 2, bl = (a[2] + b[2] + 1) / 2;
            uint8_t *o = out + y * *stride + 2 * x;
            o[0] = luma(a[0], a[1], a[2]);
            o[1] = cb(r, g, bl);
            o[2] = luma(b[0], b[1], b[2]);
            o[3] = cr(r, g, bl);
        }
    }
    return out;
}

static void print_top(const char *format, const PfeEngine *engine, const PfePrediction *top,
                      size_t n)
{
    size_t i;
    printf("== %s\n", format);
    for (i = 0; i < n; i++) {
        const char *label = pfe_engine_label(engine, top[i].class_index);
        printf("%u %.9g %s\n", (unsigned)top[i].class_index, top[i].probability,
               label ? label : "?");
    }
}

int main(int argc, char **argv)
{
    PfeOptions options = pfe_options_default();
    PfeEngine *engine = NULL;
    PfePrediction top[TOP];
    Frame frame = {0};
    uint8_t *yuyv = NULL;
    size_t shape[4], classes = 0, written = 0, yuyv_stride = 0, yuyv_len = 0;
    PfeStatus status;
    int failed = 1;

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s MODEL.onnx [IMAGE.ppm]\n", argv[0]);
        return 2;
    }
    printf("poolformer-edge %s\n", pfe_version());

    status = pfe_engine_new_from_path(argv[1], &options, &engine);
    if (status != PFE_STATUS_OK) {
        return report("loading the model", status);
    }
    if ((status = pfe_engine_input_shape(engine, shape, 4)) != PFE_STATUS_OK) {
        report("pfe_engine_input_shape", status);
        goto done;
    }
    if ((status = pfe_engine_num_classes(engine, &classes)) != PFE_STATUS_OK) {
        report("pfe_engine_num_classes", status);
        goto done;
    }
    printf("model: input %zux%zux%zux%zu, %zu classes\n", shape[0], shape[1], shape[2], shape[3],
           classes);

    if (argc == 3) {
        if (!read_ppm(argv[2], &frame)) {
            goto done;
        }
    } else {
        if (!frame_alloc(&frame, 320, 240)) {
            fprintf(stderr, "classify: out of memory\n");
            goto done;
        }
        make_pattern(&frame);
    }
    printf("frame: %ux%u\n", (unsigned)frame.width, (unsigned)frame.height);

    status = pfe_engine_classify_rgb8(engine, frame.pixels, frame.len, frame.width, frame.height,
                                      frame.stride, top, TOP, &written);
    if (status != PFE_STATUS_OK) {
        report("classifying the RGB8 frame", status);
        goto done;
    }
    print_top("rgb8", engine, top, written);

    yuyv = to_yuyv(&frame, &yuyv_stride, &yuyv_len);
    if (!yuyv) {
        fprintf(stderr, "classify: out of memory\n");
        goto done;
    }
    status = pfe_engine_classify_yuyv(engine, yuyv, yuyv_len, frame.width, frame.height,
                                      yuyv_stride, PFE_COLOR_RANGE_LIMITED, top, TOP, &written);
    if (status != PFE_STATUS_OK) {
        report("classifying the YUYV frame", status);
        goto done;
    }
    print_top("yuyv", engine, top, written);
    failed = 0;

done:
    free(yuyv);
    free(frame.pixels);
    pfe_engine_free(engine);
    return failed;
}
