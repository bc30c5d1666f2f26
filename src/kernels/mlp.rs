//! The PoolFormer channel MLP with its norm, bias, GELU, layer scale and residual
//! fused around two matrix products:
//!
//! `y = x + ls ⊙ (W2·gelu(W1·(γ ⊙ (x − μ)·r + β) + b1) + b2)`
//!
//! becomes, with `W1' = W1·diag(γ)`, `c1 = b1 + W1·β`, `W2' = diag(ls)·W2`,
//! `b2' = ls ⊙ b2`:
//!
//! `y = x + b2' + W2'·gelu(r·(W1'·(x − μ)) + c1)`.
//!
//! The tokens (columns of the `C×HW` activation) are processed in blocks, so the
//! hidden activations of a block (`4C × cols`) stay in cache between the two
//! products. On x86-64 with AVX-512 or AVX2 the products are this crate's packed
//! kernels ([`super::sgemm`], [`run_block_packed`]): weights packed once
//! ([`PackedMlp`]), centering done while packing the block, the bias + GELU and the
//! residual done in registers before the stores. Elsewhere ([`run_block`]) they come
//! from the `gemm` crate (NEON on aarch64), with the element-wise parts, GELU
//! included, as separate multiversioned passes.

use std::sync::Arc;

use anyhow::{ensure, Result};

use super::sgemm::{self, Epilogue, PackedCols, PackedWeights};
use super::{multiversion, Isa};

/// Folded weights of one block's MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpWeights {
    pub channels: usize,
    pub hidden: usize,
    /// `[hidden, channels]`, row-major: fc1 with the norm's γ folded into its columns.
    pub w1: Vec<f32>,
    /// `[hidden]`: fc1's bias plus fc1·β.
    pub c1: Vec<f32>,
    /// `[channels, hidden]`, row-major: fc2 with the layer scale folded into its rows.
    pub w2: Vec<f32>,
    /// `[channels]`: fc2's bias times the layer scale.
    pub b2: Vec<f32>,
}

impl MlpWeights {
    pub fn check(&self) -> Result<()> {
        let (c, h) = (self.channels, self.hidden);
        ensure!(c > 0 && h > 0, "empty MLP ({c} channels, {h} hidden)");
        ensure!(
            self.w1.len() == h * c && self.w2.len() == c * h,
            "MLP weight sizes"
        );
        ensure!(self.c1.len() == h && self.b2.len() == c, "MLP bias sizes");
        Ok(())
    }

    /// Column ranges to process, one block each: about 256 KiB of hidden activations
    /// per block (they stay in L2 between the two products), at least 128 columns
    /// (fewer make the matrix kernels repack the weights too often for their work),
    /// starting on multiples of `align` (the packed kernels' widest column panel, so
    /// that only the last block can end in a narrower one).
    pub fn blocks(&self, hw: usize, threads: usize, align: usize) -> Vec<(usize, usize)> {
        column_blocks(hw, (65_536 / self.hidden).max(128), threads, align)
    }
}

