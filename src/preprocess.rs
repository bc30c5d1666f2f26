//! Frames (RGB8, any stride) → normalized NCHW f32 tensor, as timm's eval transform.
//!
//! timm's eval transform for `poolformer_s12` (pretrained_cfg: input 224, crop_pct 0.9,
//! crop_mode center, bicubic, ImageNet mean/std; `create_transform` builds
//! `Resize(248) → CenterCrop(224) → MaybeToTensor → Normalize`) is, on a PIL RGB image:
//!
//! 1. `torchvision.transforms.Resize(248, BICUBIC)`: the shorter side becomes
//!    `floor(224 / 0.9) = 248`, the longer `int(248 * long / short)` (truncated); an image
//!    whose size already matches is returned untouched. On PIL images this is Pillow's
//!    `Image.resize` (`ImagingResample`): separable, one pass per axis, each rounding and
//!    clamping to u8, kernel support scaled by the downscale factor (antialias). The order
//!    of the passes depends on the Pillow version, see [`PassOrder`].
//! 2. `CenterCrop(224)`: top = `int(round((h - 224) / 2.0))` with Python's
//!    round-half-to-even, left likewise.
//! 3. `ToTensor` (`x / 255` in f32) and `Normalize(mean, std)` (`(x - mean) / std` in f32).
//!
//! [`Preprocessor`] does the same with fast_image_resize's SIMD convolutions; see its
//! documentation for where the resize differs from Pillow (one u8 level, on ~0.01 % of
//! values by default). Normalization reproduces torch's f32 operations bit for bit.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use fast_image_resize as fir;
use fast_image_resize::pixels::{U16x3, U8x3};
use serde::Deserialize;
use tract_core::ndarray::Array4;

/// The eval-transform constants of timm's `poolformer_s12` pretrained_cfg.
const PREPROCESS_JSON: &str = include_str!("../models/preprocess.json");

/// Longest resized side accepted (pixels): beyond it an extreme aspect ratio would make
/// the intermediate image huge (torchvision would allocate it; we refuse).
const MAX_RESIZED_SIDE: usize = 1 << 16;

/// A borrowed interleaved RGB8 image with an explicit row stride in bytes.
///
/// Rows may be padded (`stride > 3 * width`, as camera frames often are); the last row
/// needs only `3 * width` bytes. Build it with [`RgbImage::new`], which checks the
/// layout; [`preprocess`] checks it again since the fields are public.
#[derive(Debug, Clone, Copy)]
pub struct RgbImage<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub stride: usize,
}

impl<'a> RgbImage<'a> {
    /// A view of `data` as `height` rows of `width` RGB pixels, `stride` bytes apart.
    pub fn new(data: &'a [u8], width: usize, height: usize, stride: usize) -> Result<Self> {
        let image = RgbImage {
            data,
            width,
            height,
            stride,
        };
        image.validate()?;
        Ok(image)
    }

    /// A view of a decoded `image` crate buffer (packed rows).
    pub fn from_image(image: &'a image::RgbImage) -> Self {
        let width = image.width() as usize;
        RgbImage {
            data: image.as_raw(),
            width,
            height: image.height() as usize,
            stride: 3 * width,
        }
    }

    /// Checks that the fields describe a non-empty image inside `data`.
    pub fn validate(&self) -> Result<()> {
        let RgbImage {
            data,
            width,
            height,
            stride,
        } = *self;
        ensure!(
            width > 0 && height > 0,
            "RGB image: empty size {width}×{height}"
        );
        let row_bytes = width
            .checked_mul(3)
            .with_context(|| format!("RGB image: width {width} overflows"))?;
        ensure!(
            stride >= row_bytes,
            "RGB image {width}×{height}: stride {stride} bytes is less than a row (3 × {width} = {row_bytes})"
        );
        let needed = stride
            .checked_mul(height - 1)
            .and_then(|n| n.checked_add(row_bytes))
            .with_context(|| {
                format!("RGB image {width}×{height} stride {stride}: size overflows")
            })?;
        ensure!(
            data.len() >= needed,
            "RGB image {width}×{height} stride {stride}: buffer has {} bytes, needs {needed}",
            data.len()
        );
        Ok(())
    }

    /// Row `y`, `3 * width` bytes.
    fn row(&self, y: usize) -> &'a [u8] {
        &self.data[y * self.stride..][..3 * self.width]
    }
}

/// Decodes an image file (PNG, JPEG, BMP, PNM) to RGB8, as PIL's `Image.open(p).convert("RGB")`.
///
/// Like PIL (and timm), EXIF orientation is not applied; alpha is dropped, grey is
/// replicated. 8-bit PNGs decode to PIL's pixels exactly (checked; 16-bit ones, BMP and
/// PNM were not compared). JPEG decoders differ
/// (`image` uses zune-jpeg, PIL libjpeg-turbo; IDCT and chroma upsampling): on two JPEGs
/// (quality 75 and 90) the preprocessed tensors differed from timm's by up to 3 levels on
/// 21–32 % of values, against ≤ 16 values when both start from PIL's decoded pixels. For
/// bit-level parity checks, feed PNGs.
pub fn load_image(path: impl AsRef<Path>) -> Result<image::RgbImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .with_context(|| format!("opening image {}", path.display()))?;
    // The format comes from the content, else from the extension.
    let Some(format) = reader.format() else {
        bail!(
            "{}: not an image (format not recognized; png, jpeg, bmp and pnm are supported)",
            path.display()
        );
    };
    let decoded = reader.decode().with_context(|| {
        format!(
            "{}: not an image, or a damaged one: decoding as {format:?} failed",
            path.display()
        )
    })?;
    Ok(decoded.to_rgb8())
}

/// Sizes and normalization of the eval transform.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square center crop fed to the network.
    pub input_size: usize,
    /// The shorter image side is resized to this before cropping.
    pub resize_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Which Pillow's order of resize passes to reproduce.
    pub pass_order: PassOrder,
    /// Fixed-point precision of the resize, accuracy against speed.
    pub precision: ResizePrecision,
}

