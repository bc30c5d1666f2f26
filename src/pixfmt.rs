//! Camera pixel formats → interleaved RGB8: YUYV (packed 4:2:2), I420 (planar 4:2:0) and
//! NV12 (semi-planar 4:2:0), any row stride, BT.601 colours.
//!
//! Cameras (V4L2 UVC webcams, CSI sensors through an ISP) deliver YUV; the network wants
//! RGB. The conversion is BT.601 (SD video, what UVC webcams and JPEG use), limited range
//! (Y 16–235, Cb/Cr 16–240) by default as video is, or full range (0–255) as JPEG/JFIF
//! and some ISPs produce: pick it with [`ColorRange`].
//!
//! Portable integer code, identical on every target: each coefficient is a 16.16 fixed-point
//! number, each channel is rounded half up once and clamped to 0..=255, so the result is
//! within one level of the exact f64 formula (checked over the whole YUV cube in the
//! tests). Chroma is not interpolated: a chroma sample covers its 2×1 (YUYV) or 2×2
//! (I420, NV12) block, as libyuv's plain converters and most camera pipelines do.
//!
//! Odd sizes are handled as V4L2 and libyuv lay them out: a YUYV row of an odd width ends
//! with a whole macropixel (4 bytes, its second luma unused); 4:2:0 chroma planes are
//! `ceil(width / 2)` × `ceil(height / 2)`.

use anyhow::{ensure, Context, Result};

/// Which code range the luma and chroma values use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorRange {
    /// "TV"/video range: Y 16–235, Cb/Cr 16–240 (values outside are clamped after
    /// conversion). Cameras default to it.
    #[default]
    Limited,
    /// "PC"/JPEG range: Y, Cb, Cr over 0–255.
    Full,
}

/// One plane of a frame: `data` holds rows `stride` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
}

impl<'a> Plane<'a> {
    pub fn new(data: &'a [u8], stride: usize) -> Self {
        Plane { data, stride }
    }

    /// Checks that `rows` rows of `row_bytes` bytes fit; `what` names the plane in errors.
    fn validate(&self, what: &str, row_bytes: usize, rows: usize) -> Result<()> {
        let Plane { data, stride } = *self;
        ensure!(
            stride >= row_bytes,
            "{what}: stride {stride} bytes is less than a row ({row_bytes} bytes)"
        );
        let needed = stride
            .checked_mul(rows - 1)
            .and_then(|n| n.checked_add(row_bytes))
            .with_context(|| format!("{what}: {rows} rows of stride {stride}: size overflows"))?;
        ensure!(
            data.len() >= needed,
            "{what}: buffer has {} bytes, {rows} rows of stride {stride} need {needed}",
            data.len()
        );
        Ok(())
    }

    /// Row `y`, `len` bytes (validated beforehand).
    fn row(&self, y: usize, len: usize) -> &'a [u8] {
        &self.data[y * self.stride..][..len]
    }
}

/// A packed 4:2:2 frame, bytes `Y0 U Y1 V` per pair of pixels (V4L2 `YUYV`, FourCC `YUY2`).
#[derive(Debug, Clone, Copy)]
pub struct Yuyv<'a> {
    pub plane: Plane<'a>,
    pub width: usize,
    pub height: usize,
}

/// A planar 4:2:0 frame: full-size Y, then quarter-size U (Cb) and V (Cr) planes
/// (V4L2 `YUV420`, FourCC `I420`/`IYUV`; YV12 is the same with U and V swapped).
#[derive(Debug, Clone, Copy)]
pub struct I420<'a> {
    pub y: Plane<'a>,
    pub u: Plane<'a>,
    pub v: Plane<'a>,
    pub width: usize,
    pub height: usize,
}

/// A semi-planar 4:2:0 frame: full-size Y, then one quarter-size plane of interleaved
/// `U V` pairs (V4L2 `NV12`, what most SoC ISPs and hardware decoders output).
#[derive(Debug, Clone, Copy)]
pub struct Nv12<'a> {
    pub y: Plane<'a>,
    pub uv: Plane<'a>,
    pub width: usize,
    pub height: usize,
}

