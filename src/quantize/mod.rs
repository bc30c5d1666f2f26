//! Post-training static quantization of an fp32 ONNX model into standard QDQ ONNX.
//!
//! 1. [`qdq::find_targets`]: the ops whose weights are quantized (every Conv; the head's
//!    Gemm/MatMul on request), and which of their inputs get a Q/DQ pair (all but the
//!    residual stream, unless asked).
//! 2. [`calibrate::collect`]: the fp32 model runs in tract over a calibration set with
//!    the targets' activation inputs as extra outputs; each gets a [`Histogram`].
//! 3. A clip range per activation ([`Method`]), turned into scale and zero point.
//! 4. [`qdq::insert_qdq`]: Q/DQ pairs on those activations, per-channel int8 weights.
//!
//! The result runs in any ONNX runtime (onnxruntime, tract); norms, pooling, GELU, the
//! residual stream and, by default, the head stay in float.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use prost::Message;
use serde::Serialize;
use tract_onnx::pb::{ModelProto, StringStringEntryProto};

pub mod calibrate;
pub mod histogram;
pub mod inputs;
pub mod qdq;
pub mod smooth;

pub use histogram::Histogram;
pub use inputs::InputSet;
pub use qdq::{ActivationQuant, ActivationType, QdqSummary, Target};

/// Metadata key of the quantized model holding its [`QuantizeOptions`] as JSON.
pub const METADATA_QUANTIZATION: &str = "poolformer_edge.quantization";

/// How each activation's clip range is chosen from its calibration statistics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum Method {
    /// The observed minimum and maximum.
    MinMax,
    /// The central `percentile` % of the observed values.
    Percentile { percentile: f64 },
    /// The range minimizing the expected squared quantization error.
    Mse,
}

impl Method {
    /// The clip range of an activation with statistics `h` stored as `dtype`.
    pub fn range(&self, h: &Histogram, dtype: ActivationType) -> (f64, f64) {
        let symmetric = dtype.is_symmetric();
        match *self {
            Method::MinMax => (h.min() as f64, h.max() as f64),
            Method::Percentile { percentile } if symmetric => {
                let t = h.percentile_magnitude(percentile);
                (-t, t)
            }
            Method::Percentile { percentile } => h.percentile_range(percentile),
            Method::Mse => h.mse_range(dtype.levels(), symmetric),
        }
    }
}

/// Settings of one quantization run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizeOptions {
    pub method: Method,
    pub activation_type: ActivationType,
    /// Also quantize the classifier head's Gemm/MatMul.
    pub quantize_head: bool,
    /// Also quantize activations on the residual stream (the downsampling convs'
    /// inputs); by default those convs get int8 weights and a float input.
    pub quantize_residual: bool,
    /// SmoothQuant strength α in [0, 1] for convs fed by a norm's affine ([`smooth`]);
    /// None leaves the weights as they are.
    pub smooth_alpha: Option<f32>,
    /// Fold the mean output shift of weight rounding into the conv biases.
    pub bias_correction: bool,
    /// Side of the square network input used for calibration.
    pub input_size: usize,
    /// Calibration threads; not a property of the result, so not in its metadata.
    #[serde(skip)]
    pub threads: usize,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            method: Method::Percentile { percentile: 99.99 },
            activation_type: ActivationType::Uint8,
            quantize_head: false,
            quantize_residual: false,
            smooth_alpha: Some(0.5),
            bias_correction: true,
            input_size: 224,
            threads: 1,
        }
    }
}

impl QuantizeOptions {
    pub fn validate(&self) -> Result<()> {
        if let Method::Percentile { percentile } = self.method {
            ensure!(
                percentile > 50.0 && percentile <= 100.0,
                "percentile {percentile} is outside (50, 100]"
            );
        }
        if let Some(alpha) = self.smooth_alpha {
            ensure!(
                (0.0..=1.0).contains(&alpha),
                "smoothing strength {alpha} is outside [0, 1]"
            );
        }
        ensure!(self.threads >= 1, "threads is 0; it must be at least 1");
        ensure!(
            crate::Options::INPUT_SIZES.contains(&self.input_size),
            "input size {} is outside {:?}",
            self.input_size,
            crate::Options::INPUT_SIZES
        );
        Ok(())
    }
}

/// One quantized activation: what calibration saw and what was chosen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivationReport {
    pub name: String,
    pub min: f32,
    pub max: f32,
    /// The clip range before widening to include 0.
    pub clip: (f64, f64),
    pub quant: ActivationQuant,
    /// SQNR (dB) of this tensor alone after quantization, estimated from its histogram.
    pub expected_sqnr_db: f64,
}

/// What a quantization run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizeReport {
    pub targets: Vec<Target>,
    pub activations: Vec<ActivationReport>,
    pub summary: QdqSummary,
    pub calibration_inputs: String,
    /// Convs whose input channels were smoothed.
    pub smoothed: usize,
    /// Conv biases corrected for weight rounding.
    pub biases_corrected: usize,
}

/// Calibration statistics of every target's activation input.
pub fn calibration_stats(
    model: &ModelProto,
    targets: &[Target],
    inputs: &InputSet,
    options: &QuantizeOptions,
    progress: &ProgressBar,
) -> Result<BTreeMap<String, Histogram>> {
    let mut names: Vec<String> = targets
        .iter()
        .filter(|t| t.quantize_activation)
        .map(|t| t.activation.clone())
        .collect();
    names.sort();
    names.dedup();
    calibrate::collect(
        &model.encode_to_vec(),
        &names,
        inputs,
        options.input_size,
        options.threads,
        progress,
    )
}

