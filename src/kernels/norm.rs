//! Statistics of a one-group GroupNorm: mean and 1/sqrt(var + eps) over a whole tensor.

use super::{multiversion, Isa};

/// Lanes of the partial sums: wide enough for AVX-512, and independent chains for
/// the adds.
const LANES: usize = 16;
/// Elements summed in f32 before the partial sums are added into f64.
const BLOCK: usize = 4096;

/// Lane-wise sums of `f(v − shift)` over `block`, its tail in lane 0.
#[inline(always)]
fn lane_sums(block: &[f32], shift: f32, f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut lanes = block.chunks_exact(LANES);
    for v in &mut lanes {
        for (a, &v) in acc.iter_mut().zip(v) {
            *a += f(v - shift);
        }
    }
    for &v in lanes.remainder() {
        acc[0] += f(v - shift);
    }
    acc.iter().map(|&v| v as f64).sum()
}

multiversion! {
    /// Σ(x − shift) and Σ(x − shift)², accumulated in f32 over blocks of 4096 and in
    /// f64 across blocks.
    pub fn shifted_sums(x: &[f32], shift: f32) -> (f64, f64) {
        let mut s1 = 0f64;
        let mut s2 = 0f64;
        // One pass per sum over each block (which stays in L1 for the second): with
        // both sums in one loop the compiler pairs them up instead of vectorizing
        // across lanes.
        for block in x.chunks(BLOCK) {
            s1 += lane_sums(block, shift, |d| d);
            s2 += lane_sums(block, shift, |d| d * d);
        }
        (s1, s2)
    }
}

/// Mean and reciprocal standard deviation (biased variance, `eps` inside the root)
/// of `x`, in one pass. The sums are taken around the mean of a leading sample, so
/// a large common offset does not cancel catastrophically.
pub fn mean_rstd(isa: Isa, x: &[f32], eps: f32) -> (f32, f32) {
    mean_rstd_in_parts(isa, x, eps, 1, |parts, f| {
        parts.iter().map(|p| f(p)).collect()
    })
}

/// [`mean_rstd`] with `x` cut into `parts` slices whose sums `map` computes (in
/// parallel, for instance) by calling the given function on each.
pub fn mean_rstd_in_parts(
    isa: Isa,
    x: &[f32],
    eps: f32,
    parts: usize,
    map: impl FnOnce(&[&[f32]], &(dyn Fn(&[f32]) -> (f64, f64) + Sync)) -> Vec<(f64, f64)>,
) -> (f32, f32) {
    if x.is_empty() {
        return (0.0, 1.0 / eps.sqrt());
    }
    let head = &x[..x.len().min(256)];
    let shift = (head.iter().map(|&v| v as f64).sum::<f64>() / head.len() as f64) as f32;
    let slices: Vec<&[f32]> = x.chunks(x.len().div_ceil(parts.max(1))).collect();
    let sums = map(&slices, &|part| shifted_sums(isa, part, shift));
    let (s1, s2) = sums
        .iter()
        .fold((0.0, 0.0), |(a, b), &(c, d)| (a + c, b + d));
    let n = x.len() as f64;
    let m = s1 / n;
    let var = (s2 / n - m * m).max(0.0);
    let mean = shift as f64 + m;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}
