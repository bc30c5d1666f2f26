//! Accuracy of one model's logits against another's (a quantized model against its
//! fp32 original) on the same inputs.
//!
//! - SQNR (dB) = 10·log10(Σ a² / Σ (a − b)²), sums over every logit of every input;
//!   +∞ when the logits are identical.
//! - top-1 agreement: share of inputs where B's top-1 class is A's top-1 class.
//! - top-5 agreement: share of inputs where B's top-1 class is among A's top 5.
//! - max abs diff: the largest |a − b| over all logits.

use std::path::Path;

use anyhow::{ensure, Result};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::quantize::InputSet;
use crate::{Engine, Options};

/// Running sums of a comparison; feed it pairs of logit vectors.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    signal: f64,
    noise: f64,
    max_abs_diff: f64,
    top1: usize,
    top5: usize,
    count: usize,
}

/// The result of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub inputs: usize,
    /// +∞ (JSON: null) when B's logits equal A's.
    pub sqnr_db: f64,
    pub top1_agreement: f64,
    pub top5_agreement: f64,
    pub max_abs_diff: f64,
}

/// Index of the largest value (the first one on ties).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values.
fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[j].total_cmp(&v[i]).then(i.cmp(&j)));
    idx.truncate(k);
    idx
}

impl Accumulator {
    pub fn new() -> Accumulator {
        Accumulator::default()
    }

    /// Adds one input's logits: `a` the reference's, `b` the compared model's.
    pub fn add(&mut self, a: &[f32], b: &[f32]) -> Result<()> {
        ensure!(
            a.len() == b.len() && !a.is_empty(),
            "the models give {} and {} logits",
            a.len(),
            b.len()
        );
        ensure!(
            a.iter().chain(b).all(|v| v.is_finite()),
            "non-finite logits"
        );
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            self.signal += x * x;
            self.noise += (x - y) * (x - y);
            self.max_abs_diff = self.max_abs_diff.max((x - y).abs());
        }
        let b_top = argmax(b);
        self.top1 += (argmax(a) == b_top) as usize;
        self.top5 += top_k(a, 5).contains(&b_top) as usize;
        self.count += 1;
        Ok(())
    }

    pub fn finish(&self) -> Comparison {
        let n = self.count.max(1) as f64;
        Comparison {
            inputs: self.count,
            sqnr_db: 10.0 * (self.signal / self.noise).log10(),
            top1_agreement: self.top1 as f64 / n,
            top5_agreement: self.top5 as f64 / n,
            max_abs_diff: self.max_abs_diff,
        }
    }
}

/// Runs the models `a` and `b` on every input of `inputs` and compares B against A.
pub fn compare_models(
    a: &Engine,
    b: &Engine,
    inputs: &InputSet,
    progress: &ProgressBar,
) -> Result<Comparison> {
    ensure!(
        a.input_shape() == b.input_shape(),
        "the models take different inputs ({:?} and {:?})",
        a.input_shape(),
        b.input_shape()
    );
    ensure!(
        a.num_classes() == b.num_classes(),
        "the models have {} and {} classes",
        a.num_classes(),
        b.num_classes()
    );
    let size = a.input_shape()[2];
    let mut acc = Accumulator::new();
    progress.set_length(inputs.len() as u64);
    for input in inputs.tensors(size) {
        let input = input?;
        let la = a.run_array(input.clone())?;
        let lb = b.run_array(input)?;
        acc.add(&la, &lb)?;
        progress.inc(1);
    }
    progress.finish();
    Ok(acc.finish())
}

/// [`compare_models`] on two ONNX files.
pub fn compare_files(
    a: impl AsRef<Path>,
    b: impl AsRef<Path>,
    inputs: &InputSet,
    options: Options,
    progress: &ProgressBar,
) -> Result<Comparison> {
    let a = Engine::from_path(a, options.clone())?;
    let b = Engine::from_path(b, options)?;
    compare_models(&a, &b, inputs, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_helpers() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.9], 2), [3, 1]);
        assert_eq!(top_k(&[0.1, 0.5], 5), [1, 0]);
    }
}
