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
}

impl PackedI8 {
    /// Packs row-major `[m, k]` weights.
    pub fn new(m: usize, k: usize, w: &[i8]) -> Result<PackedI8> {
        ensure!(m > 0 && k > 0, "empty weight matrix ({m}×{k})");
        ensure!(w.len() == m * k, "weights: {} values for {m}×{k}", w.len());
        let kp = k.div_ceil(4) * 4;
        let mut data = vec![0i8; m * kp];
        for (dst, src) in data.chunks_exact_mut(kp).zip(w.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let row_sums = w
            .chunks_exact(k)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Ok(PackedI8 {
            m,
            k,
            kp,
            data,
            row_sums,
        })
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

    /// `Σ_k w[r, k]` for each row.
    pub fn row_sums(&self) -> &[i32] {
        &self.row_sums
    }

    /// Row `r`, padded to `padded_depth()` with zeros.
    pub fn row(&self, r: usize) -> &[i8] {
        &self.data[r * self.kp..(r + 1) * self.kp]
    }
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
    let _ = isa;
    portable(w, rows, b, cols, acc, ldc);
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
