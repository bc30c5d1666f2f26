//! The C ABI called as C would call it: null pointers, short buffers, bad sizes and bad
//! models give a status and a message naming the problem; outputs are written only on
//! success; results equal the Rust API's; panics never cross the boundary.

use std::ffi::{c_char, CStr, CString};
use std::ptr;
use std::sync::OnceLock;

use poolformer_edge::capi::engine::*;
use poolformer_edge::capi::options::pfe_options_default;
use poolformer_edge::capi::{
    pfe_last_error, pfe_last_error_copy, pfe_status_name, pfe_version, status_boundary, ErrorMode,
    PfeColorRange, PfeEngine, PfeOptions, PfePrediction, PfeStatus,
};
use poolformer_edge::models::{export, synth, ArchConfig};
use poolformer_edge::pixfmt::{ColorRange, Yuyv};
use poolformer_edge::testimage::natural_image;
use poolformer_edge::{Engine, Options, RgbImage};

const SIZE: u32 = 64;

fn options() -> PfeOptions {
    PfeOptions {
        threads: 1,
        input_size: SIZE,
    }
}

/// A tiny PoolFormer with 1000 classes (so ImageNet labels), as ONNX bytes.
fn model_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let arch = ArchConfig::custom("capi", &[1, 1, 1, 1], &[8, 16, 24, 32], 1000).unwrap();
        export::export_onnx(&arch, &synth::synthesize(&arch, 3).unwrap()).unwrap()
    })
}

/// One engine shared by the tests (as C programs share one between threads).
struct Shared(*mut PfeEngine);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn engine() -> *const PfeEngine {
    static ENGINE: OnceLock<Shared> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let bytes = model_bytes();
            let mut e = ptr::null_mut();
            let opts = options();
            let s =
                unsafe { pfe_engine_new_from_memory(bytes.as_ptr(), bytes.len(), &opts, &mut e) };
            assert_eq!(s, PfeStatus::Ok, "{}", last_error());
            Shared(e)
        })
        .0
}

/// The same model through the Rust API.
fn rust_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let options = Options {
            threads: 1,
            input_size: SIZE as usize,
            ..Options::default()
        };
        Engine::from_bytes(model_bytes(), options).unwrap()
    })
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(pfe_last_error()) }
        .to_str()
        .unwrap()
        .to_owned()
}

