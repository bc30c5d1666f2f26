//! 3×3 average pooling, stride 1, padding 1, divided by the number of taps inside the
//! image (ONNX AveragePool with `count_include_pad = 0`), computed exactly as tract's
//! generic `SumPool` kernel does: the taps in row-major order summed from the value an
//! empty `f32` sum starts at, then multiplied by the reciprocal of their count. Same
//! operations in the same order, so the same bits, over a bordered copy of the rows so
//! that edges and interior run as one loop the compiler vectorizes.

/// Values [`avg_pool3x3_rows`] needs beside the plane: the reciprocal tap count of
/// every position, in rows of `w + 2` (the padded width; the two extra columns unused).
pub fn tap_reciprocals(h: usize, w: usize) -> Vec<f32> {
    let span = |i: usize, n: usize| (i + 1).min(n - 1) - i.saturating_sub(1) + 1;
    let mut r = vec![0.0; h * (w + 2)];
    for y in 0..h {
        for x in 0..w {
            r[y * (w + 2) + x] = ((span(y, h) * span(x, w)) as f32).recip();
        }
    }
    r
}

/// Scratch values [`avg_pool3x3_rows`] needs for `rows` rows of width `w`.
pub fn scratch_len(rows: usize, w: usize) -> usize {
    (2 * rows + 2) * (w + 2)
}

/// Pooled values of rows `y0..y0 + out.len() / w` of one `h×w` plane.
///
/// The rows and their neighbours are copied into a buffer `w + 2` wide with a border of
/// `−0.0`, so every position sums nine taps in one loop over the buffer that the
/// compiler vectorizes whatever the width. `s + (−0.0) = s` exactly for every `s`
/// (`+0.0` included), so a border tap changes no bit of the sum: the result is the
/// in-image taps summed in row-major order, as tract computes it. `recip` comes from
/// [`tap_reciprocals`], `scratch` holds [`scratch_len`] values. `post` is applied to
/// each pooled value as it is made (the step after the pooling, or nothing).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn avg_pool3x3_rows(
    plane: &[f32],
    h: usize,
    w: usize,
    y0: usize,
    out: &mut [f32],
    recip: &[f32],
    scratch: &mut [f32],
    post: impl Fn(f32) -> f32,
) {
    let rows = out.len() / w;
    let pw = w + 2;
    debug_assert!(out.len() == rows * w && y0 + rows <= h && plane.len() == h * w);
    debug_assert!(recip.len() == h * pw && scratch.len() >= scratch_len(rows, w));
    if rows == 0 {
        return;
    }
    let (padded, sums) = scratch.split_at_mut((rows + 2) * pw);
    for (r, dst) in padded.chunks_exact_mut(pw).enumerate() {
        let y = (y0 + r).wrapping_sub(1);
        if y < h {
            dst[0] = -0.0;
            dst[1..=w].copy_from_slice(&plane[y * w..(y + 1) * w]);
            dst[w + 1] = -0.0;
        } else {
            dst.fill(-0.0);
        }
    }
    let n = rows * pw - 2;
    let sums = &mut sums[..n];
    sum_taps(padded, pw, &recip[y0 * pw..y0 * pw + n], sums, post);
    for (o, s) in out.chunks_exact_mut(w).zip(sums.chunks(pw)) {
        o.copy_from_slice(&s[..w]);
    }
}

/// The pooled values over a bordered buffer `pw` wide: output `(r, x)` at `r·pw + x`,
/// its nine taps at that index plus the offsets of a 3×3 window, added in row-major
/// order from the value an empty f32 sum starts at, times `recip`, then `post`.
#[inline(always)]
fn sum_taps(padded: &[f32], pw: usize, recip: &[f32], sums: &mut [f32], post: impl Fn(f32) -> f32) {
    let n = sums.len();
    let zero: f32 = std::iter::empty::<f32>().sum();
    let tap = |row: usize, col: usize| &padded[row * pw + col..row * pw + col + n];
    let (t00, t01, t02) = (tap(0, 0), tap(0, 1), tap(0, 2));
    let (t10, t11, t12) = (tap(1, 0), tap(1, 1), tap(1, 2));
    let (t20, t21, t22) = (tap(2, 0), tap(2, 1), tap(2, 2));
    let recip = &recip[..n];
    for i in 0..n {
        let s =
            zero + t00[i] + t01[i] + t02[i] + t10[i] + t11[i] + t12[i] + t20[i] + t21[i] + t22[i];
        sums[i] = post(s * recip[i]);
    }
}

/// [`tap_reciprocals`] for [`avg_pool3x3_planes`] on `planes` planes of `h×w`: each
/// plane's rows, then one unused row for the separator between planes.
pub fn tap_reciprocals_planes(planes: usize, h: usize, w: usize) -> Vec<f32> {
    let one = tap_reciprocals(h, w);
    let mut r = Vec::with_capacity(planes * (h + 1) * (w + 2));
    for _ in 0..planes {
        r.extend_from_slice(&one);
        r.extend(std::iter::repeat_n(0.0, w + 2));
    }
    r
}

/// Scratch values [`avg_pool3x3_planes`] needs for `planes` planes of `h×w`.
pub fn scratch_len_planes(planes: usize, h: usize, w: usize) -> usize {
    (2 * planes * (h + 1) + 1) * (w + 2)
}

