//! The project's independent oracle: a plain PoolFormer forward pass in f64 loops.
//!
//! Written from the paper's equations and timm's `timm/models/metaformer.py`
//! (`poolformer_s12` and siblings), sharing no code with the exporter or tract.
//! Slow on purpose; only tests use it. Every tensor is one image, `[C, H, W]`
//! row-major.
//!
//! ```text
//! x   = Conv7x7/4 pad 2 (image)                                   stem
//! per stage i:  x = Conv3x3/2 pad 1 (x)   if i > 0                downsampling
//! per block:    x = x + ls1 ⊙ (AvgPool3x3(n1) − n1),  n1 = GroupNorm1(x; norm1)
//!               x = x + ls2 ⊙ fc2(GELU(fc1(GroupNorm1(x; norm2))))
//! logits = fc(LayerNorm(mean_hw(x); head.norm))                  head
//! ```

use poolformer_edge::models::{ArchConfig, Weights};

/// One image's activations, `[channels, height, width]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn zeros(channels: usize, height: usize, width: usize) -> Tensor {
        Tensor {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    pub fn from_f32(channels: usize, height: usize, width: usize, data: &[f32]) -> Tensor {
        assert_eq!(data.len(), channels * height * width, "tensor data length");
        Tensor {
            channels,
            height,
            width,
            data: data.iter().map(|&v| v as f64).collect(),
        }
    }

    fn plane(&self) -> usize {
        self.height * self.width
    }

    fn channel(&self, c: usize) -> &[f64] {
        &self.data[c * self.plane()..(c + 1) * self.plane()]
    }
}

/// PoolFormer logits for one NCHW image (`input.len() == in_chans * height * width`).
///
/// Panics with the tensor's name when `weights` lack a tensor or a shape is off:
/// a test oracle has no recovery path.
pub fn forward(
    arch: &ArchConfig,
    weights: &Weights,
    input: &[f32],
    height: usize,
    width: usize,
) -> Vec<f64> {
    let param = |name: &str| -> Vec<f64> {
        let p = weights
            .get(name)
            .unwrap_or_else(|e| panic!("reference forward: {e}"));
        p.data.iter().map(|&v| v as f64).collect()
    };
    let conv = |x: &Tensor, prefix: &str, stride: usize, pad: usize| -> Tensor {
        let w = weights
            .get(&format!("{prefix}.weight"))
            .unwrap_or_else(|e| panic!("reference forward: {e}"));
        assert_eq!(
            w.shape.len(),
            4,
            "{prefix}.weight is not a conv kernel: {:?}",
            w.shape
        );
        let kernel = ConvKernel {
            out_channels: w.shape[0],
            in_channels: w.shape[1],
            size: w.shape[2],
            weight: w.data.iter().map(|&v| v as f64).collect(),
            bias: param(&format!("{prefix}.bias")),
        };
        assert_eq!(
            w.shape[2], w.shape[3],
            "{prefix}.weight is not square: {:?}",
            w.shape
        );
        conv2d(x, &kernel, stride, pad)
    };

    let mut x = Tensor::from_f32(arch.in_chans, height, width, input);
    x = conv(&x, "stem.conv", 4, 2);
    for (i, &depth) in arch.layers.iter().enumerate() {
        // timm's MetaFormerStage downsamples only where the width changes.
        if i > 0 && arch.dims[i] != arch.dims[i - 1] {
            x = conv(&x, &format!("stages.{i}.downsample.conv"), 2, 1);
        }
        for j in 0..depth {
            let p = format!("stages.{i}.blocks.{j}");
            let eps = ArchConfig::GROUPNORM_EPS as f64;

            // Token mixer branch: x + ls1 ⊙ (AvgPool(n) − n), n = GroupNorm(x).
            let n = group_norm(
                &x,
                &param(&format!("{p}.norm1.weight")),
                &param(&format!("{p}.norm1.bias")),
                eps,
            );
            let mixed = pooling_mixer(&n);
            add_scaled(&mut x, &param(&format!("{p}.layer_scale1.scale")), &mixed);

            // Channel MLP branch: x + ls2 ⊙ fc2(GELU(fc1(GroupNorm(x)))).
            let n = group_norm(
                &x,
                &param(&format!("{p}.norm2.weight")),
                &param(&format!("{p}.norm2.bias")),
                eps,
            );
            let mut hidden = conv(&n, &format!("{p}.mlp.fc1"), 1, 0);
            hidden.data.iter_mut().for_each(|v| *v = gelu(*v));
            let out = conv(&hidden, &format!("{p}.mlp.fc2"), 1, 0);
            add_scaled(&mut x, &param(&format!("{p}.layer_scale2.scale")), &out);
        }
    }

    let pooled = global_average_pool(&x);
    let normed = layer_norm(
        &pooled,
        &param("head.norm.weight"),
        &param("head.norm.bias"),
        ArchConfig::HEAD_LAYERNORM_EPS as f64,
    );
    linear(&normed, &param("head.fc.weight"), &param("head.fc.bias"))
}