/// `n / 2` rounded up: chroma samples of `n` pixels.
fn half_up(n: usize) -> usize {
    n / 2 + n % 2
}

fn check_size(format: &str, width: usize, height: usize) -> Result<()> {
    ensure!(
        width > 0 && height > 0,
        "{format} frame: empty size {width}×{height}"
    );
    Ok(())
}

impl<'a> Yuyv<'a> {
    /// A view of `data` as `height` rows of `width` pixels, `stride` bytes apart; a row
    /// holds `4 * ceil(width / 2)` bytes.
    pub fn new(data: &'a [u8], width: usize, height: usize, stride: usize) -> Result<Self> {
        let frame = Yuyv {
            plane: Plane::new(data, stride),
            width,
            height,
        };
        frame.validate()?;
        Ok(frame)
    }

    /// Bytes of one row: whole macropixels.
    fn row_bytes(&self) -> Result<usize> {
        half_up(self.width)
            .checked_mul(4)
            .with_context(|| format!("YUYV frame: width {} overflows", self.width))
    }

    pub fn validate(&self) -> Result<()> {
        check_size("YUYV", self.width, self.height)?;
        let what = format!("YUYV frame {}×{}", self.width, self.height);
        self.plane.validate(&what, self.row_bytes()?, self.height)
    }

    /// Converts into `out`, interleaved RGB8 rows `out_stride` bytes apart.
    pub fn to_rgb8_into(&self, range: ColorRange, out: &mut [u8], out_stride: usize) -> Result<()> {
        self.validate()?;
        check_output(self.width, self.height, out, out_stride)?;
        let c = Coefficients::of(range);
        let row_bytes = self.row_bytes()?;
        for y in 0..self.height {
            let src = self.plane.row(y, row_bytes);
            let dst = &mut out[y * out_stride..][..3 * self.width];
            for (yuyv, rgb) in src.chunks_exact(4).zip(dst.chunks_mut(6)) {
                let chroma = c.chroma(yuyv[1], yuyv[3]);
                c.put(yuyv[0], chroma, &mut rgb[..3]);
                if rgb.len() == 6 {
                    c.put(yuyv[2], chroma, &mut rgb[3..]);
                }
            }
        }
        Ok(())
    }

    /// Converts to packed RGB8 (`stride = 3 * width`).
    pub fn to_rgb8(&self, range: ColorRange) -> Result<Vec<u8>> {
        to_packed(self.width, self.height, |out, stride| {
            self.to_rgb8_into(range, out, stride)
        })
    }
}

impl<'a> I420<'a> {
    /// A view of three planes; U and V hold `ceil(width / 2)` × `ceil(height / 2)` samples.
    pub fn new(
        y: Plane<'a>,
        u: Plane<'a>,
        v: Plane<'a>,
        width: usize,
        height: usize,
    ) -> Result<Self> {
        let frame = I420 {
            y,
            u,
            v,
            width,
            height,
        };
        frame.validate()?;
        Ok(frame)
    }

    pub fn validate(&self) -> Result<()> {
        let (w, h) = (self.width, self.height);
        check_size("I420", w, h)?;
        let (cw, ch) = (half_up(w), half_up(h));
        self.y
            .validate(&format!("I420 frame {w}×{h}: Y plane"), w, h)?;
        self.u
            .validate(&format!("I420 frame {w}×{h}: U plane"), cw, ch)?;
        self.v
            .validate(&format!("I420 frame {w}×{h}: V plane"), cw, ch)
    }

    /// Converts into `out`, interleaved RGB8 rows `out_stride` bytes apart.
    pub fn to_rgb8_into(&self, range: ColorRange, out: &mut [u8], out_stride: usize) -> Result<()> {
        self.validate()?;
        check_output(self.width, self.height, out, out_stride)?;
        let c = Coefficients::of(range);
        let cw = half_up(self.width);
        for y in 0..self.height {
            let luma = self.y.row(y, self.width);
            let u = self.u.row(y / 2, cw);
            let v = self.v.row(y / 2, cw);
            let dst = &mut out[y * out_stride..][..3 * self.width];
            for (((rgb, luma), &u), &v) in dst.chunks_mut(6).zip(luma.chunks(2)).zip(u).zip(v) {
                c.put_pair(luma, c.chroma(u, v), rgb);
            }
        }
        Ok(())
    }

