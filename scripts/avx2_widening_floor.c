/* Cycles per 4-channel group of the exact AVX2 int8 kernel's inner loop, on this CPU.
 *
 * pfe's widening kernel (src/kernels/qgemm.rs, `tile_256`) multiplies u8 activations by
 * full-range i8 weights exactly: per group of 4 channels × 8 tokens and 4 weight rows (128
 * products) one 32-byte load, two `vpunpck[lh]bw`, four 8-byte weight broadcasts, eight
 * `vpmaddwd` and eight `vpaddd`. This times that instruction mix in a loop, register to
 * register (everything in L1), and three variants: weights loaded whole instead of
 * broadcast, activations already widened (no unpacks), and both. The last is the floor of
 * any `vpmaddwd` kernel: eight multiplies and eight adds per 128 products.
 *
 *     cc -O2 -mavx2 scripts/avx2_widening_floor.c -o /tmp/floor && /tmp/floor [GHz]
 *
 * GHz (default: measured with a chain of dependent adds) turns nanoseconds into cycles.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static char buf[4096] __attribute__((aligned(64)));

#define CL "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
           "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory"
/* One weight row: its 4 weights in ymm15 (loaded by W), times both activation halves
 * (ymm12, ymm14), added to accumulators a and b. */
#define ROW(W, a, b)                                                            \
  W "vpmaddwd %%ymm12, %%ymm15, %%ymm13\n vpaddd %%ymm13, %%ymm" #a ", %%ymm" #a \
    "\n vpmaddwd %%ymm14, %%ymm15, %%ymm13\n vpaddd %%ymm13, %%ymm" #b ", %%ymm" #b "\n"
#define BROADCAST(off) "vpbroadcastq " #off "(%0), %%ymm15\n"
#define WHOLE(off) "vmovdqu " #off "(%0), %%ymm15\n"
#define BYTES                                                        \
  "vmovdqu 512(%0), %%ymm11\n vpunpcklbw %%ymm10, %%ymm11, %%ymm12\n" \
  " vpunpckhbw %%ymm10, %%ymm11, %%ymm14\n"
#define WIDE "vmovdqu 512(%0), %%ymm12\n vmovdqu 544(%0), %%ymm14\n"
/* Two groups per iteration. */
#define KERNEL(name, ACT, W)                                                       \
  static void name(long n) {                                                       \
    for (long i = 0; i < n; i++)                                                   \
      __asm__ volatile(ACT ROW(W(0), 0, 1) ROW(W(32), 2, 3) ROW(W(64), 4, 5)       \
                           ROW(W(96), 6, 7) ACT ROW(W(128), 0, 1) ROW(W(160), 2, 3) \
                               ROW(W(192), 4, 5) ROW(W(224), 6, 7)                 \
                       :                                                           \
                       : "r"(buf)                                                  \
                       : CL);                                                      \
  }
KERNEL(as_pfe, BYTES, BROADCAST)
KERNEL(whole_weights, BYTES, WHOLE)
KERNEL(wide_activations, WIDE, BROADCAST)
KERNEL(floor_mix, WIDE, WHOLE)

static void dependent_adds(long n) {
  for (long i = 0; i < n; i++)
    __asm__ volatile(
        "vpaddd %%ymm1, %%ymm0, %%ymm0\n vpaddd %%ymm1, %%ymm0, %%ymm0\n"
        "vpaddd %%ymm1, %%ymm0, %%ymm0\n vpaddd %%ymm1, %%ymm0, %%ymm0\n" ::: "xmm0", "xmm1");
}

int main(int argc, char **argv) {
  const long n = 20000000;
  double t = now();
  dependent_adds(n);
  double ns_per_cycle = (now() - t) * 1e9 / (n * 4.0);
  if (argc > 1) ns_per_cycle = 1.0 / atof(argv[1]);
  printf("clock %.2f GHz%s\n", 1.0 / ns_per_cycle, argc > 1 ? " (given)" : " (dependent vpaddd)");
  struct {
    const char *name;
    void (*f)(long);
  } k[] = {{"pfe's loop (bytes, broadcast weights)", as_pfe},
           {"weights loaded whole", whole_weights},
           {"activations already 16-bit", wide_activations},
           {"both (vpmaddwd + vpaddd only)", floor_mix}};
  for (int r = 0; r < 3; r++)
    for (unsigned i = 0; i < sizeof k / sizeof k[0]; i++) {
      t = now();
      k[i].f(n);
      double cycles = (now() - t) * 1e9 / (n * 2.0) / ns_per_cycle;
      printf("%-40s %.2f cycles per group, %.1f products per cycle\n", k[i].name, cycles,
             128 / cycles);
    }
  return 0;
}
