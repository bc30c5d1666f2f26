//! Deterministic synthetic weights with timm's names, shapes and realistic magnitudes.
//!
//! They stand in for a trained checkpoint wherever only the graph and the value ranges
//! matter: exporter and engine tests, benchmarks, quantizer calibration dry runs.
//!
//! Same seed, same bits, on every platform: tensors are drawn in the order of
//! [`ArchConfig::parameter_shapes`] from a ChaCha8 stream (whose output is specified
//! word by word), and normal variates come from the polar method with our own
//! logarithm, built from IEEE-exact operations only. rand_distr's normal sampler calls
//! the platform's `exp`/`ln`, whose last bit differs between libms.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::weights::Param;
use super::{ArchConfig, Weights};

/// Std of conv and linear weights, as timm's `trunc_normal_(std=.02)`.
const WEIGHT_STD: f64 = 0.02;
/// Conv and linear weights are cut at this many standard deviations.
const WEIGHT_TRUNCATION: f64 = 2.0;
/// Trained PoolFormer layer scales start at 1e-5 and end up in roughly this range.
const LAYER_SCALE_RANGE: (f64, f64) = (0.05, 0.6);
/// Spread of norm weights around 1.
const NORM_WEIGHT_STD: f64 = 0.2;
/// Spread of every bias around 0.
const BIAS_STD: f64 = 0.05;

/// Synthetic weights for `arch`, identical for identical `seed` on every platform.
///
/// Conv and linear weights: normal(0, 0.02) truncated at ±2 std; layer scales (shape
/// `[C]`, as timm stores them): uniform in [0.05, 0.6); norm weights: 1 + 0.2·N(0, 1);
/// biases: 0.05·N(0, 1).
pub fn synthesize(arch: &ArchConfig, seed: u64) -> Result<Weights> {
    arch.validate()?;
    let mut source = RandomSource::new(seed);
    let mut weights = Weights::default();
    for (name, shape) in arch.parameter_shapes() {
        let init = Init::for_key(&name)
            .with_context(|| format!("synthesizing weights for {}", arch.name))?;
        let len = shape.iter().product::<usize>();
        let data = (0..len).map(|_| init.draw(&mut source) as f32).collect();
        weights.insert(name, Param::new(shape, data)?);
    }
    Ok(weights)
}

/// How one tensor is initialized.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    TruncatedNormal { std: f64, bound: f64 },
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, std: f64 },
}

impl Init {
    /// The initializer of a timm state-dict key; unknown keys are an error so that a new
    /// kind of parameter in [`ArchConfig::parameter_shapes`] is not silently drawn wrong.
    fn for_key(name: &str) -> Result<Init> {
        let init = if name.contains(".layer_scale") {
            Init::Uniform {
                low: LAYER_SCALE_RANGE.0,
                high: LAYER_SCALE_RANGE.1,
            }
        } else if name.ends_with(".bias") {
            Init::Normal {
                mean: 0.0,
                std: BIAS_STD,
            }
        } else if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name == "head.norm.weight"
        {
            Init::Normal {
                mean: 1.0,
                std: NORM_WEIGHT_STD,
            }
        } else if name.ends_with("conv.weight")
            || name.ends_with("fc1.weight")
            || name.ends_with("fc2.weight")
            || name == "head.fc.weight"
        {
            Init::TruncatedNormal {
                std: WEIGHT_STD,
                bound: WEIGHT_TRUNCATION * WEIGHT_STD,
            }
        } else {
            bail!("no synthetic initializer for tensor {name:?}")
        };
        Ok(init)
    }

    fn draw(self, source: &mut RandomSource) -> f64 {
        match self {
            Init::TruncatedNormal { std, bound } => loop {
                // Rejection keeps the exact truncated shape; it discards ~4.6% of draws at ±2 std.
                let x = std * source.standard_normal();
                if x.abs() <= bound {
                    return x;
                }
            },
            Init::Uniform { low, high } => low + (high - low) * source.unit(),
            Init::Normal { mean, std } => mean + std * source.standard_normal(),
        }
    }
}

/// Uniform and normal variates from one seeded ChaCha8 stream.
struct RandomSource {
    rng: ChaCha8Rng,
    /// The polar method yields normals in pairs; the second one waits here.
    spare_normal: Option<f64>,
}

impl RandomSource {
    fn new(seed: u64) -> RandomSource {
        RandomSource {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare_normal: None,
        }
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn unit(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }

    /// N(0, 1) by Marsaglia's polar method.
    fn standard_normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.unit() - 1.0;
            let v = 2.0 * self.unit() - 1.0;
            let s = u * u + v * v;
            // Outside the unit disc, or too small for portable_ln (no subnormal path).
            if !(f64::MIN_POSITIVE..1.0).contains(&s) {
                continue;
            }
            let factor = (-2.0 * portable_ln(s) / s).sqrt();
            self.spare_normal = Some(v * factor);
            return u * factor;
        }
    }
}

