//! PoolFormer-S12 (or any model file) at 1 thread, timed in thread CPU time: the
//! smallest, first-quartile and median of N runs (zero input, after 3 warm-up runs).
//! On a machine shared with other jobs this is steadier than `pfe bench`'s wall time;
//! to compare two builds, build this example in both and alternate them.
//!
//! `cargo run --release --example engine_cpu -- MODEL.onnx [N]`

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::cpu_now;
use poolformer_edge::{Engine, Options};
use tract_onnx::prelude::Tensor;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let iters: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(30);
    let engine = Engine::from_path(
        &path,
        Options {
            threads: 1,
            input_size: 224,
            ..Options::default()
        },
    )
    .unwrap();
    let input = Tensor::zero::<f32>(&engine.input_shape()).unwrap();
    for _ in 0..3 {
        engine.run(input.clone()).unwrap();
    }
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let a = cpu_now();
            engine.run(input.clone()).unwrap();
            (cpu_now() - a) * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "thread CPU ms per inference: min {:.2} p25 {:.2} median {:.2}",
        t[0],
        t[iters / 4],
        t[iters / 2]
    );
}
