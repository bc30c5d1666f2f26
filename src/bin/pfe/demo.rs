use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use poolformer_edge::bench::{peak_rss_mb, LatencyStats};
use poolformer_edge::models::{cache, ArchConfig};
use poolformer_edge::{testimage, Engine, Options, RgbImage};

#[derive(clap::Args)]
pub struct Args {
    /// Use this ONNX model instead of the cached synthetic PoolFormer-S12.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Thread counts for the latency table (default: 1 and every core).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<crate::ThreadList>,
    /// Timed runs per thread count.
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

pub fn main(args: Args) -> Result<()> {
    let arch = ArchConfig::by_name("poolformer_s12")?;
    let synthetic = args.model.is_none();
    let model = match args.model {
        Some(m) => m,
        None => {
            let start = Instant::now();
            let existed = cache::cache_dir()
                .join(format!("{}-synthetic-seed0.onnx", arch.name))
                .is_file();
            let path = cache::synthetic_model(&arch, 0)?;
            if existed {
                println!("model      {} (cached)", path.display());
            } else {
                println!(
                    "model      {} (built in {:.0} ms)",
                    path.display(),
                    start.elapsed().as_secs_f64() * 1e3
                );
            }
            path
        }
    };
    if synthetic {
        println!(
            "note       the weights are SYNTHETIC (deterministic random, seed 0): the labels below are \
             meaningless.\n           For real predictions fetch timm/poolformer_s12.sail_in1k model.safetensors and run\n           \
             pfe export --weights model.safetensors -o poolformer_s12.onnx && pfe demo --model poolformer_s12.onnx"
        );
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads =
        args.threads.map(|t| t.0).unwrap_or_else(
            || {
                if cores > 1 {
                    vec![1, cores]
                } else {
                    vec![1]
                }
            },
        );
    threads.dedup();

    // A 640×480 camera-sized frame, classified end to end.
    let frame = testimage::natural_image(640, 480, 42);
    let image = RgbImage::from_image(&frame);
    let engine = Engine::from_path(
        &model,
        Options {
            threads: threads[0],
            input_size: 224,
            ..Options::default()
        },
    )?;
    let preds = engine.classify(&image, 5)?;
    println!("image      generated 640×480 test pattern");
    for p in &preds {
        println!(
            "           {:>5.1}%  {:>4}  {}",
            p.probability * 100.0,
            p.class_index,
            p.label
        );
    }

    let mut pre_samples = vec![];
    for _ in 0..args.iters.max(1) {
        let start = Instant::now();
        engine.preprocess(&image)?;
        pre_samples.push(start.elapsed());
    }
    let pre = LatencyStats::from_samples(&pre_samples);
    println!();
    println!("{:<34} {:>9} {:>9}", "stage", "median ms", "p90 ms");
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "preprocess 640×480 → 1×3×224×224", pre.median_ms, pre.p90_ms
    );
    for &t in &threads {
        let engine = Engine::from_path(
            &model,
            Options {
                threads: t,
                input_size: 224,
                ..Options::default()
            },
        )?;
        let input = engine.preprocess(&image)?;
        engine.run_array(input.clone())?;
        let mut samples = vec![];
        for _ in 0..args.iters.max(1) {
            let x = input.clone();
            let start = Instant::now();
            engine.run_array(x)?;
            samples.push(start.elapsed());
        }
        let st = LatencyStats::from_samples(&samples);
        println!(
            "{:<34} {:>9.1} {:>9}",
            format!(
                "load + optimize ({t} thread{})",
                if t > 1 { "s" } else { "" }
            ),
            engine.load_time().as_secs_f64() * 1e3,
            ""
        );
        println!(
            "{:<34} {:>9.2} {:>9.2}",
            format!("inference, {t} thread{}", if t > 1 { "s" } else { "" }),
            st.median_ms,
            st.p90_ms
        );
    }
    if let Some(rss) = peak_rss_mb() {
        println!("{:<34} {:>9.0}", "peak RSS (MB)", rss);
    }
    Ok(())
}
