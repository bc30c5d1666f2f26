//! A/B of the int8 matrix kernels this CPU runs (the portable one excepted) on the
//! products the int8 channel MLP makes at 224×224: its column blocks of tokens
//! (`QuantChannelMlp` cuts each stage's tokens into blocks of about 65 536 / hidden,
//! at least 64, boundaries on multiples of 16 tokens), so about 261, 130, 65 and 49
//! tokens for the four stages, with the odd counts the last blocks get. One thread,
//! kernels alternating in one process, every result checked against the portable
//! kernel; each figure is the smallest of 15 rounds in thread CPU time, so that time
//! slices lost to other jobs on a shared machine do not count. Stage 3 also runs at
//! 64 tokens beside 65: the difference is what the one-token tail tile costs.
//!
//! `cargo run --release --example qk_ab`

#[path = "common/cpu_time.rs"]
mod cpu_time;
use cpu_time::cpu_now;
use poolformer_edge::kernels::qgemm::{gemm_u8i8_with, k4_len, PackedI8, QKernel};

fn main() {
    let shapes = [
        (256, 64, 261),
        (64, 256, 261),
        (512, 128, 130),
        (128, 512, 130),
        (1280, 320, 65),
        (320, 1280, 65),
        (1280, 320, 64),
        (2048, 512, 49),
        (512, 2048, 49),
        (512, 2048, 48),
        (1280, 320, 196),
        (320, 1280, 196),
        (512, 2880, 49),
    ];
    let mut s = 0x9e37_79b9u32;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let kernels: Vec<QKernel> = QKernel::available()
        .into_iter()
        .filter(|k| *k != QKernel::Portable)
        .collect();
    for (m, k, cols) in shapes {
        // Weights in −32..=31, so that every quad of channels fits an i16 and the
        // `avx2-maddubs` kernels run their own code (not their fallbacks).
        let w: Vec<i8> = (0..m * k).map(|_| (next() as i8) >> 2).collect();
        let b: Vec<u8> = (0..k4_len(k, cols)).map(|_| next() as u8).collect();
        let packed = PackedI8::new(m, k, &w).unwrap();
        let mut want = vec![0i32; m * cols];
        gemm_u8i8_with(QKernel::Portable, &packed, 0..m, &b, cols, &mut want, cols);
        let mut best = vec![f64::MAX; kernels.len()];
        let mut acc = vec![0i32; m * cols];
        for _ in 0..15 {
            for (i, &kernel) in kernels.iter().enumerate() {
                let t = cpu_now();
                gemm_u8i8_with(kernel, &packed, 0..m, &b, cols, &mut acc, cols);
                best[i] = best[i].min(cpu_now() - t);
                assert!(
                    acc == want,
                    "{} differs from the portable kernel",
                    kernel.name()
                );
            }
        }
        let macs = (m * k * cols) as f64;
        print!("{m:>5}×{k:<5}×{cols:<5}");
        for (i, kernel) in kernels.iter().enumerate() {
            print!(
                "  {} {:7.0} µs {:5.1} GMAC/s",
                kernel.name(),
                best[i] * 1e6,
                macs / best[i] / 1e9
            );
        }
        println!();
    }
}
