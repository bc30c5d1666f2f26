//! Load → optimize → run: the one place tract plans are built.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tract_core::ndarray::Array4;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

use crate::models::labels;
use crate::passes::PassReport;
use crate::postprocess::{self, Prediction};
use crate::preprocess::{PreprocessConfig, Preprocessor, RgbImage};

/// How an [`Engine`] is built.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Worker threads for tract's matrix products; 1 runs everything on the caller's thread.
    pub threads: usize,
    /// Side of the square network input (pixels); 224 for ImageNet-trained PoolFormers.
    pub input_size: usize,
    /// Apply this crate's graph passes (MetaFormer fusion, int8 folding) before
    /// tract's optimizer; false runs the graph as tract alone optimizes it.
    pub fuse: bool,
}

impl Options {
    /// Input sides the engine accepts, in pixels.
    pub const INPUT_SIZES: std::ops::RangeInclusive<usize> = 32..=4096;

    /// Checks the fields; the message names the bad one (`threads …`, `input_size …`).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.threads >= 1, "threads is 0; it must be at least 1");
        ensure!(
            Self::INPUT_SIZES.contains(&self.input_size),
            "input_size {} is outside {}..={}",
            self.input_size,
            Self::INPUT_SIZES.start(),
            Self::INPUT_SIZES.end()
        );
        Ok(())
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: 1,
            input_size: 224,
            fuse: true,
        }
    }
}

/// Time one node took, averaged over the profiled runs.
#[derive(Debug, Clone)]
pub struct NodeProfile {
    pub node: usize,
    pub name: String,
    /// The op's kind as tract names it (`OptMatMul`, `Reduce<Sum>`, a fused op …).
    pub op: String,
    pub time: Duration,
}

/// A loaded, optimized classifier ready to run.
///
/// `run` and `classify` take `&self` and may be called from several threads; runs
/// are serialized on the engine's own state, so use one engine per thread for
/// parallel throughput.
pub struct Engine {
    plan: Arc<TypedSimplePlan>,
    state: Mutex<TypedSimpleState>,
    preprocessor: Mutex<Preprocessor>,
    executor: Executor,
    options: Options,
    input_shape: [usize; 4],
    num_classes: usize,
    load_time: Duration,
    passes: PassReport,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.options)
            .field("input_shape", &self.input_shape)
            .field("num_classes", &self.num_classes)
            .finish()
    }
}

/// Runs `load` so that the memory it frees goes back to the system.
///
/// Loading makes a burst of short-lived buffers (the decoded protobuf, tract's model
/// at each stage, weights before and after packing): about twice the model's size,
/// freed when loading ends. glibc's malloc serves blocks below its mmap threshold
/// from the heap and raises that threshold as large blocks are freed, so most of
/// the burst ends up as heap that stays resident after it is freed, next to the
/// engine's own weights (for int8 PoolFormer-S12: 59 MB peak RSS instead of 46).
/// With glibc, `load` therefore runs with a 64 KiB mmap threshold (its blocks are
/// mapped and unmapped), after which the heap is trimmed and the thresholds are set
/// where glibc's dynamic scheme ends up: mmap above 32 MiB, trim above twice that, so
/// inference's activation buffers are reused from the heap instead of being mapped,
/// or given back and faulted in again, at every run. The setting is process-wide; other
/// C libraries and targets are left alone.
fn with_compact_heap<R>(load: impl FnOnce() -> R) -> R {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt and malloc_trim only tune and trim glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
        }
        let out = load();
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
            libc::malloc_trim(0);
        }
        out
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    load()
}

impl Engine {
    /// Loads an ONNX file. External weights (`*.onnx.data`) are found next to it.
    pub fn from_path(path: impl AsRef<Path>, options: Options) -> Result<Engine> {
        let path = path.as_ref();
        let start = Instant::now();
        ensure!(
            path.is_file(),
            "model file {} does not exist",
            path.display()
        );
        with_compact_heap(|| {
            let model =
                guard_panics(|| crate::onnx::load::model_for_path(&crate::onnx::loader(), path))
                    .with_context(|| format!("loading model {}", path.display()))?;
            Self::from_inference_model(model, options, start)
                .with_context(|| format!("preparing model {}", path.display()))
        })
    }