/// `hw` columns in balanced blocks of about `target` columns, a multiple of `threads`
/// blocks when there are enough columns to share. Block boundaries are rounded to
/// multiples of `align` (a kernel's tile width), so that only the last block has a
/// partial tile.
pub fn column_blocks(
    hw: usize,
    target: usize,
    threads: usize,
    align: usize,
) -> Vec<(usize, usize)> {
    let mut n = (hw / target.max(1)).max(1);
    if threads > 1 && hw >= threads * 32 {
        n = n.div_ceil(threads) * threads;
    }
    let n = n.min(hw.max(1));
    let align = align.max(1);
    let bound = |b: usize| {
        if b == n {
            hw
        } else {
            ((b * hw / n + align / 2) / align * align).min(hw)
        }
    };
    (0..n)
        .map(|b| (bound(b), bound(b + 1)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Per-thread buffers for [`run_block`] and [`run_block_packed`].
#[derive(Default)]
pub struct Scratch {
    centered: Vec<f32>,
    hidden: Vec<f32>,
    packed_x: PackedCols,
    packed_hidden: PackedCols,
}

/// [`MlpWeights`] with both matrices packed for [`sgemm`] on one instruction set.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMlp {
    /// The sizes and biases; its `w1` and `w2` are empty (the matrices are held once,
    /// packed, not also as given: for PoolFormer-S12 38 MB of f32).
    pub weights: Arc<MlpWeights>,
    w1: PackedWeights,
    w2: PackedWeights,
}

impl PackedMlp {
    pub fn new(isa: Isa, weights: Arc<MlpWeights>) -> PackedMlp {
        let (c, h) = (weights.channels, weights.hidden);
        PackedMlp {
            w1: PackedWeights::pack(isa, &weights.w1, h, c),
            w2: PackedWeights::pack(isa, &weights.w2, c, h),
            weights: Arc::new(MlpWeights {
                w1: Vec::new(),
                w2: Vec::new(),
                c1: weights.c1.clone(),
                b2: weights.b2.clone(),
                ..*weights
            }),
        }
    }

    /// The instruction set the weights are packed for, which [`run_block_packed`] runs.
    pub fn isa(&self) -> Isa {
        self.w1.isa()
    }

    /// Whether [`run_block_packed`] is the faster path on `isa` ([`sgemm::preferred`]).
    pub fn preferred(isa: Isa) -> bool {
        sgemm::preferred(isa)
    }
}

/// Runs `f(0)`, …, `f(n − 1)`, in any order, possibly at the same time.
pub type ForEach<'a> = &'a (dyn Fn(usize, &(dyn Fn(usize) + Sync)) + Sync);

/// [`ForEach`] one after the other on the calling thread.
pub fn sequential(n: usize, f: &(dyn Fn(usize) + Sync)) {
    (0..n).for_each(f)
}

/// [`run_block`] on the packed kernels: pack `x − mean` for the block's columns, then
/// `hidden = gelu(rstd·W1'·centered + c1)` and `out = x + b2' + W2'·hidden`. With
/// `parts > 1` each product's rows are cut into `parts` ranges run through
/// `for_each` (the split for blocks too few to share between threads).
///
/// # Safety
/// As [`run_block`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_block_packed(
    p: &PackedMlp,
    x: *const f32,
    out: *mut f32,
    hw: usize,
    (j0, j1): (usize, usize),
    (mean, rstd): (f32, f32),
    scratch: &mut Scratch,
    parts: usize,
    for_each: ForEach,
) {
    let (isa, w) = (p.isa(), &*p.weights);
    let c = w.channels;
    let cols = j1 - j0;
    debug_assert!(j0 < j1 && j1 <= hw);
    let xs = std::slice::from_raw_parts(x.add(j0), (c - 1) * hw + cols);
    scratch.packed_x.pack(isa, xs, hw, c, cols, mean);
    let px = &scratch.packed_x;
    scratch.packed_hidden.set_layout_like(px, w.hidden);
    // Pointers cross to the workers as addresses; each part writes its own rows.
    let hidden_addr = scratch.packed_hidden.as_mut_ptr() as usize;
    let (x_addr, out_addr) = (x as usize, out as usize);
    let ranges = |panels: usize| {
        let n = parts.clamp(1, panels.max(1));
        (n, move |i: usize| i * panels / n..(i + 1) * panels / n)
    };
    let (n1, r1) = ranges(p.w1.panels());
    for_each(n1, &|i| {
        let epi = Epilogue::Gelu {
            scale: rstd,
            bias: &w.c1,
            dst: hidden_addr as *mut f32,
        };
        sgemm::gemm(isa, &p.w1, r1(i), px, &epi);
    });
    let ph = &scratch.packed_hidden;
    let (n2, r2) = ranges(p.w2.panels());
    for_each(n2, &|i| {
        let epi = Epilogue::Residual {
            bias: &w.b2,
            x: (x_addr as *const f32).add(j0),
            ldx: hw,
            out: (out_addr as *mut f32).add(j0),
            ldo: hw,
        };
        sgemm::gemm(isa, &p.w2, r2(i), ph, &epi);
    });
}

multiversion! {
    /// `dst[r, ..] = src[r, ..] − mean` for `rows` rows of `cols`, `src` rows `stride` apart.
    pub fn center_rows(src: &[f32], stride: usize, rows: usize, cols: usize, mean: f32, dst: &mut [f32]) {
        for r in 0..rows {
            let s = &src[r * stride..r * stride + cols];
            let d = &mut dst[r * cols..r * cols + cols];
            for (d, &s) in d.iter_mut().zip(s) {
                *d = s - mean;
            }
        }
    }
}

/// The coefficients a₁…a₆ of Abramowitz & Stegun 7.1.28 (see [`erf`]).
#[allow(clippy::excessive_precision)]
pub const ERF_A: [f32; 6] = [
    0.070_523_078_4,
    0.042_282_012_3,
    0.009_270_527_2,
    0.000_152_014_3,
    0.000_276_567_2,
    0.000_043_063_8,
];

/// erf(x) by Abramowitz & Stegun 7.1.28 (absolute error ≤ 3e-7), branch-free so that
/// it vectorizes: `1 − 1/(1 + a₁|x| + … + a₆|x|⁶)¹⁶` with the sign of `x`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<false>(x)
}

