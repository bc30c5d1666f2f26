//! The fused channel MLP on PoolFormer-S12's four stage shapes, one thread: the `gemm`
//! crate path ([`run_block`]) against the packed kernels ([`run_block_packed`]) on each
//! instruction set this CPU runs. Throughput is in multiply-adds (2·C·4C per token),
//! so criterion's `elem/s` reads as MAC/s.
//!
//! `cargo bench --bench mlp` (`-- stage3` for one shape).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use poolformer_edge::kernels::mlp::{
    run_block, run_block_packed, sequential, MlpWeights, PackedMlp, Scratch,
};
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

fn stages(c: &mut Criterion) {
    // (stage, channels, side) of PoolFormer-S12 at 224×224; hidden = 4·channels.
    for &(stage, ch, side) in &[(1, 64, 56), (2, 128, 28), (3, 320, 14), (4, 512, 7)] {
        let (hidden, hw) = (4 * ch, side * side);
        let w = Arc::new(MlpWeights {
            channels: ch,
            hidden,
            w1: values(hidden * ch, 1, 0.2),
            c1: values(hidden, 2, 0.1),
            w2: values(ch * hidden, 3, 0.1),
            b2: values(ch, 4, 0.1),
        });
        let packed = PackedMlp::new(w.clone());
        let x = values(ch * hw, 5, 2.0);
        let mut out = vec![0f32; ch * hw];
        let blocks = w.blocks(hw, 1);
        let stats = (0.01f32, 1.7f32);
        let mut group = c.benchmark_group(format!("mlp/stage{stage}_{ch}x{hidden}x{hw}"));
        group.throughput(Throughput::Elements((2 * ch * hidden * hw) as u64));
        group.sample_size(20);
        group.warm_up_time(std::time::Duration::from_millis(500));
        group.measurement_time(std::time::Duration::from_secs(2));
        for isa in Isa::available() {
            let mut scratch = Scratch::default();
            group.bench_function(BenchmarkId::new("gemm-crate", isa.name()), |b| {
                b.iter(|| {
                    for &cols in &blocks {
                        unsafe {
                            run_block(
                                isa,
                                &w,
                                x.as_ptr(),
                                out.as_mut_ptr(),
                                hw,
                                cols,
                                stats,
                                &mut scratch,
                                gemm::Parallelism::None,
                            )
                            .unwrap()
                        }
                    }
                })
            });
            if PackedMlp::preferred(isa) {
                group.bench_function(BenchmarkId::new("packed", isa.name()), |b| {
                    b.iter(|| {
                        for &cols in &blocks {
                            unsafe {
                                run_block_packed(
                                    isa,
                                    &packed,
                                    x.as_ptr(),
                                    out.as_mut_ptr(),
                                    hw,
                                    cols,
                                    stats,
                                    &mut scratch,
                                    1,
                                    &sequential,
                                )
                            }
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
