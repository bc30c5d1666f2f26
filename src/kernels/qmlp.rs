//! The int8 PoolFormer channel MLP as a quantized graph defines it, fused around two
//! integer matrix products ([`super::qgemm`]):
//!
//! ```text
//! q₁ = Q₁(GroupNorm₁(x)·γ + β)                     u8, per-tensor grid
//! h  = R₁(W₁·(q₁ − z₁) + bias₁)                     f32 (or re-gridded f32)
//! q₂ = Q₂(gelu(h))                                  u8, per-tensor grid
//! y  = x + ls ⊙ R₂(W₂·(q₂ − z₂) + bias₂)
//! ```
//!
//! `Q` is QuantizeLinear, `R` the per-channel requantization of the integer
//! accumulator ([`crate::ops::requant::Requant`], `acc·mult[c] + offset[c]`, to f32 or
//! onto a grid and back). Every step keeps the graph's arithmetic: the only
//! differences from running the graph op by op are f32 rounding in the norm
//! statistics, in erf and in the SIMD builds' fused multiply-adds, which can move a
//! value that sits within ~1e-6 of a rounding boundary to the neighbouring
//! quantization step.
//!
//! Tokens are processed in blocks of columns; the quantized activations of a block are
//! written straight into the k4 layout the matrix kernel reads. Each product runs a
//! pass of rows at a time ([`rows_per_pass`]), its epilogue right after, so that the
//! i32 accumulators it reads back (at most 16 KiB) are still in L1.

// Kernels take their operands and the per-row quantization parameters as arguments.
#![allow(clippy::too_many_arguments)]

use std::sync::OnceLock;

use anyhow::{ensure, Result};

use super::mlp::{column_blocks, scaled_gelu};
use super::qgemm::{gemm_u8i8, k4_len, PackedI8};
use super::quant::{lookup_in_place, round_shifted, round_to_low_byte, ClampTo, Grid};
use super::{madd, multiversion, multiversion_fma, scratch_of, Isa, PORTABLE_FMA};

/// How an i32 accumulator row becomes f32: `v = (acc + corr)·mult + offset`, and
/// optionally quantized onto a grid and dequantized again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dequant {
    F32,
    /// `(clamp(round(v) + grid.zero_point) − dq_zero_point)·dq_scale`.
    Grid {
        grid: Grid,
        dq_zero_point: i32,
        dq_scale: f32,
    },
}

/// One integer 1×1 conv of the block and its requantization.
#[derive(Debug, Clone, PartialEq)]
pub struct QLayer {
    pub weights: PackedI8,
    /// Per output row: `bias − z_in·Σ_k w` in i32, so that the raw u8 product plus
    /// `corr` is the graph's accumulator `Σ_k w·(q − z_in) + bias`.
    pub corr: Vec<i32>,
    pub mult: Vec<f32>,
    pub offset: Vec<f32>,
    pub dequant: Dequant,
}

impl QLayer {
    /// `w`: `[rows, depth]` row-major i8; `bias`: i32 per row; `z_in`: the zero point
    /// of the u8 input.
    pub fn new(
        rows: usize,
        depth: usize,
        w: &[i8],
        bias: &[i32],
        z_in: i32,
        mult: Vec<f32>,
        offset: Vec<f32>,
        dequant: Dequant,
    ) -> Result<QLayer> {
        let weights = PackedI8::new(rows, depth, w)?;
        ensure!(
            bias.len() == rows && mult.len() == rows && offset.len() == rows,
            "int8 layer: {rows} rows, {} biases, {} multipliers, {} offsets",
            bias.len(),
            mult.len(),
            offset.len()
        );
        let corr = weights
            .row_sums()
            .iter()
            .zip(bias)
            .map(|(&s, &b)| b.wrapping_sub(z_in.wrapping_mul(s)))
            .collect();
        Ok(QLayer {
            weights,
            corr,
            mult,
            offset,
            dequant,
        })
    }
}

