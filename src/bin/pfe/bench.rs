use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use poolformer_edge::bench::{peak_rss_mb, process_cpu_time, LatencyStats};
use poolformer_edge::{Engine, Options};
use serde::Serialize;
use tract_onnx::prelude::Tensor;

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Thread counts to measure, e.g. 1 or 1,2,4,8.
    #[arg(long, default_value = "1", value_parser = crate::parse_threads)]
    threads: crate::ThreadList,
    /// Timed runs per thread count.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Machine-readable output: one JSON object (an array for several thread counts).
    #[arg(long)]
    json: bool,
    /// Skip this crate's graph passes (MetaFormer fusion, int8 folding): tract alone.
    #[arg(long)]
    no_fuse: bool,
    /// Also time every node (over --iters runs) and print the time per op kind.
    #[arg(long)]
    profile: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    iters: usize,
    load_ms: f64,
    min_ms: f64,
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
    /// Process CPU time per run (all threads; see `bench::process_cpu_time`): its
    /// median and smallest, where the platform has the clock.
    cpu_median_ms: Option<f64>,
    cpu_min_ms: Option<f64>,
    peak_rss_mb: Option<f64>,
}

pub fn main(args: Args) -> Result<()> {
    ensure!(args.iters >= 1, "--iters must be at least 1");
    let threads = args.threads.0;
    let mut reports = vec![];
    for &t in &threads {
        let engine = Engine::from_path(
            &args.model,
            Options {
                threads: t,
                input_size: args.size,
                fuse: !args.no_fuse,
            },
        )?;
        // A fixed, image-like input: latency does not depend on values for this network.
        let shape = engine.input_shape();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect();
        let input = Tensor::from_shape(&shape, &data)?;
        for _ in 0..args.warmup {
            engine.run(input.clone())?;
        }
        let mut samples = Vec::with_capacity(args.iters);
        let mut cpu_samples = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            let x = input.clone();
            let cpu0 = process_cpu_time();
            let start = Instant::now();
            engine.run(x)?;
            samples.push(start.elapsed());
            if let (Some(c0), Some(c1)) = (cpu0, process_cpu_time()) {
                cpu_samples.push(c1.saturating_sub(c0));
            }
        }
        let st = LatencyStats::from_samples(&samples);
        let cpu =
            (cpu_samples.len() == samples.len()).then(|| LatencyStats::from_samples(&cpu_samples));
        if args.profile {
            print_profile(&engine.profile(input.clone(), args.iters)?, t);
        }
        reports.push(Report {
            model: args.model.display().to_string(),
            threads: t,
            iters: st.iters,
            load_ms: engine.load_time().as_secs_f64() * 1e3,
            min_ms: st.min_ms,
            median_ms: st.median_ms,
            p90_ms: st.p90_ms,
            max_ms: st.max_ms,
            cpu_median_ms: cpu.as_ref().map(|c| c.median_ms),
            cpu_min_ms: cpu.as_ref().map(|c| c.min_ms),
            peak_rss_mb: peak_rss_mb(),
        });
    }
    if args.json {
        let v = if reports.len() == 1 {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::to_value(&reports)?
        };
        println!("{v}");
    } else {
        println!(
            "{}  ({}×{} input, {} iterations after {} warm-up)",
            args.model.display(),
            args.size,
            args.size,
            args.iters,
            args.warmup
        );
        println!(
            "{:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "threads", "load ms", "min ms", "median", "p90", "max", "CPU med", "peak RSS"
        );
        for r in &reports {
            let rss = r
                .peak_rss_mb
                .map(|m| format!("{m:.0} MB"))
                .unwrap_or_else(|| "?".into());
            let cpu = r
                .cpu_median_ms
                .map(|m| format!("{m:.2}"))
                .unwrap_or_else(|| "?".into());
            println!(
                "{:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9} {:>10}",
                r.threads, r.load_ms, r.min_ms, r.median_ms, r.p90_ms, r.max_ms, cpu, rss
            );
        }
        println!("CPU med: process CPU time per run, all threads together");
    }
    Ok(())
}

/// Time per op kind, largest first; per part of the network (stem, each stage, head,
/// from the node names' first two components: `stages.2.blocks.0…` → `stages.2`); then
/// the ten slowest nodes.
fn print_profile(nodes: &[poolformer_edge::engine::NodeProfile], threads: usize) {
    let total: f64 = nodes.iter().map(|n| n.time.as_secs_f64()).sum::<f64>() * 1e3;
    let mut by_op: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
    for n in nodes {
        let e = by_op.entry(n.op.as_str()).or_default();
        e.0 += n.time.as_secs_f64() * 1e3;
        e.1 += 1;
    }
    let mut rows: Vec<_> = by_op.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    eprintln!("profile, {threads} thread(s): {total:.2} ms summed over nodes");
    eprintln!("{:>9} {:>6} {:>6}  op", "ms", "%", "nodes");
    for (op, (ms, count)) in rows {
        eprintln!("{ms:>9.3} {:>6.1} {count:>6}  {op}", 100.0 * ms / total);
    }
    let mut parts: Vec<(String, f64, usize)> = Vec::new();
    for n in nodes {
        let part = match n.name.split('.').collect::<Vec<_>>().as_slice() {
            ["stages", i, ..] => format!("stages.{i}"),
            [first, ..] => first.to_string(),
            [] => String::new(),
        };
        match parts.iter_mut().find(|p| p.0 == part) {
            Some(p) => {
                p.1 += n.time.as_secs_f64() * 1e3;
                p.2 += 1;
            }
            None => parts.push((part, n.time.as_secs_f64() * 1e3, 1)),
        }
    }
    eprintln!("by part of the network:");
    for (part, ms, count) in parts.iter().filter(|p| p.1 >= 0.005 * total) {
        eprintln!("{ms:>9.3} {:>6.1} {count:>6}  {part}", 100.0 * ms / total);
    }
    let mut slow: Vec<_> = nodes.iter().collect();
    slow.sort_by_key(|n| std::cmp::Reverse(n.time));
    eprintln!("slowest nodes:");
    for n in slow.iter().take(10) {
        eprintln!("{:>9.3}  {} ({})", n.time.as_secs_f64() * 1e3, n.name, n.op);
    }
}
