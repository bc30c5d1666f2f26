use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::ArgGroup;
use poolformer_edge::preprocess::{load_image, RgbImage};
use poolformer_edge::{npy, Engine, Options};
use tract_onnx::prelude::Tensor;

#[derive(clap::Args)]
#[command(group(ArgGroup::new("source").required(true).args(["input", "image"])))]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Raw input tensor, float32 NCHW .npy (1×3×S×S).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Image file, preprocessed like timm's eval transform.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Where to write the output tensor (.npy); without it a summary is printed.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Square input side; taken from --input's shape when given.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Skip this crate's graph passes (MetaFormer fusion, int8 folding): tract alone.
    #[arg(long)]
    no_fuse: bool,
    /// Also write the preprocessed input tensor (.npy), with --image.
    #[arg(long)]
    save_input: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<()> {
    let tensor_in = match &args.input {
        Some(path) => {
            let (shape, data) = npy::read_f32(path)?;
            ensure!(
                shape.len() == 4 && shape[0] == 1 && shape[1] == 3 && shape[2] == shape[3],
                "{}: expected a 1×3×S×S tensor, got shape {shape:?}",
                path.display()
            );
            Some((shape, data))
        }
        None => None,
    };
    let size = tensor_in.as_ref().map(|(s, _)| s[2]).unwrap_or(args.size);
    let engine = Engine::from_path(
        &args.model,
        Options {
            threads: args.threads,
            input_size: size,
            fuse: !args.no_fuse,
        },
    )?;
    let (shape, data) = match (tensor_in, &args.image) {
        (Some(t), _) => t,
        (None, Some(path)) => {
            let img = load_image(path)?;
            let x = engine.preprocess(&RgbImage::from_image(&img))?;
            (x.shape().to_vec(), x.iter().copied().collect())
        }
        (None, None) => unreachable!("clap requires one source"),
    };
    if let Some(p) = &args.save_input {
        npy::write_f32(p, &shape, &data)?;
    }
    let output = engine.run(Tensor::from_shape(&shape, &data)?)?;
    let out_shape = output.shape().to_vec();
    let out: Vec<f32> = output
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    let out = &out[..];
    match &args.output {
        Some(p) => npy::write_f32(p, &out_shape, out)?,
        None => {
            println!("output shape {out_shape:?}");
            for p in engine.rank(out, 5) {
                println!("{:>5}  {:>9.4}  {}", p.class_index, p.logit, p.label);
            }
        }
    }
    Ok(())
}