/// Everything one int8 channel-MLP half-block needs besides `x`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMlp {
    pub channels: usize,
    pub hidden: usize,
    /// The norm's affine, per channel.
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    /// Reciprocal of Q₁'s scale and its grid, expressed on u8 (an i8 grid with zero
    /// point z is the u8 grid with zero point z + 128).
    pub inv_scale1: f32,
    pub grid1: Grid,
    pub fc1: QLayer,
    pub inv_scale2: f32,
    pub grid2: Grid,
    pub fc2: QLayer,
    /// Layer scale per channel (ones when the graph has none).
    pub layer_scale: Vec<f32>,
    /// Where fc1's requantization ends on a grid of at most 256 steps
    /// ([`Dequant::Grid`]), `Q₂(gelu(·))` of each step: fc1's epilogue then rounds
    /// onto the grid and looks the byte up. Filled on first use from the fields above;
    /// build with `OnceLock::new()`.
    pub gelu_table: OnceLock<Option<[u8; 256]>>,
}

impl QuantMlp {
    pub fn check(&self) -> Result<()> {
        let (c, h) = (self.channels, self.hidden);
        ensure!(c > 0 && h > 0, "empty int8 MLP");
        ensure!(
            self.gamma.len() == c && self.beta.len() == c && self.layer_scale.len() == c,
            "int8 MLP: per-channel vectors must have {c} values"
        );
        ensure!(
            self.fc1.weights.rows() == h && self.fc1.weights.depth() == c,
            "int8 MLP: fc1 must be {h}×{c}"
        );
        ensure!(
            self.fc2.weights.rows() == c && self.fc2.weights.depth() == h,
            "int8 MLP: fc2 must be {c}×{h}"
        );
        for g in [self.grid1, self.grid2] {
            ensure!(
                g.lo == 0 && g.hi == 255,
                "int8 MLP: activations must be on a u8 grid"
            );
        }
        Ok(())
    }

    /// [`QuantMlp::gelu_table`], computed on the first call.
    pub fn gelu_table(&self) -> Option<&[u8; 256]> {
        self.gelu_table
            .get_or_init(|| self.compute_gelu_table())
            .as_ref()
    }

    /// Entry `i`: fc1's grid step `grid.lo + i` dequantized, through the scaled GELU
    /// and Q₂ exactly as the portable build computes a value ([`dequant`] and
    /// [`hidden_quantize_group`]); steps past `grid.hi` are never looked up.
    fn compute_gelu_table(&self) -> Option<[u8; 256]> {
        let Dequant::Grid {
            grid,
            dq_zero_point,
            dq_scale,
        } = self.fc1.dequant
        else {
            return None;
        };
        if grid.hi < grid.lo || grid.hi - grid.lo > 255 {
            return None;
        }
        let g2 = self.grid2;
        let (lo, hi) = g2.bounds();
        Some(std::array::from_fn(|i| {
            // The integer difference is exact in f32, as `round_shifted`'s is.
            let v = (grid.lo + i as i32 - dq_zero_point) as f32 * dq_scale;
            let g = scaled_gelu::<PORTABLE_FMA>(v, self.inv_scale2);
            round_to_low_byte(g.clamp_to(lo, hi), g2.zero_point)
        }))
    }

    /// Column blocks: about 65 536 hidden values per block (64 KiB of GELU outputs in
    /// the k4 layout), at least 64 columns, boundaries at multiples of 16 tokens (the
    /// AVX2 kernels' tile width, two of NEON's), so that partial tiles occur in the last
    /// block only.
    pub fn blocks(&self, hw: usize, threads: usize) -> Vec<(usize, usize)> {
        column_blocks(hw, (65_536 / self.hidden).max(64), threads, 16)
    }
}

/// Per-thread buffers for [`run_block`].
#[derive(Default)]
pub struct QScratch {
    q1: Vec<u8>,
    acc1: Vec<i32>,
    q2: Vec<u8>,
    acc2: Vec<i32>,
}

/// Writes 4 quantized rows into one k4 group: `dst[4n + j] = q(rows[j][n])`.
#[inline(always)]
fn pack_group(dst: &mut [u8], cols: usize, mut q: impl FnMut(usize, usize) -> u8, nrows: usize) {
    for (n, d) in dst[..4 * cols].chunks_exact_mut(4).enumerate() {
        for (j, d) in d.iter_mut().enumerate() {
            *d = if j < nrows { q(j, n) } else { 0 };
        }
    }
}

