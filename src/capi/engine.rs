//! `PfeEngine`: load a model, classify frames, run tensors (the C side of [`Engine`]).

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::ptr;
use std::sync::Mutex;

use tract_core::ndarray::Array4;

use crate::capi::{copy_c_string, input_slice, output_slice, PfeError, PfeOptions, PfeStatus};
use crate::models::labels;
use crate::pixfmt::{ColorRange, Nv12, Plane, Yuyv, I420};
use crate::{Engine, RgbImage};

/// A loaded, optimized classifier. Opaque; create with `pfe_engine_new_from_path` or
/// `pfe_engine_new_from_memory`, release with `pfe_engine_free`.
///
/// Thread safety: an engine may be used from several threads at once; its runs are
/// serialized internally, so use one engine per thread for parallel throughput. It must
/// not be freed while another thread uses it.
pub struct PfeEngine {
    engine: Engine,
    /// Class labels, NUL-terminated, for `pfe_engine_label`.
    labels: Vec<CString>,
    /// RGB8 conversion of the last YUV frame, reused between frames.
    rgb: Mutex<Vec<u8>>,
}

/// Proves at compile time what the header promises: an engine may be shared by threads.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<PfeEngine>();
};

/// One ranked class of a classification.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PfePrediction {
    /// Index of the class in the model's output; `pfe_engine_label` names it.
    pub class_index: u32,
    /// Softmax probability, 0 to 1.
    pub probability: f32,
    /// The raw network output.
    pub logit: f32,
}

/// The code range of YUV frames, for the `range` argument of `pfe_engine_classify_yuyv`,
/// `_i420` and `_nv12`. BT.601 colours either way.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfeColorRange {
    /// Video ("TV") range, Y 16–235 and Cb/Cr 16–240: what cameras send by default.
    Limited = 0,
    /// Full ("PC", JPEG) range, 0–255.
    Full = 1,
}

impl TryFrom<u32> for PfeColorRange {
    type Error = PfeError;

    fn try_from(value: u32) -> Result<Self, PfeError> {
        match value {
            0 => Ok(PfeColorRange::Limited),
            1 => Ok(PfeColorRange::Full),
            _ => Err(PfeError::invalid(format!(
                "range {value} is not a PfeColorRange (PFE_COLOR_RANGE_LIMITED = 0, PFE_COLOR_RANGE_FULL = 1)"
            ))),
        }
    }
}

impl From<PfeColorRange> for ColorRange {
    fn from(range: PfeColorRange) -> ColorRange {
        match range {
            PfeColorRange::Limited => ColorRange::Limited,
            PfeColorRange::Full => ColorRange::Full,
        }
    }
}

impl PfeEngine {
    fn boxed(engine: Engine) -> *mut PfeEngine {
        let n = engine.num_classes();
        let labels = (0..n)
            .map(|i| {
                // The names `Engine::rank` gives its predictions.
                let label = labels::label(i, n);
                CString::new(label.replace('\0', " ")).unwrap_or_default()
            })
            .collect();
        Box::into_raw(Box::new(PfeEngine {
            engine,
            labels,
            rgb: Mutex::new(Vec::new()),
        }))
    }

    /// The RGB8 frame preprocessed into the network input.
    fn preprocess(&self, image: &RgbImage) -> Result<Array4<f32>, PfeError> {
        self.engine
            .preprocess(image)
            .map_err(|e| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e))
    }

    /// A YUV frame of `width`×`height`, converted by `convert` (into packed RGB8 rows of
    /// the given stride), then preprocessed.
    fn preprocess_yuv(
        &self,
        (width, height): (usize, usize),
        convert: impl FnOnce(&mut [u8], usize) -> anyhow::Result<()>,
    ) -> Result<Array4<f32>, PfeError> {
        let invalid = |e: anyhow::Error| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e);
        let mut rgb = self
            .rgb
            .lock()
            .map_err(|_| PfeError::new(PfeStatus::RuntimeError, "conversion buffer poisoned"))?;
        // The frame was validated, so its size fits in memory.
        rgb.resize(3 * width * height, 0);
        convert(&mut rgb, 3 * width).map_err(invalid)?;
        let image = RgbImage::new(&rgb, width, height, 3 * width).map_err(invalid)?;
        self.preprocess(&image)
    }

    /// Runs the network and writes the `out.len()` most probable classes; returns how many
    /// were written (fewer when the model has fewer classes).
    fn classify_input(
        &self,
        input: Array4<f32>,
        out: &mut [PfePrediction],
    ) -> Result<usize, PfeError> {
        let logits = self
            .engine
            .run_array(input)
            .map_err(|e| PfeError::from_anyhow(PfeStatus::RuntimeError, &e))?;
        let ranked = self.engine.rank(&logits, out.len());
        for (slot, p) in out.iter_mut().zip(&ranked) {
            *slot = PfePrediction {
                class_index: p.class_index as u32,
                probability: p.probability,
                logit: p.logit,
            };
        }
        Ok(ranked.len())
    }
}

