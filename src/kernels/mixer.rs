//! The PoolFormer token mixer on one channel plane, with the norm folded in.
//!
//! With `n = γ·(x − μ)·r + β` (one-group GroupNorm) and an average pool whose
//! weights sum to one (3×3, stride 1, padding 1, `count_include_pad=False`), the
//! affine commutes with the pool: `pool(n) − n = γ·r·(pool(x) − x)`. The block's
//! first half, `x + ls·(pool(n) − n)`, is therefore `x + k·(pool(x) − x)` with
//! `k = ls·γ·r` per channel: one read and one write of the plane.

use super::multiversion;

multiversion! {
    /// `out = x + k·(avgpool3x3(x) − x)` over an `h`×`w` plane (row-major), the pool
    /// averaging only the in-bounds neighbours. `col` is scratch of length `w`.
    pub fn mix_plane(x: &[f32], out: &mut [f32], h: usize, w: usize, k: f32, col: &mut [f32]) {
        debug_assert!(x.len() == h * w && out.len() == h * w && col.len() == w);
        for i in 0..h {
            let top = i.saturating_sub(1);
            let bottom = (i + 1).min(h - 1);
            let inv_rows = 1.0 / (bottom - top + 1) as f32;
            // Vertical sums of the (up to) three rows around row i.
            let r0 = &x[top * w..top * w + w];
            let r1 = &x[i * w..i * w + w];
            col.copy_from_slice(r0);
            if i != top {
                for (c, &v) in col.iter_mut().zip(r1) {
                    *c += v;
                }
            }
            if bottom != i {
                let r2 = &x[bottom * w..bottom * w + w];
                for (c, &v) in col.iter_mut().zip(r2) {
                    *c += v;
                }
            }
            let o = &mut out[i * w..i * w + w];
            if w == 1 {
                o[0] = r1[0] + k * (col[0] * inv_rows - r1[0]);
                continue;
            }
            let edge = inv_rows * 0.5;
            let inner = inv_rows * (1.0 / 3.0);
            o[0] = r1[0] + k * ((col[0] + col[1]) * edge - r1[0]);
            let last = w - 1;
            o[last] = r1[last] + k * ((col[last - 1] + col[last]) * edge - r1[last]);
            // Interior columns: three-wide horizontal sums of the vertical sums.
            let left = &col[..w - 2];
            let mid = &col[1..w - 1];
            let right = &col[2..];
            let xs = &r1[1..w - 1];
            for ((((o, &a), &b), &c), &xv) in
                o[1..w - 1].iter_mut().zip(left).zip(mid).zip(right).zip(xs)
            {
                *o = xv + k * ((a + b + c) * inner - xv);
            }
        }
    }
}