multiversion! {
    /// Q₁ of the normalized, affine-mapped `x` for one k4 group of up to 4 channels:
    /// `clamp(round((((x − μ)·r)·γ + β)·inv_scale) + zp)`. `rows` holds the group's
    /// channel rows (`cols` values each), padded with empty slices.
    pub fn norm_quantize_group(
        rows: [&[f32]; 4],
        nrows: usize,
        cols: usize,
        stats: (f32, f32),
        gamma: [f32; 4],
        beta: [f32; 4],
        inv_scale: f32,
        grid: Grid,
        dst: &mut [u8],
    ) {
        let (mean, rstd) = stats;
        let (lo, hi) = grid.bounds();
        let zp = grid.zero_point;
        if nrows == 4 {
            let (r0, r1, r2, r3) = (&rows[0][..cols], &rows[1][..cols], &rows[2][..cols], &rows[3][..cols]);
            let q = |x: f32, j: usize| {
                let n = ((x - mean) * rstd) * gamma[j] + beta[j];
                round_to_low_byte((n * inv_scale).clamp_to(lo, hi), zp)
            };
            for (n, d) in dst[..4 * cols].chunks_exact_mut(4).enumerate() {
                d[0] = q(r0[n], 0);
                d[1] = q(r1[n], 1);
                d[2] = q(r2[n], 2);
                d[3] = q(r3[n], 3);
            }
        } else {
            pack_group(dst, cols, |j, n| {
                let v = ((rows[j][n] - mean) * rstd) * gamma[j] + beta[j];
                round_to_low_byte((v * inv_scale).clamp_to(lo, hi), zp)
            }, nrows);
        }
    }
}

/// `R(acc + corr)` of one accumulator value, `acc·mult + offset` fused with `FMA`.
#[inline(always)]
fn dequant_with<const FMA: bool>(acc: i32, corr: i32, mult: f32, offset: f32, how: Dequant) -> f32 {
    let v = madd::<FMA>(acc.wrapping_add(corr) as f32, mult, offset);
    match how {
        Dequant::F32 => v,
        Dequant::Grid {
            grid,
            dq_zero_point,
            dq_scale,
        } => {
            let (lo, hi) = grid.bounds();
            round_shifted(v.clamp_to(lo, hi), (grid.zero_point - dq_zero_point) as f32) * dq_scale
        }
    }
}

/// `R(acc + corr)` of one accumulator value.
#[inline(always)]
fn dequant(acc: i32, corr: i32, mult: f32, offset: f32, how: Dequant) -> f32 {
    dequant_with::<false>(acc, corr, mult, offset, how)
}

multiversion_fma! {
    /// fc1's epilogue for one k4 group of up to 4 hidden rows:
    /// `q₂ = Q₂(gelu(R₁(acc + corr)))` into `dst`. The SIMD builds fuse multiply-adds,
    /// so a value within a rounding of a quantization boundary may land one step from
    /// the portable build's. [`hidden_rows`] runs full groups of [`Dequant::F32`] rows
    /// on AVX2 through `x86::hidden_f32_group` (the same bytes as this function's AVX2
    /// build), and re-gridded rows through [`QuantMlp::gelu_table`].
    pub fn hidden_quantize_group<const FMA: bool, const LANES: usize>(
        acc: [&[i32]; 4],
        nrows: usize,
        cols: usize,
        corr: [i32; 4],
        mult: [f32; 4],
        offset: [f32; 4],
        how: Dequant,
        inv_scale: f32,
        grid: Grid,
        dst: &mut [u8],
    ) {
        let (lo, hi) = grid.bounds();
        let zp = grid.zero_point;
        // One copy of the loop per form of `how`, so that its match is not in the loop.
        // Q₂'s scale goes into the GELU's factor ½.
        match how {
            Dequant::F32 => {
                let q = |a: i32, j: usize| {
                    let v = dequant_with::<FMA>(a, corr[j], mult[j], offset[j], Dequant::F32);
                    let g = scaled_gelu::<FMA>(v, inv_scale);
                    round_to_low_byte(g.clamp_to(lo, hi), zp)
                };
                hidden_quantize_loop::<LANES>(acc, nrows, cols, q, dst)
            }
            Dequant::Grid { grid: g1, dq_zero_point, dq_scale } => {
                let q = |a: i32, j: usize| {
                    let how = Dequant::Grid { grid: g1, dq_zero_point, dq_scale };
                    let v = dequant_with::<FMA>(a, corr[j], mult[j], offset[j], how);
                    let g = scaled_gelu::<FMA>(v, inv_scale);
                    round_to_low_byte(g.clamp_to(lo, hi), zp)
                };
                hidden_quantize_loop::<LANES>(acc, nrows, cols, q, dst)
            }
        }
    }
}

