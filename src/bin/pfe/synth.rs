use std::path::PathBuf;

use anyhow::Result;
use poolformer_edge::models::{synth, ArchConfig};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "poolformer_s12")]
    arch: String,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output safetensors file.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn main(args: Args) -> Result<()> {
    let arch = ArchConfig::by_name(&args.arch)?;
    let weights = synth::synthesize(&arch, args.seed)?;
    weights.save_safetensors(&args.output)?;
    println!(
        "wrote {} ({} synthetic weights, seed {}, {} tensors, {:.2} M parameters)",
        args.output.display(),
        arch.name,
        args.seed,
        weights.params.len(),
        arch.parameter_count() as f64 / 1e6
    );
    Ok(())
}