/// How finely fast_image_resize computes the bicubic resize; measurements in
/// [`Preprocessor`]'s documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizePrecision {
    /// u16 pixels, 30–32-bit weights: exact but within ~2e-6 of a rounding boundary; one
    /// level off Pillow on ≤ 0.02 % of values. 640×480 in ~2.3 ms.
    #[default]
    High,
    /// u8 pixels, 14–16-bit weights: one level off Pillow on 0.1–1 % of values, two on
    /// a few when upscaling. About 3× faster (~0.8 ms).
    Fast,
}

/// The order of Pillow's two resize passes, which matters because each pass rounds and
/// clamps to u8: whether bicubic overshoot is clamped after the first pass moves pixels by
/// up to ~10 levels on natural-looking synthetic images, 20+ on noise.
///
/// Pillow ≤ 12 always resized horizontally first. Pillow 13.0 (python-pillow/Pillow#9549,
/// "if height is scaled down significantly more than width, resize vertically first")
/// goes vertical first when `new_h < h && h - new_h > 2 * (w - new_w)`: inferred from the
/// installed Pillow 13.0.0, whose C source we did not have, and checked on ~1 500 random
/// size pairs (all matched; at exactly twice it goes horizontal first). For Resize(248)
/// that means downscaled portraits taller than about 2:1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PassOrder {
    /// Pillow ≥ 13.0: vertical first when the height shrinks by more than twice as many
    /// pixels as the width.
    #[default]
    Pillow13,
    /// Pillow ≤ 12: always horizontal first.
    HorizontalFirst,
}

/// The contents of models/preprocess.json.
#[derive(Debug, Deserialize)]
struct TimmEvalConstants {
    input_size: usize,
    crop_pct: f64,
    interpolation: String,
    mean: [f32; 3],
    std: [f32; 3],
}

fn timm_constants() -> TimmEvalConstants {
    let constants: TimmEvalConstants = serde_json::from_str(PREPROCESS_JSON)
        .expect("models/preprocess.json parses (checked by the preprocess tests)");
    debug_assert_eq!(constants.interpolation, "bicubic");
    constants
}

impl PreprocessConfig {
    /// timm's eval transform for poolformer_s12: crop 224, resize 248.
    pub fn timm() -> Self {
        Self::for_input_size(timm_constants().input_size)
    }

    /// The same transform for another input side `n`: resize to `floor(n / crop_pct)`,
    /// as timm's `transforms_imagenet_eval` computes it (in f64, like Python).
    pub fn for_input_size(n: usize) -> Self {
        let c = timm_constants();
        PreprocessConfig {
            input_size: n,
            resize_size: (n as f64 / c.crop_pct).floor() as usize,
            mean: c.mean,
            std: c.std,
            pass_order: PassOrder::default(),
            precision: ResizePrecision::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.input_size > 0, "preprocess config: input size is 0");
        ensure!(
            self.resize_size >= self.input_size,
            "preprocess config: resize size {} is smaller than the crop {} (padding is not supported)",
            self.resize_size,
            self.input_size
        );
        ensure!(
            self.std.iter().all(|s| s.is_finite() && *s != 0.0)
                && self.mean.iter().all(|m| m.is_finite()),
            "preprocess config: mean {:?} / std {:?} must be finite, std non-zero",
            self.mean,
            self.std
        );
        Ok(())
    }
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self::timm()
    }
}

/// torchvision's `_compute_resized_output_size` for `Resize(int)`: (width, height) with the
/// shorter side `size` and the longer `int(size * long / short)`. The product is an exact
/// integer and the quotient a correctly rounded f64, as in Python.
pub fn resized_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `center_crop` offset: `int(round((size - crop) / 2.0))`, Python's round
/// being half-to-even (`(225 - 224) / 2 = 0.5` gives 0, `(227 - 224) / 2 = 1.5` gives 2).
pub fn center_crop_offset(size: usize, crop: usize) -> usize {
    ((size - crop) as f64 / 2.0).round_ties_even() as usize
}