/// `opts`, or the defaults when NULL.
///
/// # Safety
/// `opts` must be NULL or valid.
unsafe fn options_or_default(opts: *const PfeOptions) -> Result<crate::Options, PfeError> {
    match unsafe { opts.as_ref() } {
        Some(opts) => opts.to_options(),
        None => PfeOptions::default().to_options(),
    }
}

fn model_error(err: anyhow::Error) -> PfeError {
    let io = err.chain().any(|e| e.is::<std::io::Error>());
    let status = if io {
        PfeStatus::IoError
    } else {
        PfeStatus::ModelError
    };
    PfeError::from_anyhow(status, &err)
}

#[cfg(unix)]
fn path_from_c(path: &CStr) -> Result<PathBuf, PfeError> {
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(path.to_bytes())))
}

#[cfg(not(unix))]
fn path_from_c(path: &CStr) -> Result<PathBuf, PfeError> {
    path.to_str()
        .map(PathBuf::from)
        .map_err(|_| PfeError::invalid("path is not UTF-8"))
}

fn to_usize(value: u32) -> usize {
    value as usize
}

/// Loads an ONNX model file (external weights, `*.onnx.data`, are found next to it) and
/// optimizes it for the input size of `opts` (NULL: `pfe_options_default()`).
///
/// On success `*out` receives the engine, to release with `pfe_engine_free`; on failure it
/// is NULL. Errors: PFE_STATUS_IO_ERROR (file missing or unreadable),
/// PFE_STATUS_MODEL_ERROR (not a supported classifier), PFE_STATUS_INVALID_ARGUMENT (bad
/// options). Loading takes from milliseconds to seconds, depending on the model.
///
/// # Safety
/// `path` must be a NUL-terminated string; `opts` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_new_from_path(
    path: *const c_char,
    opts: *const PfeOptions,
    out: *mut *mut PfeEngine,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_new_from_path",
        Record,
        reset(out = ptr::null_mut()),
        nonnull(path, out),
        {
            let options = unsafe { options_or_default(opts)? };
            let path = path_from_c(unsafe { CStr::from_ptr(path) })?;
            let io = |what: String| PfeError::new(PfeStatus::IoError, what);
            match std::fs::metadata(&path) {
                Err(e) => return Err(io(format!("model file {}: {e}", path.display()))),
                Ok(m) if !m.is_file() => {
                    return Err(io(format!("model file {} is not a file", path.display())))
                }
                Ok(_) => {}
            }
            let engine = Engine::from_path(&path, options).map_err(model_error)?;
            unsafe { out.write(PfeEngine::boxed(engine)) };
            Ok(())
        }
    )
}

/// Loads an ONNX model from `len` bytes at `data` (a model with external weights cannot be
/// loaded this way); the bytes are not used after the call returns. Otherwise as
/// `pfe_engine_new_from_path`.
///
/// # Safety
/// `data` must point to `len` readable bytes; `opts` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_new_from_memory(
    data: *const u8,
    len: usize,
    opts: *const PfeOptions,
    out: *mut *mut PfeEngine,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_new_from_memory",
        Record,
        reset(out = ptr::null_mut()),
        nonnull(data, out),
        {
            let options = unsafe { options_or_default(opts)? };
            if len == 0 {
                return Err(PfeError::invalid("len is 0: the model buffer is empty"));
            }
            let bytes = unsafe { input_slice(data, len, "data")? };
            let engine = Engine::from_bytes(bytes, options).map_err(model_error)?;
            unsafe { out.write(PfeEngine::boxed(engine)) };
            Ok(())
        }
    )
}