/// Asserts the status and that the last error contains every one of `parts`.
#[track_caller]
fn expect_error(status: PfeStatus, want: PfeStatus, parts: &[&str]) {
    let message = last_error();
    assert_eq!(status, want, "message: {message}");
    for part in parts {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
}

fn frame(w: usize, h: usize, seed: u64) -> Vec<u8> {
    natural_image(w as u32, h as u32, seed).into_raw()
}

/// A poisoned prediction, to see that failures leave `out` alone.
const UNTOUCHED: PfePrediction = PfePrediction {
    class_index: 777,
    probability: -1.0,
    logit: -1.0,
};

#[test]
fn version_and_defaults() {
    let v = unsafe { CStr::from_ptr(pfe_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        pfe_options_default(),
        PfeOptions {
            threads: 1,
            input_size: 224
        }
    );
    let name = unsafe { CStr::from_ptr(pfe_status_name(PfeStatus::BufferTooSmall as u32)) };
    assert_eq!(name.to_str().unwrap(), "PFE_STATUS_BUFFER_TOO_SMALL");
}

#[test]
fn null_pointers_are_named() {
    let mut e: *mut PfeEngine = std::ptr::dangling_mut::<PfeEngine>();
    let s = unsafe { pfe_engine_new_from_path(ptr::null(), ptr::null(), &mut e) };
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_new_from_path: path is NULL"],
    );
    assert!(e.is_null(), "the out-pointer is reset first");
    let path = CString::new("model.onnx").unwrap();
    let s = unsafe { pfe_engine_new_from_path(path.as_ptr(), ptr::null(), ptr::null_mut()) };
    expect_error(s, PfeStatus::NullParameter, &["out is NULL"]);
    let s = unsafe { pfe_engine_new_from_memory(ptr::null(), 10, ptr::null(), &mut e) };
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_new_from_memory: data is NULL"],
    );

    let engine = engine();
    let pixels = frame(8, 8, 1);
    let mut out = [UNTOUCHED; 5];
    let mut written = 99usize;
    let classify = |engine, pixels: *const u8, out: *mut PfePrediction, written| unsafe {
        pfe_engine_classify_rgb8(engine, pixels, 192, 8, 8, 24, out, 5, written)
    };
    let s = classify(ptr::null(), pixels.as_ptr(), out.as_mut_ptr(), &mut written);
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_classify_rgb8: engine is NULL"],
    );
    assert_eq!(written, 0, "written is reset first");
    let s = classify(engine, ptr::null(), out.as_mut_ptr(), &mut written);
    expect_error(s, PfeStatus::NullParameter, &["pixels is NULL"]);
    let s = classify(engine, pixels.as_ptr(), ptr::null_mut(), &mut written);
    expect_error(s, PfeStatus::NullParameter, &["out is NULL"]);
    let s = classify(engine, pixels.as_ptr(), out.as_mut_ptr(), ptr::null_mut());
    expect_error(s, PfeStatus::NullParameter, &["written is NULL"]);
    assert_eq!(out, [UNTOUCHED; 5]);

    let mut n = 5usize;
    let s = unsafe { pfe_engine_num_classes(ptr::null(), &mut n) };
    expect_error(s, PfeStatus::NullParameter, &["engine is NULL"]);
    assert_eq!(n, 0);
    let s = unsafe { pfe_engine_input_shape(engine, ptr::null_mut(), 4) };
    expect_error(s, PfeStatus::NullParameter, &["shape is NULL"]);
    let label = unsafe { pfe_engine_label(ptr::null(), 0) };
    assert!(label.is_null());
    expect_error(
        PfeStatus::NullParameter,
        PfeStatus::NullParameter,
        &["pfe_engine_label: engine is NULL"],
    );
    let mut logits = [0f32; 1000];
    let s = unsafe {
        pfe_engine_run_f32(
            engine,
            ptr::null(),
            12288,
            logits.as_mut_ptr(),
            1000,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_run_f32: input is NULL"],
    );
    let planes = [0u8; 64 * 64];
    let s = unsafe {
        pfe_engine_classify_i420(
            engine,
            planes.as_ptr(),
            4096,
            64,
            ptr::null(),
            1024,
            32,
            planes.as_ptr(),
            1024,
            32,
            64,
            64,
            0,
            out.as_mut_ptr(),
            5,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_classify_i420: u is NULL"],
    );
    let s = unsafe {
        pfe_engine_classify_nv12(
            engine,
            planes.as_ptr(),
            4096,
            64,
            ptr::null(),
            2048,
            64,
            64,
            64,
            0,
            out.as_mut_ptr(),
            5,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::NullParameter,
        &["pfe_engine_classify_nv12: uv is NULL"],
    );
    // Freeing NULL does nothing, and leaves the last error alone.
    unsafe { pfe_engine_free(ptr::null_mut()) };
    assert!(last_error().contains("uv is NULL"));
}

#[test]
fn bad_models_and_files() {
    let mut e = ptr::null_mut();
    let garbage = b"\x89PNG\r\n\x1a\n not a model";
    let s =
        unsafe { pfe_engine_new_from_memory(garbage.as_ptr(), garbage.len(), ptr::null(), &mut e) };
    expect_error(
        s,
        PfeStatus::ModelError,
        &["pfe_engine_new_from_memory: loading model"],
    );
    assert!(e.is_null());
    let s = unsafe { pfe_engine_new_from_memory(garbage.as_ptr(), 0, ptr::null(), &mut e) };
    expect_error(s, PfeStatus::InvalidArgument, &["len is 0"]);

    let dir = tempfile::tempdir().unwrap();
    let c_path = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let missing = c_path(&dir.path().join("missing.onnx"));
    let s = unsafe { pfe_engine_new_from_path(missing.as_ptr(), ptr::null(), &mut e) };
    expect_error(s, PfeStatus::IoError, &["missing.onnx", "No such file"]);
    let directory = c_path(dir.path());
    let s = unsafe { pfe_engine_new_from_path(directory.as_ptr(), ptr::null(), &mut e) };
    expect_error(s, PfeStatus::IoError, &["is not a file"]);

    let bytes = model_bytes();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let truncated = c_path(&truncated);
    let opts = options();
    let s = unsafe { pfe_engine_new_from_path(truncated.as_ptr(), &opts, &mut e) };
    expect_error(s, PfeStatus::ModelError, &["truncated.onnx"]);
    assert!(e.is_null());

    let good = dir.path().join("good.onnx");
    std::fs::write(&good, bytes).unwrap();
    let good = c_path(&good);
    let s = unsafe { pfe_engine_new_from_path(good.as_ptr(), &opts, &mut e) };
    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
    assert!(!e.is_null());
    assert_eq!(last_error(), "", "success clears the last error");
    unsafe { pfe_engine_free(e) };
}

#[test]
fn bad_options_are_invalid_arguments_and_match_the_engine() {
    let bytes = model_bytes();
    let mut e = ptr::null_mut();
    let load = |threads, input_size, e: &mut *mut PfeEngine| {
        let opts = PfeOptions {
            threads,
            input_size,
        };
        unsafe { pfe_engine_new_from_memory(bytes.as_ptr(), bytes.len(), &opts, e) }
    };
    expect_error(
        load(0, 64, &mut e),
        PfeStatus::InvalidArgument,
        &["opts->threads is 0"],
    );
    for size in [31, 4097, 0] {
        expect_error(
            load(1, size, &mut e),
            PfeStatus::InvalidArgument,
            &[&format!("opts->input_size {size} is outside 32..=4096")],
        );
        // The C ABI checks options up front; the engine agrees on the range.
        let options = Options {
            threads: 1,
            input_size: size as usize,
            ..Options::default()
        };
        assert!(Engine::from_bytes(bytes, options).is_err());
    }
    assert_eq!(load(2, 32, &mut e), PfeStatus::Ok, "{}", last_error());
    let mut shape = [0usize; 4];
    assert_eq!(
        unsafe { pfe_engine_input_shape(e, shape.as_mut_ptr(), 4) },
        PfeStatus::Ok
    );
    assert_eq!(shape, [1, 3, 32, 32]);
    unsafe { pfe_engine_free(e) };
}

#[test]
fn queries_and_labels() {
    let engine = engine();
    let mut shape = [9usize; 5];
    let s = unsafe { pfe_engine_input_shape(engine, shape.as_mut_ptr(), 3) };
    expect_error(
        s,
        PfeStatus::BufferTooSmall,
        &["shape holds 3 values, the input shape has 4"],
    );
    assert_eq!(shape, [9; 5]);
    let s = unsafe { pfe_engine_input_shape(engine, shape.as_mut_ptr(), 5) };
    assert_eq!(s, PfeStatus::Ok);
    assert_eq!(shape, [1, 3, 64, 64, 9]);
    let mut n = 0usize;
    assert_eq!(
        unsafe { pfe_engine_num_classes(engine, &mut n) },
        PfeStatus::Ok
    );
    assert_eq!(n, 1000);

    let label = |i| unsafe { pfe_engine_label(engine, i) };
    assert_eq!(
        unsafe { CStr::from_ptr(label(0)) }.to_str().unwrap(),
        "tench"
    );
    assert_eq!(
        unsafe { CStr::from_ptr(label(999)) }.to_str().unwrap(),
        "toilet tissue"
    );
    assert_eq!(label(0), label(0), "labels are kept by the engine");
    assert!(label(1000).is_null());
    expect_error(
        PfeStatus::InvalidArgument,
        PfeStatus::InvalidArgument,
        &["class_index 1000 is out of range: the model has 1000 classes"],
    );

    // Copy variant: size query, too small, exact.
    let mut needed = 0usize;
    let s = unsafe { pfe_engine_label_copy(engine, 0, ptr::null_mut(), 0, &mut needed) };
    expect_error(
        s,
        PfeStatus::BufferTooSmall,
        &["buf holds 0 bytes, the text needs 6"],
    );
    assert_eq!(needed, 6);
    let mut buf = [b'x' as c_char; 6];
    let s = unsafe { pfe_engine_label_copy(engine, 0, buf.as_mut_ptr(), 5, &mut needed) };
    assert_eq!(s, PfeStatus::BufferTooSmall);
    assert_eq!(buf, [b'x' as c_char; 6], "a too-small buffer is left alone");
    let s = unsafe { pfe_engine_label_copy(engine, 0, buf.as_mut_ptr(), 6, ptr::null_mut()) };
    assert_eq!(s, PfeStatus::Ok);
    assert_eq!(
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(),
        "tench"
    );
    let s = unsafe { pfe_engine_label_copy(engine, 5000, buf.as_mut_ptr(), 6, &mut needed) };
    expect_error(s, PfeStatus::InvalidArgument, &["class_index 5000"]);
    assert_eq!(needed, 0);
}

#[test]
fn rgb8_classification_equals_the_rust_api() {
    let engine = engine();
    let (w, h) = (97usize, 71usize);
    let packed = frame(w, h, 5);
    // Padded rows, as camera buffers come.
    let stride = 3 * w + 5;
    let mut padded = vec![0xAB; stride * (h - 1) + 3 * w];
    for y in 0..h {
        padded[y * stride..][..3 * w].copy_from_slice(&packed[y * 3 * w..][..3 * w]);
    }
    let want = rust_engine()
        .classify(&RgbImage::new(&packed, w, h, 3 * w).unwrap(), 5)
        .unwrap();
    let mut out = [UNTOUCHED; 5];
    let mut written = 0;
    let s = unsafe {
        pfe_engine_classify_rgb8(
            engine,
            padded.as_ptr(),
            padded.len(),
            w as u32,
            h as u32,
            stride,
            out.as_mut_ptr(),
            out.len(),
            &mut written,
        )
    };
    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
    assert_eq!(written, 5);
    for (got, want) in out.iter().zip(&want) {
        assert_eq!(got.class_index as usize, want.class_index);
        assert_eq!(got.probability, want.probability);
        assert_eq!(got.logit, want.logit);
    }
    assert!(out[0].probability >= out[4].probability);
}

#[test]
fn bad_frames_are_invalid_arguments_and_leave_outputs_alone() {
    let engine = engine();
    let pixels = frame(10, 4, 1);
    let mut out = [UNTOUCHED; 3];
    let mut written = 7usize;
    let mut classify = |len, w, h, stride, out_len| unsafe {
        pfe_engine_classify_rgb8(
            engine,
            pixels.as_ptr(),
            len,
            w,
            h,
            stride,
            out.as_mut_ptr(),
            out_len,
            &mut written,
        )
    };
    let s = classify(120, 10, 5, 30, 3);
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["buffer has 120 bytes, needs 150"],
    );
    let s = classify(119, 10, 4, 30, 3);
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["buffer has 119 bytes, needs 120"],
    );
    let s = classify(120, 10, 4, 29, 3);
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["stride 29 bytes is less than a row"],
    );
    let s = classify(120, 0, 4, 30, 3);
    expect_error(s, PfeStatus::InvalidArgument, &["empty size 0×4"]);
    let s = classify(120, 10, 4, 30, 0);
    expect_error(s, PfeStatus::InvalidArgument, &["out_len is 0"]);
    let s = classify(usize::MAX, 10, 4, 30, 3);
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["pixels: length", "larger than any buffer"],
    );
    // 1000×1 is too wide to resize to the network's square input.
    let wide = vec![0u8; 3000];
    let s = unsafe {
        pfe_engine_classify_rgb8(
            engine,
            wide.as_ptr(),
            3000,
            1000,
            1,
            3000,
            out.as_mut_ptr(),
            3,
            &mut written,
        )
    };
    expect_error(s, PfeStatus::InvalidArgument, &["aspect ratio too extreme"]);
    assert_eq!(written, 0);
    assert_eq!(out, [UNTOUCHED; 3]);
    // More room than classes: written tells how many.
    let mut many = vec![UNTOUCHED; 1200];
    let s = unsafe {
        pfe_engine_classify_rgb8(
            engine,
            pixels.as_ptr(),
            120,
            10,
            4,
            30,
            many.as_mut_ptr(),
            1200,
            &mut written,
        )
    };
    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
    assert_eq!(written, 1000);
    assert_eq!(many[1000], UNTOUCHED);
    let total: f32 = many[..1000].iter().map(|p| p.probability).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
}