/// [`hidden_quantize_group`]'s loop with its per-value function `q(acc, row)`, in runs
/// of `L` tokens (a vector of f32 lanes).
#[inline(always)]
fn hidden_quantize_loop<const L: usize>(
    acc: [&[i32]; 4],
    nrows: usize,
    cols: usize,
    q: impl Fn(i32, usize) -> u8 + Copy,
    dst: &mut [u8],
) {
    if nrows == 4 {
        // Runs of L tokens, the last one padded: every value goes through the
        // vector code (a scalar tail costs about 8 times as much per value).
        #[inline(always)]
        fn run<const L: usize>(a: [[i32; L]; 4], q: impl Fn(i32, usize) -> u8) -> [u32; L] {
            // Token l's 4 bytes as one little-endian word: shifts and ors in
            // L lanes rather than byte shuffles.
            let mut w = [0u32; L];
            for (l, w) in w.iter_mut().enumerate() {
                *w = u32::from_le_bytes([
                    q(a[0][l], 0),
                    q(a[1][l], 1),
                    q(a[2][l], 2),
                    q(a[3][l], 3),
                ]);
            }
            w
        }
        #[inline(always)]
        fn store<const L: usize>(d: &mut [u8], w: [u32; L]) {
            for (d, w) in d.chunks_exact_mut(4).zip(w) {
                d.copy_from_slice(&w.to_le_bytes());
            }
        }
        let full = cols / L;
        let (body, tail) = dst[..4 * cols].split_at_mut(4 * L * full);
        for (c, d) in body.chunks_exact_mut(4 * L).enumerate() {
            let a = std::array::from_fn(|j| {
                let row: &[i32; L] = acc[j][L * c..L * c + L].try_into().unwrap();
                *row
            });
            store(d, run::<L>(a, q));
        }
        if !tail.is_empty() {
            let t = cols - L * full;
            let a = std::array::from_fn(|j| {
                let mut row = [0i32; L];
                row[..t].copy_from_slice(&acc[j][L * full..cols]);
                row
            });
            store(tail, run::<L>(a, q));
        }
    } else {
        pack_group(dst, cols, |j, n| q(acc[j][n], j), nrows);
    }
}

multiversion_fma! {
    /// fc1's epilogue up to the grid for one k4 group of up to 4 hidden rows: the
    /// grid index `clamp(round(R₁(acc + corr))) − grid.lo` of each value, as byte
    /// (the rest is [`QuantMlp::gelu_table`]'s lookup).
    pub fn grid_index_group<const FMA: bool, const LANES: usize>(
        acc: [&[i32]; 4],
        nrows: usize,
        cols: usize,
        corr: [i32; 4],
        mult: [f32; 4],
        offset: [f32; 4],
        grid: Grid,
        dst: &mut [u8],
    ) {
        let (lo, hi) = grid.bounds();
        let shift = grid.zero_point - grid.lo;
        let q = |a: i32, j: usize| {
            let v = madd::<FMA>(a.wrapping_add(corr[j]) as f32, mult[j], offset[j]);
            round_to_low_byte(v.clamp_to(lo, hi), shift)
        };
        hidden_quantize_loop::<LANES>(acc, nrows, cols, q, dst)
    }
}

multiversion! {
    /// fc2's epilogue for one output row: `out = x + ls·R₂(acc + corr)`.
    pub fn residual_row(
        acc: &[i32],
        x: &[f32],
        out: &mut [f32],
        corr: i32,
        mult: f32,
        offset: f32,
        how: Dequant,
        ls: f32,
    ) {
        for ((o, &a), &x) in out.iter_mut().zip(acc).zip(x) {
            *o = x + ls * dequant(a, corr, mult, offset, how);
        }
    }
}

const EMPTY_F32: &[f32] = &[];
const EMPTY_I32: &[i32] = &[];

