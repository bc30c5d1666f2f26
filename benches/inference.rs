//! End-to-end PoolFormer-S12 latency (synthetic weights, fp32, 224×224) per thread count.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use poolformer_edge::models::{cache, ArchConfig};
use poolformer_edge::{Engine, Options};
use tract_onnx::prelude::Tensor;

fn s12(c: &mut Criterion) {
    let arch = ArchConfig::by_name("poolformer_s12").unwrap();
    let model = cache::synthetic_model(&arch, 0).unwrap();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut group = c.benchmark_group("poolformer_s12/fp32");
    group.sample_size(20);
    for threads in [1, cores]
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
    {
        let engine = Engine::from_path(
            &model,
            Options {
                threads,
                input_size: 224,
                ..Options::default()
            },
        )
        .unwrap();
        let input = Tensor::zero::<f32>(&engine.input_shape()).unwrap();
        group.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, _| {
            b.iter(|| engine.run(input.clone()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, s12);
criterion_main!(benches);
