use std::path::PathBuf;

use anyhow::{bail, Result};
use poolformer_edge::compare::compare_files;
use poolformer_edge::quantize::InputSet;
use poolformer_edge::Options;

#[derive(clap::Args)]
pub struct Args {
    /// Reference model (e.g. the fp32 one).
    a: PathBuf,
    /// Model compared against it (e.g. the quantized one).
    b: PathBuf,
    /// Compare on the images (png, jpeg, bmp, pnm) of this directory.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    images: Option<PathBuf>,
    /// Compare on N generated natural-looking images instead.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    /// First seed of the synthetic images (by default distinct from the quantizer's
    /// calibration seeds, so the images are held out).
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Side of the square network input.
    #[arg(long, default_value_t = 224)]
    size: usize,
}

pub fn main(args: Args) -> Result<()> {
    let inputs = match (&args.images, args.synthetic) {
        (Some(dir), _) => InputSet::from_dir(dir)?,
        (None, Some(n)) => InputSet::synthetic(n, args.seed)?,
        (None, None) => bail!("give --images DIR or --synthetic N"),
    };
    let options = Options {
        threads: args.threads,
        input_size: args.size,
        ..Options::default()
    };
    let progress = crate::progress_bar("comparing");
    let c = compare_files(&args.a, &args.b, &inputs, options, &progress)?;
    if args.json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!("inputs          {}", inputs.describe());
        println!("SQNR            {:.2} dB", c.sqnr_db);
        println!("top-1 agreement {:.1} %", c.top1_agreement * 100.0);
        println!("top-5 agreement {:.1} %", c.top5_agreement * 100.0);
        println!("max abs diff    {:.4}", c.max_abs_diff);
    }
    Ok(())
}
