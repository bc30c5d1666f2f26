//! Patch extraction for convolutions as matrix products.

use super::Isa;

/// Geometry of a 2-D convolution over one NCHW image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    /// Padding before (top, left); padding after follows from the output size.
    pub pad: (usize, usize),
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeometry {
    /// Rows of the patch matrix: `in_channels · kh · kw`.
    pub fn k(&self) -> usize {
        self.in_channels * self.kernel.0 * self.kernel.1
    }

    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// The output columns `lo..hi` whose kernel column `j` falls inside the input row
    /// (`ox·sw + j − pw` in `0..in_w`); the others read the padding.
    fn inside_cols(&self, j: usize) -> (usize, usize) {
        let (sw, pw) = (self.stride.1, self.pad.1);
        let lo = pw.saturating_sub(j).div_ceil(sw).min(self.out_w);
        let hi = (self.in_w + pw)
            .saturating_sub(j)
            .div_ceil(sw)
            .clamp(lo, self.out_w);
        (lo, hi)
    }

    /// Fills rows `first_row..first_row + rows.len()/out_pixels` of the patch matrix
    /// `[k, out_h·out_w]`: row `(c, i, j)` holds input channel `c` shifted by kernel
    /// tap `(i, j)` at every output position, zero where the tap falls in the padding.
    pub fn fill_rows(&self, x: &[f32], first_row: usize, rows: &mut [f32]) {
        let p = self.out_pixels();
        for (r, row) in rows.chunks_exact_mut(p).enumerate() {
            self.fill_row_range(x, first_row + r, 0..p, row);
        }
    }

    /// Row `row` of the patch matrix (see [`Self::fill_rows`]) at the output positions
    /// `pixels` (row-major `oy·out_w + ox`), into `out[..pixels.len()]`.
    pub fn fill_row_range(
        &self,
        x: &[f32],
        row: usize,
        pixels: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.pad;
        let c = row / (kh * kw);
        let i = (row / kw) % kh;
        let j = row % kw;
        let plane = &x[c * self.in_h * self.in_w..(c + 1) * self.in_h * self.in_w];
        let (lo, hi) = self.inside_cols(j);
        let out = &mut out[..pixels.len()];
        let (mut oy, mut ox0) = (pixels.start / self.out_w, pixels.start % self.out_w);
        let mut done = 0;
        while done < out.len() {
            let ox1 = self.out_w.min(ox0 + (out.len() - done));
            let seg = &mut out[done..done + ox1 - ox0];
            let y = (oy * sh + i) as isize - ph as isize;
            if y < 0 || y >= self.in_h as isize {
                seg.fill(0.0);
            } else {
                let src = &plane[y as usize * self.in_w..(y as usize + 1) * self.in_w];
                let (a, b) = (lo.clamp(ox0, ox1), hi.clamp(ox0, ox1));
                let (left, rest) = seg.split_at_mut(a - ox0);
                let (inside, right) = rest.split_at_mut(b - a);
                left.fill(0.0);
                right.fill(0.0);
                if b > a {
                    // Taps a..b read src[first], src[first + sw], …, all inside the row.
                    let first = a * sw + j - pw;
                    let taps = &src[first..=first + (b - a - 1) * sw];
                    match sw {
                        1 => inside.copy_from_slice(taps),
                        2 => strided::<2>(taps, inside),
                        4 => strided::<4>(taps, inside),
                        _ => strided_any(taps, sw, inside),
                    }
                }
            }
            done += ox1 - ox0;
            (oy, ox0) = (oy + 1, 0);
        }
    }
}

/// `dst[t] = src[t·S]` (`src` holds at least `(dst.len() − 1)·S + 1` values).
#[inline(always)]
fn strided<const S: usize>(src: &[f32], dst: &mut [f32]) {
    let (whole, last) = dst.split_at_mut(dst.len() - 1);
    for (d, s) in whole.iter_mut().zip(src.chunks_exact(S)) {
        *d = s[0];
    }
    last[0] = src[whole.len() * S];
}

fn strided_any(src: &[f32], step: usize, dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src.iter().step_by(step)) {
        *d = s;
    }
}

