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
