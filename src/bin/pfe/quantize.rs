use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use poolformer_edge::npy;
use poolformer_edge::quantize::{self, ActivationType, InputSet, Method, QuantizeOptions};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    /// Observed minimum and maximum.
    Minmax,
    /// Central --percentile % of the observed values.
    Percentile,
    /// Range minimizing the expected squared quantization error over the histogram.
    Mse,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ActivationArg {
    /// uint8 with a zero point.
    Uint8,
    /// int8 with a zero point.
    Int8,
    /// int8, zero point 0.
    Int8Symmetric,
}

#[derive(clap::Args)]
pub struct Args {
    /// fp32 ONNX model.
    model: PathBuf,
    /// Where to write the QDQ model.
    #[arg(short, long)]
    output: PathBuf,
    /// Calibrate on the images (png, jpeg, bmp, pnm) of this directory.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    calib: Option<PathBuf>,
    /// Calibrate on N generated natural-looking images instead.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    /// First seed of the synthetic images.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How activation clip ranges are chosen.
    #[arg(long, value_enum, default_value = "mse")]
    method: MethodArg,
    /// Percentile kept by --method percentile.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Storage type of quantized activations.
    #[arg(long, value_enum, default_value = "uint8")]
    activations: ActivationArg,
    /// Also quantize the classifier head (Gemm/MatMul); it stays float by default.
    #[arg(long)]
    quantize_head: bool,
    /// Also quantize residual-stream activations (the downsampling convs' inputs); by
    /// default those convs get int8 weights and keep a float input.
    #[arg(long)]
    quantize_residual: bool,
    /// SmoothQuant strength ALPHA in [0, 1]: moves activation outliers of convs fed by a
    /// norm's affine (fc1) into their weights.
    #[arg(long, value_name = "ALPHA", default_value_t = 0.5)]
    smooth: f32,
    /// Leave the weights unsmoothed.
    #[arg(long)]
    no_smooth: bool,
    /// Leave conv biases as they are instead of correcting them for the mean shift of
    /// weight rounding.
    #[arg(long)]
    no_bias_correction: bool,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Side of the square network input.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Write the report (targets, ranges, parameters) as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also write each preprocessed calibration input as DIR/input_NNNN.npy (f32
    /// 1×3×size×size), for other quantizers to calibrate on the same data.
    #[arg(long, value_name = "DIR")]
    save_inputs: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<()> {
    let inputs = match (&args.calib, args.synthetic) {
        (Some(dir), _) => InputSet::from_dir(dir)?,
        (None, Some(n)) => InputSet::synthetic(n, args.seed)?,
        (None, None) => bail!("give --calib DIR or --synthetic N"),
    };
    let options = QuantizeOptions {
        method: match args.method {
            MethodArg::Minmax => Method::MinMax,
            MethodArg::Percentile => Method::Percentile {
                percentile: args.percentile,
            },
            MethodArg::Mse => Method::Mse,
        },
        activation_type: match args.activations {
            ActivationArg::Uint8 => ActivationType::Uint8,
            ActivationArg::Int8 => ActivationType::Int8,
            ActivationArg::Int8Symmetric => ActivationType::Int8Symmetric,
        },
        quantize_head: args.quantize_head,
        quantize_residual: args.quantize_residual,
        smooth_alpha: (!args.no_smooth).then_some(args.smooth),
        bias_correction: !args.no_bias_correction,
        input_size: args.size,
        threads: args.threads,
    };
    options.validate()?;
    if let Some(dir) = &args.save_inputs {
        save_inputs(&inputs, args.size, dir)?;
    }
    let start = Instant::now();
    eprintln!("calibrating on {}", inputs.describe());
    let progress = crate::progress_bar("calibrating");
    let report = quantize::quantize_file(&args.model, &args.output, &inputs, &options, &progress)?;
    let s = &report.summary;
    println!(
        "wrote {}: {} ops quantized ({} QuantizeLinear, {} DequantizeLinear), weights {:.1} MB → {:.1} MB, {:.1} s",
        args.output.display(),
        report.targets.len(),
        s.quantize_nodes,
        s.dequantize_nodes,
        s.weight_bytes_before as f64 / 1e6,
        s.weight_bytes_after as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    if report.smoothed > 0 || report.biases_corrected > 0 {
        println!(
            "smoothed {} convs' inputs, corrected {} biases",
            report.smoothed, report.biases_corrected
        );
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn save_inputs(inputs: &InputSet, size: usize, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, x) in inputs.tensors(size).enumerate() {
        let x = x?;
        let data: Vec<f32> = x.iter().copied().collect();
        npy::write_f32(dir.join(format!("input_{i:04}.npy")), x.shape(), &data)?;
    }
    Ok(())
}