impl ConvGeometry {
    /// Fills k4 groups `groups` (4 patch rows each, see [`crate::kernels::qgemm`])
    /// of the u8 patch matrix `[k, out_h·out_w]` of a **1×1** conv (stride 1, no
    /// padding) in the k4 layout into `dst` (`groups.len()·4·out_pixels` bytes): input
    /// channel `c = 4g + r`, token `n` at `dst[((g − groups.start)·P + n)·4 + r]`.
    /// Values are `x ^ flip` (`flip = 0x80` reads i8 input as u8 shifted by 128); rows
    /// past `k` (the last group's padding) hold 0. Other convs take their patches from
    /// an input in the c4 layout ([`Self::fill_k4_groups_c4`]).
    pub fn fill_k4_groups(
        &self,
        x: &[u8],
        flip: u8,
        groups: std::ops::Range<usize>,
        dst: &mut [u8],
    ) {
        assert!(
            self.is_pointwise(),
            "k4 patches of planar input: 1×1 convs only"
        );
        let p = self.out_pixels();
        let plane_len = self.in_h * self.in_w;
        let isa = Isa::best();
        for (gi, g) in groups.enumerate() {
            let group = &mut dst[gi * 4 * p..(gi + 1) * 4 * p];
            if 4 * g + 4 <= self.k() {
                // A whole group: four input planes interleaved, each token's 4 bytes
                // built as one word (this vectorizes; a byte at a time does not).
                let plane = |r: usize| &x[(4 * g + r) * plane_len..][..plane_len];
                let planes = [plane(0), plane(1), plane(2), plane(3)];
                interleave4(isa, planes, flip, group);
                continue;
            }
            for r in 0..4 {
                let idx = 4 * g + r;
                let plane = x.get(idx * plane_len..(idx + 1) * plane_len);
                for (n, d) in group.chunks_exact_mut(4).enumerate() {
                    d[r] = plane.map_or(0, |p| p[n] ^ flip);
                }
            }
        }
    }
}

/// `dst[4n + r] = planes[r][n] ^ flip`: each token's 4 bytes built as one word,
/// which vectorizes (a byte at a time does not).
#[inline(always)]
fn interleave4_body(planes: [&[u8]; 4], flip: u8, dst: &mut [u8]) {
    let flip4 = u32::from_ne_bytes([flip; 4]);
    let [p0, p1, p2, p3] = planes;
    let n = dst.len() / 4;
    let (p0, p1, p2, p3) = (&p0[..n], &p1[..n], &p2[..n], &p3[..n]);
    for (i, d) in dst.chunks_exact_mut(4).enumerate() {
        let w = u32::from_le_bytes([p0[i], p1[i], p2[i], p3[i]]);
        d.copy_from_slice(&(w ^ flip4).to_le_bytes());
    }
}

crate::kernels::multiversion! {
    /// `interleave4_body`, built for each instruction set.
    pub fn interleave4(planes: [&[u8]; 4], flip: u8, dst: &mut [u8]) {
        interleave4_body(planes, flip, dst)
    }
}

impl ConvGeometry {
    /// Channels rounded up to a multiple of 4: the channel groups of the c4 layout.
    pub fn c4_channels(&self) -> usize {
        self.in_channels.div_ceil(4) * 4
    }

    /// Rows of the patch matrix of a c4 input (see [`Self::fill_k4_groups_c4`]):
    /// `kh · kw · c4_channels`.
    pub fn c4_k(&self) -> usize {
        self.kernel.0 * self.kernel.1 * self.c4_channels()
    }