/// Releases an engine; NULL is allowed and does nothing. Leaves the last error as it is.
///
/// # Safety
/// `engine` must be NULL or come from `pfe_engine_new_*`, not yet freed, and no other
/// thread may be using it.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_free(engine: *mut PfeEngine) {
    ffi_boundary!("pfe_engine_free", Keep, value(()), nonnull(), {
        if !engine.is_null() {
            drop(unsafe { Box::from_raw(engine) });
        }
        Ok(())
    })
}

/// Writes the network input shape, `{1, 3, size, size}` (NCHW), into `shape`, which holds
/// `shape_len` values (at least 4).
///
/// # Safety
/// `engine` must be valid; `shape` must point to `shape_len` writable values.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_input_shape(
    engine: *const PfeEngine,
    shape: *mut usize,
    shape_len: usize,
) -> PfeStatus {
    ffi_boundary!("pfe_engine_input_shape", Record, nonnull(engine, shape), {
        let engine = unsafe { &*engine };
        let dims = engine.engine.input_shape();
        if shape_len < dims.len() {
            return Err(PfeError::new(
                PfeStatus::BufferTooSmall,
                format!(
                    "shape holds {shape_len} values, the input shape has {}",
                    dims.len()
                ),
            ));
        }
        let out = unsafe { output_slice(shape, shape_len, "shape")? };
        out[..dims.len()].copy_from_slice(&dims);
        Ok(())
    })
}

/// Writes the number of classes (the length of the logits) into `*num_classes`.
///
/// # Safety
/// `engine` and `num_classes` must be valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_num_classes(
    engine: *const PfeEngine,
    num_classes: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_num_classes",
        Record,
        reset(num_classes = 0),
        nonnull(engine, num_classes),
        {
            let engine = unsafe { &*engine };
            unsafe { num_classes.write(engine.engine.num_classes()) };
            Ok(())
        }
    )
}

/// The label of a class: ImageNet's names for 1000-class models, `class_<index>`
/// otherwise. The string belongs to the engine and lives as long as it. NULL when
/// `engine` is NULL or `class_index` is out of range (see `pfe_last_error`).
///
/// # Safety
/// `engine` must be valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_label(
    engine: *const PfeEngine,
    class_index: u32,
) -> *const c_char {
    ffi_boundary!(
        "pfe_engine_label",
        Record,
        value(ptr::null()),
        nonnull(engine),
        { Ok(unsafe { &*engine }.label(class_index)?.as_ptr()) }
    )
}

/// Copies the label of a class, NUL-terminated, into `buf` (`len` bytes); `*needed` (if
/// `needed` is not NULL) receives the size needed, NUL included, also when `buf` is too
/// small (PFE_STATUS_BUFFER_TOO_SMALL). `buf` may be NULL when `len` is 0.
///
/// # Safety
/// `engine` must be valid; `buf` NULL or `len` writable bytes; `needed` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_label_copy(
    engine: *const PfeEngine,
    class_index: u32,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_label_copy",
        Record,
        reset(needed = 0),
        nonnull(engine),
        {
            let label = unsafe { &*engine }.label(class_index)?;
            unsafe { copy_c_string(label, buf, len, needed) }
        }
    )
}

impl PfeEngine {
    fn label(&self, class_index: u32) -> Result<&CStr, PfeError> {
        self.labels
            .get(to_usize(class_index))
            .map(CString::as_c_str)
            .ok_or_else(|| {
                PfeError::invalid(format!(
                    "class_index {class_index} is out of range: the model has {} classes",
                    self.labels.len()
                ))
            })
    }
}