/// Computes output columns `j0..j1` of the int8 MLP half-block.
///
/// `x` and `out` point at `channels × hw` row-major activations; `stats` are the
/// norm's mean and reciprocal standard deviation over all of `x`.
///
/// # Safety
/// `x` must be valid for reads and `out` for writes of `channels·hw` f32, and no one
/// else may access columns `j0..j1` of `out` during the call.
pub unsafe fn run_block(
    isa: Isa,
    w: &QuantMlp,
    x: *const f32,
    out: *mut f32,
    hw: usize,
    (j0, j1): (usize, usize),
    stats: (f32, f32),
    scratch: &mut QScratch,
) {
    let cols = j1 - j0;
    let (c, h) = (w.channels, w.hidden);
    scratch_of(&mut scratch.q1, k4_len(c, cols));
    scratch_of(&mut scratch.q2, k4_len(h, cols));
    scratch_of(&mut scratch.acc1, acc_len(h, cols));
    scratch_of(&mut scratch.acc2, acc_len(c, cols));
    let span = (c - 1) * hw + cols;
    let xs = std::slice::from_raw_parts(x.add(j0), span);
    quantize_input(isa, w, xs, hw, cols, stats, &mut scratch.q1);
    hidden_rows(
        isa,
        w,
        &scratch.q1,
        cols,
        0..h,
        &mut scratch.acc1,
        &mut scratch.q2,
    );
    output_rows(isa, w, &scratch.q2, cols, 0..c, &mut scratch.acc2, |r| {
        let dst = std::slice::from_raw_parts_mut(out.add(r * hw + j0), cols);
        (&xs[r * hw..r * hw + cols], dst)
    });
}

/// Q₁ of `channels` rows of `cols` values, rows `stride` apart in `xs`, into `q1` (k4).
pub fn quantize_input(
    isa: Isa,
    w: &QuantMlp,
    xs: &[f32],
    stride: usize,
    cols: usize,
    stats: (f32, f32),
    q1: &mut [u8],
) {
    let c = w.channels;
    for g in 0..c.div_ceil(4) {
        let nrows = (c - 4 * g).min(4);
        let mut rows = [EMPTY_F32; 4];
        let mut gamma = [0f32; 4];
        let mut beta = [0f32; 4];
        for j in 0..nrows {
            let ch = 4 * g + j;
            rows[j] = &xs[ch * stride..ch * stride + cols];
            gamma[j] = w.gamma[ch];
            beta[j] = w.beta[ch];
        }
        norm_quantize_group(
            isa,
            rows,
            nrows,
            cols,
            stats,
            gamma,
            beta,
            w.inv_scale1,
            w.grid1,
            &mut q1[4 * g * cols..4 * (g + 1) * cols],
        );
    }
}

/// Rows of a matrix product whose i32 accumulators for `cols` tokens fill at most
/// 16 KiB, a multiple of 8 (whole tiles of every kernel) and at least 8 (more than
/// 16 KiB only past 512 tokens): the epilogue reads them back from L1 rather than
/// from L2.
pub fn rows_per_pass(cols: usize) -> usize {
    (4096 / cols.max(1) / 8 * 8).max(8)
}

/// Length of the accumulator buffer [`hidden_rows`] and [`output_rows`] need for
/// `rows` rows of `cols` tokens.
pub fn acc_len(rows: usize, cols: usize) -> usize {
    rows.min(rows_per_pass(cols)) * cols
}

/// The passes of [`rows_per_pass`] rows that cover `rows`.
fn passes(
    rows: std::ops::Range<usize>,
    cols: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = rows_per_pass(cols);
    let end = rows.end;
    rows.step_by(step).map(move |r| r..(r + step).min(end))
}