    /// Whether the conv is 1×1, stride 1, unpadded: a matrix product over the pixels.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == (1, 1) && self.stride == (1, 1) && self.pad == (0, 0)
    }

    /// Weight rows `[rows, k]` in the (channel, tap) order of `w`, reordered to the
    /// (tap, channel) order of the c4 patch rows (`[rows, c4_k]`), 0 for the channels
    /// past `in_channels`.
    pub fn c4_weights(&self, rows: usize, w: &[i8]) -> Vec<i8> {
        let (k, taps, cp) = (self.k(), self.kernel.0 * self.kernel.1, self.c4_channels());
        assert_eq!(
            w.len(),
            rows * k,
            "c4 weights: {} values for {rows}×{k}",
            w.len()
        );
        let mut reordered = vec![0i8; rows * self.c4_k()];
        for (dst, src) in reordered
            .chunks_exact_mut(self.c4_k())
            .zip(w.chunks_exact(k))
        {
            for (c, src) in src.chunks_exact(taps).enumerate() {
                for (t, &v) in src.iter().enumerate() {
                    dst[t * cp + c] = v;
                }
            }
        }
        reordered
    }

    /// The input `x` (`in_channels` planes of `in_h·in_w` bytes) in the c4 layout
    /// (channel `c` of pixel `n` at `((c/4)·in_h·in_w + n)·4 + c%4`) into `dst`
    /// (`c4_channels·in_h·in_w` bytes): values `x ^ flip`, channels past
    /// `in_channels` holding `fill`.
    pub fn to_c4(&self, isa: Isa, x: &[u8], flip: u8, fill: u8, dst: &mut [u8]) {
        let plane = self.in_h * self.in_w;
        let filler = vec![
            fill ^ flip;
            if self.in_channels.is_multiple_of(4) {
                0
            } else {
                plane
            }
        ];
        for (g, dst) in dst.chunks_exact_mut(4 * plane).enumerate() {
            let planes = std::array::from_fn(|r| {
                let c = 4 * g + r;
                if c < self.in_channels {
                    &x[c * plane..(c + 1) * plane]
                } else {
                    &filler[..]
                }
            });
            interleave4(isa, planes, flip, dst);
        }
    }

    /// Fills k4 groups `groups` of the u8 patch matrix of an input in the **c4
    /// layout** (channel `c` of pixel `n` at byte `((c/4)·in_h·in_w + n)·4 + c%4`, as
    /// `split16::split_bytes_c4` writes it), with the rows ordered by tap, then channel:
    /// row `(i·kw + j)·cp + c`, `cp` = [`Self::c4_channels`]. A k4 group is then the 4
    /// channels of one channel group at one tap: one 4-byte word per token, copied
    /// whole. Taps in the padding hold `pad`. `dst` holds `groups.len()·4·out_pixels`
    /// bytes, group `g` at `(g − groups.start)·4·out_pixels`.
    pub fn fill_k4_groups_c4(
        &self,
        x: &[u8],
        pad: [u8; 4],
        groups: std::ops::Range<usize>,
        dst: &mut [u8],
    ) {
        let (kh, kw) = self.kernel;
        let p = self.out_pixels();
        let cg = self.c4_channels() / 4;
        let plane = 4 * self.in_h * self.in_w;
        let isa = Isa::best();
        for (gi, g) in groups.enumerate() {
            let (tap, c) = (g / cg, g % cg);
            let (i, j) = (tap / kw, tap % kw);
            debug_assert!(i < kh);
            let src_plane = &x[c * plane..(c + 1) * plane];
            let group = &mut dst[gi * 4 * p..(gi + 1) * 4 * p];
            fill_c4_group(isa, self, src_plane, pad, (i, j), group);
        }
    }
}

crate::kernels::multiversion! {
    /// One k4 group of a c4 patch matrix (see [`ConvGeometry::fill_k4_groups_c4`]):
    /// tap `(i, j)` of one channel group, whose plane of 4-byte words is `src`.
    pub fn fill_c4_group(
        geo: &ConvGeometry,
        src: &[u8],
        pad: [u8; 4],
        tap: (usize, usize),
        group: &mut [u8],
    ) {
        let (i, j) = tap;
        let (sh, sw) = geo.stride;
        let (ph, pw) = geo.pad;
        let (lo, hi) = geo.inside_cols(j);
        let pad = u32::from_ne_bytes(pad);
        let row_bytes = 4 * geo.in_w;
        for (oy, row) in group.chunks_exact_mut(4 * geo.out_w).enumerate() {
            let y = (oy * sh + i) as isize - ph as isize;
            if y < 0 || y >= geo.in_h as isize {
                fill_words(row, pad);
                continue;
            }
            let src = &src[y as usize * row_bytes..(y as usize + 1) * row_bytes];
            let (before, rest) = row.split_at_mut(4 * lo);
            let (inside, after) = rest.split_at_mut(4 * (hi - lo));
            fill_words(before, pad);
            fill_words(after, pad);
            if hi > lo {
                let src = &src[4 * (lo * sw + j - pw)..];
                match sw {
                    1 => inside.copy_from_slice(&src[..inside.len()]),
                    2 => copy_words::<2>(src, inside),
                    4 => copy_words::<4>(src, inside),
                    _ => {
                        for (d, s) in inside.chunks_exact_mut(4).zip(src.chunks(4 * sw)) {
                            d.copy_from_slice(&s[..4]);
                        }
                    }
                }
            }
        }
    }
}

/// Every 4-byte word of `dst` set to `w`.
#[inline(always)]
fn fill_words(dst: &mut [u8], w: u32) {
    for d in dst.chunks_exact_mut(4) {
        d.copy_from_slice(&w.to_ne_bytes());
    }
}