/// Runs the network on a preprocessed input: `input` holds `input_len` floats, exactly
/// the input shape's (NCHW, normalized as the model expects). Writes the logits into
/// `output` (`output_len` floats, at least the number of classes) and their count into
/// `*written`.
///
/// # Safety
/// `engine` must be valid; `input` must point to `input_len` readable floats, `output`
/// to `output_len` writable floats; `written` valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_run_f32(
    engine: *const PfeEngine,
    input: *const f32,
    input_len: usize,
    output: *mut f32,
    output_len: usize,
    written: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_run_f32",
        Record,
        reset(written = 0),
        nonnull(engine, input, output, written),
        {
            let engine = &unsafe { &*engine }.engine;
            let shape = engine.input_shape();
            let values: usize = shape.iter().product();
            if input_len != values {
                return Err(PfeError::invalid(format!(
                    "input_len is {input_len}; the input shape {shape:?} holds {values} values"
                )));
            }
            let classes = engine.num_classes();
            if output_len < classes {
                return Err(PfeError::new(
                    PfeStatus::BufferTooSmall,
                    format!("output holds {output_len} floats, the model gives {classes} logits"),
                ));
            }
            // Copied before `output` is borrowed: the two may overlap.
            let input = unsafe { input_slice(input, input_len, "input")? }.to_vec();
            let input = Array4::from_shape_vec(shape, input)
                .map_err(|e| PfeError::invalid(format!("input: {e}")))?;
            let logits = engine
                .run_array(input)
                .map_err(|e| PfeError::from_anyhow(PfeStatus::RuntimeError, &e))?;
            let output = unsafe { output_slice(output, output_len, "output")? };
            output[..logits.len()].copy_from_slice(&logits);
            unsafe { written.write(logits.len()) };
            Ok(())
        }
    )
}

/// Where the classify functions write: `out` as a slice of `out_len` (at least 1).
///
/// # Safety
/// As `output_slice`.
unsafe fn predictions<'a>(
    out: *mut PfePrediction,
    out_len: usize,
) -> Result<&'a mut [PfePrediction], PfeError> {
    if out_len == 0 {
        return Err(PfeError::invalid("out_len is 0: no room for a prediction"));
    }
    unsafe { output_slice(out, out_len, "out") }
}

/// Classifies an interleaved RGB8 frame (`width`×`height` pixels, rows `stride` bytes
/// apart, `stride >= 3 * width`; the last row needs only `3 * width` bytes) held in `len`
/// bytes at `pixels`. The frame is preprocessed as timm's eval transform does (resize the
/// shorter side, center crop, normalize).
///
/// Writes the `out_len` most probable classes, most probable first, into `out` and their
/// count (`out_len`, or the number of classes if smaller) into `*written`.
///
/// # Safety
/// `engine` must be valid; `pixels` must point to `len` readable bytes; `out` to
/// `out_len` writable predictions; `written` valid.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_classify_rgb8(
    engine: *const PfeEngine,
    pixels: *const u8,
    len: usize,
    width: u32,
    height: u32,
    stride: usize,
    out: *mut PfePrediction,
    out_len: usize,
    written: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_classify_rgb8",
        Record,
        reset(written = 0),
        nonnull(engine, pixels, out, written),
        {
            let engine = unsafe { &*engine };
            let out = unsafe { predictions(out, out_len)? };
            let pixels = unsafe { input_slice(pixels, len, "pixels")? };
            let image = RgbImage::new(pixels, to_usize(width), to_usize(height), stride)
                .map_err(|e| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e))?;
            let input = engine.preprocess(&image)?;
            let n = engine.classify_input(input, out)?;
            unsafe { written.write(n) };
            Ok(())
        }
    )
}

/// Classifies a YUYV frame (packed 4:2:2, bytes `Y0 U Y1 V` per pixel pair; V4L2 `YUYV`,
/// `YUY2`): `width`×`height` pixels, rows `stride` bytes apart (`stride >= 4 *
/// ceil(width / 2)`), `len` bytes at `pixels`; `range` is a `PfeColorRange`. BT.601
/// colours; otherwise as `pfe_engine_classify_rgb8`.
///
/// # Safety
/// As `pfe_engine_classify_rgb8`.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_classify_yuyv(
    engine: *const PfeEngine,
    pixels: *const u8,
    len: usize,
    width: u32,
    height: u32,
    stride: usize,
    range: u32,
    out: *mut PfePrediction,
    out_len: usize,
    written: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_classify_yuyv",
        Record,
        reset(written = 0),
        nonnull(engine, pixels, out, written),
        {
            let engine = unsafe { &*engine };
            let range = ColorRange::from(PfeColorRange::try_from(range)?);
            let out = unsafe { predictions(out, out_len)? };
            let pixels = unsafe { input_slice(pixels, len, "pixels")? };
            let frame = Yuyv::new(pixels, to_usize(width), to_usize(height), stride)
                .map_err(|e| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e))?;
            let input = engine.preprocess_yuv((frame.width, frame.height), |rgb, stride| {
                frame.to_rgb8_into(range, rgb, stride)
            })?;
            let n = engine.classify_input(input, out)?;
            unsafe { written.write(n) };
            Ok(())
        }
    )
}