/// [`erf`] with its polynomial's multiply-adds fused when `FMA` (see [`super::madd`]).
#[inline(always)]
pub fn erf_with<const FMA: bool>(x: f32) -> f32 {
    use super::madd;
    const A: [f32; 6] = ERF_A;
    let t = x.abs();
    let mut p = A[5];
    for &c in A[..5].iter().rev() {
        p = madd::<FMA>(p, t, c);
    }
    let p = madd::<FMA>(p, t, 1.0);
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    (1.0 - 1.0 / (p8 * p8)).copysign(x)
}

/// `s·gelu(a) = (s/2)·a·(1 + erf(a/√2))` with [`erf`]'s approximation, its polynomial
/// and products fused into multiply-adds with `FMA` (see [`super::madd`]).
#[inline(always)]
pub fn scaled_gelu<const FMA: bool>(a: f32, s: f32) -> f32 {
    let erf = erf_with::<FMA>(a * std::f32::consts::FRAC_1_SQRT_2);
    let h = a * (0.5 * s);
    super::madd::<FMA>(h, erf, h)
}

/// The exact GELU, `0.5·a·(1 + erf(a/√2))`, with [`erf`]'s approximation.
#[inline(always)]
pub fn gelu(a: f32) -> f32 {
    0.5 * a * (1.0 + erf(a * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion! {
    /// `h = gelu(r·h + c[row])` with the exact (erf) GELU, rows of `cols`.
    pub fn bias_gelu_rows(h: &mut [f32], cols: usize, r: f32, c: &[f32]) {
        for (row, &c) in h.chunks_exact_mut(cols).zip(c) {
            for v in row.iter_mut() {
                *v = gelu(*v * r + c);
            }
        }
    }
}

multiversion! {
    /// `dst = src + b`.
    pub fn add_scalar(src: &[f32], dst: &mut [f32], b: f32) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s + b;
        }
    }
}

/// Computes output columns `j0..j1` of the MLP half-block.
///
/// `x` and `out` point at `channels × hw` row-major activations; `mean`/`rstd` are
/// the norm's statistics over all of `x`.
///
/// # Safety
/// `x` must be valid for reads and `out` for writes of `channels·hw` f32, and no one
/// else may access columns `j0..j1` of `out` during the call (other threads may work
/// on other columns).
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_block(
    isa: Isa,
    w: &MlpWeights,
    x: *const f32,
    out: *mut f32,
    hw: usize,
    (j0, j1): (usize, usize),
    (mean, rstd): (f32, f32),
    scratch: &mut Scratch,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    let (c, h) = (w.channels, w.hidden);
    let cols = j1 - j0;
    debug_assert!(j0 < j1 && j1 <= hw);
    super::scratch_of(&mut scratch.centered, c * cols);
    super::scratch_of(&mut scratch.hidden, h * cols);
    // The columns of x this block reads, as one slice from (0, j0) to (c−1, j1).
    let span = (c - 1) * hw + cols;
    let xs = std::slice::from_raw_parts(x.add(j0), span);
    center_rows(isa, xs, hw, c, cols, mean, &mut scratch.centered);
    // hidden = W1' · centered   ([h, c] · [c, cols])
    gemm::gemm(
        h,
        cols,
        c,
        scratch.hidden.as_mut_ptr(),
        1,
        cols as isize,
        false,
        w.w1.as_ptr(),
        1,
        c as isize,
        scratch.centered.as_ptr(),
        1,
        cols as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
    bias_gelu_rows(isa, &mut scratch.hidden, cols, rstd, &w.c1);
    // out = x + b2'; out += W2' · hidden   ([c, h] · [h, cols])
    for (r, &b) in w.b2.iter().enumerate() {
        // Only this block's columns of row r: other threads may own the rest.
        let dst = std::slice::from_raw_parts_mut(out.add(r * hw + j0), cols);
        add_scalar(isa, &xs[r * hw..r * hw + cols], dst, b);
    }
    gemm::gemm(
        c,
        cols,
        h,
        out.add(j0),
        1,
        hw as isize,
        true,
        w.w2.as_ptr(),
        1,
        h as isize,
        scratch.hidden.as_ptr(),
        1,
        cols as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
    Ok(())
}