/// BT.601 limited-range RGB → YCbCr, integer (as examples/c/classify.c does).
fn rgb_to_yuv(r: i32, g: i32, b: i32) -> [u8; 3] {
    let y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    [y as u8, u as u8, v as u8]
}

/// The same `w`×`h` frame as YUYV, I420 and NV12 (4:2:0 chroma, repeated on both rows of
/// a block in YUYV), packed.
struct YuvFrames {
    yuyv: Vec<u8>,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
    uv: Vec<u8>,
}

fn yuv_frames(rgb: &[u8], w: usize, h: usize) -> YuvFrames {
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let px = |x: usize, y: usize| {
        let p = &rgb[3 * (y.min(h - 1) * w + x.min(w - 1))..];
        rgb_to_yuv(p[0] as i32, p[1] as i32, p[2] as i32)
    };
    let mut f = YuvFrames {
        yuyv: vec![0; 4 * cw * h],
        y: vec![0; w * h],
        u: vec![0; cw * ch],
        v: vec![0; cw * ch],
        uv: vec![0; 2 * cw * ch],
    };
    for y in 0..h {
        for x in 0..w {
            f.y[y * w + x] = px(x, y)[0];
            f.yuyv[y * 4 * cw + 2 * x] = px(x, y)[0];
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            let [_, u, v] = px(2 * cx, 2 * cy);
            f.u[cy * cw + cx] = u;
            f.v[cy * cw + cx] = v;
            f.uv[cy * 2 * cw + 2 * cx] = u;
            f.uv[cy * 2 * cw + 2 * cx + 1] = v;
            for y in [2 * cy, 2 * cy + 1].into_iter().filter(|&y| y < h) {
                f.yuyv[y * 4 * cw + 4 * cx + 1] = u;
                f.yuyv[y * 4 * cw + 4 * cx + 3] = v;
            }
        }
    }
    f
}