/// Whether Pillow (per `order`) resizes `w`×`h` to `new_w`×`new_h` vertical pass first.
fn vertical_first(
    order: PassOrder,
    (w, h): (usize, usize),
    (new_w, new_h): (usize, usize),
) -> bool {
    let shrink_h = h as i64 - new_h as i64;
    let shrink_w = w as i64 - new_w as i64;
    order == PassOrder::Pillow13 && shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// Reusable preprocessing state: the SIMD resizer, scratch images and the
/// normalization table. One per thread; no allocation after the first frame of a size.
///
/// # Resize accuracy against Pillow
///
/// The kernel is fast_image_resize's `FilterType::CatmullRom`, the same cubic as Pillow's
/// `BICUBIC` (a = −0.5, support 2 scaled by the downscale factor, weights normalized to
/// sum 1, the same taps). We call the resizer once per axis, so that the passes run in
/// Pillow's order with Pillow's rounding and clamping to u8 in between; fast_image_resize's
/// own two-pass resize goes vertical first for u8 images, which differs by up to 20+
/// levels on noisy content (bicubic overshoot clamped at a different stage).
///
/// What remains is fixed-point precision. Pillow stores weights as i32 scaled by 2^22;
/// fast_image_resize as i32 scaled by 2^p, p = 30–32, for u16 pixels
/// ([`ResizePrecision::High`], the default), or as i16 with p = 14–16 for u8 pixels
/// ([`ResizePrecision::Fast`]). All round alike (add half, shift, clamp), so a value differs
/// only where its exact value lies within the weights' rounding error of a .5 boundary
/// (Pillow ≤ 5e-4 levels, High ≤ 2e-6, Fast ≤ 0.12): it is then one level off, and a level
/// off after the first pass can shift a second-pass value by one, or two where two such
/// neighbours have weights summing above 1. Exact ties are common on synthetic linear
/// gradients (each implementation breaks them by its own rounding noise).
///
/// Measured against Pillow 13.0.0 (torchvision 0.29.2, timm 1.0.31) on 29 PNGs, natural-
/// looking, random-noise and gradient images from 7×5 to 1280×720, odd and even, up- and
/// downscaled, both pass orders (scripts/preprocess_vs_timm.py):
///
/// | precision | max \|Δ\| | values off (of 150 528 per image) | 640×480 frame |
/// |-----------|------------|------------------------------------|---------------|
/// | High      | 1 level    | 0–27 (≤ 0.02 %); 835 on a linear gradient (ties) | 2.3 ms |
/// | Fast      | 2 levels (upscaling 7×5, 225×224), else 1 | 130–1 440 (0.1–1 %) | 0.8 ms |
///
/// One level is 1/(255·std) = 0.0171–0.0175 in normalized units. Timings: one x86-64 core
/// with AVX2, release build. JPEG files differ more, from the decoder not the resize (see
/// [`load_image`]).
pub struct Preprocessor {
    config: PreprocessConfig,
    resizer: fir::Resizer,
    /// `[channel][u8 value]` → normalized value, computed with timm's f32 operations.
    table: [[f32; 256]; 3],
    high: Scratch<U16x3>,
    fast: Scratch<U8x3>,
    /// The center crop, packed RGB8.
    crop: Vec<u8>,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Images between resize passes, kept to avoid allocating per frame.
#[derive(Default)]
struct Scratch<P> {
    /// The source with unpadded rows.
    source: Vec<P>,
    /// After the first resize pass.
    first: Vec<P>,
    /// After the second resize pass (crop rows or columns only).
    second: Vec<P>,
}

/// A pixel type the resize runs on: RGB with u8 values, in a wider type or not.
trait RgbPixel: fir::PixelTrait + Default {
    fn from_rgb(rgb: &[u8]) -> Self;
    fn to_rgb(self) -> [u8; 3];
    /// Clamps to 0..=255 as Pillow's `clip8` (fast_image_resize clamps to the type's range).
    fn clamp_u8(&mut self);
}

impl RgbPixel for U8x3 {
    fn from_rgb(rgb: &[u8]) -> Self {
        U8x3::new([rgb[0], rgb[1], rgb[2]])
    }
    fn to_rgb(self) -> [u8; 3] {
        self.0
    }
    fn clamp_u8(&mut self) {}
}

impl RgbPixel for U16x3 {
    fn from_rgb(rgb: &[u8]) -> Self {
        U16x3::new([rgb[0] as u16, rgb[1] as u16, rgb[2] as u16])
    }
    fn to_rgb(self) -> [u8; 3] {
        self.0.map(|v| v as u8)
    }
    fn clamp_u8(&mut self) {
        self.0 = self.0.map(|v| v.min(255));
    }
}

/// One resize pass along one axis, as Pillow's `ResampleHorizontal`/`ResampleVertical`:
/// `src` (`src_w`×`src_h`) cropped to `crop` = (left, top, width, height) → `dst`
/// (`dst_w`×`dst_h`), rounded and clamped to u8 values. The crop is integer and equals the
/// destination along the axis that is not resampled, so fast_image_resize runs that single
/// pass: rows (or columns) it skips are ones the caller will not use, each output row
/// (column) depending only on its own source row (column).
fn resize_pass<P: RgbPixel>(
    resizer: &mut fir::Resizer,
    src: &[P],
    (src_w, src_h): (usize, usize),
    (left, top, width, height): (usize, usize, usize, usize),
    dst: &mut Vec<P>,
    (dst_w, dst_h): (usize, usize),
) -> Result<()> {
    debug_assert!(
        (width == dst_w) != (height == dst_h),
        "exactly one axis is resampled"
    );
    let u32_of = |v: usize| u32::try_from(v).context("preprocess: image too large");
    let src = fir::images::TypedImageRef::new(u32_of(src_w)?, u32_of(src_h)?, src)
        .context("preprocess: wrapping the source of a resize pass")?;
    dst.resize(dst_w * dst_h, P::default());
    let mut dst_image =
        fir::images::TypedImage::from_pixels_slice(u32_of(dst_w)?, u32_of(dst_h)?, dst)
            .context("preprocess: wrapping the destination of a resize pass")?;
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom))
        .crop(left as f64, top as f64, width as f64, height as f64);
    resizer
        .resize_typed(&src, &mut dst_image, &options)
        .context("preprocess: resizing")?;
    dst.iter_mut().for_each(P::clamp_u8);
    Ok(())
}

/// The geometry of one frame's Resize + CenterCrop.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Source size.
    size: (usize, usize),
    /// Size after Resize.
    resized: (usize, usize),
    /// Crop side and offset in the resized image.
    crop: usize,
    left: usize,
    top: usize,
    vertical_first: bool,
}