    /// Converts to packed RGB8 (`stride = 3 * width`).
    pub fn to_rgb8(&self, range: ColorRange) -> Result<Vec<u8>> {
        to_packed(self.width, self.height, |out, stride| {
            self.to_rgb8_into(range, out, stride)
        })
    }
}

impl<'a> Nv12<'a> {
    /// A view of two planes; UV holds `ceil(height / 2)` rows of `ceil(width / 2)` pairs.
    pub fn new(y: Plane<'a>, uv: Plane<'a>, width: usize, height: usize) -> Result<Self> {
        let frame = Nv12 {
            y,
            uv,
            width,
            height,
        };
        frame.validate()?;
        Ok(frame)
    }

    pub fn validate(&self) -> Result<()> {
        let (w, h) = (self.width, self.height);
        check_size("NV12", w, h)?;
        self.y
            .validate(&format!("NV12 frame {w}×{h}: Y plane"), w, h)?;
        let what = format!("NV12 frame {w}×{h}: UV plane");
        self.uv.validate(&what, 2 * half_up(w), half_up(h))
    }

    /// Converts into `out`, interleaved RGB8 rows `out_stride` bytes apart.
    pub fn to_rgb8_into(&self, range: ColorRange, out: &mut [u8], out_stride: usize) -> Result<()> {
        self.validate()?;
        check_output(self.width, self.height, out, out_stride)?;
        let c = Coefficients::of(range);
        let uv_bytes = 2 * half_up(self.width);
        for y in 0..self.height {
            let luma = self.y.row(y, self.width);
            let uv = self.uv.row(y / 2, uv_bytes);
            let dst = &mut out[y * out_stride..][..3 * self.width];
            for ((rgb, luma), uv) in dst
                .chunks_mut(6)
                .zip(luma.chunks(2))
                .zip(uv.chunks_exact(2))
            {
                c.put_pair(luma, c.chroma(uv[0], uv[1]), rgb);
            }
        }
        Ok(())
    }

    /// Converts to packed RGB8 (`stride = 3 * width`).
    pub fn to_rgb8(&self, range: ColorRange) -> Result<Vec<u8>> {
        to_packed(self.width, self.height, |out, stride| {
            self.to_rgb8_into(range, out, stride)
        })
    }
}

/// Checks that `out` holds `height` RGB8 rows of `width` pixels, `stride` bytes apart.
fn check_output(width: usize, height: usize, out: &[u8], stride: usize) -> Result<()> {
    let what = format!("RGB8 output {width}×{height}");
    let row_bytes = width
        .checked_mul(3)
        .with_context(|| format!("{what}: width overflows"))?;
    Plane::new(out, stride).validate(&what, row_bytes, height)
}

fn to_packed(
    width: usize,
    height: usize,
    convert: impl FnOnce(&mut [u8], usize) -> Result<()>,
) -> Result<Vec<u8>> {
    let len = width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(3))
        .with_context(|| format!("RGB8 output {width}×{height}: size overflows"))?;
    let mut out = vec![0u8; len];
    convert(&mut out, 3 * width)?;
    Ok(out)
}

/// Fractional bits of the fixed-point coefficients.
const SHIFT: u32 = 16;
/// Added before the shift: rounds half up.
const ROUND: i32 = 1 << (SHIFT - 1);

/// BT.601 YCbCr → RGB as 16.16 fixed point: `R = s(Y − o) + rv·Cr'`,
/// `G = s(Y − o) − gu·Cb' − gv·Cr'`, `B = s(Y − o) + bu·Cb'` with `Cb' = Cb − 128`,
/// `Cr' = Cr − 128`.
///
/// From Kr = 0.299, Kb = 0.114: full range has s = 1, rv = 2(1 − Kr) = 1.402,
/// gu = 2Kb(1 − Kb)/Kg = 0.344136, gv = 2Kr(1 − Kr)/Kg = 0.714136, bu = 2(1 − Kb) = 1.772;
/// limited range scales luma by 255/219 (s = 1.164383, o = 16) and chroma by 255/224.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    y_offset: i32,
    y_scale: i32,
    rv: i32,
    gu: i32,
    gv: i32,
    bu: i32,
}

