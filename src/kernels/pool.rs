//! 3×3 average pooling, stride 1, padding 1, divided by the number of taps inside the
//! image (ONNX AveragePool with `count_include_pad = 0`), computed exactly as tract's
//! generic `SumPool` kernel does: the taps in row-major order summed from the value an
//! empty `f32` sum starts at, then multiplied by the reciprocal of their count. Same
//! operations in the same order, so the same bits; interior rows run as one loop over
//! the columns that the compiler vectorizes (each lane keeps that order).

/// Pooled values of positions `start..start + out.len()` of one `h×w` plane.
#[inline(always)]
pub fn avg_pool3x3(plane: &[f32], h: usize, w: usize, start: usize, out: &mut [f32]) {
    debug_assert!(plane.len() == h * w && start + out.len() <= h * w);
    let zero: f32 = std::iter::empty::<f32>().sum();
    let mut p = start;
    let mut done = 0;
    while done < out.len() {
        let (y, x0) = (p / w, p % w);
        let x1 = w.min(x0 + out.len() - done);
        pool_row(plane, h, w, y, x0, x1, zero, &mut out[done..done + x1 - x0]);
        done += x1 - x0;
        p += x1 - x0;
    }
}

/// Columns `x0..x1` of output row `y`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pool_row(
    plane: &[f32],
    h: usize,
    w: usize,
    y: usize,
    x0: usize,
    x1: usize,
    zero: f32,
    out: &mut [f32],
) {
    let interior = if y >= 1 && y + 1 < h && w >= 3 {
        x0.max(1)..x1.min(w - 1).max(x0.max(1))
    } else {
        x0..x0
    };
    for x in (x0..interior.start).chain(interior.end..x1) {
        out[x - x0] = edge(plane, h, w, y, x, zero);
    }
    if interior.is_empty() {
        return;
    }
    let r0 = &plane[(y - 1) * w..y * w];
    let r1 = &plane[y * w..(y + 1) * w];
    let r2 = &plane[(y + 1) * w..(y + 2) * w];
    let ninth = 9f32.recip();
    let dst = &mut out[interior.start - x0..interior.end - x0];
    for (i, o) in dst.iter_mut().enumerate() {
        let x = interior.start + i;
        let s = zero
            + r0[x - 1]
            + r0[x]
            + r0[x + 1]
            + r1[x - 1]
            + r1[x]
            + r1[x + 1]
            + r2[x - 1]
            + r2[x]
            + r2[x + 1];
        *o = s * ninth;
    }
}

/// One output at `(y, x)`, any position.
#[inline(always)]
fn edge(plane: &[f32], h: usize, w: usize, y: usize, x: usize, zero: f32) -> f32 {
    let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
    let (xa, xb) = (x.saturating_sub(1), (x + 1).min(w - 1));
    let mut s = zero;
    for yy in ya..=yb {
        for xx in xa..=xb {
            s += plane[yy * w + xx];
        }
    }
    s * (((yb - ya + 1) * (xb - xa + 1)) as f32).recip()
}
