//! Patch extraction for convolutions as matrix products.

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

    /// Fills rows `first_row..first_row + rows.len()/out_pixels` of the patch matrix
    /// `[k, out_h·out_w]`: row `(c, i, j)` holds input channel `c` shifted by kernel
    /// tap `(i, j)` at every output position, zero where the tap falls in the padding.
    pub fn fill_rows(&self, x: &[f32], first_row: usize, rows: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.pad;
        let p = self.out_pixels();
        for (r, row) in rows.chunks_exact_mut(p).enumerate() {
            let idx = first_row + r;
            let c = idx / (kh * kw);
            let i = (idx / kw) % kh;
            let j = idx % kw;
            let plane = &x[c * self.in_h * self.in_w..(c + 1) * self.in_h * self.in_w];
            for oy in 0..self.out_h {
                let out = &mut row[oy * self.out_w..(oy + 1) * self.out_w];
                let y = (oy * sh + i) as isize - ph as isize;
                if y < 0 || y >= self.in_h as isize {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[y as usize * self.in_w..(y as usize + 1) * self.in_w];
                for (ox, o) in out.iter_mut().enumerate() {
                    let xx = (ox * sw + j) as isize - pw as isize;
                    *o = if xx >= 0 && (xx as usize) < self.in_w {
                        src[xx as usize]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

impl ConvGeometry {
    /// Fills k4 groups `groups` (4 patch rows each, see [`crate::kernels::qgemm`])
    /// of the u8 patch matrix `[k, out_h·out_w]` in the k4 layout into `dst`
    /// (`groups.len()·4·out_pixels` bytes): row `(c, i, j)`, token `n` at
    /// `dst[((g − groups.start)·P + n)·4 + r]` for `k = 4g + r`. Values are `x ^ flip`
    /// (`flip = 0x80` reads i8 input as u8 shifted by 128); taps in the padding hold
    /// `pad`, the activation zero point, so that they add nothing once the zero point
    /// is subtracted. Rows past `k` (the last group's padding) are left as they are.
    pub fn fill_k4_groups(
        &self,
        x: &[u8],
        flip: u8,
        pad: u8,
        groups: std::ops::Range<usize>,
        dst: &mut [u8],
    ) {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.pad;
        let p = self.out_pixels();
        let plane_len = self.in_h * self.in_w;
        let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
        for (gi, g) in groups.enumerate() {
            let group = &mut dst[gi * 4 * p..(gi + 1) * 4 * p];
            for r in 0..4 {
                let idx = 4 * g + r;
                if idx >= self.k() {
                    break;
                }
                let c = idx / (kh * kw);
                let plane = &x[c * plane_len..(c + 1) * plane_len];
                if pointwise {
                    for (n, &v) in plane.iter().enumerate() {
                        group[4 * n + r] = v ^ flip;
                    }
                    continue;
                }
                let i = (idx / kw) % kh;
                let j = idx % kw;
                for oy in 0..self.out_h {
                    let row = &mut group[4 * oy * self.out_w..4 * (oy + 1) * self.out_w];
                    let y = (oy * sh + i) as isize - ph as isize;
                    if y < 0 || y >= self.in_h as isize {
                        for ox in 0..self.out_w {
                            row[4 * ox + r] = pad;
                        }
                        continue;
                    }
                    let src = &plane[y as usize * self.in_w..(y as usize + 1) * self.in_w];
                    for ox in 0..self.out_w {
                        let xx = (ox * sw + j) as isize - pw as isize;
                        row[4 * ox + r] = if xx >= 0 && (xx as usize) < self.in_w {
                            src[xx as usize] ^ flip
                        } else {
                            pad
                        };
                    }
                }
            }
        }
    }
}