/// A square convolution kernel: `weight` is `[out, in, size, size]` row-major.
pub struct ConvKernel {
    pub out_channels: usize,
    pub in_channels: usize,
    pub size: usize,
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
}

/// y[o, i, j] = b[o] + Σ_c Σ_ky Σ_kx w[o, c, ky, kx] · x[c, i·s + ky − p, j·s + kx − p],
/// taps outside the input reading zero. Output side: ⌊(n + 2p − k) / s⌋ + 1.
///
/// Loops run output channel → input channel → tap → pixels, so the innermost loop
/// is an axpy over one output row (contiguous, vectorizable when s = 1).
pub fn conv2d(x: &Tensor, kernel: &ConvKernel, stride: usize, pad: usize) -> Tensor {
    assert_eq!(x.channels, kernel.in_channels, "conv input channels");
    let k = kernel.size;
    let out_h = (x.height + 2 * pad - k) / stride + 1;
    let out_w = (x.width + 2 * pad - k) / stride + 1;
    let mut y = Tensor::zeros(kernel.out_channels, out_h, out_w);
    let out_plane = out_h * out_w;
    for (o, out) in y.data.chunks_exact_mut(out_plane).enumerate() {
        out.fill(kernel.bias[o]);
        for c in 0..x.channels {
            let input = x.channel(c);
            for ky in 0..k {
                for kx in 0..k {
                    let w = kernel.weight[((o * x.channels + c) * k + ky) * k + kx];
                    // Output columns j whose tap column j·s + kx − p lies in [0, width).
                    let j_lo = (pad.saturating_sub(kx)).div_ceil(stride);
                    let j_hi = ((x.width + pad - kx).div_ceil(stride)).min(out_w);
                    for i in 0..out_h {
                        let Some(row) = (i * stride + ky).checked_sub(pad) else {
                            continue;
                        };
                        if row >= x.height {
                            continue;
                        }
                        let in_row = &input[row * x.width..(row + 1) * x.width];
                        let out_row = &mut out[i * out_w..(i + 1) * out_w];
                        for j in j_lo..j_hi {
                            out_row[j] += w * in_row[j * stride + kx - pad];
                        }
                    }
                }
            }
        }
    }
    y
}

/// GroupNorm with one group: μ, σ² over all of C·H·W (biased variance), then
/// y[c, i, j] = (x[c, i, j] − μ) / √(σ² + ε) · γ[c] + β[c].
pub fn group_norm(x: &Tensor, gamma: &[f64], beta: &[f64], eps: f64) -> Tensor {
    assert_eq!(gamma.len(), x.channels, "group norm weight length");
    assert_eq!(beta.len(), x.channels, "group norm bias length");
    let n = x.data.len() as f64;
    let mean = x.data.iter().sum::<f64>() / n;
    let var = x.data.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    let mut y = x.clone();
    let plane = x.plane();
    for (c, channel) in y.data.chunks_exact_mut(plane).enumerate() {
        for v in channel {
            *v = (*v - mean) * inv_std * gamma[c] + beta[c];
        }
    }
    y
}

