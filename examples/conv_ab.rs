//! A/B of the patch convolution's paths on PoolFormer-S12's stem and downsampling
//! convolution shapes at 224×224, for int8 and f32 weights: the `gemm` crate on row-major
//! weights (int8 ones dequantized 64 rows at a time), the crate's `sgemm` kernels on
//! packed weights (int8 ones dequantized a stretch at a time), which `PatchConv`'s
//! codegen picks for f32 weights on AVX2 and AVX-512, and for int8 weights the input
//! quantized to 16 bits (`split16`): through two u8 × i8 products on a CPU with AVX-512
//! VNNI, through one fused i16 product on AVX2 without it, which the codegen picks
//! there. They alternate in one process, outputs compared. On one thread each figure
//! is the smallest of 15 rounds in thread CPU time, so that time lost to other jobs does
//! not count; with `--threads N` (N > 1) the ops run on a pool of N threads and each
//! figure is the smallest of 40 rounds in wall time.
//!
//! `cargo run --release --example conv_ab [-- [SHAPE] [--threads N]]`

#[path = "common/cpu_time.rs"]
mod cpu_time;
use std::sync::Arc;

use cpu_time::cpu_now;
use poolformer_edge::kernels::im2col::ConvGeometry;
use poolformer_edge::kernels::{sgemm, Isa};
use poolformer_edge::ops::conv::{fused16_pays, split16_pays, ConvWeights, PatchConv};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

/// Seconds of wall time since the first call.
fn wall_now() -> f64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

fn main() -> TractResult<()> {
    let isa = Isa::best();
    if !sgemm::preferred(isa) {
        println!("the sgemm kernels are not the patch conv's path on this CPU");
        return Ok(());
    }
    // (in channels, side, out channels, kernel, stride, pad)
    let shapes = [
        (3usize, 224usize, 64usize, 7usize, 4usize, 2usize),
        (64, 56, 128, 3, 2, 1),
        (128, 28, 320, 3, 2, 1),
        (320, 14, 512, 3, 2, 1),
    ];
    let mut s = 0x9e37_79b9u32;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // A number not after `--threads` picks one shape by its index.
    let only: Option<usize> = args
        .iter()
        .enumerate()
        .filter(|&(i, _)| i == 0 || args[i - 1] != "--threads")
        .find_map(|(_, a)| a.parse().ok());
    let (rounds, now): (usize, fn() -> f64) = if threads > 1 {
        (40, wall_now)
    } else {
        (15, cpu_now)
    };
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    println!("{threads} thread(s), smallest of {rounds} rounds");
    println!(
        "{:>28} {:>8} {:>12} {:>12} {:>7} {:>12} {:>7}",
        "conv", "weights", "gemm crate", "sgemm", "ratio", "split16", "ratio"
    );
    for (i, (ci, n, co, k, st, p)) in shapes.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let out = (n + 2 * p - k) / st + 1;
        let g = ConvGeometry {
            in_channels: ci,
            in_h: n,
            in_w: n,
            kernel: (k, k),
            stride: (st, st),
            pad: (p, p),
            out_h: out,
            out_w: out,
        };
        let kk = ci * k * k;
        let q: Vec<i8> = (0..co * kk).map(|_| next() as i8).collect();
        let scale: Vec<f32> = (0..co).map(|o| 1e-3 * (1 + o % 7) as f32).collect();
        let x: Vec<f32> = (0..ci * n * n)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let input = Tensor::from_shape(&[1, ci, n, n], &x)?.into_tvalue();
        let x_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let f32_weights: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(j, &v)| v as f32 * scale[j / kk])
            .collect();
        let l1_max = f32_weights
            .chunks(kk)
            .map(|r| r.iter().map(|v| v.abs()).sum::<f32>())
            .fold(0f32, f32::max);
        let int8 = ConvWeights::I8 {
            q: Arc::new(q),
            scale: Arc::new(scale),
            zero: Arc::new(vec![0; co]),
        };
        for (kind, weights) in [
            ("int8", int8),
            ("f32", ConvWeights::F32(Arc::new(f32_weights))),
        ] {
            let mut variants = vec![weights.clone(), weights.packed(isa, co)];
            if kind == "int8" && (split16_pays(isa) || fused16_pays(isa)) {
                variants.extend(weights.prepared(isa, &g, co)?);
            }
            let plans: Vec<_> = variants
                .into_iter()
                .map(|weights| {
                    let op = PatchConv {
                        geometry: g,
                        out_channels: co,
                        weights,
                        bias: Arc::new(vec![0.1; co]),
                    };
                    let mut model = TypedModel::default();
                    let src = model.add_source("x", f32::fact([1, ci, n, n])).unwrap();
                    let y = model.wire_node("conv", op, &[src]).unwrap();
                    model.select_output_outlets(&y).unwrap();
                    model.into_runnable().unwrap()
                })
                .collect();
            let mut best = vec![f64::MAX; plans.len()];
            let mut outs = vec![];
            for _ in 0..rounds {
                outs.clear();
                for (i, plan) in plans.iter().enumerate() {
                    let t = now();
                    let y = multithread_tract_scope(executor.clone(), || {
                        plan.run(tvec!(input.clone()))
                    })?;
                    best[i] = best[i].min(now() - t);
                    outs.push(y[0].clone().into_tensor());
                }
                outs[0].close_enough(&outs[1], tract_core::internal::Approximation::Approximate)?;
                if let Some(o) = outs.get(2) {
                    // The 16-bit input moves each output by at most half a step of the
                    // input grid (max|x| / 32767) times the row's L1 norm of weights.
                    let bound = l1_max * x_max / 65534.0 * 1.001 + 1e-5;
                    let (a, b) = (
                        outs[0].to_plain_array_view::<f32>()?,
                        o.to_plain_array_view::<f32>()?,
                    );
                    let worst = a
                        .iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    anyhow::ensure!(worst <= bound, "split16 off by {worst} > {bound}");
                }
            }
            let name = format!("{ci}→{co} {k}×{k}/{st} on {n}×{n}");
            let split = match best.get(2) {
                Some(t) => format!("{:>9.3} ms {:>7.2}", t * 1e3, best[0] / t),
                None => format!("{:>12} {:>7}", "-", "-"),
            };
            println!(
                "{name:>28} {kind:>8} {:>9.3} ms {:>9.3} ms {:>7.2} {split}",
                best[0] * 1e3,
                best[1] * 1e3,
                best[0] / best[1]
            );
        }
    }
    Ok(())
}
