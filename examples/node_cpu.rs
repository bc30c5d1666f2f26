//! One node of a model run alone, timed in thread CPU time: the node whose name
//! contains PATTERN (the first in the optimized graph), copied into a graph of its own
//! with sources shaped like its inputs, fed deterministic values, and run N times at
//! 1 thread; prints the smallest, first-quartile and median time. For A/B work on one
//! op (an element-wise chain, an int8 conv) where a whole inference is too noisy.
//!
//! `cargo run --release --example node_cpu -- MODEL.onnx PATTERN [N]`

#[path = "common/cpu_time.rs"]
mod cpu_time;
use anyhow::{anyhow, Context, Result};
use cpu_time::cpu_now;
use poolformer_edge::{Engine, Options};
use tract_core::internal::*;

/// A tensor of `fact`'s shape and type with values spread over its range.
fn input(fact: &TypedFact) -> Result<Tensor> {
    let shape = fact
        .shape
        .as_concrete()
        .ok_or_else(|| anyhow!("input shape {:?} is not concrete", fact.shape))?
        .to_vec();
    let len: usize = shape.iter().product();
    let spread = |i: usize, m: usize| (i * 7919) % m;
    let dt = fact.datum_type;
    Ok(if dt == f32::datum_type() {
        let v: Vec<f32> = (0..len)
            .map(|i| spread(i, 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_shape(&shape, &v)?
    } else if dt == i32::datum_type() {
        let v: Vec<i32> = (0..len).map(|i| spread(i, 20000) as i32 - 10000).collect();
        Tensor::from_shape(&shape, &v)?
    } else if dt.size_of() == 1 {
        let v: Vec<u8> = (0..len).map(|i| spread(i, 256) as u8).collect();
        let mut t = Tensor::from_shape(&shape, &v)?;
        // SAFETY: every byte pattern is a valid u8, i8 or quantized 8-bit value.
        unsafe { t.set_datum_type(dt) };
        t
    } else {
        return Err(anyhow!("no test values for inputs of type {dt:?}"));
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: node_cpu MODEL.onnx PATTERN [N]";
    let path = args.next().context(usage)?;
    let pattern = args.next().context(usage)?;
    let iters: usize = match args.next() {
        Some(n) => n.parse().context(usage)?,
        None => 200,
    };
    let engine = Engine::from_path(
        &path,
        Options {
            threads: 1,
            ..Options::default()
        },
    )?;
    let model = engine.model();
    let node = model
        .nodes()
        .iter()
        .find(|n| n.name.contains(&pattern))
        .ok_or_else(|| anyhow!("no node whose name contains {pattern:?}"))?;
    println!(
        "{} ({}): {}",
        node.name,
        node.op.name(),
        node.op.info()?.join("; ")
    );
    let mut graph = TypedModel::default();
    let mut wires = tvec![];
    let mut inputs = tvec![];
    for (i, outlet) in node.inputs.iter().enumerate() {
        let fact = model.outlet_fact(*outlet)?.clone().without_value();
        inputs.push(input(&fact)?.into_tvalue());
        wires.push(graph.add_source(format!("input.{i}"), fact)?);
    }
    let outputs = graph.wire_node("node", node.op.clone(), &wires)?;
    graph.select_output_outlets(&outputs)?;
    let plan = graph.into_runnable()?;
    for _ in 0..3 {
        plan.run(inputs.clone())?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = cpu_now();
        plan.run(inputs.clone())?;
        times.push((cpu_now() - t0) * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    println!(
        "thread CPU µs per run: min {:.1} p25 {:.1} median {:.1}",
        times[0],
        times[n / 4],
        times[n / 2]
    );
    Ok(())
}