/// Resize (Pillow's passes, computing only the rows or columns the crop needs in the last
/// one) then CenterCrop, appending the crop's RGB8 pixels to `crop`.
fn resize_crop_with<P: RgbPixel>(
    resizer: &mut fir::Resizer,
    scratch: &mut Scratch<P>,
    image: &RgbImage,
    plan: Plan,
    crop: &mut Vec<u8>,
) -> Result<()> {
    let Plan {
        size: (w, h),
        resized: (rw, rh),
        crop: n,
        left,
        top,
        vertical_first,
    } = plan;
    let Scratch {
        source,
        first,
        second,
    } = scratch;
    source.clear();
    for y in 0..h {
        source.extend(image.row(y).chunks_exact(3).map(P::from_rgb));
    }
    let (resized, stride, left, top): (&[P], usize, usize, usize) = if rh == h {
        // Horizontal pass only, on the crop's rows.
        resize_pass(resizer, source, (w, h), (0, top, w, n), first, (rw, n))?;
        (first, rw, left, 0)
    } else if rw == w {
        // Vertical pass only, on the crop's columns.
        resize_pass(resizer, source, (w, h), (left, 0, n, h), first, (n, rh))?;
        (first, n, 0, top)
    } else if vertical_first {
        resize_pass(resizer, source, (w, h), (0, 0, w, h), first, (w, rh))?;
        resize_pass(resizer, first, (w, rh), (0, top, w, n), second, (rw, n))?;
        (second, rw, left, 0)
    } else {
        resize_pass(resizer, source, (w, h), (0, 0, w, h), first, (rw, h))?;
        resize_pass(resizer, first, (rw, h), (left, 0, n, h), second, (n, rh))?;
        (second, n, 0, top)
    };
    for y in top..top + n {
        for &px in &resized[y * stride + left..][..n] {
            crop.extend(px.to_rgb());
        }
    }
    Ok(())
}

impl Preprocessor {
    pub fn new(config: PreprocessConfig) -> Self {
        let table = std::array::from_fn(|c| {
            std::array::from_fn(|v| {
                // Exactly ToTensor's `x.float().div(255)` then Normalize's `sub_(mean).div_(std)`.
                (v as f32 / 255.0 - config.mean[c]) / config.std[c]
            })
        });
        Preprocessor {
            config,
            resizer: fir::Resizer::new(),
            table,
            high: Scratch::default(),
            fast: Scratch::default(),
            crop: Vec::new(),
        }
    }

    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// The normalized `[1, 3, n, n]` tensor for `image`.
    pub fn preprocess(&mut self, image: &RgbImage) -> Result<Array4<f32>> {
        let n = self.config.input_size;
        let mut out = Array4::<f32>::zeros((1, 3, n, n));
        let slice = out.as_slice_mut().expect("a fresh array is contiguous");
        self.preprocess_into(image, slice)?;
        Ok(out)
    }

    /// Writes the normalized tensor, NCHW `[1, 3, n, n]` in C order, into `out` (length 3·n²).
    pub fn preprocess_into(&mut self, image: &RgbImage, out: &mut [f32]) -> Result<()> {
        let n = self.config.input_size;
        ensure!(
            out.len() == 3 * n * n,
            "preprocess: output buffer holds {} values, a 1×3×{n}×{n} tensor needs {}",
            out.len(),
            3 * n * n
        );
        self.resize_crop(image)?;
        let (plane_r, rest) = out.split_at_mut(n * n);
        let (plane_g, plane_b) = rest.split_at_mut(n * n);
        let [table_r, table_g, table_b] = &self.table;
        let planes = plane_r.iter_mut().zip(plane_g).zip(plane_b);
        for (px, ((r, g), b)) in self.crop.chunks_exact(3).zip(planes) {
            *r = table_r[px[0] as usize];
            *g = table_g[px[1] as usize];
            *b = table_b[px[2] as usize];
        }
        Ok(())
    }

    /// The resized and center-cropped image before normalization: n×n packed RGB8, the
    /// pixels timm has after `CenterCrop`.
    pub fn resize_crop(&mut self, image: &RgbImage) -> Result<&[u8]> {
        image.validate()?;
        self.config.validate()?;
        let (w, h) = (image.width, image.height);
        let n = self.config.input_size;
        let (rw, rh) = resized_size(w, h, self.config.resize_size);
        ensure!(
            rw <= MAX_RESIZED_SIDE && rh <= MAX_RESIZED_SIDE,
            "preprocess: a {w}×{h} image would be resized to {rw}×{rh}; aspect ratio too extreme"
        );
        let (left, top) = (center_crop_offset(rw, n), center_crop_offset(rh, n));
        self.crop.clear();
        if (rw, rh) == (w, h) {
            // torchvision's resize returns the image itself when the size already matches.
            for y in top..top + n {
                self.crop
                    .extend_from_slice(&image.row(y)[3 * left..][..3 * n]);
            }
            return Ok(&self.crop);
        }
        let plan = Plan {
            size: (w, h),
            resized: (rw, rh),
            crop: n,
            left,
            top,
            vertical_first: vertical_first(self.config.pass_order, (w, h), (rw, rh)),
        };
        let resizer = &mut self.resizer;
        match self.config.precision {
            ResizePrecision::High => {
                resize_crop_with(resizer, &mut self.high, image, plan, &mut self.crop)?
            }
            ResizePrecision::Fast => {
                resize_crop_with(resizer, &mut self.fast, image, plan, &mut self.crop)?
            }
        }
        Ok(&self.crop)
    }
}

