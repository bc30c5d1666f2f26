//! Helpers shared by the integration tests: the f64 reference forward pass,
//! deterministic test images, a minimal `.npy` writer and ONNX protobuf pieces.

// Each tests/*.rs crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod onnx;
pub mod reference;

use std::path::Path;

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

/// Runs `model` on `input` with `threads` threads (tract's single-thread executor for
/// one) and returns its first output.
pub fn run_model(model: &TypedModel, input: &Tensor, threads: usize) -> Tensor {
    let plan = model.clone().into_runnable().unwrap();
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    let out =
        multithread_tract_scope(executor, || plan.run(tvec!(input.clone().into_tvalue()))).unwrap();
    out[0].clone().into_tensor()
}

/// A one-node model: `op` on one source of `fact`.
pub fn one_op_model(op: impl Into<Box<dyn TypedOp>>, fact: TypedFact) -> TypedModel {
    let mut model = TypedModel::default();
    let src = model.add_source("x", fact).unwrap();
    let y = model.wire_node("op", op, &[src]).unwrap();
    model.select_output_outlets(&y).unwrap();
    model
}

/// A deterministic image-like NCHW input of shape `[1, channels, height, width]`:
/// smooth gradients and blobs plus small noise, roughly in [-2, 2] like an
/// ImageNet-normalized photo. Identical for identical arguments on every platform
/// (integer hash noise, no `rand`).
pub fn test_image(channels: usize, height: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(channels * height * width);
    for c in 0..channels {
        let phase = c as f64 * 0.9 + seed as f64 * 0.37;
        for i in 0..height {
            for j in 0..width {
                let y = i as f64 / height as f64;
                let x = j as f64 / width as f64;
                let smooth = 1.1 * (6.0 * x + phase).sin() * (4.0 * y - 0.5 * phase).cos()
                    + 0.6 * (x - 0.5 - 0.1 * c as f64)
                    + 0.4 * (y - 0.5);
                let noise = unit_noise(seed, c, i, j) * 0.35;
                out.push((smooth + noise).clamp(-2.1, 2.6) as f32);
            }
        }
    }
    out
}

/// Hash of (seed, c, i, j) mapped to [-1, 1) (SplitMix64 finalizer).
fn unit_noise(seed: u64, c: usize, i: usize, j: usize) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((c as u64) << 40 ^ (i as u64) << 20 ^ j as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// Largest |a[k] − b[k]|, with the index where it occurs.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> (f64, usize) {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .enumerate()
        .fold((0.0, 0), |best, (k, d)| {
            if d > best.0 || d.is_nan() {
                (d, k)
            } else {
                best
            }
        })
}

/// Values that `.npy` can hold here: little-endian f32 (`<f4`) or f64 (`<f8`).
pub trait NpyElement: Copy {
    const DESCR: &'static str;
    fn le_bytes(self) -> Vec<u8>;
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl NpyElement for f64 {
    const DESCR: &'static str = "<f8";
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

/// Writes a C-order `.npy` (format 1.0): magic, header length, a Python dict
/// literal padded with spaces so data starts at a multiple of 64, then raw data.
pub fn write_npy<T: NpyElement>(path: &Path, shape: &[usize], data: &[T]) -> std::io::Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy shape vs data"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        T::DESCR
    );
    // 10 bytes of preamble + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for &v in data {
        bytes.extend(v.le_bytes());
    }
    std::fs::write(path, bytes)
}
