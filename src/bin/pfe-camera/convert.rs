//! Captured frames → packed RGB8: the raw formats through the library's
//! [`poolformer_edge::pixfmt`] (YUYV, I420, NV12), MJPEG through zune-jpeg (the decoder the
//! `image` crate wraps, called directly so it decodes into a reused buffer), RGB24 rows
//! repacked only when they are padded.
//!
//! Every source (V4L2, stdin, files, the test pattern) ends here, so this is also where the
//! V4L2 layer is tested: it hands over bytes and a [`PixelFormat`], nothing else.

use anyhow::{bail, ensure, Context, Result};
use poolformer_edge::pixfmt::{ColorRange, Nv12, Plane, Yuyv, I420};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// The layouts a frame can arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Interleaved R G B bytes.
    Rgb24,
    /// Packed 4:2:2, `Y0 U Y1 V` (V4L2 `YUYV`).
    Yuyv,
    /// Planar 4:2:0: Y, then U, then V (V4L2 `YU12`, rpicam-vid's `--codec yuv420`).
    I420,
    /// Semi-planar 4:2:0: Y, then interleaved `U V` (V4L2 `NV12`).
    Nv12,
    /// One baseline or progressive JPEG per frame (V4L2 `MJPG`/`JPEG`).
    Mjpeg,
}

impl PixelFormat {
    /// The names `stdin:FORMAT:…` and `--pixel-format` accept, first the canonical one.
    pub const NAMES: &'static [(&'static str, PixelFormat)] = &[
        ("rgb24", PixelFormat::Rgb24),
        ("rgb", PixelFormat::Rgb24),
        ("yuyv", PixelFormat::Yuyv),
        ("yuy2", PixelFormat::Yuyv),
        ("yuv420", PixelFormat::I420),
        ("i420", PixelFormat::I420),
        ("yu12", PixelFormat::I420),
        ("nv12", PixelFormat::Nv12),
        ("mjpeg", PixelFormat::Mjpeg),
        ("mjpg", PixelFormat::Mjpeg),
        ("jpeg", PixelFormat::Mjpeg),
    ];

    pub fn parse(name: &str) -> Result<PixelFormat> {
        let lower = name.to_ascii_lowercase();
        match Self::NAMES.iter().find(|(n, _)| *n == lower) {
            Some((_, f)) => Ok(*f),
            None => bail!(
                "unknown pixel format {name:?}; known: rgb24, yuyv, yuv420 (i420), nv12, mjpeg"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb24 => "rgb24",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::I420 => "yuv420",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Mjpeg => "mjpeg",
        }
    }

    /// Bytes of the first plane's rows for `width` pixels: the least stride.
    pub fn min_stride(self, width: usize) -> usize {
        match self {
            PixelFormat::Rgb24 => 3 * width,
            PixelFormat::Yuyv => 4 * width.div_ceil(2),
            PixelFormat::I420 | PixelFormat::Nv12 => width,
            PixelFormat::Mjpeg => 0,
        }
    }

    /// Bytes of one uncompressed frame whose first plane has rows `stride` bytes apart
    /// (chroma planes as [`Layout`] places them); `None` for MJPEG.
    pub fn frame_len(self, width: usize, height: usize, stride: usize) -> Option<usize> {
        let layout = Layout::of(self, width, height, stride)?;
        Some(layout.len)
    }
}

/// Where the planes of an uncompressed frame lie in one buffer: contiguous, the chroma
/// planes of 4:2:0 formats right after the luma rows, with strides derived from the luma
/// stride as V4L2 and libcamera lay them out (I420: half, rounded up; NV12: the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the chroma plane(s) (I420: U; V follows at `chroma + c_stride * c_rows`).
    pub chroma: usize,
    pub c_stride: usize,
    pub c_rows: usize,
    /// Bytes of the whole frame.
    pub len: usize,
}

impl Layout {
    pub fn of(format: PixelFormat, width: usize, height: usize, stride: usize) -> Option<Layout> {
        let luma = stride.checked_mul(height)?;
        let c_rows = height.div_ceil(2);
        let (c_stride, chroma_len) = match format {
            PixelFormat::Rgb24 | PixelFormat::Yuyv => (0, 0),
            PixelFormat::I420 => {
                let s = stride.div_ceil(2);
                (s, s.checked_mul(c_rows)?.checked_mul(2)?)
            }
            PixelFormat::Nv12 => {
                let s = stride.max(2 * width.div_ceil(2));
                (s, s.checked_mul(c_rows)?)
            }
            PixelFormat::Mjpeg => return None,
        };
        Some(Layout {
            chroma: luma,
            c_stride,
            c_rows,
            len: luma.checked_add(chroma_len)?,
        })
    }
}