    /// Loads an ONNX model held in memory (external weights are not supported here).
    pub fn from_bytes(bytes: &[u8], options: Options) -> Result<Engine> {
        let start = Instant::now();
        ensure!(!bytes.is_empty(), "model buffer is empty");
        with_compact_heap(|| {
            let model = guard_panics(|| crate::onnx::loader().model_for_read(&mut &bytes[..]))
                .context("loading model from memory")?;
            Self::from_inference_model(model, options, start).context("preparing model from memory")
        })
    }

    fn from_inference_model(
        model: InferenceModel,
        options: Options,
        start: Instant,
    ) -> Result<Engine> {
        options.validate()?;
        ensure!(
            model.inputs.len() == 1,
            "expected an image classifier with one input, the model has {}",
            model.inputs.len()
        );
        ensure!(
            model.outputs.len() == 1,
            "expected an image classifier with one output, the model has {}",
            model.outputs.len()
        );
        let declared = model.input_fact(0)?.clone();
        if !declared.shape.is_open() {
            let rank = declared.shape.dims().count();
            ensure!(
                rank == 4,
                "expected a 1×3×H×W image input, the model's input has rank {rank} ({declared:?})"
            );
        }
        let s = options.input_size;
        let input_shape = [1, 3, s, s];
        let executor = if options.threads > 1 {
            Executor::multithread(options.threads)
        } else {
            Executor::SingleThread
        };
        let fuse = options.fuse;
        let (plan, passes) = guard_panics(|| {
            let typed = model
                .with_input_fact(0, f32::fact(input_shape).into())?
                .into_typed()?;
            let (optimized, report) = crate::passes::optimize(typed, fuse)?;
            Ok((optimized.into_runnable()?, report))
        })
        .with_context(|| format!("fixing the input to 1×3×{s}×{s} f32 and optimizing"))?;
        let output_fact = plan.model().output_fact(0)?.clone();
        let out_shape = output_fact
            .shape
            .as_concrete()
            .ok_or_else(|| anyhow!("output shape {:?} is not concrete", output_fact.shape))?
            .to_vec();
        ensure!(
            out_shape.len() == 2 && out_shape[0] == 1 && out_shape[1] > 1,
            "expected classifier logits of shape 1×classes, the model gives {out_shape:?}"
        );
        ensure!(
            output_fact.datum_type == f32::datum_type(),
            "expected f32 logits, the model gives {:?}",
            output_fact.datum_type
        );
        let state = plan.spawn()?;
        Ok(Engine {
            state: Mutex::new(state),
            preprocessor: Mutex::new(Preprocessor::new(PreprocessConfig::for_input_size(s))),
            plan,
            executor,
            options,
            input_shape,
            num_classes: out_shape[1],
            load_time: start.elapsed(),
            passes,
        })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Shape of the network input, `[1, 3, size, size]`.
    pub fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Time spent loading and optimizing the model.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// What this crate's graph passes rewrote.
    pub fn passes(&self) -> &PassReport {
        &self.passes
    }

    /// The optimized tract model (for inspection).
    pub fn model(&self) -> &TypedModel {
        self.plan.model()
    }

    /// Runs the network on a preprocessed NCHW tensor; returns the logits, `[1, classes]`.
    pub fn run(&self, input: Tensor) -> Result<Tensor> {
        ensure!(
            input.datum_type() == f32::datum_type(),
            "input must be f32, got {:?}",
            input.datum_type()
        );
        ensure!(
            input.shape() == self.input_shape,
            "input must have shape {:?}, got {:?}",
            self.input_shape,
            input.shape()
        );
        let mut state = self
            .state
            .lock()
            .map_err(|_| anyhow!("engine state poisoned"))?;
        let executor = self.executor.clone();
        let mut outputs = guard_panics(|| {
            crate::ops::on_executor(&executor, || state.run(tvec!(input.into_tvalue())))
        })
        .context("running the model")?;
        Ok(outputs.remove(0).into_tensor())
    }

    /// Runs the network `rounds` times and times every node; returns one entry per
    /// node that ran, in plan order, with its total time over all rounds.
    pub fn profile(&self, input: Tensor, rounds: usize) -> Result<Vec<NodeProfile>> {
        ensure!(rounds >= 1, "profile rounds must be at least 1");
        let model = self.plan.model();
        let mut totals = vec![Duration::ZERO; model.nodes().len()];
        let mut state = self
            .state
            .lock()
            .map_err(|_| anyhow!("engine state poisoned"))?;
        for _ in 0..rounds {
            let executor = self.executor.clone();
            let x = input.clone();
            guard_panics(|| {
                crate::ops::on_executor(&executor, || {
                    state.run_plan_with_eval(
                        tvec!(x.into_tvalue()),
                        |ctx, op_state, node, inputs| {
                            let start = Instant::now();
                            let r = tract_core::plan::eval(ctx, op_state, node, inputs);
                            totals[node.id] += start.elapsed();
                            r
                        },
                    )
                })
            })
            .context("running the model")?;
        }
        Ok(model
            .eval_order()?
            .iter()
            .filter(|&&id| !totals[id].is_zero())
            .map(|&id| {
                let node = &model.nodes()[id];
                NodeProfile {
                    node: id,
                    name: node.name.clone(),
                    op: node.op().name().to_string(),
                    time: totals[id] / rounds as u32,
                }
            })
            .collect())
    }

    /// Runs the network on an NCHW f32 array.
    pub fn run_array(&self, input: Array4<f32>) -> Result<Vec<f32>> {
        let out = self.run(input.into_tensor())?;
        Ok(out.to_plain_array_view::<f32>()?.iter().copied().collect())
    }

    /// Preprocesses an RGB8 frame as timm's eval transform does (resize the shorter
    /// side, center crop, normalize) into the network's input tensor.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Array4<f32>> {
        let mut pre = self
            .preprocessor
            .lock()
            .map_err(|_| anyhow!("preprocessor poisoned"))?;
        pre.preprocess(image)
    }