/// fc1 for hidden rows `rows` (starting on a k4 group) and its epilogue into `q2`,
/// the k4 groups of those rows (group `rows.start/4` first), a pass of
/// [`rows_per_pass`] rows at a time. `acc` holds at least [`acc_len`] values.
pub fn hidden_rows(
    isa: Isa,
    w: &QuantMlp,
    q1: &[u8],
    cols: usize,
    rows: std::ops::Range<usize>,
    acc: &mut [i32],
    q2: &mut [u8],
) {
    debug_assert!(rows.start.is_multiple_of(4));
    let l = &w.fc1;
    let table = w.gelu_table();
    let g0 = rows.start / 4;
    for pass in passes(rows, cols) {
        let n = pass.len();
        gemm_u8i8(
            isa,
            &l.weights,
            pass.clone(),
            q1,
            cols,
            &mut acc[..n * cols],
            cols,
        );
        for g in pass.start / 4..pass.end.div_ceil(4) {
            let nrows = (pass.end - 4 * g).min(4);
            let mut a = [EMPTY_I32; 4];
            let mut corr = [0i32; 4];
            let mut mult = [0f32; 4];
            let mut offset = [0f32; 4];
            for j in 0..nrows {
                let r = 4 * g + j;
                let local = r - pass.start;
                a[j] = &acc[local * cols..(local + 1) * cols];
                corr[j] = l.corr[r];
                mult[j] = l.mult[r];
                offset[j] = l.offset[r];
            }
            let dst = &mut q2[4 * (g - g0) * cols..4 * (g - g0 + 1) * cols];
            match (table, l.dequant) {
                (Some(_), Dequant::Grid { grid, .. }) => {
                    grid_index_group(isa, a, nrows, cols, corr, mult, offset, grid, dst)
                }
                #[cfg(target_arch = "x86_64")]
                (_, Dequant::F32) if nrows == 4 && isa == Isa::Avx2 && isa.is_supported() => {
                    // SAFETY: AVX2 and FMA are present (checked).
                    unsafe {
                        x86::hidden_f32_group(
                            a,
                            cols,
                            corr,
                            mult,
                            offset,
                            w.inv_scale2,
                            w.grid2,
                            dst,
                        )
                    }
                }
                _ => hidden_quantize_group(
                    isa,
                    a,
                    nrows,
                    cols,
                    corr,
                    mult,
                    offset,
                    l.dequant,
                    w.inv_scale2,
                    w.grid2,
                    dst,
                ),
            }
        }
        if let Some(table) = table {
            let groups = pass.start / 4 - g0..pass.end.div_ceil(4) - g0;
            lookup_in_place(
                isa,
                &mut q2[4 * groups.start * cols..4 * groups.end * cols],
                table,
            );
        }
    }
}