#[test]
fn yuv_formats_agree_with_each_other_and_the_rust_api() {
    let engine = engine();
    let (w, h) = (81usize, 67usize); // odd: partial macropixels and chroma blocks
    let f = yuv_frames(&frame(w, h, 9), w, h);
    let cw = w.div_ceil(2);
    for (range, code) in [
        (ColorRange::Limited, PfeColorRange::Limited as u32),
        (ColorRange::Full, PfeColorRange::Full as u32),
    ] {
        let rgb = Yuyv::new(&f.yuyv, w, h, 4 * cw)
            .unwrap()
            .to_rgb8(range)
            .unwrap();
        let want = rust_engine()
            .classify(&RgbImage::new(&rgb, w, h, 3 * w).unwrap(), 3)
            .unwrap();
        let mut results = Vec::new();
        let (mut out, mut written) = ([UNTOUCHED; 3], 0usize);
        let s = unsafe {
            pfe_engine_classify_yuyv(
                engine,
                f.yuyv.as_ptr(),
                f.yuyv.len(),
                w as u32,
                h as u32,
                4 * cw,
                code,
                out.as_mut_ptr(),
                3,
                &mut written,
            )
        };
        assert_eq!(s, PfeStatus::Ok, "{}", last_error());
        results.push(("yuyv", out, written));
        let s = unsafe {
            pfe_engine_classify_i420(
                engine,
                f.y.as_ptr(),
                f.y.len(),
                w,
                f.u.as_ptr(),
                f.u.len(),
                cw,
                f.v.as_ptr(),
                f.v.len(),
                cw,
                w as u32,
                h as u32,
                code,
                out.as_mut_ptr(),
                3,
                &mut written,
            )
        };
        assert_eq!(s, PfeStatus::Ok, "{}", last_error());
        results.push(("i420", out, written));
        let s = unsafe {
            pfe_engine_classify_nv12(
                engine,
                f.y.as_ptr(),
                f.y.len(),
                w,
                f.uv.as_ptr(),
                f.uv.len(),
                2 * cw,
                w as u32,
                h as u32,
                code,
                out.as_mut_ptr(),
                3,
                &mut written,
            )
        };
        assert_eq!(s, PfeStatus::Ok, "{}", last_error());
        results.push(("nv12", out, written));
        for (format, out, written) in results {
            assert_eq!(written, 3);
            for (got, want) in out.iter().zip(&want) {
                assert_eq!(
                    got.class_index as usize, want.class_index,
                    "{format} {range:?}"
                );
                assert_eq!(got.probability, want.probability, "{format} {range:?}");
            }
        }
    }
}