    /// Logits of an RGB8 frame.
    pub fn logits(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let input = self.preprocess(image)?;
        self.run_array(input)
    }

    /// The `top` most probable classes of an RGB8 frame, most probable first.
    pub fn classify(&self, image: &RgbImage, top: usize) -> Result<Vec<Prediction>> {
        let logits = self.logits(image)?;
        Ok(self.rank(&logits, top))
    }

    /// Ranks logits into labelled predictions.
    pub fn rank(&self, logits: &[f32], top: usize) -> Vec<Prediction> {
        let n = self.num_classes;
        postprocess::top_k(logits, top, |i| labels::label(i, n))
    }
}

/// Turns off the backtraces that errors capture (`RUST_LIB_BACKTRACE=0`) unless the
/// environment already sets `RUST_LIB_BACKTRACE`. For programs that print errors as
/// messages and never their backtraces, to be called first thing in `main`, while the
/// process has one thread (it sets an environment variable).
///
/// While optimizing a graph, tract creates and drops many errors: its binary ops ask
/// whether a uniform constant operand is the operation's neutral or absorbing element
/// (`x + 0`, `x · 1`, `x · 0`) through `Tensor::close_enough`, whose "no" is an error.
/// With `RUST_BACKTRACE=1` in the environment each one captures a backtrace, which
/// costs 10–50 ms of loading PoolFormer-S12 and pages in the unwinder's tables (about
/// 1 MB of resident memory). Panics still print their backtraces with `RUST_BACKTRACE=1`.
pub fn skip_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Turns a panic inside tract into an error, so a malformed model never takes the
/// process down.
fn guard_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            bail!("internal error in tract: {msg}")
        }
    }
}