impl Coefficients {
    const LIMITED: Coefficients = Coefficients {
        y_offset: 16,
        y_scale: 76_309, // 1.164383 × 2^16
        rv: 104_597,     // 1.596027
        gu: 25_675,      // 0.391762
        gv: 53_279,      // 0.812968
        bu: 132_201,     // 2.017232
    };
    const FULL: Coefficients = Coefficients {
        y_offset: 0,
        y_scale: 1 << SHIFT,
        rv: 91_881,  // 1.402
        gu: 22_554,  // 0.344136
        gv: 46_802,  // 0.714136
        bu: 116_130, // 1.772
    };

    fn of(range: ColorRange) -> Coefficients {
        match range {
            ColorRange::Limited => Self::LIMITED,
            ColorRange::Full => Self::FULL,
        }
    }

    /// The chroma terms of R, G and B (rounding included), shared by the pixels of a block.
    #[inline(always)]
    fn chroma(&self, u: u8, v: u8) -> [i32; 3] {
        let (u, v) = (u as i32 - 128, v as i32 - 128);
        [
            self.rv * v + ROUND,
            ROUND - self.gu * u - self.gv * v,
            self.bu * u + ROUND,
        ]
    }

    /// Writes one RGB pixel (3 bytes).
    #[inline(always)]
    fn put(&self, y: u8, chroma: [i32; 3], rgb: &mut [u8]) {
        let luma = (y as i32 - self.y_offset) * self.y_scale;
        for (out, c) in rgb.iter_mut().zip(chroma) {
            *out = ((luma + c) >> SHIFT).clamp(0, 255) as u8;
        }
    }

