//! Two fp32 graph edits that make the later int8 rounding cheaper, both exact in float:
//!
//! - Smoothing (SmoothQuant): where a conv reads a norm's per-channel affine output
//!   `y_c = x̂_c·γ_c + β_c` (PoolFormer: norm2 → fc1), channel c is divided by
//!   `s_c = max|y_c|^α / max|W[:, c]|^(1−α)` in the affine (γ, β) and multiplied by
//!   `s_c` in the conv's input channel c. Outlier channels move into the weights, which
//!   are quantized per output channel, and the per-tensor activation range shrinks.
//! - Bias correction: per-channel weight rounding shifts each output channel's mean by
//!   `Σ ΔW[o, c, ·]·E[x_c]`; subtracting that from the bias removes the shift.

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

use super::calibrate::ChannelStats;
use super::qdq::{float_data, quantize_per_channel, Target};

/// A conv whose input is a per-channel affine that can absorb a scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Smoothable {
    pub node: String,
    pub activation: String,
    pub gamma: String,
    pub beta: String,
    pub weight: String,
}

/// The targets (Conv, axis 0) whose activation is `Add(Mul(x, γ), β)` with initializer
/// γ and β of `C` elements, where γ, β and the activation have no other reader.
pub fn find_smoothable(model: &ModelProto, targets: &[Target]) -> Result<Vec<Smoothable>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    let graph_outputs: Vec<&str> = graph.output.iter().map(|v| v.name.as_str()).collect();
    let single_reader = |v: &str| readers.get(v) == Some(&1) && !graph_outputs.contains(&v);
    let per_channel = |name: &str, channels: i64| {
        inits.get(name).is_some_and(|t| {
            t.dims.iter().product::<i64>() == channels && t.dims.first() == Some(&channels)
        })
    };
    let mut out = vec![];
    for t in targets.iter().filter(|t| t.op_type == "Conv") {
        let Some(w) = inits.get(t.weight.as_str()) else {
            continue;
        };
        let Some(&channels) = w.dims.get(1) else {
            continue;
        };
        let Some(add) = producers.get(t.activation.as_str()) else {
            continue;
        };
        if add.op_type != "Add" || add.input.len() != 2 || !single_reader(&t.activation) {
            continue;
        }
        let (scaled, beta) = (&add.input[0], &add.input[1]);
        let Some(mul) = producers.get(scaled.as_str()) else {
            continue;
        };
        if mul.op_type != "Mul" || mul.input.len() != 2 || !single_reader(scaled) {
            continue;
        }
        let gamma = &mul.input[1];
        if per_channel(gamma, channels)
            && per_channel(beta, channels)
            && single_reader(gamma)
            && single_reader(beta)
        {
            out.push(Smoothable {
                node: t.node.clone(),
                activation: t.activation.clone(),
                gamma: gamma.clone(),
                beta: beta.clone(),
                weight: t.weight.clone(),
            });
        }
    }
    Ok(out)
}

fn initializer_mut<'m>(model: &'m mut ModelProto, name: &str) -> Result<&'m mut TensorProto> {
    model
        .graph
        .as_mut()
        .context("the model has no graph")?
        .initializer
        .iter_mut()
        .find(|t| t.name == name)
        .with_context(|| format!("no initializer {name:?}"))
}

fn set_float_data(t: &mut TensorProto, values: &[f32]) {
    t.float_data.clear();
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
}

/// Applies smoothing with strength `alpha` (0: nothing moves, 1: all range into the
/// weights) given each activation's per-channel maxima. Returns the scales per conv.
pub fn smooth(
    model: &mut ModelProto,
    smoothable: &[Smoothable],
    stats: &BTreeMap<String, ChannelStats>,
    alpha: f32,
) -> Result<BTreeMap<String, Vec<f32>>> {
    ensure!(
        (0.0..=1.0).contains(&alpha),
        "smoothing strength {alpha} is outside [0, 1]"
    );
    let mut applied = BTreeMap::new();
    for s in smoothable {
        let x = stats
            .get(&s.activation)
            .with_context(|| format!("no channel statistics for {:?}", s.activation))?;
        let w_tensor = initializer_mut(model, &s.weight)?;
        let dims: Vec<usize> = w_tensor.dims.iter().map(|&d| d as usize).collect();
        let mut w = float_data(w_tensor)?;
        let (outs, ins) = (dims[0], dims[1]);
        let inner: usize = dims[2..].iter().product();
        ensure!(
            x.absmax.len() == ins,
            "{}: {} activation channels for {ins} weight input channels",
            s.node,
            x.absmax.len()
        );
        let mut w_max = vec![0f32; ins];
        for (i, v) in w.iter().enumerate() {
            let c = (i / inner) % ins;
            w_max[c] = w_max[c].max(v.abs());
        }
        let scales: Vec<f32> = (0..ins)
            .map(|c| {
                let s = x.absmax[c].powf(alpha) / w_max[c].powf(1.0 - alpha);
                if s.is_finite() && s > 0.0 {
                    s.clamp(1e-3, 1e3)
                } else {
                    1.0
                }
            })
            .collect();
        for o in 0..outs {
            for c in 0..ins {
                for k in 0..inner {
                    w[(o * ins + c) * inner + k] *= scales[c];
                }
            }
        }
        set_float_data(w_tensor, &w);
        for name in [&s.gamma, &s.beta] {
            let t = initializer_mut(model, name)?;
            let v: Vec<f32> = float_data(t)?
                .iter()
                .zip(&scales)
                .map(|(v, s)| v / s)
                .collect();
            set_float_data(t, &v);
        }
        applied.insert(s.node.clone(), scales);
    }
    Ok(applied)
}