/// Classifies an I420 frame (planar 4:2:0: a `width`×`height` Y plane, then U and V planes
/// of `ceil(width / 2)`×`ceil(height / 2)`; V4L2 `YUV420`), each plane given as its bytes,
/// their count and its row stride; `range` is a `PfeColorRange`. BT.601 colours; otherwise
/// as `pfe_engine_classify_rgb8`.
///
/// # Safety
/// As `pfe_engine_classify_rgb8`, for each plane.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_classify_i420(
    engine: *const PfeEngine,
    y: *const u8,
    y_len: usize,
    y_stride: usize,
    u: *const u8,
    u_len: usize,
    u_stride: usize,
    v: *const u8,
    v_len: usize,
    v_stride: usize,
    width: u32,
    height: u32,
    range: u32,
    out: *mut PfePrediction,
    out_len: usize,
    written: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_classify_i420",
        Record,
        reset(written = 0),
        nonnull(engine, y, u, v, out, written),
        {
            let engine = unsafe { &*engine };
            let range = ColorRange::from(PfeColorRange::try_from(range)?);
            let out = unsafe { predictions(out, out_len)? };
            let (y, u, v) = unsafe {
                (
                    Plane::new(input_slice(y, y_len, "y")?, y_stride),
                    Plane::new(input_slice(u, u_len, "u")?, u_stride),
                    Plane::new(input_slice(v, v_len, "v")?, v_stride),
                )
            };
            let frame = I420::new(y, u, v, to_usize(width), to_usize(height))
                .map_err(|e| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e))?;
            let input = engine.preprocess_yuv((frame.width, frame.height), |rgb, stride| {
                frame.to_rgb8_into(range, rgb, stride)
            })?;
            let n = engine.classify_input(input, out)?;
            unsafe { written.write(n) };
            Ok(())
        }
    )
}

/// Classifies an NV12 frame (semi-planar 4:2:0: a `width`×`height` Y plane, then one plane
/// of `ceil(height / 2)` rows of `ceil(width / 2)` interleaved U, V pairs), each plane given
/// as its bytes, their count and its row stride; `range` is a `PfeColorRange`. BT.601
/// colours; otherwise as `pfe_engine_classify_rgb8`.
///
/// # Safety
/// As `pfe_engine_classify_rgb8`, for each plane.
#[no_mangle]
pub unsafe extern "C" fn pfe_engine_classify_nv12(
    engine: *const PfeEngine,
    y: *const u8,
    y_len: usize,
    y_stride: usize,
    uv: *const u8,
    uv_len: usize,
    uv_stride: usize,
    width: u32,
    height: u32,
    range: u32,
    out: *mut PfePrediction,
    out_len: usize,
    written: *mut usize,
) -> PfeStatus {
    ffi_boundary!(
        "pfe_engine_classify_nv12",
        Record,
        reset(written = 0),
        nonnull(engine, y, uv, out, written),
        {
            let engine = unsafe { &*engine };
            let range = ColorRange::from(PfeColorRange::try_from(range)?);
            let out = unsafe { predictions(out, out_len)? };
            let (y, uv) = unsafe {
                (
                    Plane::new(input_slice(y, y_len, "y")?, y_stride),
                    Plane::new(input_slice(uv, uv_len, "uv")?, uv_stride),
                )
            };
            let frame = Nv12::new(y, uv, to_usize(width), to_usize(height))
                .map_err(|e| PfeError::from_anyhow(PfeStatus::InvalidArgument, &e))?;
            let input = engine.preprocess_yuv((frame.width, frame.height), |rgb, stride| {
                frame.to_rgb8_into(range, rgb, stride)
            })?;
            let n = engine.classify_input(input, out)?;
            unsafe { written.write(n) };
            Ok(())
        }
    )
}
