//! `pfe`: the poolformer-edge command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod classify;
mod compare;
mod demo;
mod export;
mod info;
mod quantize;
mod run;
mod synth;

/// Edge inference runtime for PoolFormer image classifiers (tract-based).
#[derive(Parser)]
#[command(name = "pfe", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model on a raw NCHW tensor (.npy) or an image; write the raw output (.npy).
    Run(run::Args),
    /// Classify image files: top-k labels with probabilities.
    Classify(classify::Args),
    /// Measure load time, latency (min/median/p90/max) and peak memory.
    Bench(bench::Args),
    /// Describe a model: inputs, outputs, ops, parameters, MACs, quantization form.
    Info(info::Args),
    /// Write an fp32 ONNX graph from a timm PoolFormer state dict (safetensors).
    Export(export::Args),
    /// Write deterministic synthetic weights with timm's names and shapes (safetensors).
    Synth(synth::Args),
    /// The main job on the embedded default: build the synthetic S12 model once,
    /// classify a generated image, print a latency table.
    Demo(demo::Args),
    /// Quantize an fp32 model to int8 QDQ ONNX, calibrated on images or synthetic inputs.
    Quantize(quantize::Args),
    /// Compare two models' logits on the same inputs: SQNR, top-1/top-5 agreement.
    ///
    /// A is the reference, B the model scored against it, both run on the same
    /// preprocessed inputs. SQNR = 10·log10(Σa² / Σ(a − b)²) in dB, the sums over every
    /// logit of every input (inf when identical). Top-1 agreement: share of inputs where
    /// B's highest class is A's highest. Top-5 agreement: share of inputs where B's
    /// highest class is among A's five highest. Max abs diff: largest |a − b| over all
    /// logits.
    Compare(compare::Args),
}

fn main() {
    // Errors are printed as messages, never with their backtraces.
    poolformer_edge::engine::skip_error_backtraces();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Run(a) => run::main(a),
        Command::Classify(a) => classify::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Info(a) => info::main(a),
        Command::Export(a) => export::main(a),
        Command::Synth(a) => synth::main(a),
        Command::Demo(a) => demo::main(a),
        Command::Quantize(a) => quantize::main(a),
        Command::Compare(a) => compare::main(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Thread counts given as `--threads 1,2,4` (or a single number).
#[derive(Debug, Clone)]
pub struct ThreadList(pub Vec<usize>);

pub fn parse_threads(s: &str) -> Result<ThreadList, String> {
    let counts: Result<Vec<usize>, _> = s.split(',').map(|t| t.trim().parse::<usize>()).collect();
    match counts {
        Ok(c) if !c.is_empty() && c.iter().all(|&n| n >= 1) => Ok(ThreadList(c)),
        _ => Err(format!(
            "expected thread counts ≥ 1 like 1 or 1,2,4, got {s:?}"
        )),
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal); its length is set
/// by the library call that drives it.
pub fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