#[test]
fn bad_yuv_frames_name_the_plane() {
    let engine = engine();
    let (mut out, mut written) = ([UNTOUCHED; 2], 0usize);
    let buf = vec![128u8; 64 * 64 * 2];
    // 5×3 YUYV needs 3 macropixels (12 bytes) a row.
    let s = unsafe {
        pfe_engine_classify_yuyv(
            engine,
            buf.as_ptr(),
            100,
            5,
            3,
            10,
            0,
            out.as_mut_ptr(),
            2,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["YUYV frame 5×3: stride 10 bytes is less than a row (12 bytes)"],
    );
    let s = unsafe {
        pfe_engine_classify_yuyv(
            engine,
            buf.as_ptr(),
            100,
            64,
            64,
            128,
            2,
            out.as_mut_ptr(),
            2,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["range 2 is not a PfeColorRange"],
    );
    let s = unsafe {
        pfe_engine_classify_i420(
            engine,
            buf.as_ptr(),
            4096,
            64,
            buf.as_ptr(),
            1024,
            32,
            buf.as_ptr(),
            1023,
            32,
            64,
            64,
            0,
            out.as_mut_ptr(),
            2,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["I420 frame 64×64: V plane: buffer has 1023 bytes"],
    );
    let s = unsafe {
        pfe_engine_classify_nv12(
            engine,
            buf.as_ptr(),
            4096,
            64,
            buf.as_ptr(),
            2048,
            63,
            64,
            64,
            1,
            out.as_mut_ptr(),
            2,
            &mut written,
        )
    };
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["NV12 frame 64×64: UV plane: stride 63 bytes"],
    );
    assert_eq!(out, [UNTOUCHED; 2]);
    // A grey frame works.
    let s = unsafe {
        pfe_engine_classify_nv12(
            engine,
            buf.as_ptr(),
            4096,
            64,
            buf.as_ptr(),
            2048,
            64,
            64,
            64,
            1,
            out.as_mut_ptr(),
            2,
            &mut written,
        )
    };
    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
    assert_eq!(written, 2);
}

#[test]
fn run_f32_checks_sizes_and_equals_the_rust_api() {
    let engine = engine();
    let n = 3 * 64 * 64;
    let input: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 30.0).collect();
    let mut output = vec![f32::NAN; 1001];
    let mut written = 5usize;
    let run = |input: *const f32, input_len, output: *mut f32, output_len, written| unsafe {
        pfe_engine_run_f32(engine, input, input_len, output, output_len, written)
    };
    let s = run(
        input.as_ptr(),
        n - 1,
        output.as_mut_ptr(),
        1001,
        &mut written,
    );
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["input_len is 12287; the input shape [1, 3, 64, 64] holds 12288 values"],
    );
    assert_eq!(written, 0);
    let s = run(input.as_ptr(), n, output.as_mut_ptr(), 999, &mut written);
    expect_error(
        s,
        PfeStatus::BufferTooSmall,
        &["output holds 999 floats, the model gives 1000 logits"],
    );
    assert!(output.iter().all(|v| v.is_nan()));
    // A float buffer must be aligned for floats.
    let bytes = vec![0u8; 4 * n + 4];
    let misaligned = bytes
        .as_ptr()
        .wrapping_add(if (bytes.as_ptr() as usize).is_multiple_of(4) {
            1
        } else {
            0
        });
    let s = run(
        misaligned.cast(),
        n,
        output.as_mut_ptr(),
        1001,
        &mut written,
    );
    expect_error(
        s,
        PfeStatus::InvalidArgument,
        &["input is not aligned to 4 bytes"],
    );

    let s = run(input.as_ptr(), n, output.as_mut_ptr(), 1001, &mut written);
    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
    assert_eq!(written, 1000);
    assert!(output[1000].is_nan());
    let array = tract_core::ndarray::Array4::from_shape_vec([1, 3, 64, 64], input).unwrap();
    let want = rust_engine().run_array(array).unwrap();
    assert_eq!(&output[..1000], &want[..]);
}