/// A captured frame's bytes as the source delivered them.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub data: &'a [u8],
    pub format: PixelFormat,
    /// For MJPEG the size negotiated with the device; the JPEG's own header wins.
    pub width: usize,
    pub height: usize,
    /// Bytes between the first plane's rows (ignored for MJPEG).
    pub stride: usize,
}

/// Converts frames to packed RGB8 (`stride = 3 * width`), reusing its buffers.
#[derive(Debug, Default)]
pub struct Converter {
    pub range: ColorRange,
    /// A JPEG with a marker inserted (see [`needs_default_tables`]).
    patched_jpeg: Vec<u8>,
}

impl Converter {
    pub fn new(range: ColorRange) -> Converter {
        Converter {
            range,
            patched_jpeg: Vec::new(),
        }
    }

    /// Whether `frame` is already packed RGB8 and needs no conversion at all.
    pub fn is_packed_rgb(frame: &RawFrame) -> bool {
        frame.format == PixelFormat::Rgb24 && frame.stride == 3 * frame.width
    }

    /// Converts `frame` into `out` (resized as needed); returns the image's width and height.
    pub fn convert_to_rgb(
        &mut self,
        frame: &RawFrame,
        out: &mut Vec<u8>,
    ) -> Result<(usize, usize)> {
        let RawFrame {
            data,
            format,
            width: w,
            height: h,
            stride,
        } = *frame;
        if format == PixelFormat::Mjpeg {
            return self.decode_jpeg(data, out);
        }
        ensure!(
            w > 0 && h > 0,
            "{} frame: empty size {w}×{h}",
            format.name()
        );
        let layout = Layout::of(format, w, h, stride)
            .with_context(|| format!("{} frame {w}×{h}: size overflows", format.name()))?;
        // Packed formats need no padding after the last row; planar ones are laid out
        // plane after plane.
        let needed = match format {
            PixelFormat::Rgb24 | PixelFormat::Yuyv => stride * (h - 1) + format.min_stride(w),
            _ => layout.len,
        };
        ensure!(
            data.len() >= needed,
            "{} frame {w}×{h} (stride {stride}): {} bytes, needs {needed}",
            format.name(),
            data.len(),
        );
        out.resize(3 * w * h, 0);
        let range = self.range;
        match format {
            PixelFormat::Rgb24 => {
                ensure!(
                    stride >= 3 * w,
                    "rgb24 frame {w}×{h}: stride {stride} is less than a row ({} bytes)",
                    3 * w
                );
                for (dst, src) in out.chunks_exact_mut(3 * w).zip(data.chunks(stride)) {
                    dst.copy_from_slice(&src[..3 * w]);
                }
            }
            PixelFormat::Yuyv => Yuyv::new(data, w, h, stride)?.to_rgb8_into(range, out, 3 * w)?,
            PixelFormat::I420 => {
                let (u, v) = data[layout.chroma..].split_at(layout.c_stride * layout.c_rows);
                let frame = I420::new(
                    Plane::new(&data[..layout.chroma], stride),
                    Plane::new(u, layout.c_stride),
                    Plane::new(v, layout.c_stride),
                    w,
                    h,
                )?;
                frame.to_rgb8_into(range, out, 3 * w)?;
            }
            PixelFormat::Nv12 => {
                let frame = Nv12::new(
                    Plane::new(&data[..layout.chroma], stride),
                    Plane::new(&data[layout.chroma..layout.len], layout.c_stride),
                    w,
                    h,
                )?;
                frame.to_rgb8_into(range, out, 3 * w)?;
            }
            PixelFormat::Mjpeg => unreachable!("handled above"),
        }
        Ok((w, h))
    }