/// Natural logarithm of a positive normal f64 from +, −, ×, ÷ only (IEEE-exact on
/// every platform, unlike libm's `ln`); within a few ulps of `f64::ln`.
fn portable_ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0, "portable_ln({x})");
    const MANTISSA_BITS: u64 = (1 << 52) - 1;
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut mantissa = f64::from_bits((bits & MANTISSA_BITS) | (1023 << 52));
    // Centering the mantissa on 1 keeps |t| ≤ 0.172 so the series converges fast.
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2·atanh(t) = 2·(t + t³/3 + t⁵/5 + …) with t = (m − 1)/(m + 1);
    // 13 terms bring the truncation error below 1e-21.
    let t = (mantissa - 1.0) / (mantissa + 1.0);
    let t2 = t * t;
    let mut series = 0.0;
    for k in (0..13).rev() {
        series = series * t2 + 1.0 / (2 * k + 1) as f64;
    }
    2.0 * t * series + exponent as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ArchConfig {
        ArchConfig::custom("tiny", &[1, 1, 2, 1], &[8, 16, 24, 32], 10).unwrap()
    }

    fn mean_std(values: &[f32]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let arch = tiny();
        let a = synthesize(&arch, 7).unwrap();
        assert_eq!(a, synthesize(&arch, 7).unwrap());
        let b = synthesize(&arch, 8).unwrap();
        for (name, param) in &a.params {
            assert_ne!(param.data, b.params[name].data, "{name} ignores the seed");
        }
    }

    /// Pins the stream: a change here changes every synthetic model (and every golden
    /// output computed from one), so it must be deliberate.
    #[test]
    fn first_values_are_pinned() {
        let w = synthesize(&tiny(), 0).unwrap();
        let pinned: [(&str, [u32; 3]); 2] = [
            // 0.036585834, -0.0059633134, 0.003085759
            ("stem.conv.weight", [1024842503, 3150145510, 994720370]),
            // 0.011612541, 0.005484874, -0.022744946
            ("head.fc.bias", [1010713223, 1001634421, 3166327708]),
        ];
        for (name, bits) in pinned {
            let first = &w.params[name].data[..3];
            let first_bits: Vec<u32> = first.iter().map(|v| v.to_bits()).collect();
            assert_eq!(first_bits, bits, "{name} starts with {first:?}");
        }
    }

    #[test]
    fn synthetic_weights_pass_validation() {
        for arch in [tiny(), ArchConfig::by_name("poolformer_s12").unwrap()] {
            let w = synthesize(&arch, 1).unwrap();
            w.validate(&arch).unwrap();
            assert_eq!(w.params.len(), arch.parameter_shapes().len());
            for (name, shape) in arch.parameter_shapes() {
                assert_eq!(w.params[&name].shape, shape, "{name}");
            }
        }
    }

    #[test]
    fn magnitudes_are_realistic() {
        let arch = ArchConfig::by_name("poolformer_s12").unwrap();
        let w = synthesize(&arch, 3).unwrap();

        // 409,600 values: sampling error of the std is ~0.1%.
        let fc1 = &w.params["stages.2.blocks.0.mlp.fc1.weight"].data;
        let (mean, std) = mean_std(fc1);
        // Normal truncated at ±2σ keeps std · sqrt(1 − 4φ(2)/(2Φ(2) − 1)) = 0.8796 std.
        let expected_std = 0.02 * 0.8796;
        assert!(
            (std / expected_std - 1.0).abs() < 0.01,
            "fc1 std {std}, expected {expected_std}"
        );
        assert!(mean.abs() < 2e-4, "fc1 mean {mean}");
        let max = fc1.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= 0.04 && max > 0.039, "fc1 max |w| {max}");

        let mut scales = vec![];
        let mut norm_weights = vec![];
        let mut biases = vec![];
        for (name, p) in &w.params {
            if name.contains("layer_scale") {
                assert_eq!(p.shape.len(), 1, "{name} is not [C]");
                scales.extend_from_slice(&p.data);
            } else if name.contains("norm") && name.ends_with(".weight") {
                norm_weights.extend_from_slice(&p.data);
            } else if name.ends_with(".bias") {
                biases.extend_from_slice(&p.data);
            }
        }
        assert!(
            scales.iter().all(|s| (0.05..0.6).contains(s)),
            "layer scale out of range"
        );
        let (scale_mean, _) = mean_std(&scales);
        assert!(
            (scale_mean - 0.325).abs() < 0.01,
            "layer scale mean {scale_mean}"
        );
        let (norm_mean, norm_std) = mean_std(&norm_weights);
        assert!(
            (norm_mean - 1.0).abs() < 0.01 && (norm_std - 0.2).abs() < 0.01,
            "norm weights {norm_mean} ± {norm_std}"
        );
        let (bias_mean, bias_std) = mean_std(&biases);
        assert!(
            bias_mean.abs() < 0.002 && (bias_std - 0.05).abs() < 0.002,
            "biases {bias_mean} ± {bias_std}"
        );
    }

    #[test]
    fn portable_ln_matches_std() {
        let mut x = f64::MIN_POSITIVE;
        while x < 1e300 {
            // Mantissas on both sides of the √2 split and near the ends of [1, 2).
            let sqrt2 = std::f64::consts::SQRT_2;
            for m in [1.0, 1.1, sqrt2 - 1e-9, sqrt2 + 1e-9, 1.9, 1.999_999] {
                let v = x * m;
                let err = (portable_ln(v) - v.ln()).abs();
                assert!(
                    err <= 4.0 * f64::EPSILON * v.ln().abs().max(1.0),
                    "ln({v}): {err}"
                );
            }
            x *= 3.7;
        }
        assert_eq!(portable_ln(1.0), 0.0);
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Init::for_key("stages.0.blocks.0.mystery").unwrap_err();
        assert!(err.to_string().contains("mystery"), "{err}");
    }
}
