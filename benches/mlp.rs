//! The fused channel MLP on PoolFormer-S12's four stage shapes, one thread: the `gemm`
//! crate path ([`run_block`]) against the packed kernels ([`run_block_packed`]) on each
//! instruction set this CPU runs (the engine uses them where `sgemm::preferred`).
//! Throughput is in multiply-adds (2·C·4C per token), so criterion's `elem/s` reads as
//! MAC/s.
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall
//! time: on a machine shared with other jobs, time slices lost to them do not count
//! (their effect on shared caches still does).
//!
//! The block's element-wise halves on the same shapes: the token mixer over every
//! channel plane, and the one-pass norm statistics; throughput in elements.
//!
//! `cargo bench --bench mlp` (`-- stage3` for one shape, `-- mixer` for the mixer and
//! statistics only).

use std::sync::Arc;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use poolformer_edge::kernels::mlp::{
    run_block, run_block_packed, sequential, MlpWeights, PackedMlp, Scratch,
};
use poolformer_edge::kernels::{mixer, norm, Isa};

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

/// Thread CPU time, in nanoseconds.
struct ThreadCpu;

fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

impl Measurement for ThreadCpu {
    type Intermediate = f64;
    type Value = f64;
    fn start(&self) -> f64 {
        thread_cpu_ns()
    }
    fn end(&self, start: f64) -> f64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &f64, b: &f64) -> f64 {
        a + b
    }
    fn zero(&self) -> f64 {
        0.0
    }
    fn to_f64(&self, v: &f64) -> f64 {
        *v
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (div, unit) = if typical >= 1e6 {
            (1e6, "ms cpu")
        } else if typical >= 1e3 {
            (1e3, "µs cpu")
        } else {
            (1.0, "ns cpu")
        };
        values.iter_mut().for_each(|v| *v /= div);
        unit
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let n = match *t {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) | Throughput::Elements(n) => n,
        };
        // Per CPU second, in units of 10⁹.
        values.iter_mut().for_each(|v| *v = n as f64 / *v);
        "G/s (cpu)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn stages(c: &mut Criterion<ThreadCpu>) {
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
        let x = values(ch * hw, 5, 2.0);
        let mut out = vec![0f32; ch * hw];
        let blocks = w.blocks(hw, 1, 16);
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
            if isa != Isa::Portable {
                let packed = PackedMlp::new(isa, w.clone());
                group.bench_function(BenchmarkId::new("packed", isa.name()), |b| {
                    b.iter(|| {
                        for &cols in &blocks {
                            unsafe {
                                run_block_packed(
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

fn token_mixer(c: &mut Criterion<ThreadCpu>) {
    for &(stage, ch, side) in &[(1, 64, 56), (2, 128, 28), (3, 320, 14), (4, 512, 7)] {
        let plane = side * side;
        let x = values(ch * plane, 6, 2.0);
        let mut out = vec![0f32; ch * plane];
        let taps = mixer::PoolTaps::new(side, side);
        let mut sums = vec![0f32; taps.scratch_len()];
        let mut group = c.benchmark_group(format!("mixer/stage{stage}_{ch}x{side}x{side}"));
        group.throughput(Throughput::Elements((ch * plane) as u64));
        group.sample_size(20);
        group.warm_up_time(std::time::Duration::from_millis(300));
        group.measurement_time(std::time::Duration::from_secs(1));
        for isa in Isa::available() {
            group.bench_function(BenchmarkId::new("mix", isa.name()), |b| {
                b.iter(|| {
                    for (xp, o) in x.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
                        mixer::mix_plane(isa, xp, o, &taps, 0.3, &mut sums);
                    }
                })
            });
            group.bench_function(BenchmarkId::new("norm-stats", isa.name()), |b| {
                b.iter(|| norm::mean_rstd(isa, &x, 1e-5))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = stages, token_mixer
}
criterion_main!(benches);