#[test]
fn last_error_copy_and_per_thread_messages() {
    let mut e = ptr::null_mut();
    let s = unsafe { pfe_engine_new_from_memory(b"x".as_ptr(), 1, ptr::null(), &mut e) };
    assert_eq!(s, PfeStatus::ModelError);
    let message = last_error();
    assert!(
        message.starts_with("pfe_engine_new_from_memory: "),
        "{message}"
    );

    let mut needed = 0usize;
    let s = unsafe { pfe_last_error_copy(ptr::null_mut(), 0, &mut needed) };
    assert_eq!(s, PfeStatus::BufferTooSmall);
    assert_eq!(needed, message.len() + 1);
    let mut small = vec![0 as c_char; needed - 1];
    let s = unsafe { pfe_last_error_copy(small.as_mut_ptr(), small.len(), &mut needed) };
    assert_eq!(s, PfeStatus::BufferTooSmall);
    assert!(small.iter().all(|&c| c == 0));
    let s = unsafe { pfe_last_error_copy(ptr::null_mut(), 10_000, &mut needed) };
    assert_eq!(s, PfeStatus::NullParameter);
    let mut buf = vec![0 as c_char; needed];
    let s = unsafe { pfe_last_error_copy(buf.as_mut_ptr(), buf.len(), ptr::null_mut()) };
    assert_eq!(s, PfeStatus::Ok);
    assert_eq!(
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(),
        message
    );
    // The getters leave the message alone, whatever they return.
    assert_eq!(last_error(), message);

    // Another thread has its own (empty) message, and its failures stay its own.
    let other = std::thread::spawn(|| {
        let before = last_error();
        let mut n = 0usize;
        let s = unsafe { pfe_engine_num_classes(ptr::null(), &mut n) };
        assert_eq!(s, PfeStatus::NullParameter);
        (before, last_error())
    })
    .join()
    .unwrap();
    assert_eq!(other.0, "");
    assert!(other.1.contains("pfe_engine_num_classes: engine is NULL"));
    assert_eq!(last_error(), message);

    // A successful call clears it.
    let mut n = 0usize;
    assert_eq!(
        unsafe { pfe_engine_num_classes(engine(), &mut n) },
        PfeStatus::Ok
    );
    assert_eq!(last_error(), "");
    let s = unsafe { pfe_last_error_copy(buf.as_mut_ptr(), buf.len(), &mut needed) };
    assert_eq!(s, PfeStatus::Ok);
    assert_eq!(needed, 1);
}

