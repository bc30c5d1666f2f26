//! Integer matrix product `acc = W · B` of the int8 channel MLP: i8 weights (the
//! broadcast operand, packed once) times u8 activations, accumulated in i32.
//!
//! Activations are `K × cols` (channels × tokens). They are stored in the **k4
//! layout**: for each group of 4 consecutive channels and each token, the 4 bytes
//! side by side (`b[((k/4)·cols + n)·4 + k%4]`), the operand order of x86's VNNI
//! `vpdpbusd` and ARM's `sdot`/`udot`, which multiply-add 4 byte pairs into one i32
//! lane. Producers (the quantizing epilogues) write this layout directly, so there
//! is no separate packing pass. `K` is padded to a multiple of 4; the padding bytes
//! may hold anything, because the padded weights are zero.
//!
//! Raw u8 values are multiplied: the activation zero point `z` is the caller's, via
//! `Σ_k w·(b − z) = acc − z·row_sum`.
//!
//! Every kernel is exact: the result is the i32 sum, with no intermediate saturation.
//! x86's `vpmaddubsw` adds pairs of u8·i8 products into a saturating i16, so it runs
//! only weights whose pairs of adjacent channels have `|w₀| + |w₁| ≤ 128`
//! ([`PackedI8::pairs_fit_i16`]), where no sum can saturate, and adds two such i16
//! sums before widening them only where the quads they cover have `Σ|w| ≤ 128`
//! ([`PackedI8::quads_fit_i16`]; `pfe quantize` writes such weights). [`QKernel`]
//! lists the kernels; [`gemm_u8i8`] picks one from the [`Isa`] level and the weights:
//!
//! | kernel        | runs for                                   | instructions                |
//! |---------------|--------------------------------------------|-----------------------------|
//! | `Avx512Vnni`  | `Isa::Avx512` on a CPU with AVX512-VNNI    | `vpdpbusd` zmm              |
//! | `Avx2MaddubsQuads` | as `Avx2`, weights whose quads fit an i16 | 2 `vpmaddubsw` + `vpaddw` + `vpmaddwd` |
//! | `Avx2Maddubs` | as `Avx2`, weights whose pairs fit an i16  | `vpmaddubsw` + `vpmaddwd`   |
//! | `Avx2`        | `Isa::Avx2`, and `Isa::Avx512` without VNNI | `vpmaddwd` on widened bytes |
//! | `NeonDot`     | aarch64 with the dot product (A76, Pi 5)    | `sdot` on `b ^ 0x80`        |
//! | `Neon`        | aarch64 without it (A72, A53)               | `smull` + `sadalp`          |
//! | `Portable`    | everything else (armv7: auto-vectorized)    | plain Rust                  |
//!
//! [`gemm_q16_planes`] multiplies the same weights by a 16-bit input held as two byte
//! planes in the k4 layout (the 16-bit patch convolution's input on AVX2, see
//! [`super::split16`]), with the `Avx2` kernel's tiles.

use std::ops::Range;

use anyhow::{ensure, Result};

use super::Isa;

/// Row-major i8 weights `[m, kp]`, `kp = k` rounded up to a multiple of 4 with zero
/// columns, and each row's sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedI8 {
    m: usize,
    k: usize,
    kp: usize,
    data: Vec<i8>,
    row_sums: Vec<i32>,
    /// Every pair of weights `w[r, 2j], w[r, 2j + 1]` has `|w₀| + |w₁| ≤ 128`, so
    /// `255·(|w₀| + |w₁|)` fits an i16: `vpmaddubsw` is exact on any u8 activations.
    pairs_fit_i16: bool,
    /// Besides, in every octet of a row (channels `8j..8j + 8`), the quads
    /// `{0, 1, 4, 5}` and `{2, 3, 6, 7}` have `Σ|w| ≤ 128`: two `vpmaddubsw` pair sums
    /// of adjacent channel groups then add into an i16 without overflow.
    quads_fit_i16: bool,
}

impl PackedI8 {
    /// Packs row-major `[m, k]` weights.
    pub fn new(m: usize, k: usize, w: &[i8]) -> Result<PackedI8> {
        ensure!(m > 0 && k > 0, "empty weight matrix ({m}×{k})");
        ensure!(w.len() == m * k, "weights: {} values for {m}×{k}", w.len());
        let kp = k.div_ceil(4) * 4;
        // ROW_SLACK zero bytes after the last row: a kernel reading 32 bytes of a row at
        // a time may run past a row's end (into the next row, or this slack), where its
        // activations are zero.
        let mut data = vec![0i8; m * kp + ROW_SLACK];
        for (dst, src) in data.chunks_exact_mut(kp).zip(w.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let row_sums = w
            .chunks_exact(k)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        // A max without early exit: it vectorizes (this runs over every weight at load).
        let largest_pair = data
            .chunks_exact(2)
            .map(|p| (p[0] as i16).abs() + (p[1] as i16).abs())
            .max()
            .unwrap_or(0);
        let pairs_fit_i16 = largest_pair as i32 <= PAIR_BOUND;
        let quads_fit_i16 = pairs_fit_i16 && largest_quad(&data[..m * kp], kp) <= PAIR_BOUND;
        Ok(PackedI8 {
            m,
            k,
            kp,
            data,
            row_sums,
            pairs_fit_i16,
            quads_fit_i16,
        })
    }

    /// Whether each pair of adjacent weights of a row (channels `2j`, `2j + 1`) has
    /// `|w₀| + |w₁| ≤ 128`: then `255·|w₀| + 255·|w₁| ≤ 32 640` and a u8·i8 pair sum
    /// fits an i16, so [`QKernel::Avx2Maddubs`] runs these weights exactly.
    pub fn pairs_fit_i16(&self) -> bool {
        self.pairs_fit_i16
    }

    /// Whether, besides [`PackedI8::pairs_fit_i16`], every octet of a row (channels
    /// `8j..8j + 8`) has `Σ|w| ≤ 128` over channels `{0, 1, 4, 5}` and over
    /// `{2, 3, 6, 7}`: the pairs `vpmaddubsw` makes of two adjacent 4-channel groups
    /// then add into an i16 (`255·128 ≤ i16::MAX`), so [`QKernel::Avx2MaddubsQuads`]
    /// runs these weights exactly with one `vpmaddwd` per two groups.
    pub fn quads_fit_i16(&self) -> bool {
        self.quads_fit_i16
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    /// `depth` rounded up to a multiple of 4: rows of a k4 activation buffer.
    pub fn padded_depth(&self) -> usize {
        self.kp
    }

    /// The largest `Σ_k |w[r, k]|` of a row (computed on each call): an output of
    /// [`gemm_q16_planes`] fits an i32 for inputs up to `i32::MAX / max_row_l1` in
    /// magnitude.
    pub fn max_row_l1(&self) -> i64 {
        self.data
            .chunks_exact(self.kp)
            .map(|r| r.iter().map(|&v| (v as i64).abs()).sum())
            .max()
            .unwrap_or(0)
    }

    /// `Σ_k w[r, k]` for each row.
    pub fn row_sums(&self) -> &[i32] {
        &self.row_sums
    }

    /// Row `r`, padded to `padded_depth()` with zeros.
    pub fn row(&self, r: usize) -> &[i8] {
        &self.data[r * self.kp..(r + 1) * self.kp]
    }
}

/// Zero bytes after [`PackedI8`]'s last row.
const ROW_SLACK: usize = 32;

/// Largest `|w₀| + |w₁|` of a weight pair that `vpmaddubsw` multiplies exactly by any two
/// u8: `255 · 128 = 32 640 ≤ i16::MAX`.
pub const PAIR_BOUND: i32 = 128;

/// The largest `Σ|w|` over channels `{0, 1, 4, 5}` or `{2, 3, 6, 7}` of an octet
/// `8j..8j + 8` of a row of `data` (rows of `kp` bytes; a last group of 4 that starts no
/// octet is left out).
fn largest_quad(data: &[i8], kp: usize) -> i32 {
    // Fixed-size octets in i16 (a quad's sum is at most 512) and a max without early
    // exit, so that the compiler vectorizes it (this runs over every weight at load).
    let quads = |octets: &[[i8; 8]]| {
        octets.iter().fold(0i16, |m, o| {
            let a = |i: usize| (o[i] as i16).abs();
            m.max(a(0) + a(1) + a(4) + a(5))
                .max(a(2) + a(3) + a(6) + a(7))
        })
    };
    let largest = if kp.is_multiple_of(8) {
        // Rows of whole octets: the octets of all rows in one run (row by row, the
        // short loops take half as long again).
        quads(data.as_chunks::<8>().0)
    } else {
        data.chunks_exact(kp)
            .map(|row| quads(row.as_chunks::<8>().0))
            .max()
            .unwrap_or(0)
    };
    largest as i32
}

/// Position of activation `(k, n)` in a k4 buffer of `cols` tokens.
#[inline(always)]
pub fn k4_index(k: usize, n: usize, cols: usize) -> usize {
    ((k / 4) * cols + n) * 4 + k % 4
}

/// Bytes of a k4 buffer holding `depth` channels (any, rounded up to 4) of `cols` tokens.
pub fn k4_len(depth: usize, cols: usize) -> usize {
    depth.div_ceil(4) * 4 * cols
}

/// An implementation of [`gemm_u8i8`]. All give the same (exact) result; tests and
/// benchmarks call each one this CPU runs through [`gemm_u8i8_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QKernel {
    /// Plain Rust, vectorized by the compiler for the build's baseline target.
    Portable,
    /// x86-64 AVX2: bytes widened to i16, `vpmaddwd`, i32 accumulators.
    Avx2,
    /// x86-64 AVX2: `vpmaddubsw` on the bytes, for weights whose pairs fit an i16
    /// ([`PackedI8::pairs_fit_i16`]); other weights run [`QKernel::Avx2`].
    Avx2Maddubs,
    /// x86-64 AVX2: as [`QKernel::Avx2Maddubs`], with the `vpmaddubsw` pairs of two
    /// channel groups added in i16 before `vpmaddwd`, for weights whose quads fit an
    /// i16 ([`PackedI8::quads_fit_i16`]); three multiplies per 64 products instead of
    /// four. Other weights run [`QKernel::Avx2Maddubs`] or [`QKernel::Avx2`].
    Avx2MaddubsQuads,
    /// x86-64 AVX-512 VNNI: `vpdpbusd` on 16 tokens per register.
    Avx512Vnni,
    /// aarch64 NEON without the dot product: `smull`/`sadalp`.
    Neon,
    /// aarch64 NEON with the dot product (FEAT_DotProd): `sdot`.
    NeonDot,
}

impl QKernel {
    /// Every kernel this CPU runs, portable first.
    pub fn available() -> Vec<QKernel> {
        [
            QKernel::Portable,
            QKernel::Avx2,
            QKernel::Avx2Maddubs,
            QKernel::Avx2MaddubsQuads,
            QKernel::Avx512Vnni,
            QKernel::Neon,
            QKernel::NeonDot,
        ]
        .into_iter()
        .filter(|k| k.is_supported())
        .collect()
    }