    /// Decodes one JPEG into `out` as RGB8 (grey JPEGs are replicated to RGB).
    pub fn decode_jpeg(&mut self, jpeg: &[u8], out: &mut Vec<u8>) -> Result<(usize, usize)> {
        ensure!(
            jpeg.len() >= 4 && jpeg[..2] == [0xFF, 0xD8],
            "MJPEG frame of {} bytes does not start with a JPEG marker",
            jpeg.len()
        );
        let data: &[u8] = if needs_default_tables(jpeg) {
            // UVC cameras send MJPEG without Huffman tables (the standard ones are implied,
            // as in AVI's MJPEG); zune-jpeg supplies them when the frame carries the AVI1
            // APP0 marker, so insert one.
            self.patched_jpeg.clear();
            self.patched_jpeg.extend_from_slice(&jpeg[..2]);
            self.patched_jpeg
                .extend_from_slice(&[0xFF, 0xE0, 0x00, 0x07, b'A', b'V', b'I', b'1', 0]);
            self.patched_jpeg.extend_from_slice(&jpeg[2..]);
            &self.patched_jpeg
        } else {
            jpeg
        };
        let options = DecoderOptions::default()
            .set_strict_mode(false)
            .set_max_width(1 << 14)
            .set_max_height(1 << 14);
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(data), options);
        decoder
            .decode_headers()
            .map_err(|e| anyhow::anyhow!("MJPEG frame: {e:?}"))?;
        let (w, h) = decoder.dimensions().context("MJPEG frame: no size")?;
        let grey = matches!(
            decoder.input_colorspace(),
            Some(ColorSpace::Luma | ColorSpace::LumaA)
        );
        let out_space = if grey {
            ColorSpace::Luma
        } else {
            ColorSpace::RGB
        };
        decoder.set_options(decoder.options().jpeg_set_out_colorspace(out_space));
        let channels = if grey { 1 } else { 3 };
        out.resize(w * h * 3, 0);
        decoder
            .decode_into(&mut out[..w * h * channels])
            .map_err(|e| anyhow::anyhow!("MJPEG frame {w}×{h}: {e:?}"))?;
        if grey {
            // Expand in place from the back so no value is overwritten before it is read.
            for i in (0..w * h).rev() {
                let g = out[i];
                out[3 * i..3 * i + 3].fill(g);
            }
        }
        Ok((w, h))
    }
}