#[test]
fn one_engine_serves_several_threads() {
    let engine = Shared(engine() as *mut PfeEngine);
    let (w, h) = (120usize, 90usize);
    let want = rust_engine()
        .classify(&RgbImage::new(&frame(w, h, 4), w, h, 3 * w).unwrap(), 3)
        .unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let engine = &engine;
            let want = &want;
            scope.spawn(move || {
                let pixels = frame(w, h, 4);
                let yuv = yuv_frames(&pixels, w, h);
                for i in 0..3 {
                    let (mut out, mut written) = ([UNTOUCHED; 3], 0usize);
                    let s = if (t + i) % 2 == 0 {
                        unsafe {
                            pfe_engine_classify_rgb8(
                                engine.0,
                                pixels.as_ptr(),
                                pixels.len(),
                                w as u32,
                                h as u32,
                                3 * w,
                                out.as_mut_ptr(),
                                3,
                                &mut written,
                            )
                        }
                    } else {
                        unsafe {
                            pfe_engine_classify_nv12(
                                engine.0,
                                yuv.y.as_ptr(),
                                yuv.y.len(),
                                w,
                                yuv.uv.as_ptr(),
                                yuv.uv.len(),
                                w,
                                w as u32,
                                h as u32,
                                0,
                                out.as_mut_ptr(),
                                3,
                                &mut written,
                            )
                        }
                    };
                    assert_eq!(s, PfeStatus::Ok, "{}", last_error());
                    if (t + i) % 2 == 0 {
                        let got: Vec<_> = out.iter().map(|p| p.class_index as usize).collect();
                        let want: Vec<_> = want.iter().map(|p| p.class_index).collect();
                        assert_eq!(got, want);
                    }
                }
            });
        }
    });
}

#[test]
fn panics_never_cross_the_boundary() {
    // No pfe_* function is known to panic; the boundary they all run in is tested with
    // one that does.
    let status = status_boundary("pfe_engine_classify_rgb8", ErrorMode::Record, || {
        let v: Vec<u8> = Vec::new();
        let _ = v[3];
        Ok(())
    });
    assert_eq!(status, PfeStatus::Panic);
    let message = last_error();
    assert!(
        message
            .starts_with("pfe_engine_classify_rgb8: internal error (panic): index out of bounds"),
        "{message}"
    );
}
