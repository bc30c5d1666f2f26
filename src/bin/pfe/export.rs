use std::path::PathBuf;

use anyhow::Result;
use poolformer_edge::models::{export, ArchConfig, Weights};

#[derive(clap::Args)]
pub struct Args {
    /// Architecture (poolformer_s12, poolformer_s24, poolformer_s36, poolformer_m36, poolformer_m48).
    #[arg(long, default_value = "poolformer_s12")]
    arch: String,
    /// timm state dict in safetensors form (e.g. timm/poolformer_s12.sail_in1k model.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Output ONNX file.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn main(args: Args) -> Result<()> {
    let arch = ArchConfig::by_name(&args.arch)?;
    let weights = Weights::load_safetensors(&args.weights)?;
    export::export_onnx_to_path(&arch, &weights, &args.output)?;
    println!(
        "wrote {} ({}, fp32, opset 17)",
        args.output.display(),
        arch.name
    );
    Ok(())
}
