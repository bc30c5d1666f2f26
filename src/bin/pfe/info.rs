use std::path::PathBuf;

use anyhow::Result;
use poolformer_edge::inspect::inspect;
use poolformer_edge::{Engine, Options};

#[derive(clap::Args)]
pub struct Args {
    /// ONNX model file.
    model: PathBuf,
    /// Input side used to count MACs.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long)]
    json: bool,
}

pub fn main(args: Args) -> Result<()> {
    let info = inspect(&args.model, args.size)?;
    // What this crate's graph passes make of the model at this input size.
    let fused = Engine::from_path(
        &args.model,
        Options {
            input_size: args.size,
            ..Options::default()
        },
    )
    .map(|e| e.passes().rewrites.clone())
    .map_err(|e| format!("{e:#}"));
    if args.json {
        let mut v = serde_json::to_value(&info)?;
        v["fused"] = match &fused {
            Ok(r) => serde_json::json!(r),
            Err(e) => serde_json::json!({ "error": e }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model        {}", info.path);
    if !info.producer.is_empty() {
        println!("producer     {}", info.producer);
    }
    let opsets: Vec<String> = info
        .opsets
        .iter()
        .map(|(d, v)| format!("{d} {v}"))
        .collect();
    println!("opsets       {}", opsets.join(", "));
    for i in &info.inputs {
        println!(
            "input        {} [{}] {}",
            i.name,
            i.shape.join(", "),
            i.dtype
        );
    }
    for o in &info.outputs {
        println!(
            "output       {} [{}] {}",
            o.name,
            o.shape.join(", "),
            o.dtype
        );
    }
    println!("quantization {}", info.quantization);
    println!(
        "parameters   {} ({:.2} M)",
        info.parameters,
        info.parameters as f64 / 1e6
    );
    match info.macs {
        Some(m) => println!(
            "MACs         {:.3} G at {}×{}",
            m as f64 / 1e9,
            info.input_size,
            info.input_size
        ),
        None => println!(
            "MACs         unknown (the graph does not type-check at {}×{})",
            info.input_size, info.input_size
        ),
    }
    match &fused {
        Ok(r) if r.is_empty() => println!("fused        nothing (no PoolFormer block matched)"),
        Ok(r) => println!("fused        {}", r.join("; ")),
        Err(e) => println!("fused        not loadable here: {e}"),
    }
    println!("nodes        {}", info.nodes);
    let mut ops: Vec<_> = info.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("  {n:>5}  {op}");
    }
    for (k, v) in &info.metadata {
        println!("meta         {k} = {v}");
    }
    Ok(())
}