/// 3×3 average pool, stride 1, pad 1, count_include_pad = false: each output is the
/// mean of the in-bounds taps only (4 at a corner, 6 on an edge, 9 inside).
pub fn avg_pool3x3(x: &Tensor) -> Tensor {
    let (h, w) = (x.height, x.width);
    let mut y = Tensor::zeros(x.channels, h, w);
    for c in 0..x.channels {
        let input = x.channel(c);
        for i in 0..h {
            for j in 0..w {
                let rows = i.saturating_sub(1)..(i + 2).min(h);
                let cols = j.saturating_sub(1)..(j + 2).min(w);
                let count = (rows.len() * cols.len()) as f64;
                let sum: f64 = rows
                    .flat_map(|r| cols.clone().map(move |s| input[r * w + s]))
                    .sum();
                y.data[(c * h + i) * w + j] = sum / count;
            }
        }
    }
    y
}

/// PoolFormer's token mixer: AvgPool(n) − n (the block adds n back through the residual).
pub fn pooling_mixer(n: &Tensor) -> Tensor {
    let mut y = avg_pool3x3(n);
    y.data.iter_mut().zip(&n.data).for_each(|(p, v)| *p -= v);
    y
}

/// Residual with layer scale: x[c, i, j] += s[c] · branch[c, i, j]. `s` may have been
/// stored as `[C]` (timm) or `[C, 1, 1]`: both flatten to C values.
pub fn add_scaled(x: &mut Tensor, scale: &[f64], branch: &Tensor) {
    assert_eq!(scale.len(), x.channels, "layer scale length");
    assert_eq!(branch.data.len(), x.data.len(), "residual branch shape");
    let plane = x.plane();
    for (c, (xs, bs)) in x
        .data
        .chunks_exact_mut(plane)
        .zip(branch.data.chunks_exact(plane))
        .enumerate()
    {
        xs.iter_mut().zip(bs).for_each(|(v, b)| *v += scale[c] * b);
    }
}

/// Exact GELU: GELU(x) = x · Φ(x) = ½ · x · (1 + erf(x / √2)).
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf(x) = 2/√π · e^(−x²) · Σ_{n≥0} 2ⁿ x^(2n+1) / (1·3·5···(2n+1))
/// (Abramowitz & Stegun 7.1.6). Every term is positive, so the sum has no
/// cancellation: relative error stays within a few ulps times the term count.
/// Beyond |x| = 6, 1 − |erf(x)| < 2.2e-17 and the result is ±1 to f64 precision.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a >= 6.0 {
        return x.signum();
    }
    let x2 = a * a;
    let mut term = a;
    let mut sum = a;
    let mut n = 0.0;
    // Term ratio is 2x²/(2n+3): terms grow until n ≈ x², then fall geometrically.
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    let value = 2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum;
    value.min(1.0).copysign(x)
}

/// Global average pool: g[c] = 1/(H·W) · Σ_{i,j} x[c, i, j].
pub fn global_average_pool(x: &Tensor) -> Vec<f64> {
    let plane = x.plane();
    x.data
        .chunks_exact(plane)
        .map(|ch| ch.iter().sum::<f64>() / plane as f64)
        .collect()
}

/// LayerNorm over a vector: μ, σ² (biased) over its C values,
/// y[c] = (v[c] − μ) / √(σ² + ε) · γ[c] + β[c].
pub fn layer_norm(v: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    assert_eq!(gamma.len(), v.len(), "layer norm weight length");
    assert_eq!(beta.len(), v.len(), "layer norm bias length");
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let inv_std = 1.0 / (var + eps).sqrt();
    v.iter()
        .enumerate()
        .map(|(c, x)| (x - mean) * inv_std * gamma[c] + beta[c])
        .collect()
}

