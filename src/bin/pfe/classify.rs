use std::path::PathBuf;

use anyhow::{Context, Result};
use poolformer_edge::preprocess::{load_image, RgbImage};
use poolformer_edge::{Engine, Options};

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Image files (PNG, JPEG, BMP, PNM).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to report per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// One JSON object per image on stdout.
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    let engine = Engine::from_path(
        &args.model,
        Options {
            threads: args.threads,
            input_size: args.size,
            ..Options::default()
        },
    )?;
    for path in &args.images {
        let img = load_image(path)?;
        let preds = engine
            .classify(&RgbImage::from_image(&img), args.top)
            .with_context(|| format!("classifying {}", path.display()))?;
        if args.json {
            let v = serde_json::json!({ "image": path, "predictions": preds });
            println!("{v}");
        } else {
            println!("{}", path.display());
            for p in preds {
                println!(
                    "  {:>5.1}%  {:>4}  {}",
                    p.probability * 100.0,
                    p.class_index,
                    p.label
                );
            }
        }
    }
    Ok(())
}