/// Subtracts from each target conv's bias the mean output shift its weight rounding
/// causes, `Σ_c Σ_k ΔW[o, c, k]·E[x_c]`, `E[x_c]` over the calibration set (zero padding
/// is not accounted for). Targets without a bias initializer are skipped. Returns the
/// number of biases corrected.
pub fn correct_biases(
    model: &mut ModelProto,
    targets: &[Target],
    means: &BTreeMap<String, ChannelStats>,
) -> Result<usize> {
    let mut corrected = 0;
    for t in targets.iter().filter(|t| t.op_type == "Conv") {
        let Some(stats) = means.get(&t.activation) else {
            continue;
        };
        let graph = model.graph.as_ref().context("the model has no graph")?;
        let Some(bias) = graph
            .node
            .iter()
            .find(|n| n.name == t.node)
            .and_then(|n| n.input.get(2))
            .cloned()
        else {
            continue;
        };
        let w_tensor = graph
            .initializer
            .iter()
            .find(|i| i.name == t.weight)
            .with_context(|| format!("no initializer {:?}", t.weight))?;
        let dims: Vec<usize> = w_tensor.dims.iter().map(|&d| d as usize).collect();
        let w = float_data(w_tensor)?;
        let q = quantize_per_channel(&w, &dims, 0, t.paired_weights());
        let (outs, ins) = (dims[0], dims[1]);
        let inner: usize = dims[2..].iter().product();
        ensure!(
            stats.mean.len() == ins,
            "{}: {} activation channels for {ins} weight input channels",
            t.node,
            stats.mean.len()
        );
        let Ok(b_tensor) = initializer_mut(model, &bias) else {
            continue;
        };
        let mut b = float_data(b_tensor)?;
        for (o, b_o) in b.iter_mut().enumerate().take(outs) {
            let mut shift = 0f64;
            for c in 0..ins {
                for k in 0..inner {
                    let i = (o * ins + c) * inner + k;
                    let dw = q.data[i] as f64 * q.scales[o] as f64 - w[i] as f64;
                    shift += dw * stats.mean[c];
                }
            }
            *b_o -= shift as f32;
        }
        set_float_data(b_tensor, &b);
        corrected += 1;
    }
    Ok(corrected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::qdq::float_tensor;
    use tract_onnx::pb::GraphProto;

    /// A one-conv graph: `y = Conv(x, W[2, 2, 1, 1], b)`.
    fn one_conv(w: &[f32], b: &[f32]) -> (ModelProto, Target) {
        let model = ModelProto {
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    name: "conv".into(),
                    op_type: "Conv".into(),
                    input: vec!["x".into(), "w".into(), "b".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                initializer: vec![
                    float_tensor("w", &[2, 2, 1, 1], w),
                    float_tensor("b", &[2], b),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let target = Target {
            node: "conv".into(),
            op_type: "Conv".into(),
            activation: "x".into(),
            weight: "w".into(),
            axis: 0,
            quantize_activation: true,
        };
        (model, target)
    }

    /// W = [[1, 0.3], [0.5, −0.2]], a conv with a quantized input, so its scales are
    /// paired (each row is one pair): 1.3/127 and 0.7/127. Row 0 rounds to 98 and 29
    /// steps, row 1 to 91 and −36: ΔW = [[0.4, −0.4], [0.2, 0.2]]/127. With
    /// E[x] = [2, 10] the outputs' means move by ΔW·E[x], which the biases take back
    /// (to 1e-6: 0.3 and 0.2 are not exact in f32, which moves ΔW·10 by ~1e-7).
    #[test]
    fn bias_correction_by_hand() {
        let (mut model, target) = one_conv(&[1.0, 0.3, 0.5, -0.2], &[0.1, -0.1]);
        let means = BTreeMap::from([(
            "x".to_string(),
            ChannelStats {
                absmax: vec![1.0, 1.0],
                mean: vec![2.0, 10.0],
            },
        )]);
        assert_eq!(correct_biases(&mut model, &[target], &means).unwrap(), 1);
        let b = float_data(&model.graph.unwrap().initializer[1]).unwrap();
        let d0 = 2.0 * (98.0 * 1.3 / 127.0 - 1.0) + 10.0 * (29.0 * 1.3 / 127.0 - 0.3f64);
        let d1 = 2.0 * (91.0 * 0.7 / 127.0 - 0.5) + 10.0 * (-36.0 * 0.7 / 127.0 + 0.2f64);
        assert!((b[0] as f64 - (0.1 - d0)).abs() < 1e-6, "{b:?}");
        assert!((b[1] as f64 - (-0.1 - d1)).abs() < 1e-6, "{b:?}");
    }
}