/// Linear layer: y[k] = b[k] + Σ_f W[k, f] · v[f], W stored `[classes, features]`.
pub fn linear(v: &[f64], weight: &[f64], bias: &[f64]) -> Vec<f64> {
    assert_eq!(weight.len(), bias.len() * v.len(), "linear weight shape");
    weight
        .chunks_exact(v.len())
        .zip(bias)
        .map(|(row, b)| b + row.iter().zip(v).map(|(w, x)| w * x).sum::<f64>())
        .collect()
}

#[cfg(test)]
mod tests {
    //! Hand-computed checks of each primitive, so a wrong oracle fails on its own
    //! and not only by disagreeing with the engine.
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn erf_matches_known_values() {
        // Values from mpmath at 30 digits.
        let known = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (0.1, 0.112_462_916_018_284_9),
            (3.0, 0.999_977_909_503_001_4),
            (-4.5, -0.999_999_999_803_383_9),
        ];
        for (x, want) in known {
            let got = erf(x);
            assert!(close(got, want, 1e-15), "erf({x}) = {got:e}, want {want:e}");
        }
        // Continuity at the ±1 cut-off.
        assert!(close(erf(5.999_999), 1.0, 1e-16));
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(-30.0), -1.0);
    }

    #[test]
    fn gelu_matches_known_values() {
        // GELU(1) = ½(1 + erf(1/√2)) = Φ(1) = 0.8413447460685429.
        assert!(close(gelu(1.0), 0.841_344_746_068_542_9, 1e-15));
        // GELU(−1) = −Φ(−1) = −0.15865525393145707.
        assert!(close(gelu(-1.0), -0.158_655_253_931_457_07, 1e-15));
        assert_eq!(gelu(0.0), 0.0);
        assert!(close(gelu(10.0), 10.0, 1e-15));
        assert!(gelu(-10.0).abs() < 1e-20);
    }

    #[test]
    fn avg_pool_divides_by_in_bounds_taps() {
        // Ones stay ones everywhere only if corners divide by 4 and edges by 6.
        let ones = Tensor {
            channels: 1,
            height: 3,
            width: 3,
            data: vec![1.0; 9],
        };
        assert_eq!(avg_pool3x3(&ones).data, vec![1.0; 9]);

        // Ramp 0..9: corner (0,0) = (0+1+3+4)/4 = 2, edge (0,1) = (0+1+2+3+4+5)/6 = 2.5,
        // centre = 36/9 = 4, corner (2,2) = (4+5+7+8)/4 = 6.
        let ramp = Tensor {
            channels: 1,
            height: 3,
            width: 3,
            data: (0..9).map(f64::from).collect(),
        };
        let pooled = avg_pool3x3(&ramp);
        assert_eq!(
            pooled.data,
            vec![2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0]
        );

        // The mixer subtracts the input back: centre 4 − 4 = 0, corner 2 − 0 = 2.
        let mixed = pooling_mixer(&ramp);
        assert_eq!(mixed.data[4], 0.0);
        assert_eq!(mixed.data[0], 2.0);
    }

    #[test]
    fn avg_pool_keeps_channels_apart() {
        let x = Tensor {
            channels: 2,
            height: 1,
            width: 2,
            data: vec![1.0, 3.0, 10.0, 30.0],
        };
        assert_eq!(avg_pool3x3(&x).data, vec![2.0, 2.0, 20.0, 20.0]);
    }

    #[test]
    fn conv_stride_padding_and_bias() {
        // 1 channel 4×4 ramp, 3×3 kernel of ones, stride 2, pad 1: output 2×2 of
        // neighbourhood sums plus bias 0.5.
        let x = Tensor {
            channels: 1,
            height: 4,
            width: 4,
            data: (0..16).map(f64::from).collect(),
        };
        let k = ConvKernel {
            out_channels: 1,
            in_channels: 1,
            size: 3,
            weight: vec![1.0; 9],
            bias: vec![0.5],
        };
        let y = conv2d(&x, &k, 2, 1);
        assert_eq!((y.height, y.width), (2, 2));
        // (0,0): rows 0..2, cols 0..2 = 0+1+4+5 = 10; (0,1): rows 0..2, cols 1..4 = 1+2+3+5+6+7 = 24;
        // (1,0): rows 1..4, cols 0..2 = 4+5+8+9+12+13 = 51; (1,1): rows 1..4, cols 1..4 = 90.
        assert_eq!(y.data, vec![10.5, 24.5, 51.5, 90.5]);
    }

    #[test]
    fn conv_mixes_input_channels_per_output_channel() {
        // 1×1 conv = per-pixel matrix product: out0 = 2·a − b + 1, out1 = b.
        let x = Tensor {
            channels: 2,
            height: 1,
            width: 2,
            data: vec![1.0, 2.0, 10.0, 20.0],
        };
        let k = ConvKernel {
            out_channels: 2,
            in_channels: 2,
            size: 1,
            weight: vec![2.0, -1.0, 0.0, 1.0],
            bias: vec![1.0, 0.0],
        };
        assert_eq!(conv2d(&x, &k, 1, 0).data, vec![-7.0, -15.0, 10.0, 20.0]);
    }

    #[test]
    fn conv_7x7_stride_4_output_size() {
        // timm's stem at 224: (224 + 4 − 7) / 4 + 1 = 56; at 64×96: 16×24.
        let k = ConvKernel {
            out_channels: 1,
            in_channels: 1,
            size: 7,
            weight: vec![0.0; 49],
            bias: vec![0.0],
        };
        let y = conv2d(&Tensor::zeros(1, 224, 224), &k, 4, 2);
        assert_eq!((y.height, y.width), (56, 56));
        let y = conv2d(&Tensor::zeros(1, 64, 96), &k, 4, 2);
        assert_eq!((y.height, y.width), (16, 24));
    }

    #[test]
    fn group_norm_uses_all_channels_and_biased_variance() {
        // Values 1, 3 | 5, 7: μ = 4, σ² = (9 + 1 + 1 + 9)/4 = 5 (biased).
        let x = Tensor {
            channels: 2,
            height: 1,
            width: 2,
            data: vec![1.0, 3.0, 5.0, 7.0],
        };
        let y = group_norm(&x, &[1.0, 2.0], &[0.0, 1.0], 0.0);
        let s = 5f64.sqrt();
        let want = [-3.0 / s, -1.0 / s, 2.0 / s + 1.0, 6.0 / s + 1.0];
        for (got, want) in y.data.iter().zip(want) {
            assert!(close(*got, want, 1e-15), "{got} vs {want}");
        }
    }

    #[test]
    fn layer_norm_and_linear() {
        // [1, 2, 3]: μ = 2, σ² = 2/3.
        let y = layer_norm(&[1.0, 2.0, 3.0], &[1.0; 3], &[0.0; 3], 0.0);
        let s = (2.0f64 / 3.0).sqrt();
        assert!(
            close(y[0], -1.0 / s, 1e-15) && close(y[1], 0.0, 1e-15) && close(y[2], 1.0 / s, 1e-15)
        );
        // W = [[1, 2], [3, 4]], b = [0.5, −1]: [1·1 + 2·2 + 0.5, 3·1 + 4·2 − 1] = [5.5, 10].
        assert_eq!(
            linear(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], &[0.5, -1.0]),
            vec![5.5, 10.0]
        );
    }

    #[test]
    fn global_average_pool_per_channel() {
        let x = Tensor {
            channels: 2,
            height: 2,
            width: 1,
            data: vec![1.0, 3.0, -2.0, 4.0],
        };
        assert_eq!(global_average_pool(&x), vec![2.0, 1.0]);
    }
}