/// Word `k` of `dst` = word `k·S` of `src`.
#[inline(always)]
fn copy_words<const S: usize>(src: &[u8], dst: &mut [u8]) {
    let n = dst.len() / 4;
    if n == 0 {
        return;
    }
    assert!(
        4 * ((n - 1) * S + 1) <= src.len(),
        "c4 patches: source row too short"
    );
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for k in 0..n {
        // SAFETY: word k·S ends within `src` (asserted for the last one), word k within
        // `dst`; unaligned reads and writes of plain bytes.
        unsafe {
            let w = (s.add(4 * k * S) as *const u32).read_unaligned();
            (d.add(4 * k) as *mut u32).write_unaligned(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input byte of channel `c` at `(y, x)`, or `pad` outside the image, by the
    /// definition of a padded convolution's patches.
    fn tap(g: &ConvGeometry, x: &[u8], c: usize, y: isize, xx: isize, pad: u8) -> u8 {
        if c >= g.in_channels || y < 0 || xx < 0 || y >= g.in_h as isize || xx >= g.in_w as isize {
            return pad;
        }
        x[(c * g.in_h + y as usize) * g.in_w + xx as usize]
    }

    #[test]
    fn c4_patches_match_the_definition() {
        // (channels, in h, in w, kernel, stride, pad): the stem and downsampling convs
        // of PoolFormer, every stride the copies special-case and one they do not, a
        // window wider than the input, channels that are not a multiple of 4.
        let cases = [
            (3, 23, 19, 7, 4, 2),
            (8, 12, 12, 3, 2, 1),
            (5, 9, 11, 3, 1, 1),
            (6, 10, 7, 3, 3, 1),
            (5, 4, 5, 7, 1, 3),
            (4, 6, 6, 1, 2, 0),
        ];
        for (c, h, w, k, s, p) in cases {
            let g = ConvGeometry {
                in_channels: c,
                in_h: h,
                in_w: w,
                kernel: (k, k),
                stride: (s, s),
                pad: (p, p),
                out_h: (h + 2 * p - k) / s + 1,
                out_w: (w + 2 * p - k) / s + 1,
            };
            let x: Vec<u8> = (0..c * h * w).map(|i| (i * 37 + 11) as u8).collect();
            let (flip, a0) = (0x80u8, 7u8);
            let n = g.out_pixels();
            let cp = g.c4_channels();
            for isa in Isa::available() {
                let mut c4 = vec![0u8; cp * h * w];
                g.to_c4(isa, &x, flip, a0, &mut c4);
                let groups = g.c4_k() / 4;
                let mut got = vec![0u8; g.c4_k() * n];
                for (gi, part) in got.chunks_exact_mut(4 * n).enumerate() {
                    let (t, cg) = (gi / (cp / 4), gi % (cp / 4));
                    let plane = &c4[cg * 4 * h * w..(cg + 1) * 4 * h * w];
                    fill_c4_group(isa, &g, plane, [a0; 4], (t / k, t % k), part);
                }
                let mut best = vec![0u8; got.len()];
                g.fill_k4_groups_c4(&c4, [a0; 4], 0..groups, &mut best);
                assert_eq!(got, best, "{isa:?} {g:?}");
                for row in 0..g.c4_k() {
                    let (t, ch) = (row / cp, row % cp);
                    let (i, j) = (t / k, t % k);
                    for oy in 0..g.out_h {
                        for ox in 0..g.out_w {
                            let y = (oy * s + i) as isize - p as isize;
                            let xx = (ox * s + j) as isize - p as isize;
                            // Image bytes flipped; padding (spatial or channel) a0.
                            let v = tap(&g, &x, ch, y, xx, a0 ^ flip) ^ flip;
                            let at = (((row / 4) * n) + oy * g.out_w + ox) * 4 + row % 4;
                            assert_eq!(got[at], v, "{isa:?} {g:?}: row {row}, ({oy}, {ox})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn c4_weights_follow_the_patch_rows() {
        let g = ConvGeometry {
            in_channels: 3,
            in_h: 8,
            in_w: 8,
            kernel: (2, 3),
            stride: (1, 1),
            pad: (0, 0),
            out_h: 7,
            out_w: 6,
        };
        let rows = 2;
        let w: Vec<i8> = (0..rows * g.k()).map(|v| v as i8 + 1).collect();
        let r = g.c4_weights(rows, &w);
        assert_eq!(r.len(), rows * g.c4_k());
        for o in 0..rows {
            for t in 0..6 {
                for c in 0..4 {
                    let want = if c < 3 { w[o * g.k() + c * 6 + t] } else { 0 };
                    assert_eq!(
                        r[o * g.c4_k() + t * 4 + c],
                        want,
                        "row {o}, tap {t}, channel {c}"
                    );
                }
            }
        }
    }
}