/// fc2 for output rows `rows` and the residual epilogue, a pass of [`rows_per_pass`]
/// rows at a time; `row_io(r)` gives output row `r`'s residual input and destination.
/// `acc` holds at least [`acc_len`] values.
pub fn output_rows<'o>(
    isa: Isa,
    w: &QuantMlp,
    q2: &[u8],
    cols: usize,
    rows: std::ops::Range<usize>,
    acc: &mut [i32],
    mut row_io: impl FnMut(usize) -> (&'o [f32], &'o mut [f32]),
) {
    let l = &w.fc2;
    for pass in passes(rows, cols) {
        let n = pass.len();
        gemm_u8i8(
            isa,
            &l.weights,
            pass.clone(),
            q2,
            cols,
            &mut acc[..n * cols],
            cols,
        );
        for (i, r) in pass.enumerate() {
            let (x, out) = row_io(r);
            residual_row(
                isa,
                &acc[i * cols..(i + 1) * cols],
                x,
                out,
                l.corr[r],
                l.mult[r],
                l.offset[r],
                l.dequant,
                w.layer_scale[r],
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::mlp::ERF_A;
    use super::Grid;

    /// [`super::hidden_quantize_group`] with [`super::Dequant::F32`] and 4 rows, in
    /// AVX2 intrinsics: the same operations in the same order as the AVX2 build of the
    /// generic code (so the same bytes), 8 tokens of one row at a time with the
    /// constants in registers or memory operands, where the compiler's vectorization
    /// of the generic loop reloads them by broadcasts in every group (on Zen 3 the
    /// whole `pfe quantize` S12 runs about 4 % faster so).
    ///
    /// # Safety
    /// AVX2 and FMA; `acc` rows hold `cols` values, `dst` `4·cols` bytes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hidden_f32_group(
        acc: [&[i32]; 4],
        cols: usize,
        corr: [i32; 4],
        mult: [f32; 4],
        offset: [f32; 4],
        inv_scale: f32,
        grid: Grid,
        dst: &mut [u8],
    ) {
        let k = Consts {
            a: ERF_A.map(|c| _mm256_set1_ps(c)),
            one: _mm256_set1_ps(1.0),
            sqrt_half: _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            half_scale: _mm256_set1_ps(0.5 * inv_scale),
            sign: _mm256_set1_ps(-0.0),
            lo: _mm256_set1_ps(grid.bounds().0),
            hi: _mm256_set1_ps(grid.bounds().1),
            magic: _mm256_set1_ps(12_582_912.0),
            zp: _mm256_set1_epi32(grid.zero_point),
            low: _mm256_set1_epi32(0xFF),
        };
        let rows: [_; 4] = std::array::from_fn(|j| {
            (
                _mm256_set1_epi32(corr[j]),
                _mm256_set1_ps(mult[j]),
                _mm256_set1_ps(offset[j]),
            )
        });
        let full = cols / 8;
        for c in 0..full {
            // SAFETY: AVX2 and FMA; tokens 8c..8c + 8 ≤ cols of each row, bytes
            // 32c..32c + 32 of `dst`.
            unsafe {
                let load =
                    |j: usize| _mm256_loadu_si256(acc[j].as_ptr().add(8 * c) as *const __m256i);
                let v = [
                    value(&k, rows[0], load(0)),
                    value(&k, rows[1], load(1)),
                    value(&k, rows[2], load(2)),
                    value(&k, rows[3], load(3)),
                ];
                _mm256_storeu_si256(dst.as_mut_ptr().add(32 * c) as *mut __m256i, word(&k, v));
            }
        }
        let t = cols - 8 * full;
        if t > 0 {
            let mut tail = [[0i32; 8]; 4];
            for (row, acc) in tail.iter_mut().zip(acc) {
                row[..t].copy_from_slice(&acc[8 * full..cols]);
            }
            let mut out = [0u8; 32];
            // SAFETY: AVX2 and FMA; 8 values of each local row, 32 bytes of `out`.
            unsafe {
                let load = |j: usize| _mm256_loadu_si256(tail[j].as_ptr() as *const __m256i);
                let v = [
                    value(&k, rows[0], load(0)),
                    value(&k, rows[1], load(1)),
                    value(&k, rows[2], load(2)),
                    value(&k, rows[3], load(3)),
                ];
                _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, word(&k, v));
            }
            dst[32 * full..4 * cols].copy_from_slice(&out[..4 * t]);
        }
    }

    /// The constants of [`hidden_f32_group`].
    struct Consts {
        a: [__m256; 6],
        one: __m256,
        sqrt_half: __m256,
        half_scale: __m256,
        sign: __m256,
        lo: __m256,
        hi: __m256,
        magic: __m256,
        zp: __m256i,
        low: __m256i,
    }

    /// One row's 8 values (`row`: its correction, multiplier and offset): the low byte
    /// of each lane is the output.
    ///
    /// # Safety
    /// AVX2 and FMA (inlined into [`hidden_f32_group`]).
    #[inline(always)]
    unsafe fn value(k: &Consts, row: (__m256i, __m256, __m256), acc: __m256i) -> __m256i {
        unsafe {
            let v = _mm256_cvtepi32_ps(_mm256_add_epi32(acc, row.0));
            let v = _mm256_fmadd_ps(v, row.1, row.2);
            let x = _mm256_mul_ps(v, k.sqrt_half);
            let t = _mm256_andnot_ps(k.sign, x);
            let mut p = k.a[5];
            for c in k.a[..5].iter().rev() {
                p = _mm256_fmadd_ps(p, t, *c);
            }
            let p = _mm256_fmadd_ps(p, t, k.one);
            let p2 = _mm256_mul_ps(p, p);
            let p4 = _mm256_mul_ps(p2, p2);
            let p8 = _mm256_mul_ps(p4, p4);
            let e = _mm256_sub_ps(k.one, _mm256_div_ps(k.one, _mm256_mul_ps(p8, p8)));
            let e = _mm256_or_ps(e, _mm256_and_ps(k.sign, x));
            let h = _mm256_mul_ps(v, k.half_scale);
            let g = _mm256_fmadd_ps(h, e, h);
            let g = _mm256_min_ps(_mm256_max_ps(g, k.lo), k.hi);
            _mm256_add_epi32(_mm256_castps_si256(_mm256_add_ps(g, k.magic)), k.zp)
        }
    }

    /// Four rows' output bytes (the low bytes of `v`'s lanes) as 8 k4 words.
    ///
    /// # Safety
    /// AVX2 (inlined into [`hidden_f32_group`]).
    #[inline(always)]
    unsafe fn word(k: &Consts, v: [__m256i; 4]) -> __m256i {
        unsafe {
            let b = |i: usize| _mm256_and_si256(v[i], k.low);
            _mm256_or_si256(
                _mm256_or_si256(b(0), _mm256_slli_epi32::<8>(b(1))),
                _mm256_or_si256(_mm256_slli_epi32::<16>(b(2)), _mm256_slli_epi32::<24>(v[3])),
            )
        }
    }
}
