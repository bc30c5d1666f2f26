//! The PoolFormer token mixer on one channel plane, with the norm folded in.
//!
//! With `n = γ·(x − μ)·r + β` (one-group GroupNorm) and an average pool whose
//! weights sum to one (3×3, stride 1, padding 1, `count_include_pad=False`), the
//! affine commutes with the pool: `pool(n) − n = γ·r·(pool(x) − x)`. The block's
//! first half, `x + ls·(pool(n) − n)`, is therefore `x + k·(pool(x) − x)` with
//! `k = ls·γ·r` per channel: one read and one write of the plane.
//!
//! The plane is handled as one flat run of `h·w` values, so that the vector loops are
//! as long as the plane whatever its width (PoolFormer's last stage is 7×7): first the
//! vertical sums of the (up to) three rows around each position, then each position's
//! weighted sum of the vertical sums to its left, at it and to its right. The weights
//! ([`PoolTaps`]) hold the reciprocal of the number of taps inside the plane, and zero
//! where the left or right neighbour lies in another row.

use super::multiversion;

/// Per-position weights of a 3×3 average pool (stride 1, padding 1,
/// `count_include_pad=False`) over an `h`×`w` plane, applied to vertical three-row sums.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolTaps {
    h: usize,
    w: usize,
    left: Vec<f32>,
    mid: Vec<f32>,
    right: Vec<f32>,
}

impl PoolTaps {
    pub fn new(h: usize, w: usize) -> PoolTaps {
        let n = h * w;
        let (mut left, mut mid, mut right) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        for i in 0..h {
            let rows = 1 + usize::from(i > 0) + usize::from(i + 1 < h);
            for j in 0..w {
                let (has_left, has_right) = (j > 0, j + 1 < w);
                let cols = 1 + usize::from(has_left) + usize::from(has_right);
                let inv = ((rows * cols) as f32).recip();
                let p = i * w + j;
                mid[p] = inv;
                left[p] = if has_left { inv } else { 0.0 };
                right[p] = if has_right { inv } else { 0.0 };
            }
        }
        PoolTaps {
            h,
            w,
            left,
            mid,
            right,
        }
    }

    /// Length of the scratch [`mix_plane`] takes.
    pub fn scratch_len(&self) -> usize {
        self.h * self.w + 2
    }
}

multiversion! {
    /// `out = x + k·(avgpool3x3(x) − x)` over the plane `taps` describes (row-major),
    /// the pool averaging only the in-bounds neighbours. `sums` is scratch of
    /// [`PoolTaps::scratch_len`].
    pub fn mix_plane(x: &[f32], out: &mut [f32], taps: &PoolTaps, k: f32, sums: &mut [f32]) {
        let (h, w) = (taps.h, taps.w);
        let n = h * w;
        assert!(x.len() == n && out.len() == n && sums.len() == n + 2);
        if n == 0 {
            return;
        }
        // sums[1 + p], p = i·w + j: the sum of x over the rows i−1..=i+1 inside the
        // plane, at column j. sums[0] and sums[n + 1] pad the ends (their weights are
        // zero).
        sums[0] = 0.0;
        sums[n + 1] = 0.0;
        let v = &mut sums[1..n + 1];
        if h == 1 {
            v.copy_from_slice(x);
        } else {
            let last = (h - 1) * w;
            for ((s, &a), &b) in v[..w].iter_mut().zip(&x[..w]).zip(&x[w..2 * w]) {
                *s = a + b;
            }
            for (((s, &a), &b), &c) in v[w..last]
                .iter_mut()
                .zip(&x[..last - w])
                .zip(&x[w..last])
                .zip(&x[2 * w..])
            {
                *s = a + b + c;
            }
            for ((s, &a), &b) in v[last..].iter_mut().zip(&x[last - w..last]).zip(&x[last..]) {
                *s = a + b;
            }
        }
        let weights = taps.left.iter().zip(&taps.mid).zip(&taps.right);
        let neighbours = sums[..n].iter().zip(&sums[1..n + 1]).zip(&sums[2..n + 2]);
        for (((o, &xv), ((&wl, &wm), &wr)), ((&sl, &sm), &sr)) in
            out.iter_mut().zip(x).zip(weights).zip(neighbours)
        {
            let pool = wl * sl + wm * sm + wr * sr;
            *o = xv + k * (pool - xv);
        }
    }
}