/// Pooled values of whole `h×w` planes, several at a time: `planes` holds them one
/// after the other, `out` as many. The planes go into one bordered buffer with a row
/// of `−0.0` above, below and between them, so that the loop of
/// [`avg_pool3x3_rows`] runs once over all of them: the taps a position takes from a
/// separator row add nothing, as the border's do, and the same bits come out. Small
/// planes (7×7, 14×14) are then not a call each. `recip` comes from
/// [`tap_reciprocals_planes`], `scratch` holds [`scratch_len_planes`] values.
#[inline(always)]
pub fn avg_pool3x3_planes(
    planes: &[f32],
    h: usize,
    w: usize,
    out: &mut [f32],
    recip: &[f32],
    scratch: &mut [f32],
    post: impl Fn(f32) -> f32,
) {
    let plane = h * w;
    let k = out.len() / plane.max(1);
    let pw = w + 2;
    debug_assert!(out.len() == k * plane && planes.len() == out.len());
    if k == 0 {
        return;
    }
    let rows = k * (h + 1) + 1;
    debug_assert!(recip.len() >= (rows - 2) * pw && scratch.len() >= scratch_len_planes(k, h, w));
    let (padded, sums) = scratch.split_at_mut(rows * pw);
    padded[..pw].fill(-0.0);
    for (src, dst) in planes
        .chunks_exact(plane)
        .zip(padded[pw..].chunks_exact_mut((h + 1) * pw))
    {
        for (row, d) in src.chunks_exact(w).zip(dst.chunks_exact_mut(pw)) {
            d[0] = -0.0;
            d[1..=w].copy_from_slice(row);
            d[w + 1] = -0.0;
        }
        dst[h * pw..].fill(-0.0);
    }
    let n = (rows - 2) * pw - 2;
    let sums = &mut sums[..n];
    sum_taps(padded, pw, &recip[..n], sums, post);
    for (o, s) in out.chunks_exact_mut(plane).zip(sums.chunks((h + 1) * pw)) {
        for (o, s) in o.chunks_exact_mut(w).zip(s.chunks(pw)) {
            o.copy_from_slice(&s[..w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of mixed magnitude (sums round), signed zeros included.
    fn mixed_values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 7 {
                0 => -0.0,
                3 => 0.0,
                k => ((i * 37 % 101) as f32 - 50.0) * 10f32.powi(k as i32 - 3),
            })
            .collect()
    }

    /// One output the way tract's generic `SumPool` computes it.
    fn tract_order(plane: &[f32], h: usize, w: usize, y: usize, x: usize) -> f32 {
        let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
        let (xa, xb) = (x.saturating_sub(1), (x + 1).min(w - 1));
        let mut s: f32 = std::iter::empty::<f32>().sum();
        for yy in ya..=yb {
            for xx in xa..=xb {
                s += plane[yy * w + xx];
            }
        }
        s * (((yb - ya + 1) * (xb - xa + 1)) as f32).recip()
    }

    #[test]
    fn rows_match_tract_bit_for_bit() {
        for (h, w) in [
            (1, 1),
            (1, 5),
            (4, 1),
            (2, 2),
            (7, 7),
            (5, 13),
            (14, 14),
            (9, 56),
        ] {
            let plane = mixed_values(h * w);
            let recip = tap_reciprocals(h, w);
            for rows in 1..=h {
                for y0 in (0..h).step_by(rows) {
                    let rows = rows.min(h - y0);
                    let mut out = vec![f32::NAN; rows * w];
                    let mut scratch = vec![f32::NAN; scratch_len(rows, w)];
                    avg_pool3x3_rows(&plane, h, w, y0, &mut out, &recip, &mut scratch, |v| v);
                    for (i, &got) in out.iter().enumerate() {
                        let (y, x) = (y0 + i / w, i % w);
                        let want = tract_order(&plane, h, w, y, x);
                        assert_eq!(got.to_bits(), want.to_bits(), "{h}×{w} at ({y}, {x})");
                    }
                }
            }
        }
    }

    #[test]
    fn planes_match_tract_bit_for_bit() {
        for (h, w) in [(1, 1), (1, 5), (4, 1), (2, 2), (7, 7), (5, 13), (14, 14)] {
            let k = 5;
            let plane = h * w;
            let all = mixed_values(k * plane);
            for planes in 1..=k {
                let recip = tap_reciprocals_planes(planes, h, w);
                let mut out = vec![f32::NAN; planes * plane];
                let mut scratch = vec![f32::NAN; scratch_len_planes(planes, h, w)];
                let src = &all[..planes * plane];
                avg_pool3x3_planes(src, h, w, &mut out, &recip, &mut scratch, |v| v);
                for (j, (o, p)) in out.chunks(plane).zip(src.chunks(plane)).enumerate() {
                    for (i, &got) in o.iter().enumerate() {
                        let (y, x) = (i / w, i % w);
                        let want = tract_order(p, h, w, y, x);
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{h}×{w}, plane {j}, ({y}, {x})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_negative_zeros_stay_negative() {
        let plane = vec![-0.0f32; 12];
        let mut out = vec![0.0; 12];
        let mut scratch = vec![0.0; scratch_len(3, 4)];
        avg_pool3x3_rows(
            &plane,
            3,
            4,
            0,
            &mut out,
            &tap_reciprocals(3, 4),
            &mut scratch,
            |v| v,
        );
        assert!(out.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
    }
}