    /// Whether this CPU runs `self`.
    pub fn is_supported(self) -> bool {
        match self {
            QKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            QKernel::Avx2 | QKernel::Avx2Maddubs | QKernel::Avx2MaddubsQuads => {
                Isa::Avx2.is_supported()
            }
            #[cfg(target_arch = "x86_64")]
            QKernel::Avx512Vnni => has_avx512_vnni(),
            #[cfg(target_arch = "aarch64")]
            QKernel::Neon => true,
            #[cfg(target_arch = "aarch64")]
            QKernel::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The kernel [`gemm_u8i8`] runs for `isa`: the fastest one at that level.
    /// `Isa::Avx2` always gets the plain AVX2 kernel (`PFE_ISA=avx2` runs it on any
    /// AVX2 CPU); VNNI needs `Isa::Avx512`. On aarch64 `Isa::Portable` is the NEON
    /// level, so it gets the NEON kernels.
    pub fn for_isa(isa: Isa) -> QKernel {
        let k = match isa {
            Isa::Avx512 if QKernel::Avx512Vnni.is_supported() => QKernel::Avx512Vnni,
            Isa::Avx512 | Isa::Avx2 => QKernel::Avx2,
            Isa::Portable if QKernel::NeonDot.is_supported() => QKernel::NeonDot,
            Isa::Portable if QKernel::Neon.is_supported() => QKernel::Neon,
            Isa::Portable => QKernel::Portable,
        };
        if k.is_supported() {
            k
        } else {
            QKernel::Portable
        }
    }

    /// The kernel [`gemm_u8i8`] runs for `isa` on the weights `w`: [`QKernel::for_isa`],
    /// except that AVX2 takes `vpmaddubsw` where `w`'s pairs allow it, and adds the
    /// pairs of two groups in i16 where its quads do.
    pub fn for_weights(isa: Isa, w: &PackedI8) -> QKernel {
        match QKernel::for_isa(isa) {
            QKernel::Avx2 if w.quads_fit_i16 => QKernel::Avx2MaddubsQuads,
            QKernel::Avx2 if w.pairs_fit_i16 => QKernel::Avx2Maddubs,
            k => k,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QKernel::Portable => "portable",
            QKernel::Avx2 => "avx2",
            QKernel::Avx2Maddubs => "avx2-maddubs",
            QKernel::Avx2MaddubsQuads => "avx2-maddubs-quads",
            QKernel::Avx512Vnni => "avx512vnni",
            QKernel::Neon => "neon",
            QKernel::NeonDot => "neon-dot",
        }
    }
}

/// AVX-512 F/BW with VNNI (`vpdpbusd` on zmm): Ice Lake, Sapphire Rapids, Zen 4 and later.
#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// `acc[(r − rows.start)·ldc + n] = Σ_k w[r, k]·b[k, n]` for `r` in `rows`, `n < cols`,
/// with `b` in the k4 layout of `cols` tokens.
///
/// Panics (a caller bug, not bad input) when a buffer is too short.
pub fn gemm_u8i8(
    isa: Isa,
    w: &PackedI8,
    rows: Range<usize>,
    b: &[u8],
    cols: usize,
    acc: &mut [i32],
    ldc: usize,
) {
    gemm_u8i8_with(QKernel::for_weights(isa, w), w, rows, b, cols, acc, ldc)
}

/// [`gemm_u8i8`] with a given kernel (the portable one where `kernel` is not supported).
pub fn gemm_u8i8_with(
    kernel: QKernel,
    w: &PackedI8,
    rows: Range<usize>,
    b: &[u8],
    cols: usize,
    acc: &mut [i32],
    ldc: usize,
) {
    assert!(
        rows.start <= rows.end && rows.end <= w.m,
        "rows out of range"
    );
    assert!(b.len() >= w.kp * cols, "k4 buffer too short");
    assert!(ldc >= cols, "ldc < cols");
    let nrows = rows.len();
    if nrows == 0 || cols == 0 {
        return;
    }
    assert!(
        acc.len() >= (nrows - 1) * ldc + cols,
        "accumulator too short"
    );
    // The `vpmaddubsw` kernels fall back, one bound at a time, on weights that exceed it.
    let kernel = match kernel {
        QKernel::Avx2MaddubsQuads if !w.quads_fit_i16 => QKernel::Avx2Maddubs,
        k => k,
    };
    let kernel = match kernel {
        QKernel::Avx2Maddubs if !w.pairs_fit_i16 => QKernel::Avx2,
        k => k,
    };
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked); the buffer lengths were
        // checked above, which is all the kernel's raw-pointer accesses rely on.
        QKernel::Avx512Vnni if kernel.is_supported() => unsafe {
            x86::gemm_avx512vnni(w, rows, b, cols, acc, ldc)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked); buffer lengths checked above.
        QKernel::Avx2 if kernel.is_supported() => unsafe {
            x86::gemm_avx2(w, rows, b, cols, acc, ldc)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked), the weights' pairs fit an i16 (checked
        // above); buffer lengths checked above.
        QKernel::Avx2Maddubs if kernel.is_supported() => unsafe {
            x86::gemm_maddubs::<false>(w, rows, b, cols, acc, ldc)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked), the weights' quads (and so their pairs)
        // fit an i16 (checked above); buffer lengths checked above.
        QKernel::Avx2MaddubsQuads if kernel.is_supported() => unsafe {
            x86::gemm_maddubs::<true>(w, rows, b, cols, acc, ldc)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the CPU has the dot product (checked); buffer lengths checked above.
        QKernel::NeonDot if kernel.is_supported() => unsafe {
            neon::gemm_dot(w, rows, b, cols, acc, ldc)
        },
        #[cfg(target_arch = "aarch64")]
        QKernel::Neon => neon::gemm(w, rows, b, cols, acc, ldc),
        _ => portable(w, rows, b, cols, acc, ldc),
    }
}

/// The product of the weights and a **16-bit input given as two byte planes**:
/// `acc[(r − rows.start)·ldc + n] = Σ_k w[r, k]·(256·hi[k, n] + lo[k, n])`, with `hi`'s
/// bytes read as i8 and `lo`'s as u8, both in the k4 layout of `cols` tokens. Each
/// output is the exact sum wherever it fits an i32, which holds for every input with
/// `|256·hi + lo| ≤ i32::MAX / w.max_row_l1()`; the i32 additions wrap, so partial
/// sums may pass the limit on the way.
///
/// At `isa` AVX2 or AVX-512 this is one `vpmaddwd` product on the planes interleaved
/// into i16 ([`QKernel::Avx2`]'s kernel with the high bytes in place of its zero
/// extension): half the instructions of two byte products on that kernel, which makes
/// the 16-bit patch convolution pay on CPUs without VNNI. Elsewhere plain Rust.
///
/// Panics (a caller bug, not bad input) when a buffer is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_q16_planes(
    isa: Isa,
    w: &PackedI8,
    rows: Range<usize>,
    hi: &[u8],
    lo: &[u8],
    cols: usize,
    acc: &mut [i32],
    ldc: usize,
) {
    assert!(
        rows.start <= rows.end && rows.end <= w.m,
        "rows out of range"
    );
    assert!(
        hi.len() >= w.kp * cols && lo.len() >= w.kp * cols,
        "k4 buffer too short"
    );
    assert!(ldc >= cols, "ldc < cols");
    let nrows = rows.len();
    if nrows == 0 || cols == 0 {
        return;
    }
    assert!(
        acc.len() >= (nrows - 1) * ldc + cols,
        "accumulator too short"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 (checked); buffer lengths checked above.
        Isa::Avx2 | Isa::Avx512 if Isa::Avx2.is_supported() => unsafe {
            x86::gemm_avx2_planes(w, rows, hi, lo, cols, acc, ldc)
        },
        _ => portable_planes(w, rows, hi, lo, cols, acc, ldc),
    }
}

/// [`gemm_q16_planes`] in plain Rust.
fn portable_planes(
    w: &PackedI8,
    rows: Range<usize>,
    hi: &[u8],
    lo: &[u8],
    cols: usize,
    acc: &mut [i32],
    ldc: usize,
) {
    let groups = w.kp / 4;
    for (i, r) in rows.enumerate() {
        let wr = w.row(r);
        let out = &mut acc[i * ldc..i * ldc + cols];
        out.fill(0);
        for g in 0..groups {
            let span = g * cols * 4..(g + 1) * cols * 4;
            let (h, l) = (&hi[span.clone()], &lo[span]);
            for (n, o) in out.iter_mut().enumerate() {
                for j in 0..4 {
                    let q = 256 * (h[4 * n + j] as i8 as i32) + l[4 * n + j] as i32;
                    *o = o.wrapping_add((wr[4 * g + j] as i32).wrapping_mul(q));
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;
    use core::arch::asm;
    use std::ops::Range;

    use super::PackedI8;

    /// Rows per tile of the dot-product kernel (8 × 2 accumulators).
    const MR_DOT: usize = 8;
    /// Rows per tile of the widening kernel (4 × 4 accumulators).
    const MR: usize = 4;

    /// Both kernels multiply `x = b ^ 0x80 = b − 128` (as i8) by the weights and add
    /// `128·row_sum` at the end: `Σ w·b = Σ w·x + 128·Σ w`. Tiles are 8 tokens wide (two
    /// registers of 4 tokens × 4 channels); the last `cols % 8` tokens are first copied,
    /// zero-padded, into a buffer of 8-token groups, so every load is a whole register.
    struct Tokens<'a> {
        b: &'a [u8],
        cols: usize,
        full: usize,
        tail: Vec<u8>,
    }

    impl<'a> Tokens<'a> {
        fn new(b: &'a [u8], cols: usize, groups: usize) -> Tokens<'a> {
            let full = cols / 8 * 8;
            let mut tail = Vec::new();
            if full < cols {
                tail = vec![0u8; groups * 32];
                for (g, t) in tail.chunks_exact_mut(32).enumerate() {
                    t[..4 * (cols - full)]
                        .copy_from_slice(&b[4 * (g * cols + full)..4 * (g + 1) * cols]);
                }
            }
            Tokens {
                b,
                cols,
                full,
                tail,
            }
        }

        /// Tiles as (first token, tokens, pointer to its first group, group stride).
        fn tiles(&self) -> impl Iterator<Item = (usize, usize, *const u8, usize)> + '_ {
            let full = (0..self.full)
                .step_by(8)
                .map(|n| (n, 8, self.b[4 * n..].as_ptr(), 4 * self.cols));
            let tail = (self.full < self.cols)
                .then(|| (self.full, self.cols - self.full, self.tail.as_ptr(), 32));
            full.chain(tail)
        }
    }

    /// Writes tile results `c` (plus 128·row_sum) to `nt` tokens from `n` of each row.
    fn store<const R: usize>(
        c: [[int32x4_t; 2]; R],
        row_sums: &[i32],
        acc: &mut [i32],
        ldc: usize,
        n: usize,
        nt: usize,
    ) {
        for (i, ci) in c.iter().enumerate() {
            let mut v = [0i32; 8];
            // SAFETY: NEON is part of aarch64; two stores of 4 i32 into the 8 of `v`.
            unsafe {
                let corr = vdupq_n_s32(row_sums[i].wrapping_mul(128));
                vst1q_s32(v.as_mut_ptr(), vaddq_s32(ci[0], corr));
                vst1q_s32(v.as_mut_ptr().add(4), vaddq_s32(ci[1], corr));
            }
            acc[i * ldc + n..i * ldc + n + nt].copy_from_slice(&v[..nt]);
        }
    }

    /// `sdot acc.4s, a.16b, b.16b`: each i32 lane += the dot product of its 4 byte pairs.
    #[inline(always)]
    fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: a register-only instruction; it is only inlined into `dotprod`
        // functions, which run only on CPUs with FEAT_DotProd.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// Dot-product kernel: tiles of 8 rows × 8 tokens, one `sdot` per row, register
    /// of 4 tokens and group of 4 channels (the row's 4 weights broadcast, `ld1r`).
    ///
    /// # Safety
    /// The CPU has FEAT_DotProd; buffers as checked by `gemm_u8i8_with`.
    #[target_feature(enable = "dotprod")]
    pub(super) unsafe fn gemm_dot(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        let kp = w.kp;
        let tokens = Tokens::new(b, cols, kp / 4);
        let mut r = rows.start;
        while r < rows.end {
            let mr = MR_DOT.min(rows.end - r);
            let wp = w.row(r).as_ptr();
            let rs = &w.row_sums[r..r + mr];
            let out = &mut acc[(r - rows.start) * ldc..];
            for (n, nt, bp, bs) in tokens.tiles() {
                // SAFETY: rows r..r + mr of `kp` bytes in `w`; `bp` points at kp/4
                // groups (stride `bs`) of 8 tokens' bytes (the buffer's or the
                // zero-padded tail's); FEAT_DotProd as for this function.
                unsafe {
                    match mr {
                        8 => store(tile_dot::<8>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        7 => store(tile_dot::<7>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        6 => store(tile_dot::<6>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        5 => store(tile_dot::<5>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        4 => store(tile_dot::<4>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        3 => store(tile_dot::<3>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        2 => store(tile_dot::<2>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        _ => store(tile_dot::<1>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                    }
                }
            }
            r += mr;
        }
    }

    /// # Safety
    /// FEAT_DotProd; `w`: `R` rows of `kp` bytes (stride `kp`); `b`: `kp/4` groups
    /// (stride `bstride`) of 32 bytes.
    #[target_feature(enable = "dotprod")]
    unsafe fn tile_dot<const R: usize>(
        w: *const i8,
        kp: usize,
        b: *const u8,
        bstride: usize,
    ) -> [[int32x4_t; 2]; R] {
        let flip = vdupq_n_u8(0x80);
        let mut c = [[vdupq_n_s32(0); 2]; R];
        let mut bp = b;
        let mut wp = w;
        for _ in 0..kp / 4 {
            // SAFETY: 32 bytes of this group (8 tokens × 4 channels).
            let (x0, x1) = unsafe {
                (
                    vreinterpretq_s8_u8(veorq_u8(vld1q_u8(bp), flip)),
                    vreinterpretq_s8_u8(veorq_u8(vld1q_u8(bp.add(16)), flip)),
                )
            };
            for (i, ci) in c.iter_mut().enumerate() {
                // SAFETY: 4 bytes of row i's current group (i < R, group < kp/4).
                let wv =
                    vreinterpretq_s8_s32(unsafe { vld1q_dup_s32(wp.add(i * kp) as *const i32) });
                ci[0] = sdot(ci[0], x0, wv);
                ci[1] = sdot(ci[1], x1, wv);
            }
            // After the last group these point one group past it, which may lie
            // beyond the buffers' ends: wrapping offsets, never dereferenced then.
            bp = bp.wrapping_add(bstride);
            wp = wp.wrapping_add(4);
        }
        c
    }

    /// Kernel without the dot product (Cortex-A72, A53): per row, register of 4 tokens
    /// and group, `smull`/`smull2` give the 16 products in i16 (|x·w| ≤ 2¹⁴, exact) and
    /// `sadalp` adds their pairs into i32 accumulators (2 per register of tokens: tokens
    /// 0, 1 and 2, 3, each as 2 partial sums, added by one `addp` at the end). Tiles of
    /// 4 rows × 8 tokens.
    pub(super) fn gemm(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        let kp = w.kp;
        let tokens = Tokens::new(b, cols, kp / 4);
        let mut r = rows.start;
        while r < rows.end {
            let mr = MR.min(rows.end - r);
            let wp = w.row(r).as_ptr();
            let rs = &w.row_sums[r..r + mr];
            let out = &mut acc[(r - rows.start) * ldc..];
            for (n, nt, bp, bs) in tokens.tiles() {
                // SAFETY: rows r..r + mr of `kp` bytes in `w`; `bp` points at kp/4
                // groups (stride `bs`) of 8 tokens' bytes.
                unsafe {
                    match mr {
                        4 => store(tile::<4>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        3 => store(tile::<3>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        2 => store(tile::<2>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                        _ => store(tile::<1>(wp, kp, bp, bs), rs, out, ldc, n, nt),
                    }
                }
            }
            r += mr;
        }
    }

    /// # Safety
    /// `w`: `R` rows of `kp` bytes (stride `kp`); `b`: `kp/4` groups (stride `bstride`)
    /// of 32 bytes.
    unsafe fn tile<const R: usize>(
        w: *const i8,
        kp: usize,
        b: *const u8,
        bstride: usize,
    ) -> [[int32x4_t; 2]; R] {
        let flip = vdupq_n_u8(0x80);
        let zero = vdupq_n_s32(0);
        // Per row and register of tokens: partial sums of tokens 0, 1 and of 2, 3.
        let mut c = [[[zero; 2]; 2]; R];
        let mut bp = b;
        let mut wp = w;
        for _ in 0..kp / 4 {
            // SAFETY: 32 bytes of this group (8 tokens × 4 channels).
            let x = unsafe {
                [
                    vreinterpretq_s8_u8(veorq_u8(vld1q_u8(bp), flip)),
                    vreinterpretq_s8_u8(veorq_u8(vld1q_u8(bp.add(16)), flip)),
                ]
            };
            for (i, ci) in c.iter_mut().enumerate() {
                // SAFETY: 4 bytes of row i's current group (i < R, group < kp/4).
                let wv =
                    vreinterpretq_s8_s32(unsafe { vld1q_dup_s32(wp.add(i * kp) as *const i32) });
                for (cij, &xj) in ci.iter_mut().zip(&x) {
                    cij[0] = vpadalq_s16(cij[0], vmull_s8(vget_low_s8(xj), vget_low_s8(wv)));
                    cij[1] = vpadalq_s16(cij[1], vmull_high_s8(xj, wv));
                }
            }
            // After the last group these point one group past it, which may lie
            // beyond the buffers' ends: wrapping offsets, never dereferenced then.
            bp = bp.wrapping_add(bstride);
            wp = wp.wrapping_add(4);
        }
        let mut out = [[zero; 2]; R];
        for (o, ci) in out.iter_mut().zip(&c) {
            for (oj, cij) in o.iter_mut().zip(ci) {
                *oj = vpaddq_s32(cij[0], cij[1]);
            }
        }
        out
    }
}

/// Plain Rust, one output row at a time, tokens innermost (the compiler vectorizes
/// the token loop).
fn portable(w: &PackedI8, rows: Range<usize>, b: &[u8], cols: usize, acc: &mut [i32], ldc: usize) {
    let groups = w.kp / 4;
    for (i, r) in rows.enumerate() {
        let wr = w.row(r);
        let out = &mut acc[i * ldc..i * ldc + cols];
        out.fill(0);
        for g in 0..groups {
            let wg = [
                wr[4 * g] as i32,
                wr[4 * g + 1] as i32,
                wr[4 * g + 2] as i32,
                wr[4 * g + 3] as i32,
            ];
            let bg = &b[g * cols * 4..(g + 1) * cols * 4];
            for (o, q) in out.iter_mut().zip(bg.chunks_exact(4)) {
                *o += wg[0] * q[0] as i32
                    + wg[1] * q[1] as i32
                    + wg[2] * q[2] as i32
                    + wg[3] * q[3] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use std::ops::Range;

    use super::PackedI8;

    /// Rows of weights per AVX2 tile (8 tokens each: 2 accumulators per row).
    const MR256: usize = 4;

    /// Bytes of activations one depth block of [`gemm_avx2`] reads: the block stays in
    /// L1 while every row panel sweeps it.
    const KC_BYTES256: usize = 16 * 1024;

    /// AVX2 without VNNI, exact: each group of 8 tokens × 4 channels (32 bytes) is
    /// widened to i16 (tokens 0, 1, 4, 5 and 2, 3, 6, 7, by `vpunpck[lh]bw`), multiplied
    /// by the row's 4 weights (i16, repeated) with `vpmaddwd`, which adds the channel
    /// pairs into i32 (|pair| ≤ 2·255·128, no saturation), and accumulated; one
    /// `vphaddd` per tile at the end adds the two pairs of each token, in token order.
    /// Tiles of 4 rows × 8 tokens; the last tokens masked (`vpmaskmovd`).
    ///
    /// With up to 256 tokens, the depth is cut into blocks of about [`KC_BYTES256`] of
    /// activations (whole 4-channel groups); for each block, every 4-row panel sweeps
    /// all tokens, the first block storing its sums and the others adding to them.
    /// Without the blocks a deep product over few tokens (PoolFormer's last stage:
    /// 2048 × 49) reads each 64-byte line of activations twice, half at a time, with
    /// the whole matrix passing through L1 in between. The two-plane product
    /// ([`gemm_avx2_planes`]) also cuts a product over more tokens into blocks of 16
    /// groups, which stay in L2 (its downsampling convs, 576 × 784 and 1152 × 196, run
    /// 12–15 % faster so); on one plane that gained nothing on onnxruntime's S12
    /// files (within 1 %, slower if anything), whose 1×1 convs over 3136 tokens then
    /// re-read their sums once per block. Each panel's weights of a block are first widened to i16,
    /// group-major (`[g][row][4]`), so that a row's group is one 8-byte broadcast load.
    ///
    /// # Safety
    /// The CPU has AVX2; buffers as for [`gemm_avx512vnni`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_avx2(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        // SAFETY: as this function's.
        unsafe { widening::<false>(w, rows, b, b, cols, acc, ldc) }
    }

    /// [`super::gemm_q16_planes`]: [`gemm_avx2`] with the bytes of `lo` widened by
    /// those of `hi` (`vpunpck[lh]bw lo, hi`: the i16 values `256·hi + lo`) instead of
    /// by zeros, in the tiles and in the dot products of the last tokens alike.
    ///
    /// # Safety
    /// The CPU has AVX2; `hi` and `lo` as `b` of [`gemm_avx512vnni`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_avx2_planes(
        w: &PackedI8,
        rows: Range<usize>,
        hi: &[u8],
        lo: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        // SAFETY: as this function's.
        unsafe { widening::<true>(w, rows, lo, hi, cols, acc, ldc) }
    }

    /// The body of [`gemm_avx2`] (`PLANES` false: `high` unused, the bytes widened by
    /// zeros) and of [`gemm_avx2_planes`] (`PLANES` true: by the bytes of `high`).
    ///
    /// # Safety
    /// As for [`gemm_avx2`], with `high` as long as `b` where `PLANES`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn widening<const PLANES: bool>(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        high: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        let kp = w.kp;
        let groups = kp / 4;
        // The last few tokens past whole registers, if any, as dot products (see
        // `dots_256`), after the tiles.
        let tail = tail_tokens(cols, 8, kp);
        let full = cols - tail;
        let plane_count = if PLANES { 2 } else { 1 };
        // Blocks of at least 16 groups; with more tokens than that allows, 16 groups
        // for two planes and no blocks for one.
        let block = match KC_BYTES256 / (4 * plane_count * cols) {
            g if g >= 16 => g,
            _ if PLANES => 16,
            _ => groups,
        };
        let mut wide = vec![0i16; MR256 * 4 * block.min(groups)];
        let mut g0 = 0;
        // Only tail tokens (`full` 0): no tiles, no weights to widen.
        while full > 0 && g0 < groups {
            let gc = block.min(groups - g0);
            let accumulate = g0 > 0;
            let mut r = rows.start;
            while r < rows.end {
                let mr = MR256.min(rows.end - r);
                // SAFETY: AVX2 (this function's precondition).
                unsafe { widen_panel(w, r, mr, g0, gc, &mut wide) };
                // SAFETY: the output rows of r..r + mr exist in `acc` (checked by the caller).
                let out = unsafe { acc.as_mut_ptr().add((r - rows.start) * ldc) };
                let mut n = 0;
                while n < full {
                    let nt = 8.min(full - n);
                    let mask = _mm256_cmpgt_epi32(
                        _mm256_set1_epi32(nt as i32),
                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    );
                    // SAFETY: tokens n..n + nt of groups g0..g0 + gc are inside `b`,
                    // their outputs inside `acc`; lanes past `nt` are masked off (loads
                    // and stores); `wide` holds gc groups of `mr` rows.
                    unsafe {
                        let wp = wide.as_ptr();
                        let bp = b.as_ptr().add(4 * (g0 * cols + n));
                        let hp = high.as_ptr().add(4 * (g0 * cols + n));
                        let op = out.add(n);
                        let t = Tile {
                            groups: gc,
                            bstride: 4 * cols,
                            ldc,
                            nt,
                            mask,
                            accumulate,
                        };
                        match mr {
                            4 => tile_256::<4, PLANES>(wp, bp, hp, op, &t),
                            3 => tile_256::<3, PLANES>(wp, bp, hp, op, &t),
                            2 => tile_256::<2, PLANES>(wp, bp, hp, op, &t),
                            _ => tile_256::<1, PLANES>(wp, bp, hp, op, &t),
                        }
                    }
                    n += nt;
                }
                r += mr;
            }
            g0 += gc;
        }
        let columns = tail_columns(b, cols, kp, tail);
        let high_columns = if PLANES {
            tail_columns(high, cols, kp, tail)
        } else {
            Vec::new()
        };
        let mut r = rows.start;
        while r < rows.end {
            let mr = MR256.min(rows.end - r);
            for (t, column) in columns.chunks_exact(kp.max(1)).enumerate() {
                let hc = if PLANES {
                    high_columns[t * kp..].as_ptr()
                } else {
                    column.as_ptr()
                };
                // SAFETY: rows r..r + mr of `w` (`kp` bytes each), a column of `kp`
                // bytes (and its high bytes where `PLANES`), output `full + t < cols`
                // of those rows inside `acc`.
                unsafe {
                    let wp = w.data.as_ptr().add(r * kp);
                    let out = acc.as_mut_ptr().add((r - rows.start) * ldc + full + t);
                    let c = column.as_ptr();
                    match mr {
                        4 => dots_256::<4, PLANES>(wp, kp, c, hc, out, ldc),
                        3 => dots_256::<3, PLANES>(wp, kp, c, hc, out, ldc),
                        2 => dots_256::<2, PLANES>(wp, kp, c, hc, out, ldc),
                        _ => dots_256::<1, PLANES>(wp, kp, c, hc, out, ldc),
                    }
                }
            }
            r += mr;
        }
    }

    /// One token against `R` rows on AVX2: the token's `kp` bytes and each row's, 16
    /// at a time widened to i16 and multiplied in pairs into 8 partial sums per row
    /// (`vpmaddwd`, exact: no product of a u8 and an i8 nears its limits), the last
    /// `kp % 16` one by one. With `PLANES`, the token's values are `256·high + column`
    /// (`high` read as i8), as in [`gemm_avx2_planes`].
    ///
    /// # Safety
    /// AVX2; `w` points at `R` rows of `kp` bytes (stride `kp`), `column` (and `high`
    /// where `PLANES`) at `kp` bytes, `out` at `R` values `ldc` apart.
    #[target_feature(enable = "avx2")]
    unsafe fn dots_256<const R: usize, const PLANES: bool>(
        w: *const i8,
        kp: usize,
        column: *const u8,
        high: *const u8,
        out: *mut i32,
        ldc: usize,
    ) {
        let mut c = [_mm256_setzero_si256(); R];
        let mut k = 0;
        while k + 16 <= kp {
            // SAFETY: bytes k..k + 16 of the column (and of `high`) and of each row,
            // inside `kp`.
            unsafe {
                let l = _mm_loadu_si128(column.add(k) as *const __m128i);
                let t = if PLANES {
                    let h = _mm_loadu_si128(high.add(k) as *const __m128i);
                    _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h))
                } else {
                    _mm256_cvtepu8_epi16(l)
                };
                for (i, ci) in c.iter_mut().enumerate() {
                    let wv =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(i * kp + k) as *const __m128i));
                    *ci = _mm256_add_epi32(*ci, _mm256_madd_epi16(t, wv));
                }
            }
            k += 16;
        }
        for (i, &ci) in c.iter().enumerate() {
            let mut lanes = [0i32; 8];
            // SAFETY: 8 i32 into an array of 8.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, ci) };
            let mut sum = lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v));
            for kk in k..kp {
                // SAFETY: byte kk < kp of row i and of the column (and of `high`).
                let v = unsafe {
                    let v = *column.add(kk) as i32;
                    if PLANES {
                        v + 256 * (*high.add(kk) as i8 as i32)
                    } else {
                        v
                    }
                };
                sum = sum.wrapping_add(unsafe { *w.add(i * kp + kk) as i32 }.wrapping_mul(v));
            }
            // SAFETY: output row i < R.
            unsafe { *out.add(i * ldc) = sum };
        }
    }

    /// Rows `r..r + mr` of `w`, groups `g0..g0 + gc`, as i16 in the order the tiles
    /// read them: `wide[(g·mr + i)·4 + j] = w[r + i, 4(g0 + g) + j]`. Full panels
    /// transpose 4 groups × 4 rows of 4-byte words at a time (`vpunpck[lh]dq/qdq`) and
    /// sign-extend them (`vpmovsxbw`).
    ///
    /// # Safety
    /// AVX2; rows and groups within `w`; `wide` holds `mr·4·gc` values.
    #[target_feature(enable = "avx2")]
    unsafe fn widen_panel(
        w: &PackedI8,
        r: usize,
        mr: usize,
        g0: usize,
        gc: usize,
        wide: &mut [i16],
    ) {
        let mut g = 0;
        if mr == 4 {
            let rows = [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)];
            while g + 4 <= gc {
                let at = 4 * (g0 + g);
                // SAFETY: 16 bytes (4 groups) of each row at `at`, inside the row
                // (g0 + g + 4 ≤ groups); 4 × 32 bytes of `wide` from 16·4·g.
                unsafe {
                    let ld = |i: usize| _mm_loadu_si128(rows[i].as_ptr().add(at) as *const __m128i);
                    let (a, b, c, d) = (ld(0), ld(1), ld(2), ld(3));
                    let ab_lo = _mm_unpacklo_epi32(a, b);
                    let cd_lo = _mm_unpacklo_epi32(c, d);
                    let ab_hi = _mm_unpackhi_epi32(a, b);
                    let cd_hi = _mm_unpackhi_epi32(c, d);
                    let groups = [
                        _mm_unpacklo_epi64(ab_lo, cd_lo),
                        _mm_unpackhi_epi64(ab_lo, cd_lo),
                        _mm_unpacklo_epi64(ab_hi, cd_hi),
                        _mm_unpackhi_epi64(ab_hi, cd_hi),
                    ];
                    let dst = wide.as_mut_ptr().add(16 * g) as *mut __m256i;
                    for (k, v) in groups.into_iter().enumerate() {
                        _mm256_storeu_si256(dst.add(k), _mm256_cvtepi8_epi16(v));
                    }
                }
                g += 4;
            }
        }
        for g in g..gc {
            for i in 0..mr {
                let q = &w.row(r + i)[4 * (g0 + g)..4 * (g0 + g + 1)];
                let d = &mut wide[(g * mr + i) * 4..(g * mr + i + 1) * 4];
                for (d, &q) in d.iter_mut().zip(q) {
                    *d = q as i16;
                }
            }
        }
    }

    /// One tile's extent for [`tile_256`].
    struct Tile {
        /// 4-channel groups of this depth block.
        groups: usize,
        /// Bytes between groups in the activations.
        bstride: usize,
        ldc: usize,
        /// Real tokens (≤ 8), and their lanes.
        nt: usize,
        mask: __m256i,
        /// Add to the outputs instead of storing.
        accumulate: bool,
    }

    /// `R` rows × 8 tokens of [`widening`] over one depth block.
    ///
    /// # Safety
    /// AVX2; `w` points at `t.groups` groups of `R` rows' 4 i16 weights; `b` (and `h`
    /// where `PLANES`) at `t.groups` groups (stride `t.bstride` bytes) of `t.nt` tokens;
    /// `out` at `R` rows (stride `t.ldc`) of `t.nt` i32, initialized where
    /// `t.accumulate`.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_256<const R: usize, const PLANES: bool>(
        w: *const i16,
        b: *const u8,
        h: *const u8,
        out: *mut i32,
        t: &Tile,
    ) {
        let zero = _mm256_setzero_si256();
        let mut lo = [zero; R];
        let mut hi = [zero; R];
        let mut bp = b;
        let mut hp = h;
        let mut wp = w;
        let full = t.nt == 8;
        for _ in 0..t.groups {
            // SAFETY: `nt` tokens of this group (of `b`, and of `h` where `PLANES`); the
            // lanes past them are not read.
            let (bv, high) = unsafe {
                if full {
                    let high = if PLANES {
                        _mm256_loadu_si256(hp as *const __m256i)
                    } else {
                        zero
                    };
                    (_mm256_loadu_si256(bp as *const __m256i), high)
                } else {
                    let high = if PLANES {
                        _mm256_maskload_epi32(hp as *const i32, t.mask)
                    } else {
                        zero
                    };
                    (_mm256_maskload_epi32(bp as *const i32, t.mask), high)
                }
            };
            let blo = _mm256_unpacklo_epi8(bv, high);
            let bhi = _mm256_unpackhi_epi8(bv, high);
            for i in 0..R {
                // SAFETY: row i's 4 weights of the current group (i < R, group < groups).
                let wv =
                    _mm256_set1_epi64x(unsafe { (wp.add(4 * i) as *const i64).read_unaligned() });
                lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(blo, wv));
                hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(bhi, wv));
            }
            // After the last group these point one group past it, which may lie
            // beyond the buffers' ends: wrapping offsets, never dereferenced then.
            bp = bp.wrapping_add(t.bstride);
            hp = hp.wrapping_add(t.bstride);
            wp = wp.wrapping_add(4 * R);
        }
        for i in 0..R {
            let mut v = _mm256_hadd_epi32(lo[i], hi[i]);
            // SAFETY: row i < R, `nt` outputs (the lanes past them masked off),
            // initialized when accumulating.
            unsafe {
                let p = out.add(i * t.ldc);
                if full {
                    if t.accumulate {
                        v = _mm256_add_epi32(v, _mm256_loadu_si256(p as *const __m256i));
                    }
                    _mm256_storeu_si256(p as *mut __m256i, v)
                } else {
                    if t.accumulate {
                        v = _mm256_add_epi32(v, _mm256_maskload_epi32(p, t.mask));
                    }
                    _mm256_maskstore_epi32(p, t.mask, v)
                }
            }
        }
    }

    /// Rows of weights per `vpmaddubsw` tile.
    const MR_MADDUBS: usize = 4;
    /// Rows per tile of the two-group form: 3 × 2 accumulators, 4 activation registers.
    const MR_QUADS: usize = 3;
    /// Registers of 8 tokens per `vpmaddubsw` tile: 4 × 2 accumulators.
    const NV_MADDUBS: usize = 2;

    /// AVX2 with `vpmaddubsw`, exact for weights whose pairs fit an i16
    /// ([`PackedI8::pairs_fit_i16`]): per row and 4-channel group, the row's 4 weights
    /// broadcast to every token; `vpmaddubsw` multiplies them by the tokens' 4 u8 and
    /// adds the pairs into i16 (no saturation, by the weights' bound); `vpmaddwd` by 1
    /// adds the two pairs of each token into its i32 lane, in token order. Two
    /// multiplies per 32 products, against the plain AVX2 kernel's two plus the
    /// widening. Tiles of 4 rows × 16 (or 8) tokens; the depth is cut into blocks of
    /// about [`KC_BYTES256`] of activations, which stay in L1 while every row panel
    /// sweeps them (the outputs accumulate over blocks). The last `cols % 8` tokens,
    /// which would fill a tile register only partly, are each a matrix-vector product
    /// instead ([`tail_token`]).
    ///
    /// With `QUADS` (`w.quads_fit_i16()`), the tiles add the `vpmaddubsw` pairs of two
    /// adjacent groups in i16 before the `vpmaddwd`: three multiplies per 64 products
    /// instead of four. Its tiles have 3 rows ([`MR_QUADS`]): with 4, the 8
    /// accumulators, 4 activation registers and the temporaries exceed AVX2's 16
    /// registers, and the spills cost more than the saved multiplies.
    ///
    /// # Safety
    /// AVX2; `w.pairs_fit_i16()`, and `w.quads_fit_i16()` with `QUADS`; buffers as for
    /// [`gemm_avx512vnni`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_maddubs<const QUADS: bool>(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        debug_assert!(w.pairs_fit_i16 && (w.quads_fit_i16 || !QUADS));
        let kp = w.kp;
        let groups = kp / 4;
        let tiled = cols / 8 * 8;
        let mr_max = if QUADS { MR_QUADS } else { MR_MADDUBS };
        // Depth blocks of about KC_BYTES256 of activations (at least 16 groups, an even
        // number so that a block starts an octet of channels): a block stays in L1
        // while every row panel sweeps it.
        let block = (KC_BYTES256 / (4 * tiled.max(1))).max(16) & !1;
        let mut g0 = 0;
        while tiled > 0 && g0 < groups {
            let gc = block.min(groups - g0);
            let mut r = rows.start;
            while r < rows.end {
                let mr = mr_max.min(rows.end - r);
                // SAFETY: rows r..r + mr exist in `w`, groups g0..g0 + gc in each; the
                // output rows r − rows.start.. exist in `acc` (checked by the caller).
                let wp = unsafe { w.data.as_ptr().add(r * kp + 4 * g0) };
                let out = unsafe { acc.as_mut_ptr().add((r - rows.start) * ldc) };
                let mut n = 0;
                while n < tiled {
                    let nc = (8 * NV_MADDUBS).min(tiled - n);
                    // SAFETY: tokens n..n + nc (whole registers) of groups g0..g0 + gc
                    // are inside `b`, their outputs inside `acc`.
                    unsafe {
                        let bp = b.as_ptr().add(4 * (g0 * cols + n));
                        let op = out.add(n);
                        let t = MaddubsTile {
                            kp,
                            groups: gc,
                            bstride: 4 * cols,
                            ldc,
                            accumulate: g0 > 0,
                        };
                        match (mr, nc / 8) {
                            (4, 2) => tile_maddubs::<4, 2, QUADS>(wp, bp, op, &t),
                            (4, _) => tile_maddubs::<4, 1, QUADS>(wp, bp, op, &t),
                            (3, 2) => tile_maddubs::<3, 2, QUADS>(wp, bp, op, &t),
                            (3, _) => tile_maddubs::<3, 1, QUADS>(wp, bp, op, &t),
                            (2, 2) => tile_maddubs::<2, 2, QUADS>(wp, bp, op, &t),
                            (2, _) => tile_maddubs::<2, 1, QUADS>(wp, bp, op, &t),
                            (_, 2) => tile_maddubs::<1, 2, QUADS>(wp, bp, op, &t),
                            (_, _) => tile_maddubs::<1, 1, QUADS>(wp, bp, op, &t),
                        }
                    }
                    n += nc;
                }
                r += mr;
            }
            g0 += gc;
        }
        if tiled < cols {
            let mut token = vec![0u8; kp.div_ceil(32) * 32];
            for n in tiled..cols {
                for (g, t) in token[..kp].chunks_exact_mut(4).enumerate() {
                    t.copy_from_slice(&b[4 * (g * cols + n)..4 * (g * cols + n) + 4]);
                }
                // SAFETY: AVX2; `token` is zero past `kp` and a multiple of 32 long;
                // output column n of rows.len() rows inside `acc` (checked by the caller).
                unsafe { tail_token(w, rows.clone(), &token, acc.as_mut_ptr().add(n), ldc) };
            }
        }
    }

    /// `out[(r − rows.start)·ldc] = Σ_k w[r, k]·token[k]` for `r` in `rows`: one token's
    /// column as a matrix-vector product, 32 channels per `vpmaddubsw`, 4 rows sharing
    /// each load of the token. A row read 32 bytes at a time runs past its `kp` bytes
    /// (into the next row or `PackedI8`'s zero slack) where `token` is zero.
    ///
    /// # Safety
    /// AVX2; `w.pairs_fit_i16()`; `token.len()` is `kp` rounded up to 32, zero past
    /// `kp`; `out` is valid for writes at `i·ldc`, `i < rows.len()`.
    #[target_feature(enable = "avx2")]
    unsafe fn tail_token(
        w: &PackedI8,
        rows: Range<usize>,
        token: &[u8],
        out: *mut i32,
        ldc: usize,
    ) {
        let kp = w.kp;
        let chunks = token.len() / 32;
        debug_assert!(w.data.len() >= rows.end * kp + (32 * chunks - kp));
        let ones = _mm256_set1_epi16(1);
        let hsum = |v: __m256i| -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
        };
        let mut r = rows.start;
        while r < rows.end {
            let mr = 4.min(rows.end - r);
            let mut c = [_mm256_setzero_si256(); 4];
            for j in 0..chunks {
                // SAFETY: 32 bytes of `token`; 32 bytes of row r + i from 32j, inside
                // `w.data` (rows end at `rows.end·kp`, then the slack).
                unsafe {
                    let bv = _mm256_loadu_si256(token.as_ptr().add(32 * j) as *const __m256i);
                    for (i, ci) in c.iter_mut().enumerate().take(mr) {
                        let wv = _mm256_loadu_si256(
                            w.data.as_ptr().add((r + i) * kp + 32 * j) as *const __m256i
                        );
                        let pairs = _mm256_maddubs_epi16(bv, wv);
                        *ci = _mm256_add_epi32(*ci, _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for (i, &ci) in c.iter().enumerate().take(mr) {
                // SAFETY: output row r + i − rows.start (the caller's contract).
                unsafe { *out.add((r + i - rows.start) * ldc) = hsum(ci) };
            }
            r += mr;
        }
    }

    /// Where a [`tile_maddubs`] reads and writes.
    struct MaddubsTile {
        /// Padded depth of a weight row (its stride).
        kp: usize,
        /// Groups of 4 channels to multiply.
        groups: usize,
        /// Bytes between two groups of the activations.
        bstride: usize,
        /// Output row stride.
        ldc: usize,
        /// Add to the outputs (a depth block after the first) instead of storing.
        accumulate: bool,
    }

    /// `R` rows × `V` registers of 8 tokens of [`gemm_maddubs`], over `t.groups` groups.
    ///
    /// # Safety
    /// AVX2; `w` points at `R` rows (stride `t.kp`) of `4·t.groups` bytes whose pairs
    /// fit an i16 (and whose quads do, with `QUADS`, the first group starting an octet);
    /// `b` at `t.groups` groups (stride `t.bstride`) of `8V` tokens; `out` at `R` rows
    /// (stride `t.ldc`) of `8V` i32.
    #[target_feature(enable = "avx2")]
    unsafe fn tile_maddubs<const R: usize, const V: usize, const QUADS: bool>(
        w: *const i8,
        b: *const u8,
        out: *mut i32,
        t: &MaddubsTile,
    ) {
        let (kp, bstride, ldc) = (t.kp, t.bstride, t.ldc);
        let ones = _mm256_set1_epi16(1);
        let mut c = [[_mm256_setzero_si256(); V]; R];
        let mut bp = b;
        let mut wp = w;
        let mut groups = t.groups;
        if QUADS {
            while groups >= 2 {
                let mut b0 = [_mm256_setzero_si256(); V];
                let mut b1 = [_mm256_setzero_si256(); V];
                for j in 0..V {
                    // SAFETY: register j's 8 tokens of this group and the next.
                    unsafe {
                        b0[j] = _mm256_loadu_si256(bp.add(32 * j) as *const __m256i);
                        b1[j] = _mm256_loadu_si256(bp.add(bstride + 32 * j) as *const __m256i);
                    }
                }
                for (i, ci) in c.iter_mut().enumerate() {
                    // SAFETY: 8 bytes of row i's current two groups.
                    let (w0, w1) = unsafe {
                        let p = wp.add(i * kp) as *const i32;
                        (p.read_unaligned(), p.add(1).read_unaligned())
                    };
                    let (w0, w1) = (_mm256_set1_epi32(w0), _mm256_set1_epi32(w1));
                    for j in 0..V {
                        // Each lane: the pair of channels {0, 1} (or {2, 3}) of this
                        // group plus the same pair of the next; fits an i16 by the
                        // weights' quad bound.
                        let pairs = _mm256_add_epi16(
                            _mm256_maddubs_epi16(b0[j], w0),
                            _mm256_maddubs_epi16(b1[j], w1),
                        );
                        ci[j] = _mm256_add_epi32(ci[j], _mm256_madd_epi16(pairs, ones));
                    }
                }
                bp = bp.wrapping_add(2 * bstride);
                wp = wp.wrapping_add(8);
                groups -= 2;
            }
        }
        for _ in 0..groups {
            let mut bv = [_mm256_setzero_si256(); V];
            for (j, v) in bv.iter_mut().enumerate() {
                // SAFETY: register j's 8 tokens of this group.
                *v = unsafe { _mm256_loadu_si256(bp.add(32 * j) as *const __m256i) };
            }
            for (i, ci) in c.iter_mut().enumerate() {
                // SAFETY: 4 bytes of row i's current group (i < R, group < kp/4).
                let wv =
                    _mm256_set1_epi32(unsafe { (wp.add(i * kp) as *const i32).read_unaligned() });
                for (cij, &bj) in ci.iter_mut().zip(&bv) {
                    let pairs = _mm256_maddubs_epi16(bj, wv);
                    *cij = _mm256_add_epi32(*cij, _mm256_madd_epi16(pairs, ones));
                }
            }
            // After the last group these point one group past it, which may lie
            // beyond the buffers' ends: wrapping offsets, never dereferenced then.
            bp = bp.wrapping_add(bstride);
            wp = wp.wrapping_add(4);
        }
        for (i, ci) in c.iter().enumerate() {
            for (j, &cij) in ci.iter().enumerate() {
                // SAFETY: row i < R, register j's 8 tokens inside the tile.
                unsafe {
                    let p = out.add(i * ldc + 8 * j) as *mut __m256i;
                    let v = if t.accumulate {
                        _mm256_add_epi32(_mm256_loadu_si256(p), cij)
                    } else {
                        cij
                    };
                    _mm256_storeu_si256(p, v);
                }
            }
        }
    }

    /// Rows of weights per AVX-512 tile.
    const MR512: usize = 8;
    /// Registers of 16 tokens per AVX-512 tile: 8 × 3 accumulators, 3 activation
    /// registers, the weights come as broadcast memory operands.
    const NV512: usize = 3;

    /// AVX-512 VNNI: tiles of 8 rows × 48 tokens, the rows' weights (the tile's 8 × `kp`
    /// bytes, ≤ 16 KiB for `k` ≤ 2048) stay in L1 while the tile sweeps the tokens.
    /// Up to [`TAIL_TOKENS`] tokens past the last whole register (49 = 48 + 1, 196 =
    /// 4·48 + 4) are dot products of each row with the token's gathered column, at
    /// a sixteenth of a register's cost per token.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; `b.len() ≥ kp·cols`, `rows` within `w`, `acc`
    /// holds `(rows.len() − 1)·ldc + cols` values, `cols ≤ ldc` (all checked by
    /// `gemm_u8i8_with`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn gemm_avx512vnni(
        w: &PackedI8,
        rows: Range<usize>,
        b: &[u8],
        cols: usize,
        acc: &mut [i32],
        ldc: usize,
    ) {
        let kp = w.kp;
        // The last few tokens past whole registers, if any, are multiplied one at a
        // time as dot products of byte runs (see `dots_512`): their columns first.
        let tail = tail_tokens(cols, 16, kp);
        let full = cols - tail;
        let columns = tail_columns(b, cols, kp, tail);
        let mut r = rows.start;
        while r < rows.end {
            let mr = MR512.min(rows.end - r);
            // SAFETY: rows r..r + mr exist in `w`; the output rows r − rows.start.. exist
            // in `acc` (checked by the caller).
            let wp = unsafe { w.data.as_ptr().add(r * kp) };
            let out = unsafe { acc.as_mut_ptr().add((r - rows.start) * ldc) };
            for (t, column) in columns.chunks_exact(kp.max(1)).enumerate() {
                // SAFETY: `mr` rows of `kp` bytes at `wp`, a column of `kp` bytes, and
                // output `full + t < cols` of each of the tile's rows.
                unsafe { dots_512(mr, wp, kp, column.as_ptr(), out.add(full + t), ldc) };
            }
            let mut n = 0;
            while n < full {
                let nc = (16 * NV512).min(full - n);
                let nv = nc.div_ceil(16);
                let mask = tail_mask16(nc - 16 * (nv - 1));
                // SAFETY: tokens n..n + nc of every group are inside `b` (`b.len() ≥
                // kp·cols`), outputs n..n + nc of the tile's rows inside `acc`; the
                // last register's lanes past `nc` are masked off.
                unsafe {
                    let bp = b.as_ptr().add(4 * n);
                    let op = out.add(n);
                    match nv {
                        3 => rows_512::<3>(mr, wp, kp, bp, 4 * cols, op, ldc, mask),
                        2 => rows_512::<2>(mr, wp, kp, bp, 4 * cols, op, ldc, mask),
                        _ => rows_512::<1>(mr, wp, kp, bp, 4 * cols, op, ldc, mask),
                    }
                }
                n += nc;
            }
            r += mr;
        }
    }

    /// Most tokens past whole registers that [`gemm_avx512vnni`] and [`gemm_avx2`]
    /// multiply one at a time: a register of tokens costs the same per row whatever
    /// the number of tokens in it (`kp/4` `vpdpbusd` for 16 lanes), a token alone a
    /// sixteenth of that (`kp/64`) and a sum across lanes.
    const TAIL_TOKENS: usize = 4;
    /// Shortest reduction for those tokens: below, the sums across lanes outweigh the
    /// products saved.
    const TAIL_MIN_DEPTH: usize = 256;

    /// How many of `cols` tokens, past whole registers of `lanes`, are multiplied one
    /// at a time: 0, or 1..=[`TAIL_TOKENS`].
    fn tail_tokens(cols: usize, lanes: usize, kp: usize) -> usize {
        let rest = cols % lanes;
        if (1..=TAIL_TOKENS).contains(&rest) && kp >= TAIL_MIN_DEPTH {
            rest
        } else {
            0
        }
    }

    /// The last `tail` tokens' columns of the k4 buffer `b` (`cols` tokens, `kp` deep),
    /// each as `kp` consecutive bytes.
    fn tail_columns(b: &[u8], cols: usize, kp: usize, tail: usize) -> Vec<u8> {
        let full = cols - tail;
        let mut columns = vec![0u8; tail * kp];
        for (t, column) in columns.chunks_exact_mut(kp.max(1)).enumerate() {
            for (g, dst) in column.chunks_exact_mut(4).enumerate() {
                let at = (g * cols + full + t) * 4;
                dst.copy_from_slice(&b[at..at + 4]);
            }
        }
        columns
    }

    /// `out[i·ldc] = Σ_k w[i·kp + k]·column[k]` for `mr` (1..=8) rows.
    ///
    /// # Safety
    /// As [`dots`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dots_512(
        mr: usize,
        w: *const i8,
        kp: usize,
        column: *const u8,
        out: *mut i32,
        ldc: usize,
    ) {
        // SAFETY: the caller's contract, for `mr` rows.
        unsafe {
            match mr {
                8 => dots::<8>(w, kp, column, out, ldc),
                7 => dots::<7>(w, kp, column, out, ldc),
                6 => dots::<6>(w, kp, column, out, ldc),
                5 => dots::<5>(w, kp, column, out, ldc),
                4 => dots::<4>(w, kp, column, out, ldc),
                3 => dots::<3>(w, kp, column, out, ldc),
                2 => dots::<2>(w, kp, column, out, ldc),
                _ => dots::<1>(w, kp, column, out, ldc),
            }
        }
    }

    /// One token against `R` rows: the token's `kp` bytes (one per channel) and each
    /// row's, 64 at a time into 16 partial sums per row, which are then added up.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `w` points at `R` rows of `kp` bytes (stride `kp`), `column`
    /// at `kp` bytes, `out` at `R` values `ldc` apart.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dots<const R: usize>(
        w: *const i8,
        kp: usize,
        column: *const u8,
        out: *mut i32,
        ldc: usize,
    ) {
        let mut c = [_mm512_setzero_si512(); R];
        let mut k = 0;
        while k < kp {
            // The last run stops at `kp` (masked-off bytes are not read).
            let mask: __mmask64 = if kp - k >= 64 {
                !0
            } else {
                (1u64 << (kp - k)) - 1
            };
            // SAFETY: bytes k.. of the column and of each row, within `kp` by `mask`.
            unsafe {
                let t = _mm512_maskz_loadu_epi8(mask, column.add(k) as *const i8);
                for (i, ci) in c.iter_mut().enumerate() {
                    let wv = _mm512_maskz_loadu_epi8(mask, w.add(i * kp + k));
                    *ci = _mm512_dpbusd_epi32(*ci, t, wv);
                }
            }
            k += 64;
        }
        for (i, &ci) in c.iter().enumerate() {
            // SAFETY: output row i < R.
            unsafe { *out.add(i * ldc) = _mm512_reduce_add_epi32(ci) };
        }
    }

    /// Mask of the first `n` (1..=16) lanes.
    fn tail_mask16(n: usize) -> __mmask16 {
        (((1u32 << n) - 1) & 0xffff) as __mmask16
    }

    /// [`tile_512`] for `mr` (1..=8) rows.
    ///
    /// # Safety
    /// As [`tile_512`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows_512<const V: usize>(
        mr: usize,
        w: *const i8,
        kp: usize,
        b: *const u8,
        bstride: usize,
        out: *mut i32,
        ldc: usize,
        mask: __mmask16,
    ) {
        // SAFETY: the caller's contract, for `mr` rows.
        unsafe {
            match mr {
                8 => tile_512::<8, V>(w, kp, b, bstride, out, ldc, mask),
                7 => tile_512::<7, V>(w, kp, b, bstride, out, ldc, mask),
                6 => tile_512::<6, V>(w, kp, b, bstride, out, ldc, mask),
                5 => tile_512::<5, V>(w, kp, b, bstride, out, ldc, mask),
                4 => tile_512::<4, V>(w, kp, b, bstride, out, ldc, mask),
                3 => tile_512::<3, V>(w, kp, b, bstride, out, ldc, mask),
                2 => tile_512::<2, V>(w, kp, b, bstride, out, ldc, mask),
                _ => tile_512::<1, V>(w, kp, b, bstride, out, ldc, mask),
            }
        }
    }

    /// `R` rows × `V` registers of 16 tokens: `out[i·ldc + t] = Σ_g w[i, g]·b[g, t]`, the
    /// last register's lanes limited to `mask`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI; `w` points at `R` rows of `kp` bytes (stride `kp`); `b` at
    /// `kp/4` groups (stride `bstride` bytes) of `16·(V − 1) + popcount(mask)` tokens;
    /// `out` at `R` rows (stride `ldc`) of as many i32.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_512<const R: usize, const V: usize>(
        w: *const i8,
        kp: usize,
        b: *const u8,
        bstride: usize,
        out: *mut i32,
        ldc: usize,
        mask: __mmask16,
    ) {
        let mut c = [[_mm512_setzero_si512(); V]; R];
        let mut bp = b;
        let mut wp = w;
        for _ in 0..kp / 4 {
            let mut bv = [_mm512_setzero_si512(); V];
            for (j, v) in bv.iter_mut().enumerate() {
                // SAFETY: token registers 0..V − 1 are whole; the last one loads the
                // lanes in `mask` only (masked-off lanes are not read, cannot fault).
                *v = unsafe {
                    let p = bp.add(64 * j) as *const i32;
                    if j + 1 == V {
                        _mm512_maskz_loadu_epi32(mask, p)
                    } else {
                        _mm512_loadu_epi32(p)
                    }
                };
            }
            for (i, ci) in c.iter_mut().enumerate() {
                // SAFETY: 4 bytes of row i's current group (i < R, group < kp/4).
                let wv =
                    _mm512_set1_epi32(unsafe { (wp.add(i * kp) as *const i32).read_unaligned() });
                for (cij, &bj) in ci.iter_mut().zip(&bv) {
                    *cij = _mm512_dpbusd_epi32(*cij, bj, wv);
                }
            }
            // After the last group these point one group past it, which may lie
            // beyond the buffers' ends: wrapping offsets, never dereferenced then.
            bp = bp.wrapping_add(bstride);
            wp = wp.wrapping_add(4);
        }
        for (i, ci) in c.iter().enumerate() {
            for (j, &cij) in ci.iter().enumerate() {
                // SAFETY: row i < R, tokens of register j inside the tile (the last
                // register writes the lanes in `mask` only).
                unsafe {
                    let p = out.add(i * ldc + 16 * j);
                    if j + 1 == V {
                        _mm512_mask_storeu_epi32(p, mask, cij)
                    } else {
                        _mm512_storeu_epi32(p, cij)
                    }
                }
            }
        }
    }
}