fn channel_stats(
    model: &ModelProto,
    names: &[String],
    inputs: &InputSet,
    options: &QuantizeOptions,
    progress: &ProgressBar,
) -> Result<BTreeMap<String, calibrate::ChannelStats>> {
    calibrate::collect_channel_stats(
        &model.encode_to_vec(),
        names,
        inputs,
        options.input_size,
        options.threads,
        progress,
    )
}

/// Quantization parameters of each activation from its statistics.
pub fn activation_params(
    stats: &BTreeMap<String, Histogram>,
    method: Method,
    dtype: ActivationType,
) -> Vec<ActivationReport> {
    stats
        .iter()
        .map(|(name, h)| {
            let clip = method.range(h, dtype);
            let quant = ActivationQuant::from_range(clip.0, clip.1, dtype);
            let (lo, hi) = quant.range();
            ActivationReport {
                name: name.clone(),
                min: h.min(),
                max: h.max(),
                clip,
                quant,
                expected_sqnr_db: h.expected_sqnr_db(lo as f64, hi as f64, dtype.levels()),
            }
        })
        .collect()
}

/// Builds the QDQ model from precomputed statistics (several methods can share one
/// calibration pass this way).
pub fn quantize_with_stats(
    model: &ModelProto,
    targets: &[Target],
    stats: &BTreeMap<String, Histogram>,
    options: &QuantizeOptions,
) -> Result<(ModelProto, QuantizeReport)> {
    options.validate()?;
    let activations = activation_params(stats, options.method, options.activation_type);
    let params: BTreeMap<String, ActivationQuant> = activations
        .iter()
        .map(|a| (a.name.clone(), a.quant))
        .collect();
    let mut out = model.clone();
    let summary = qdq::insert_qdq(&mut out, targets, &params)?;
    let settings = serde_json::to_string(options).context("serializing the settings")?;
    out.metadata_props
        .retain(|p| p.key != METADATA_QUANTIZATION);
    out.metadata_props.push(StringStringEntryProto {
        key: METADATA_QUANTIZATION.to_string(),
        value: settings,
    });
    out.doc_string = format!(
        "{} | QDQ int8: per-channel weights of {} ops, per-tensor activations",
        out.doc_string,
        targets.len()
    );
    Ok((
        out,
        QuantizeReport {
            targets: targets.to_vec(),
            activations,
            summary,
            calibration_inputs: String::new(),
            smoothed: 0,
            biases_corrected: 0,
        },
    ))
}

/// Calibrates `model` on `inputs` and returns its QDQ form.
pub fn quantize(
    model: &ModelProto,
    inputs: &InputSet,
    options: &QuantizeOptions,
    progress: &ProgressBar,
) -> Result<(ModelProto, QuantizeReport)> {
    options.validate()?;
    let targets = qdq::find_targets(model, options.quantize_head, options.quantize_residual)?;
    ensure!(
        !targets.is_empty(),
        "the model has no Conv (or Gemm/MatMul) with a constant weight to quantize"
    );
    let mut model = model.clone();
    let mut smoothed = 0;
    if let Some(alpha) = options.smooth_alpha {
        let smoothable = smooth::find_smoothable(&model, &targets)?;
        let names: Vec<String> = smoothable.iter().map(|s| s.activation.clone()).collect();
        if !names.is_empty() {
            let stats = channel_stats(&model, &names, inputs, options, progress)?;
            smoothed = smooth::smooth(&mut model, &smoothable, &stats, alpha)?.len();
        }
    }
    let mut biases_corrected = 0;
    if options.bias_correction {
        let mut names: Vec<String> = targets.iter().map(|t| t.activation.clone()).collect();
        names.sort();
        names.dedup();
        let stats = channel_stats(&model, &names, inputs, options, progress)?;
        biases_corrected = smooth::correct_biases(&mut model, &targets, &stats)?;
    }
    let stats = calibration_stats(&model, &targets, inputs, options, progress)?;
    let (out, mut report) = quantize_with_stats(&model, &targets, &stats, options)?;
    report.calibration_inputs = inputs.describe();
    report.smoothed = smoothed;
    report.biases_corrected = biases_corrected;
    Ok((out, report))
}

/// Reads an ONNX file (weights inside the file).
pub fn read_model(path: impl AsRef<Path>) -> Result<ModelProto> {
    let path = path.as_ref();
    ensure!(
        path.is_file(),
        "model file {} does not exist",
        path.display()
    );
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(!bytes.is_empty(), "model file {} is empty", path.display());
    let model = ModelProto::decode(&bytes[..])
        .with_context(|| format!("{} is not an ONNX model", path.display()))?;
    ensure!(
        model.graph.is_some(),
        "{} is not an ONNX model (no graph)",
        path.display()
    );
    Ok(model)
}

/// [`quantize`] from file to file.
pub fn quantize_file(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    inputs: &InputSet,
    options: &QuantizeOptions,
    progress: &ProgressBar,
) -> Result<QuantizeReport> {
    let (input, output) = (input.as_ref(), output.as_ref());
    let model = read_model(input)?;
    let (quantized, report) = quantize(&model, inputs, options, progress)
        .with_context(|| format!("quantizing {}", input.display()))?;
    std::fs::write(output, quantized.encode_to_vec())
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(report)
}
