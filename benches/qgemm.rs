//! The u8 × i8 → i32 matrix product of the int8 MLP on its PoolFormer shapes, one
//! thread, every kernel this CPU runs side by side, with the f32 product of the same
//! shape (the `gemm` crate, as src/kernels/mlp.rs calls it, one thread) for scale.
//! Throughput is in multiply-adds: criterion's "Gelem/s" is GMAC/s.
//!
//!   cargo bench --bench qgemm                 # all shapes
//!   cargo bench --bench qgemm -- 1280x320     # one shape

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use poolformer_edge::kernels::qgemm::{gemm_u8i8_with, k4_len, PackedI8, QKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// (rows m, depth k, tokens): the fc1/fc2 products of the four stages at 224×224.
const SHAPES: [(usize, usize, usize); 6] = [
    (256, 64, 1024),
    (64, 256, 1024),
    (1280, 320, 196),
    (320, 1280, 196),
    (2048, 512, 49),
    (512, 2048, 49),
];

fn qgemm(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (m, k, cols) in SHAPES {
        // Weights in −32..=31: every quad of channels fits an i16, so both
        // `avx2-maddubs` kernels run their own code (quantized files from `pfe quantize`
        // have such weights), not their fallbacks.
        let w: Vec<i8> = (0..m * k).map(|_| rng.gen::<i8>() >> 2).collect();
        let b: Vec<u8> = (0..k4_len(k, cols)).map(|_| rng.gen()).collect();
        let packed = PackedI8::new(m, k, &w).unwrap();
        let mut acc = vec![0i32; m * cols];
        let mut g = c.benchmark_group(format!("qgemm/{m}x{k}x{cols}"));
        g.throughput(Throughput::Elements((m * k * cols) as u64));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for kernel in QKernel::available() {
            g.bench_function(BenchmarkId::from_parameter(kernel.name()), |bch| {
                bch.iter(|| gemm_u8i8_with(kernel, &packed, 0..m, &b, cols, &mut acc, cols))
            });
        }
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let bf: Vec<f32> = (0..k * cols).map(|i| (i % 251) as f32).collect();
        let mut cf = vec![0f32; m * cols];
        g.bench_function(BenchmarkId::from_parameter("f32-gemm"), |bch| {
            bch.iter(|| {
                // SAFETY: row-major m×k, k×cols and m×cols buffers of those sizes.
                unsafe {
                    gemm::gemm(
                        m,
                        cols,
                        k,
                        cf.as_mut_ptr(),
                        1,
                        cols as isize,
                        false,
                        wf.as_ptr(),
                        1,
                        k as isize,
                        bf.as_ptr(),
                        1,
                        cols as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, qgemm);
criterion_main!(benches);