    /// Writes the one or two pixels of a chroma block's row (`luma.len()` of them).
    #[inline(always)]
    fn put_pair(&self, luma: &[u8], chroma: [i32; 3], rgb: &mut [u8]) {
        for (&y, rgb) in luma.iter().zip(rgb.chunks_exact_mut(3)) {
            self.put(y, chroma, rgb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact BT.601 formula in f64, rounded and clamped: the reference.
    fn reference(y: u8, u: u8, v: u8, range: ColorRange) -> [u8; 3] {
        let (kr, kb) = (0.299, 0.114);
        let kg = 1.0 - kr - kb;
        let (luma, chroma) = match range {
            ColorRange::Limited => ((y as f64 - 16.0) * 255.0 / 219.0, 255.0 / 224.0),
            ColorRange::Full => (y as f64, 1.0),
        };
        let cb = (u as f64 - 128.0) * chroma;
        let cr = (v as f64 - 128.0) * chroma;
        let r = luma + 2.0 * (1.0 - kr) * cr;
        let g = luma - 2.0 * kb * (1.0 - kb) / kg * cb - 2.0 * kr * (1.0 - kr) / kg * cr;
        let b = luma + 2.0 * (1.0 - kb) * cb;
        [r, g, b].map(|x| x.round().clamp(0.0, 255.0) as u8)
    }

    fn convert_one(y: u8, u: u8, v: u8, range: ColorRange) -> [u8; 3] {
        let data = [y, u, y, v];
        let rgb = Yuyv::new(&data, 1, 1, 4).unwrap().to_rgb8(range).unwrap();
        [rgb[0], rgb[1], rgb[2]]
    }

    #[test]
    fn limited_range_luma_limits() {
        let l = ColorRange::Limited;
        assert_eq!(convert_one(16, 128, 128, l), [0, 0, 0]);
        assert_eq!(convert_one(235, 128, 128, l), [255, 255, 255]);
        // Outside the nominal range: clamped, not wrapped.
        assert_eq!(convert_one(0, 128, 128, l), [0, 0, 0]);
        assert_eq!(convert_one(255, 128, 128, l), [255, 255, 255]);
        // Mid grey: (126 − 16) × 255 / 219 = 128.08.
        assert_eq!(convert_one(126, 128, 128, l), [128, 128, 128]);
    }

    #[test]
    fn full_range_grey_is_luma() {
        for y in 0..=255u8 {
            assert_eq!(convert_one(y, 128, 128, ColorRange::Full), [y; 3]);
        }
    }

    #[test]
    fn primaries_from_their_known_yuv_values() {
        // BT.601 YCbCr of pure red, green and blue (8-bit, rounded), e.g. Jack, "Video
        // Demystified", table 3.2 (limited) and the JFIF equations (full).
        let cases = [
            (ColorRange::Limited, [81, 90, 240], [255, 0, 0]),
            (ColorRange::Limited, [145, 54, 34], [0, 255, 0]),
            (ColorRange::Limited, [41, 240, 110], [0, 0, 255]),
            (ColorRange::Limited, [210, 16, 146], [255, 255, 0]),
            (ColorRange::Full, [76, 85, 255], [255, 0, 0]),
            (ColorRange::Full, [150, 44, 21], [0, 255, 0]),
            (ColorRange::Full, [29, 255, 107], [0, 0, 255]),
        ];
        for (range, [y, u, v], want) in cases {
            let got = convert_one(y, u, v, range);
            // The YUV values are rounded, so the primaries come back within two levels.
            for (g, w) in got.iter().zip(want) {
                assert!(
                    g.abs_diff(w) <= 2,
                    "{range:?} YUV {:?} → {got:?}, want {want:?}",
                    [y, u, v]
                );
            }
        }
    }

    #[test]
    fn within_one_level_of_the_exact_formula_everywhere() {
        for range in [ColorRange::Limited, ColorRange::Full] {
            let c = Coefficients::of(range);
            let mut off = 0usize;
            for y in 0..=255u8 {
                for u in 0..=255u8 {
                    for v in 0..=255u8 {
                        let mut got = [0u8; 3];
                        c.put(y, c.chroma(u, v), &mut got);
                        let want = reference(y, u, v, range);
                        for (g, w) in got.iter().zip(want) {
                            assert!(
                                g.abs_diff(w) <= 1,
                                "{range:?} {y} {u} {v}: {got:?} vs {want:?}"
                            );
                            off += (*g != w) as usize;
                        }
                    }
                }
            }
            // Off by one only at near-ties of the exact value.
            assert!(off < 3 * (1 << 24) / 1000, "{range:?}: {off} values off");
        }
    }

    /// A deterministic YUV sample value for plane `p` at (x, y).
    fn sample(p: usize, x: usize, y: usize) -> u8 {
        ((x * 37 + y * 101 + p * 59 + (x * y) % 13) % 256) as u8
    }

    /// Frames of `w`×`h` in the three formats with the same samples: Y(x, y) for luma,
    /// U/V(x / 2, y / 2) for chroma (YUYV repeats the 4:2:0 chroma on both rows of a
    /// block), with padded strides.
    struct Frames {
        yuyv: Vec<u8>,
        yuyv_stride: usize,
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
        uv: Vec<u8>,
        y_stride: usize,
        c_stride: usize,
        uv_stride: usize,
    }

    fn frames(w: usize, h: usize) -> Frames {
        let (cw, ch) = (half_up(w), half_up(h));
        let yuyv_stride = 4 * cw + 3;
        let (y_stride, c_stride, uv_stride) = (w + 5, cw + 1, 2 * cw + 7);
        // Padding bytes are 0xEE: a read of them would show.
        let mut f = Frames {
            yuyv: vec![0xEE; yuyv_stride * h],
            yuyv_stride,
            y: vec![0xEE; y_stride * (h - 1) + w],
            u: vec![0xEE; c_stride * (ch - 1) + cw],
            v: vec![0xEE; c_stride * (ch - 1) + cw],
            uv: vec![0xEE; uv_stride * (ch - 1) + 2 * cw],
            y_stride,
            c_stride,
            uv_stride,
        };
        for y in 0..h {
            for x in 0..w {
                f.y[y * y_stride + x] = sample(0, x, y);
                f.yuyv[y * yuyv_stride + 2 * x] = sample(0, x, y);
            }
            for cx in 0..cw {
                f.yuyv[y * yuyv_stride + 4 * cx + 1] = sample(1, cx, y / 2);
                f.yuyv[y * yuyv_stride + 4 * cx + 3] = sample(2, cx, y / 2);
            }
        }
        for cy in 0..ch {
            for cx in 0..cw {
                f.u[cy * c_stride + cx] = sample(1, cx, cy);
                f.v[cy * c_stride + cx] = sample(2, cx, cy);
                f.uv[cy * uv_stride + 2 * cx] = sample(1, cx, cy);
                f.uv[cy * uv_stride + 2 * cx + 1] = sample(2, cx, cy);
            }
        }
        f
    }

    #[test]
    fn all_formats_match_the_per_pixel_reference_at_odd_and_even_sizes() {
        for (w, h) in [(1, 1), (2, 2), (5, 3), (4, 7), (7, 7), (64, 48), (33, 2)] {
            let f = frames(w, h);
            for range in [ColorRange::Limited, ColorRange::Full] {
                let c = Coefficients::of(range);
                let mut want = vec![0u8; 3 * w * h];
                for y in 0..h {
                    for x in 0..w {
                        let chroma = c.chroma(sample(1, x / 2, y / 2), sample(2, x / 2, y / 2));
                        c.put(sample(0, x, y), chroma, &mut want[3 * (y * w + x)..][..3]);
                    }
                }
                let yuyv = Yuyv::new(&f.yuyv, w, h, f.yuyv_stride).unwrap();
                assert_eq!(yuyv.to_rgb8(range).unwrap(), want, "YUYV {w}×{h}");
                let (y, u, v) = (
                    Plane::new(&f.y, f.y_stride),
                    Plane::new(&f.u, f.c_stride),
                    Plane::new(&f.v, f.c_stride),
                );
                let i420 = I420::new(y, u, v, w, h).unwrap();
                assert_eq!(i420.to_rgb8(range).unwrap(), want, "I420 {w}×{h}");
                let nv12 = Nv12::new(y, Plane::new(&f.uv, f.uv_stride), w, h).unwrap();
                assert_eq!(nv12.to_rgb8(range).unwrap(), want, "NV12 {w}×{h}");
            }
        }
    }

    #[test]
    fn padded_output_rows_leave_the_padding_alone() {
        let (w, h) = (5, 3);
        let f = frames(w, h);
        let yuyv = Yuyv::new(&f.yuyv, w, h, f.yuyv_stride).unwrap();
        let packed = yuyv.to_rgb8(ColorRange::Limited).unwrap();
        let stride = 3 * w + 2;
        // The last row needs no padding.
        let mut out = vec![0x55; stride * (h - 1) + 3 * w];
        yuyv.to_rgb8_into(ColorRange::Limited, &mut out, stride)
            .unwrap();
        for y in 0..h {
            assert_eq!(&out[y * stride..][..3 * w], &packed[y * 3 * w..][..3 * w]);
            if y + 1 < h {
                assert_eq!(&out[y * stride + 3 * w..][..2], &[0x55, 0x55]);
            }
        }
    }

    #[test]
    fn bad_layouts_are_clear_errors() {
        let data = vec![0u8; 64];
        let err = |r: Result<()>| format!("{:#}", r.unwrap_err());
        let yuyv = |w, h, stride| Yuyv::new(&data, w, h, stride).map(|_| ());
        assert!(err(yuyv(0, 4, 8)).contains("YUYV frame: empty size 0×4"));
        // 5 pixels need 3 macropixels: 12 bytes.
        let e = err(yuyv(5, 2, 10));
        assert!(
            e.contains("stride 10 bytes is less than a row (12 bytes)"),
            "{e}"
        );
        let e = err(yuyv(8, 5, 16));
        assert!(
            e.contains("buffer has 64 bytes, 5 rows of stride 16 need 80"),
            "{e}"
        );
        assert!(yuyv(8, 4, 16).is_ok());
        assert!(err(yuyv(usize::MAX, 1, usize::MAX)).contains("overflows"));
        assert!(err(yuyv(2, usize::MAX, 4)).contains("overflows"));

        let plane = |len: usize, stride| Plane::new(&data[..len], stride);
        // 5×3 I420: Y 5×3, U and V 3×2.
        let i420 = |y, u, v| I420::new(y, u, v, 5, 3).map(|_| ());
        assert!(i420(plane(15, 5), plane(6, 3), plane(6, 3)).is_ok());
        let e = err(i420(plane(14, 5), plane(6, 3), plane(6, 3)));
        assert!(
            e.contains("I420 frame 5×3: Y plane: buffer has 14 bytes"),
            "{e}"
        );
        let e = err(i420(plane(15, 5), plane(6, 2), plane(6, 3)));
        assert!(
            e.contains("U plane: stride 2 bytes is less than a row (3 bytes)"),
            "{e}"
        );
        let e = err(i420(plane(15, 5), plane(6, 3), plane(5, 3)));
        assert!(
            e.contains("V plane: buffer has 5 bytes, 2 rows of stride 3 need 6"),
            "{e}"
        );
        // 5×3 NV12: UV 2 rows of 3 pairs.
        let nv12 = |y, uv| Nv12::new(y, uv, 5, 3).map(|_| ());
        assert!(nv12(plane(15, 5), plane(12, 6)).is_ok());
        let e = err(nv12(plane(15, 5), plane(11, 6)));
        assert!(
            e.contains("NV12 frame 5×3: UV plane: buffer has 11 bytes"),
            "{e}"
        );
        assert!(err(nv12(plane(15, 5), plane(12, 6))
            .and(Nv12::new(plane(0, 0), plane(0, 0), 0, 3).map(|_| ())))
        .contains("NV12 frame: empty size 0×3"));

        let frame = Yuyv::new(&data, 4, 2, 8).unwrap();
        let mut out = vec![0u8; 23];
        let e = err(frame.to_rgb8_into(ColorRange::Limited, &mut out, 12));
        assert!(
            e.contains("RGB8 output 4×2: buffer has 23 bytes, 2 rows of stride 12 need 24"),
            "{e}"
        );
        let e = err(frame.to_rgb8_into(ColorRange::Limited, &mut out, 11));
        assert!(
            e.contains("stride 11 bytes is less than a row (12 bytes)"),
            "{e}"
        );
    }

    /// Time per 640×480 frame of each format (release build):
    /// `cargo test --release --lib pixfmt::tests::time_vga_frames -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, prints only"]
    fn time_vga_frames() {
        let (w, h) = (640, 480);
        let f = frames(w, h);
        let mut out = vec![0u8; 3 * w * h];
        let (y, u, v) = (
            Plane::new(&f.y, f.y_stride),
            Plane::new(&f.u, f.c_stride),
            Plane::new(&f.v, f.c_stride),
        );
        let yuyv = Yuyv::new(&f.yuyv, w, h, f.yuyv_stride).unwrap();
        let i420 = I420::new(y, u, v, w, h).unwrap();
        let nv12 = Nv12::new(y, Plane::new(&f.uv, f.uv_stride), w, h).unwrap();
        let mut time = |name: &str, convert: &mut dyn FnMut(&mut [u8])| {
            let best = (0..20)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..10 {
                        convert(&mut out);
                    }
                    t.elapsed().as_secs_f64() / 10.0
                })
                .fold(f64::INFINITY, f64::min);
            println!("{name} 640×480 → RGB8: {:.3} ms/frame", best * 1e3);
        };
        let range = ColorRange::Limited;
        time("YUYV", &mut |o| yuyv.to_rgb8_into(range, o, 3 * w).unwrap());
        time("I420", &mut |o| i420.to_rgb8_into(range, o, 3 * w).unwrap());
        time("NV12", &mut |o| nv12.to_rgb8_into(range, o, 3 * w).unwrap());
    }
}