/// Whether a JPEG lacks Huffman tables (no DHT segment before the first scan) and has no
/// AVI1 marker telling the decoder to use the standard ones.
pub fn needs_default_tables(jpeg: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return false; // not a marker where one should be: let the decoder complain
        }
        let marker = jpeg[i + 1];
        match marker {
            0xFF => {
                i += 1; // fill byte
                continue;
            }
            0xC4 => return false, // DHT
            0xDA => return true,  // SOS without a DHT before it
            0xD0..=0xD9 | 0x01 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if marker == 0xE0 && jpeg[i + 4..].starts_with(b"AVI1") {
            return false;
        }
        i += 2 + len;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(format: PixelFormat, data: &[u8], w: usize, h: usize, stride: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let frame = RawFrame {
            data,
            format,
            width: w,
            height: h,
            stride,
        };
        let dims = Converter::new(ColorRange::Limited)
            .convert_to_rgb(&frame, &mut out)
            .unwrap();
        assert_eq!(dims, (w, h));
        out
    }

    // BT.601 limited-range YCbCr of a few colours (rounded): black, white, red, green, blue.
    const BLACK: [u8; 3] = [16, 128, 128];
    const WHITE: [u8; 3] = [235, 128, 128];
    const RED: [u8; 3] = [81, 90, 240];
    const GREEN: [u8; 3] = [145, 54, 34];
    const BLUE: [u8; 3] = [41, 240, 110];

    fn assert_close(got: &[u8], want: &[u8], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.abs_diff(*w) <= 2, "{what}: byte {i}: {g} vs {w}");
        }
    }

    /// 4×2 image: top row black white red green, bottom row red red blue blue — each 2×2
    /// block has one chroma in 4:2:0, so the test image keeps chroma per block.
    #[test]
    fn yuyv_known_pixels_with_padded_rows() {
        // 2×2 macropixels per row pair; YUYV carries chroma per 2×1 pair.
        let rows = [[BLACK, WHITE, RED, RED], [BLUE, BLUE, GREEN, GREEN]];
        let stride = 12; // 8 bytes of pixels + 4 of padding
        let mut data = vec![0xAA; stride * 2];
        for (y, row) in rows.iter().enumerate() {
            for pair in 0..2 {
                let (a, b) = (row[2 * pair], row[2 * pair + 1]);
                // Shared chroma: the first pixel's (black/white share neutral chroma).
                let o = y * stride + 4 * pair;
                data[o..o + 4].copy_from_slice(&[a[0], a[1], b[0], a[2]]);
            }
        }
        let rgb = convert(PixelFormat::Yuyv, &data, 4, 2, stride);
        let want = [
            [0, 0, 0],
            [255, 255, 255],
            [255, 0, 0],
            [255, 0, 0],
            [0, 0, 255],
            [0, 0, 255],
            [0, 255, 0],
            [0, 255, 0],
        ]
        .concat();
        assert_close(&rgb, &want, "YUYV");
    }

    /// A 4×4 frame of 2×2 blocks: red, green / blue, white (chroma per block).
    fn blocks() -> ([[u8; 3]; 4], Vec<u8>) {
        let colours = [RED, GREEN, BLUE, WHITE];
        let want: Vec<u8> = (0..16)
            .flat_map(|i| {
                let (x, y) = (i % 4, i / 4);
                match (x / 2, y / 2) {
                    (0, 0) => [255, 0, 0],
                    (1, 0) => [0, 255, 0],
                    (0, 1) => [0, 0, 255],
                    _ => [255, 255, 255],
                }
            })
            .collect();
        (colours, want)
    }

    #[test]
    fn i420_known_pixels_in_one_buffer() {
        let (colours, want) = blocks();
        // Luma stride 6 (2 bytes of padding), chroma stride 3: the Layout convention.
        let stride = 6;
        let layout = Layout::of(PixelFormat::I420, 4, 4, stride).unwrap();
        assert_eq!(
            layout,
            Layout {
                chroma: 24,
                c_stride: 3,
                c_rows: 2,
                len: 36
            }
        );
        let mut data = vec![0xAA; layout.len];
        for y in 0..4 {
            for x in 0..4 {
                data[y * stride + x] = colours[(y / 2) * 2 + x / 2][0];
            }
        }
        for by in 0..2 {
            for bx in 0..2 {
                let c = colours[by * 2 + bx];
                data[24 + by * 3 + bx] = c[1];
                data[24 + 6 + by * 3 + bx] = c[2];
            }
        }
        assert_close(
            &convert(PixelFormat::I420, &data, 4, 4, stride),
            &want,
            "I420",
        );
    }

    #[test]
    fn nv12_known_pixels_in_one_buffer() {
        let (colours, want) = blocks();
        let stride = 4;
        let layout = Layout::of(PixelFormat::Nv12, 4, 4, stride).unwrap();
        assert_eq!((layout.chroma, layout.c_stride, layout.len), (16, 4, 24));
        let mut data = vec![0; layout.len];
        for y in 0..4 {
            for x in 0..4 {
                data[y * stride + x] = colours[(y / 2) * 2 + x / 2][0];
            }
        }
        for by in 0..2 {
            for bx in 0..2 {
                let c = colours[by * 2 + bx];
                data[16 + by * 4 + 2 * bx] = c[1];
                data[16 + by * 4 + 2 * bx + 1] = c[2];
            }
        }
        assert_close(
            &convert(PixelFormat::Nv12, &data, 4, 4, stride),
            &want,
            "NV12",
        );
    }

    #[test]
    fn rgb24_padded_rows_are_repacked() {
        let data = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12];
        let frame = RawFrame {
            data: &data,
            format: PixelFormat::Rgb24,
            width: 2,
            height: 2,
            stride: 8,
        };
        assert!(!Converter::is_packed_rgb(&frame));
        assert_eq!(
            convert(PixelFormat::Rgb24, &data, 2, 2, 8),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
    }

    /// A 16×16 JPEG of four flat quadrants, from the `image` crate's encoder.
    fn quadrant_jpeg() -> (Vec<u8>, Vec<u8>) {
        let colours = [
            [200u8, 30, 30],
            [30, 200, 30],
            [30, 30, 200],
            [220, 220, 220],
        ];
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            image::Rgb(colours[(y as usize / 8) * 2 + x as usize / 8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode(img.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        (jpeg, img.into_raw())
    }

    #[test]
    fn mjpeg_decodes_to_known_pixels() {
        let (jpeg, want) = quadrant_jpeg();
        assert!(!needs_default_tables(&jpeg));
        let mut out = Vec::new();
        let dims = Converter::default().decode_jpeg(&jpeg, &mut out).unwrap();
        assert_eq!(dims, (16, 16));
        // Flat 8×8 blocks survive JPEG nearly exactly; allow a few levels.
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(g.abs_diff(*w) <= 6, "byte {i}: {g} vs {w}");
        }
    }

    /// Removes every DHT segment, as UVC cameras send MJPEG.
    fn strip_huffman_tables(jpeg: &[u8]) -> Vec<u8> {
        let mut out = jpeg[..2].to_vec();
        let mut i = 2;
        loop {
            let marker = jpeg[i + 1];
            let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
            if marker == 0xDA {
                out.extend_from_slice(&jpeg[i..]);
                return out;
            }
            if marker != 0xC4 {
                out.extend_from_slice(&jpeg[i..i + 2 + len]);
            }
            i += 2 + len;
        }
    }

    #[test]
    fn mjpeg_without_huffman_tables_uses_the_standard_ones() {
        let (jpeg, _) = quadrant_jpeg();
        let stripped = strip_huffman_tables(&jpeg);
        assert!(stripped.len() < jpeg.len());
        assert!(needs_default_tables(&stripped));
        let (mut full, mut bare) = (Vec::new(), Vec::new());
        let mut conv = Converter::default();
        conv.decode_jpeg(&jpeg, &mut full).unwrap();
        let frame = RawFrame {
            data: &stripped,
            format: PixelFormat::Mjpeg,
            width: 0,
            height: 0,
            stride: 0,
        };
        assert_eq!(conv.convert_to_rgb(&frame, &mut bare).unwrap(), (16, 16));
        assert_eq!(full, bare);
    }

    #[test]
    fn grey_jpeg_becomes_grey_rgb() {
        let img =
            image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 40 } else { 210 }]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode(img.as_raw(), 8, 8, image::ExtendedColorType::L8)
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            Converter::default().decode_jpeg(&jpeg, &mut out).unwrap(),
            (8, 8)
        );
        for px in out.chunks(3) {
            assert!(px[0] == px[1] && px[1] == px[2]);
        }
        assert!(out[0].abs_diff(40) <= 4 && out[3 * 7].abs_diff(210) <= 4);
    }

    #[test]
    fn damaged_frames_are_errors_not_panics() {
        let mut conv = Converter::default();
        let mut out = Vec::new();
        let (jpeg, _) = quadrant_jpeg();
        for cut in [0, 3, 20, jpeg.len() / 2] {
            let _ = conv.decode_jpeg(&jpeg[..cut], &mut out);
        }
        assert!(conv.decode_jpeg(b"not a jpeg", &mut out).is_err());
        let short = RawFrame {
            data: &[0; 10],
            format: PixelFormat::I420,
            width: 4,
            height: 4,
            stride: 4,
        };
        let e = conv
            .convert_to_rgb(&short, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 bytes, needs 24"), "{e}");
    }

    #[test]
    fn names_and_sizes() {
        assert_eq!(PixelFormat::parse("YUV420").unwrap(), PixelFormat::I420);
        assert_eq!(PixelFormat::parse("mjpg").unwrap(), PixelFormat::Mjpeg);
        assert!(PixelFormat::parse("bayer")
            .unwrap_err()
            .to_string()
            .contains("known: rgb24"));
        assert_eq!(
            PixelFormat::I420.frame_len(640, 480, 640),
            Some(640 * 480 * 3 / 2)
        );
        assert_eq!(
            PixelFormat::Nv12.frame_len(640, 480, 640),
            Some(640 * 480 * 3 / 2)
        );
        assert_eq!(
            PixelFormat::Yuyv.frame_len(640, 480, 1280),
            Some(640 * 480 * 2)
        );
        assert_eq!(PixelFormat::Rgb24.frame_len(4, 2, 12), Some(24));
        assert_eq!(PixelFormat::Mjpeg.frame_len(4, 2, 0), None);
        // Odd sizes: chroma rounds up.
        assert_eq!(PixelFormat::I420.frame_len(5, 3, 5), Some(15 + 2 * 3 * 2));
    }
}