/// One-shot [`Preprocessor::preprocess`]; keep a [`Preprocessor`] to reuse its buffers.
pub fn preprocess(image: &RgbImage, config: &PreprocessConfig) -> Result<Array4<f32>> {
    Preprocessor::new(config.clone()).preprocess(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testimage::natural_image;
    use rand::{Rng, SeedableRng};

    const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
    const STD: [f64; 3] = [0.229, 0.224, 0.225];

    /// Pillow's BICUBIC kernel (a = −0.5), written out independently of fast_image_resize.
    fn cubic(x: f64) -> f64 {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            (a + 2.0) * x.powi(3) - (a + 3.0) * x.powi(2) + 1.0
        } else if x < 2.0 {
            a * x.powi(3) - 5.0 * a * x.powi(2) + 8.0 * a * x - 4.0 * a
        } else {
            0.0
        }
    }

    /// Pillow's `precompute_coeffs` in f64: per output pixel, the first input index and the
    /// normalized weights.
    fn pil_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                // C's (int) truncates toward zero, then clamps.
                let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
                let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64) as usize;
                let w: Vec<f64> = (xmin..xmax)
                    .map(|x| cubic((x as f64 - center + 0.5) / filter_scale))
                    .collect();
                let total: f64 = w.iter().sum();
                (xmin, w.iter().map(|v| v / total).collect())
            })
            .collect()
    }

    /// The u8 values a pixel may take: `lo..=hi`.
    type Range = (u8, u8);

    /// One Pillow resize pass in exact (f64) arithmetic, on pixels known up to a range.
    /// Pillow rounds half up and clamps to u8 (`clip8`); a value within `eps` of a .5
    /// boundary may round either way in fixed point, so both results are allowed.
    fn pil_pass(
        src: &[Range],
        (w, h): (usize, usize),
        (nw, nh): (usize, usize),
        horizontal: bool,
        eps: f64,
    ) -> Vec<Range> {
        let coeffs = if horizontal {
            pil_coeffs(w, nw)
        } else {
            pil_coeffs(h, nh)
        };
        let round = |v: f64| (v + 0.5).floor().clamp(0.0, 255.0) as u8;
        let mut out = vec![(0, 0); nw * nh * 3];
        for y in 0..nh {
            for x in 0..nw {
                let (start, weights) = &coeffs[if horizontal { x } else { y }];
                for c in 0..3 {
                    let (mut lo, mut hi) = (0.0, 0.0);
                    for (i, &k) in weights.iter().enumerate() {
                        let (sx, sy) = if horizontal {
                            (start + i, y)
                        } else {
                            (x, start + i)
                        };
                        let (a, b) = src[(sy * w + sx) * 3 + c];
                        let (a, b) = if k >= 0.0 { (a, b) } else { (b, a) };
                        lo += k * a as f64;
                        hi += k * b as f64;
                    }
                    out[(y * nw + x) * 3 + c] = (round(lo - eps), round(hi + eps));
                }
            }
        }
        out
    }

    /// Pillow's `ImagingResample`: one pass, rounding and clamping to u8, the other pass.
    fn pil_resize(
        src: &[u8],
        (w, h): (usize, usize),
        (nw, nh): (usize, usize),
        vertical_first: bool,
        eps: f64,
    ) -> Vec<Range> {
        let img: Vec<Range> = src.iter().map(|&v| (v, v)).collect();
        match (nw != w, nh != h) {
            (false, false) => img,
            (true, false) => pil_pass(&img, (w, h), (nw, h), true, eps),
            (false, true) => pil_pass(&img, (w, h), (w, nh), false, eps),
            (true, true) if vertical_first => {
                let tmp = pil_pass(&img, (w, h), (w, nh), false, eps);
                pil_pass(&tmp, (w, nh), (nw, nh), true, eps)
            }
            (true, true) => {
                let tmp = pil_pass(&img, (w, h), (nw, h), true, eps);
                pil_pass(&tmp, (nw, h), (nw, nh), false, eps)
            }
        }
    }

    /// torchvision's Resize(size) then CenterCrop(crop) on Pillow 13 (or ≤ 12 with
    /// `horizontal_first`), sizes in integer arithmetic: the crop's possible values.
    fn reference_resize_crop(
        src: &[u8],
        (w, h): (usize, usize),
        (size, crop): (usize, usize),
        horizontal_first: bool,
        eps: f64,
    ) -> Vec<Range> {
        let (nw, nh) = if w <= h {
            (size, size * h / w)
        } else {
            (size * w / h, size)
        };
        let shrink = |from: usize, to: usize| from as i64 - to as i64;
        // python-pillow/Pillow#9549.
        let vertical_first = !horizontal_first && nh < h && shrink(h, nh) > 2 * shrink(w, nw);
        let resized = pil_resize(src, (w, h), (nw, nh), vertical_first, eps);
        // round(d / 2) half-to-even: an odd d = 2k + 1 rounds to the even one of k, k + 1.
        let offset = |d: usize| {
            if d.is_multiple_of(2) || (d / 2).is_multiple_of(2) {
                d / 2
            } else {
                d / 2 + 1
            }
        };
        let (left, top) = (offset(nw - crop), offset(nh - crop));
        let mut out = Vec::with_capacity(crop * crop * 3);
        for y in top..top + crop {
            out.extend_from_slice(&resized[(y * nw + left) * 3..][..crop * 3]);
        }
        out
    }

    /// The fixed-point error bound of each precision, in levels: weights rounded to
    /// 2^-(p+1) (p ≥ 30 for u16 pixels, p ≥ 14 for u8 ones), times up to 15 taps of 255.
    fn eps(precision: ResizePrecision) -> f64 {
        match precision {
            ResizePrecision::High => 15.0 * 255.0 / (1u64 << 31) as f64,
            ResizePrecision::Fast => 15.0 * 255.0 / (1u64 << 15) as f64,
        }
    }

    /// Checks our crop against the exact reference: every value inside its range. Returns
    /// (values differing from the reference's nearest value, the largest such difference).
    fn check_against_reference(
        src: &[u8],
        (w, h): (usize, usize),
        config: PreprocessConfig,
    ) -> (usize, u8) {
        let horizontal_first = config.pass_order == PassOrder::HorizontalFirst;
        let eps = eps(config.precision);
        let sizes = (config.resize_size, config.input_size);
        let expected = reference_resize_crop(src, (w, h), sizes, horizontal_first, eps);
        let exact = reference_resize_crop(src, (w, h), sizes, horizontal_first, 0.0);
        let what = format!("{w}×{h} {:?} {:?}", config.pass_order, config.precision);
        let mut pre = Preprocessor::new(config);
        let got = pre
            .resize_crop(&RgbImage::new(src, w, h, 3 * w).unwrap())
            .unwrap();
        assert_eq!(got.len(), expected.len());
        for (i, (&v, &(lo, hi))) in got.iter().zip(&expected).enumerate() {
            let (x, y, c) = (i / 3 % 224, i / 3 / 224, i % 3);
            assert!(
                lo <= v && v <= hi,
                "{what}: crop ({x}, {y}) channel {c} is {v}, expected {lo}..={hi}"
            );
        }
        let diffs = got.iter().zip(&exact).map(|(&v, &(lo, _))| v.abs_diff(lo));
        (
            diffs.clone().filter(|&d| d > 0).count(),
            diffs.max().unwrap(),
        )
    }

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                v.extend([
                    (x * 255 / (w - 1).max(1)) as u8,
                    (y * 255 / (h - 1).max(1)) as u8,
                    ((x * 7 + y * 13) % 256) as u8,
                ]);
            }
        }
        v
    }

    fn natural(w: usize, h: usize, seed: u64) -> Vec<u8> {
        natural_image(w as u32, h as u32, seed).into_raw()
    }

    fn noise(w: usize, h: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..w * h * 3).map(|_| rng.gen()).collect()
    }

    fn config(pass_order: PassOrder, precision: ResizePrecision) -> PreprocessConfig {
        PreprocessConfig {
            pass_order,
            precision,
            ..PreprocessConfig::timm()
        }
    }

    #[test]
    fn constants_come_from_models_preprocess_json() {
        let c = timm_constants();
        assert_eq!(c.interpolation, "bicubic");
        assert_eq!(c.crop_pct, 0.9);
        let timm = PreprocessConfig::timm();
        assert_eq!((timm.input_size, timm.resize_size), (224, 248));
        assert_eq!(timm.mean, [0.485, 0.456, 0.406]);
        assert_eq!(timm.std, [0.229, 0.224, 0.225]);
        assert_eq!(timm.pass_order, PassOrder::Pillow13);
        assert_eq!(timm.precision, ResizePrecision::High);
        assert_eq!(PreprocessConfig::default(), timm);
        // timm: scale_size = math.floor(img_size / crop_pct).
        assert_eq!(PreprocessConfig::for_input_size(256).resize_size, 284);
        assert_eq!(PreprocessConfig::for_input_size(288).resize_size, 320);
        assert_eq!(PreprocessConfig::for_input_size(384).resize_size, 426);
    }

    #[test]
    fn resized_size_and_crop_offsets_match_torchvision() {
        // Values printed by torchvision 0.29.2's `_compute_resized_output_size` (Resize(248))
        // and `int(round((size - 224) / 2.0))` (CenterCrop(224)).
        assert_eq!(resized_size(640, 480, 248), (330, 248));
        assert_eq!(resized_size(480, 640, 248), (248, 330));
        assert_eq!(resized_size(251, 640, 248), (248, 632));
        assert_eq!(resized_size(300, 250, 248), (297, 248));
        assert_eq!(resized_size(225, 224, 248), (249, 248));
        assert_eq!(resized_size(248, 300, 248), (248, 300));
        assert_eq!(resized_size(1000, 1000, 248), (248, 248));
        assert_eq!(resized_size(249, 1000, 248), (248, 995));
        assert_eq!(resized_size(1280, 720, 248), (440, 248));
        assert_eq!(resized_size(7, 5, 248), (347, 248));
        assert_eq!(center_crop_offset(224, 224), 0);
        assert_eq!(center_crop_offset(225, 224), 0); // round(0.5) == 0
        assert_eq!(center_crop_offset(227, 224), 2); // round(1.5) == 2
        assert_eq!(center_crop_offset(229, 224), 2); // round(2.5) == 2
        assert_eq!(center_crop_offset(249, 224), 12); // round(12.5) == 12
        assert_eq!(center_crop_offset(251, 224), 14); // round(13.5) == 14
        assert_eq!(center_crop_offset(330, 224), 53);
    }

    #[test]
    fn constant_image_normalizes_exactly() {
        for precision in [ResizePrecision::High, ResizePrecision::Fast] {
            for (w, h) in [(640, 480), (225, 224), (248, 248), (7, 5), (251, 640)] {
                let color = [0u8, 128, 255];
                let data: Vec<u8> = color.iter().copied().cycle().take(w * h * 3).collect();
                let image = RgbImage::new(&data, w, h, 3 * w).unwrap();
                let x = preprocess(&image, &config(PassOrder::Pillow13, precision)).unwrap();
                assert_eq!(x.shape(), &[1, 3, 224, 224]);
                for c in 0..3 {
                    let expected = (color[c] as f64 / 255.0 - MEAN[c]) / STD[c];
                    for v in x.slice(tract_core::ndarray::s![0, c, .., ..]) {
                        let d = (*v as f64 - expected).abs();
                        assert!(
                            d < 1e-6,
                            "{w}×{h} {precision:?} channel {c}: {v} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn normalization_matches_float_reference() {
        let data = natural(300, 250, 3);
        let mut pre = Preprocessor::new(PreprocessConfig::timm());
        let image = RgbImage::new(&data, 300, 250, 900).unwrap();
        let crop = pre.resize_crop(&image).unwrap().to_vec();
        let x = pre.preprocess(&image).unwrap();
        for (i, px) in crop.chunks_exact(3).enumerate() {
            let (y, xx) = (i / 224, i % 224);
            for c in 0..3 {
                let expected = (px[c] as f64 / 255.0 - MEAN[c]) / STD[c];
                assert!((x[[0, c, y, xx]] as f64 - expected).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn resize_and_crop_match_exact_pillow_reference() {
        // Downscale both axes, odd sizes, upscale (short side 224 < 248), short side already
        // 248 (no resize, or one axis only), portrait, landscape, and portraits taller than
        // 2:1 (vertical pass first in Pillow 13).
        let sizes = [
            (300, 250),
            (251, 640),
            (225, 224),
            (248, 300),
            (333, 248),
            (640, 480),
            (249, 1000),
            (7, 5),
            (1280, 720),
            (300, 700),
        ];
        for (w, h) in sizes {
            let images = [
                ("gradient", gradient(w, h)),
                ("natural", natural(w, h, (w * h) as u64)),
                ("noise", noise(w, h, w as u64)),
            ];
            for (name, src) in images {
                for order in [PassOrder::Pillow13, PassOrder::HorizontalFirst] {
                    for precision in [ResizePrecision::High, ResizePrecision::Fast] {
                        let (count, max) =
                            check_against_reference(&src, (w, h), config(order, precision));
                        // Off the exact result only at (near-)ties: one level, or two where
                        // the second pass sums two tied first-pass values (weights > 1).
                        assert!(
                            max <= 2,
                            "{name} {w}×{h}: {count} values off, by up to {max}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pass_order_follows_pillow_13_for_tall_images() {
        // 251×640 → 248×632: the height shrinks by 8 > 2 × 3 pixels, so Pillow 13 resizes
        // vertically first. On noise the two orders clamp different overshoots.
        assert!(vertical_first(PassOrder::Pillow13, (251, 640), (248, 632)));
        assert!(!vertical_first(
            PassOrder::HorizontalFirst,
            (251, 640),
            (248, 632)
        ));
        assert!(!vertical_first(PassOrder::Pillow13, (480, 640), (248, 330)));
        assert!(!vertical_first(PassOrder::Pillow13, (640, 251), (632, 248)));
        // Twice is not more than twice; a growing height never goes first.
        assert!(!vertical_first(PassOrder::Pillow13, (100, 100), (90, 80)));
        assert!(!vertical_first(PassOrder::Pillow13, (113, 78), (133, 106)));
        let (w, h) = (251, 640);
        let src = noise(w, h, 1);
        let image = RgbImage::new(&src, w, h, 3 * w).unwrap();
        let mut pillow13 = Preprocessor::new(PreprocessConfig::timm());
        let mut legacy =
            Preprocessor::new(config(PassOrder::HorizontalFirst, ResizePrecision::High));
        let a = pillow13.resize_crop(&image).unwrap();
        let b = legacy.resize_crop(&image).unwrap();
        let max = a.iter().zip(b).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(
            max > 10,
            "the orders should differ on noise, max diff {max}"
        );
    }

    #[test]
    fn no_resize_when_short_side_is_already_the_resize_size() {
        // torchvision returns the image untouched: the crop is the exact source pixels.
        let (w, h) = (248, 301);
        let src = natural(w, h, 9);
        let mut pre = Preprocessor::new(PreprocessConfig::timm());
        let got = pre
            .resize_crop(&RgbImage::new(&src, w, h, 3 * w).unwrap())
            .unwrap();
        let (left, top) = (12, 38); // round(24 / 2), round(77 / 2) = round(38.5) = 38
        for y in 0..224 {
            assert_eq!(
                &got[y * 224 * 3..][..224 * 3],
                &src[((top + y) * w + left) * 3..][..224 * 3]
            );
        }
    }

    #[test]
    fn padded_rows_give_the_packed_result() {
        for precision in [ResizePrecision::High, ResizePrecision::Fast] {
            for (w, h) in [(300, 250), (248, 300), (251, 640), (225, 224), (333, 248)] {
                let packed = natural(w, h, 5);
                let stride = 3 * w + 7; // not a multiple of 3, as some camera drivers pad
                let mut padded = vec![0xAAu8; stride * (h - 1) + 3 * w];
                for y in 0..h {
                    padded[y * stride..][..3 * w].copy_from_slice(&packed[y * 3 * w..][..3 * w]);
                }
                let config = config(PassOrder::Pillow13, precision);
                let a = preprocess(&RgbImage::new(&packed, w, h, 3 * w).unwrap(), &config).unwrap();
                let b =
                    preprocess(&RgbImage::new(&padded, w, h, stride).unwrap(), &config).unwrap();
                assert_eq!(a, b, "{w}×{h} stride {stride} {precision:?}");
            }
        }
    }

    #[test]
    fn preprocessor_reuse_across_sizes_is_stateless() {
        let config = PreprocessConfig::timm();
        let mut pre = Preprocessor::new(config.clone());
        for (w, h, seed) in [
            (640, 480, 1),
            (251, 640, 2),
            (640, 480, 3),
            (300, 250, 4),
            (248, 248, 5),
        ] {
            let src = natural(w, h, seed);
            let image = RgbImage::new(&src, w, h, 3 * w).unwrap();
            assert_eq!(
                pre.preprocess(&image).unwrap(),
                preprocess(&image, &config).unwrap()
            );
        }
        let mut out = vec![0f32; 3 * 224 * 224];
        let src = natural(320, 240, 7);
        let image = RgbImage::new(&src, 320, 240, 960).unwrap();
        pre.preprocess_into(&image, &mut out).unwrap();
        let expected: Vec<f32> = pre.preprocess(&image).unwrap().iter().copied().collect();
        assert_eq!(out, expected);
        let err = pre
            .preprocess_into(&image, &mut out[1..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("output buffer holds 150527 values"), "{err}");
    }

    #[test]
    fn other_input_sizes() {
        let config = PreprocessConfig::for_input_size(256);
        let src = natural(500, 375, 11);
        let image = RgbImage::new(&src, 500, 375, 1500).unwrap();
        let x = preprocess(&image, &config).unwrap();
        assert_eq!(x.shape(), &[1, 3, 256, 256]);
        let eps = eps(ResizePrecision::High);
        let expected = reference_resize_crop(&src, (500, 375), (284, 256), false, eps);
        let got = Preprocessor::new(config)
            .resize_crop(&image)
            .unwrap()
            .to_vec();
        assert!(got
            .iter()
            .zip(&expected)
            .all(|(&v, &(lo, hi))| lo <= v && v <= hi));
    }

    #[test]
    fn bad_images_are_clear_errors() {
        let data = vec![0u8; 100];
        let err = |r: Result<RgbImage>| r.unwrap_err().to_string();
        assert!(err(RgbImage::new(&data, 0, 5, 30)).contains("empty size 0×5"));
        assert!(err(RgbImage::new(&data, 5, 0, 15)).contains("empty size 5×0"));
        let e = err(RgbImage::new(&data, 10, 2, 29));
        assert!(
            e.contains("stride 29 bytes is less than a row (3 × 10 = 30)"),
            "{e}"
        );
        let e = err(RgbImage::new(&data, 10, 4, 30));
        assert!(e.contains("buffer has 100 bytes, needs 120"), "{e}");
        // The last row needs no padding: stride 70 × 1 + 30 = 100 bytes fit exactly.
        assert!(RgbImage::new(&data, 10, 2, 70).is_ok());
        assert!(err(RgbImage::new(&data, usize::MAX / 2, 1, usize::MAX)).contains("overflows"));
        assert!(err(RgbImage::new(&data, 10, usize::MAX, 30)).contains("overflows"));
        // Fields are public: preprocess checks them again.
        let bogus = RgbImage {
            data: &data,
            width: 100,
            height: 100,
            stride: 300,
        };
        let e = preprocess(&bogus, &PreprocessConfig::timm())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 30000"), "{e}");
        let small = PreprocessConfig {
            resize_size: 200,
            ..PreprocessConfig::timm()
        };
        let ok = RgbImage::new(&data, 5, 5, 15).unwrap();
        let e = preprocess(&ok, &small).unwrap_err().to_string();
        assert!(e.contains("smaller than the crop"), "{e}");
        let skinny = vec![0u8; 3 * 1000];
        let skinny = RgbImage::new(&skinny, 1000, 1, 3000).unwrap();
        let e = preprocess(&skinny, &PreprocessConfig::timm())
            .unwrap_err()
            .to_string();
        assert!(e.contains("aspect ratio too extreme"), "{e}");
    }

    #[test]
    fn image_files_load_or_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("frame.png");
        let img = natural_image(33, 17, 1);
        img.save(&png).unwrap();
        let loaded = load_image(&png).unwrap();
        assert_eq!(loaded, img);
        assert_eq!(RgbImage::from_image(&loaded).stride, 99);

        let text = dir.path().join("notes.png");
        std::fs::write(&text, "this is not an image").unwrap();
        let e = format!("{:#}", load_image(&text).unwrap_err());
        assert!(e.contains("notes.png: not an image"), "{e}");

        let truncated = dir.path().join("cut.png");
        std::fs::write(&truncated, &std::fs::read(&png).unwrap()[..40]).unwrap();
        let e = format!("{:#}", load_image(&truncated).unwrap_err());
        assert!(
            e.contains("cut.png") && e.contains("decoding as Png failed"),
            "{e}"
        );

        let unknown = dir.path().join("notes.txt");
        std::fs::write(&unknown, "this is not an image either").unwrap();
        let e = format!("{:#}", load_image(&unknown).unwrap_err());
        assert!(
            e.contains("notes.txt: not an image (format not recognized"),
            "{e}"
        );

        let missing = dir.path().join("missing.jpg");
        let e = format!("{:#}", load_image(&missing).unwrap_err());
        assert!(
            e.contains("opening image") && e.contains("missing.jpg"),
            "{e}"
        );
        assert!(e.contains("No such file"), "{e}");
    }

    /// Writes `<stem>.npy` (our normalized tensor, as `pfe run --save-input`) and
    /// `<stem>.crop.npy` (the u8 crop, as f32 HWC) for every image in `$PFE_PREPROCESS_DIR`,
    /// for scripts/preprocess_vs_timm.py --rust-dir. `PFE_PREPROCESS_FAST=1` uses
    /// [`ResizePrecision::Fast`].
    #[test]
    #[ignore = "writes files; run with PFE_PREPROCESS_DIR=dir"]
    fn dump_preprocessed_images() {
        let dir = std::env::var("PFE_PREPROCESS_DIR").expect("PFE_PREPROCESS_DIR");
        let dir = std::path::PathBuf::from(dir);
        let precision = match std::env::var("PFE_PREPROCESS_FAST") {
            Ok(_) => ResizePrecision::Fast,
            Err(_) => ResizePrecision::High,
        };
        let mut pre = Preprocessor::new(config(PassOrder::Pillow13, precision));
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !["png", "jpg", "jpeg", "bmp", "ppm"].contains(&ext) {
                continue;
            }
            let img = load_image(&path).unwrap();
            let image = RgbImage::from_image(&img);
            let stem = path.file_stem().unwrap().to_str().unwrap();
            let x = pre.preprocess(&image).unwrap();
            let npy = dir.join(format!("{stem}.npy"));
            crate::npy::write_f32(npy, x.shape(), x.as_slice().unwrap()).unwrap();
            let crop: Vec<f32> = pre
                .resize_crop(&image)
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect();
            let npy = dir.join(format!("{stem}.crop.npy"));
            crate::npy::write_f32(npy, &[224, 224, 3], &crop).unwrap();
        }
    }

    /// Time per 640×480 RGB8 frame, best of 20 batches of 10 (release build):
    /// `cargo test --release --lib preprocess::tests::time_vga_frame -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, prints only"]
    fn time_vga_frame() {
        let src = natural(640, 480, 1);
        let image = RgbImage::new(&src, 640, 480, 1920).unwrap();
        for precision in [ResizePrecision::High, ResizePrecision::Fast] {
            let mut pre = Preprocessor::new(config(PassOrder::Pillow13, precision));
            let mut out = vec![0f32; 3 * 224 * 224];
            pre.preprocess_into(&image, &mut out).unwrap();
            let best = (0..20)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..10 {
                        pre.preprocess_into(&image, &mut out).unwrap();
                    }
                    t.elapsed().as_secs_f64() / 10.0
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "640×480 → 1×3×224×224, {precision:?}: {:.3} ms/frame",
                best * 1e3
            );
        }
    }
}
