//! A/B of the channel MLP's two product paths on PoolFormer-S12's four stage shapes,
//! one thread, alternating in one process: the `gemm` crate path (`run_block`) and
//! the packed kernels (`run_block_packed`) on AVX-512 and AVX2, on the engine's token
//! blocks (aligned to 16 tokens, as on AVX2) and, as `unaligned`, on the same cut without that
//! alignment, which leaves a narrow column panel at the end of each block. Each figure is the
//! smallest of 15 rounds of 5 calls, in thread CPU time, so that on a shared machine
//! time slices lost to other jobs do not count.
//!
//! `cargo run --release --example mlp_ab [STAGE…]`; `peak` instead times the packed
//! kernels on a product that stays in L1 (64×64 weights, 48 tokens).
//!
//! The `gemm` crate picks its own kernels at run time (AVX-512 where the CPU has it,
//! whatever `isa` says); the `isa` of its rows is that of the element-wise passes.

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::cpu_now;
use std::sync::Arc;

use poolformer_edge::kernels::mlp::{
    run_block, run_block_packed, sequential, MlpWeights, PackedMlp, Scratch,
};
use poolformer_edge::kernels::sgemm::{gemm, Epilogue, PackedCols, PackedWeights};
use poolformer_edge::kernels::Isa;

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

fn min_time(rounds: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = cpu_now();
            (0..reps).for_each(|_| f());
            (cpu_now() - t) / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn peak() {
    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Portable) {
        let (m, k, n) = (64, 64, 48);
        let pw = PackedWeights::pack(isa, &values(m * k, 1, 0.2), m, k);
        let mut px = PackedCols::default();
        px.pack(isa, &values(k * n, 2, 0.2), n, k, n, 0.0);
        let bias = vec![0f32; m];
        let mut out = vec![0f32; m * n];
        let t = min_time(10, 2000, || {
            let epi = Epilogue::Residual {
                bias: &bias,
                x: out.as_ptr(),
                ldx: n,
                out: out.as_mut_ptr(),
                ldo: n,
            };
            // SAFETY: `out` is m × n.
            unsafe { gemm(isa, &pw, 0..pw.panels(), &px, &epi) };
        });
        println!(
            "in L1, {}: {:.1} GMAC/s",
            isa.name(),
            (m * k * n) as f64 / t / 1e9
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "peak") {
        return peak();
    }
    for &(stage, ch, side) in &[(1, 64, 56), (2, 128, 28), (3, 320, 14), (4, 512, 7)] {
        if !args.is_empty() && !args.contains(&stage.to_string()) {
            continue;
        }
        let (hidden, hw) = (4 * ch, side * side);
        let w = Arc::new(MlpWeights {
            channels: ch,
            hidden,
            w1: values(hidden * ch, 1, 0.2),
            c1: values(hidden, 2, 0.1),
            w2: values(ch * hidden, 3, 0.1),
            b2: values(ch, 4, 0.1),
        });
        let packed: Vec<_> = [Isa::Avx512, Isa::Avx2]
            .map(|isa| PackedMlp::new(isa, w.clone()))
            .into();
        let x = values(ch * hw, 5, 2.0);
        let mut out = vec![0f32; ch * hw];
        // The engine's blocks, and the same cut without aligning them to 16 tokens (their
        // ends then leave a narrow column panel in every block).
        let blocks = w.blocks(hw, 1, 16);
        let unaligned = w.blocks(hw, 1, 1);
        let stats = (0.01f32, 1.7f32);
        let macs = (2 * ch * hidden * hw) as f64;
        let mut variants = vec![("gemm crate", Isa::best())];
        for isa in [Isa::Avx512, Isa::Avx2] {
            if isa.is_supported() {
                variants.push(("packed", isa));
                variants.push(("unaligned", isa));
            }
        }
        let mut best = vec![f64::INFINITY; variants.len()];
        let mut scratch = Scratch::default();
        for _ in 0..15 {
            for (vi, &(kind, isa)) in variants.iter().enumerate() {
                let cut = if kind == "unaligned" {
                    &unaligned
                } else {
                    &blocks
                };
                let t = min_time(1, 5, || {
                    for &cols in cut {
                        // SAFETY: x and out are ch × hw.
                        unsafe {
                            if kind != "gemm crate" {
                                let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
                                let p = packed.iter().find(|p| p.isa() == isa).unwrap();
                                run_block_packed(
                                    p,
                                    xp,
                                    op,
                                    hw,
                                    cols,
                                    stats,
                                    &mut scratch,
                                    1,
                                    &sequential,
                                );
                            } else {
                                let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
                                let none = gemm::Parallelism::None;
                                run_block(isa, &w, xp, op, hw, cols, stats, &mut scratch, none)
                                    .unwrap();
                            }
                        }
                    }
                });
                best[vi] = best[vi].min(t);
            }
        }
        for (vi, &(kind, isa)) in variants.iter().enumerate() {
            println!(
                "stage {stage} {ch}→{hidden}→{ch} × {hw} tokens  {kind:10} {:7} {:7.3} ms {:6.1} GMAC/s",
                isa.name(),
                best[vi] * 1e3,
                macs / best[vi] / 1e9
            );
        }
    }
}
