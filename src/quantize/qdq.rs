//! Rewrites an fp32 ONNX graph into standard QDQ form: per-channel symmetric int8
//! weights behind `DequantizeLinear(axis)`, and a `QuantizeLinear → DequantizeLinear`
//! pair on each quantized op's activation input. Biases stay float; everything else
//! (norms, pooling, residuals, GELU) is untouched.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, ModelProto, NodeProto,
    TensorProto,
};

/// Lowest default-domain opset with per-axis `DequantizeLinear`.
pub const MIN_OPSET: i64 = 13;

/// An op whose weight is quantized and whose activation input gets a Q/DQ pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The node's name (or `#index` when unnamed).
    pub node: String,
    pub op_type: String,
    /// Name of the activation value entering the op (input 0 for Conv/Gemm/MatMul).
    pub activation: String,
    /// Name of the float weight initializer (input 1).
    pub weight: String,
    /// Output-channel axis of the weight: 0 for Conv and Gemm with transB = 1, 1 for
    /// MatMul and Gemm with transB = 0.
    pub axis: usize,
    /// Whether the activation gets a Q/DQ pair (false: int8 weight, float input).
    pub quantize_activation: bool,
}

/// How activations are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationType {
    /// uint8 with a zero point (asymmetric).
    Uint8,
    /// int8 with a zero point (asymmetric).
    Int8,
    /// int8, zero point 0.
    Int8Symmetric,
}

impl ActivationType {
    pub fn is_symmetric(self) -> bool {
        self == ActivationType::Int8Symmetric
    }

    /// Number of representable levels a clip range is divided into.
    pub fn levels(self) -> usize {
        if self.is_symmetric() {
            255
        } else {
            256
        }
    }
}

/// Per-tensor quantization of one activation: `q = clamp(round(x/scale) + zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ActivationQuant {
    pub scale: f32,
    pub zero_point: i32,
    pub dtype: ActivationType,
}

impl ActivationQuant {
    /// Parameters covering `[lo, hi]`, widened to include 0 (which must be exact: the
    /// convolutions zero-pad).
    pub fn from_range(lo: f64, hi: f64, dtype: ActivationType) -> ActivationQuant {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let degenerate = |s: f64| if s > 0.0 && s.is_finite() { s } else { 1.0 };
        match dtype {
            ActivationType::Int8Symmetric => ActivationQuant {
                scale: degenerate(lo.abs().max(hi) / 127.0) as f32,
                zero_point: 0,
                dtype,
            },
            ActivationType::Uint8 | ActivationType::Int8 => {
                let scale = degenerate((hi - lo) / 255.0);
                let offset = if dtype == ActivationType::Int8 {
                    128
                } else {
                    0
                };
                let zero_point = ((-lo / scale).round() as i32).clamp(0, 255) - offset;
                ActivationQuant {
                    scale: scale as f32,
                    zero_point,
                    dtype,
                }
            }
        }
    }

    /// The float range the parameters represent.
    pub fn range(&self) -> (f32, f32) {
        let (qmin, qmax) = match self.dtype {
            ActivationType::Uint8 => (0, 255),
            ActivationType::Int8 | ActivationType::Int8Symmetric => (-128, 127),
        };
        (
            (qmin - self.zero_point) as f32 * self.scale,
            (qmax - self.zero_point) as f32 * self.scale,
        )
    }
}

/// Per-channel symmetric int8 weights: `w ≈ data · scales[channel]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Quantizes `w` (shape `shape`) per channel along `axis`: `s_c = max|w_c|/127`,
/// `q = round(w/s_c)`. An all-zero channel gets scale 1 (its values are all 0).
///
/// With `paired` (`axis` 0 only: each channel's values are contiguous), the scale
/// bounds sums of `|w|` instead of single values, so that x86's `vpmaddubsw` can
/// multiply the weights by u8 activations without overflowing its i16 sums
/// (`kernels::qgemm::PAIR_BOUND`):
/// - a 1×1 conv (a row is its input channels, the order the int8 kernels reduce in):
///   in each octet of channels `8j..8j + 8`, the quads `{0, 1, 4, 5}` and
///   `{2, 3, 6, 7}`, scale `max Σ|w|/126`, so that `Σ|q| ≤ 128` per quad
///   (`PackedI8::quads_fit_i16`: two groups' pairs add in i16); a last part of 4
///   channels or fewer, which the kernels take as one group, in pairs;
/// - other convs: consecutive pairs (`2j`, `2j + 1`), scale `max(|w₀| + |w₁|)/127`,
///   `|q₀| + |q₁| ≤ 128`. A k×k conv's kernel reduces tap by tap over its channels in
///   groups of four (`ConvGeometry::c4_weights`), so for PoolFormer's stem the bounded
///   pairs are not the kernel's (docs/quantization.md, "Paired weight scales").
///
/// Both bounds hold for rows of normal floats. A row whose largest bounded sum is
/// subnormal loses precision in the division and may exceed them; the packing checks
/// the bound again (`PackedI8`), and such weights run the paired or widening kernel.
///
/// The step grows by the ratio of the largest bounded sum to the largest value: on
/// the synthetic S12's 1×1 convs, per row, median 1.34 for pairs (10th–90th
/// percentile 1.07–1.84) and 1.95 for quads (1.40–3.02).
pub fn quantize_per_channel(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    paired: bool,
) -> QuantizedWeight {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let channel = |i: usize| (i / inner) % channels;
    // A bounded set's Σ|q| stays within 128 after rounding (each value rounds by at
    // most ½): a pair's sum is held to 127 steps, a quad's to 126.
    let mut steps = vec![0f32; channels];
    if paired {
        assert_eq!(axis, 0, "paired weights are per channel along axis 0");
        let quads = shape.len() >= 3 && inner == shape[1];
        let sum = |v: &[f32], idx: &[usize]| -> f32 {
            idx.iter().filter_map(|&i| v.get(i)).map(|x| x.abs()).sum()
        };
        for (c, row) in w.chunks(inner).enumerate() {
            for o in row.chunks(if quads { 8 } else { 2 }) {
                let s = if quads && o.len() > 4 {
                    sum(o, &[0, 1, 4, 5]).max(sum(o, &[2, 3, 6, 7])) / 126.0
                } else {
                    // A pair; or, for quads, a last part of at most 4 channels (one
                    // group for the kernels), bounded in pairs.
                    o.chunks(2).map(|p| sum(p, &[0, 1])).fold(0f32, f32::max) / 127.0
                };
                steps[c] = steps[c].max(s);
            }
        }
    } else {
        for (i, v) in w.iter().enumerate() {
            let c = channel(i);
            steps[c] = steps[c].max(v.abs() / 127.0);
        }
    }
    let scales: Vec<f32> = steps
        .iter()
        .map(|&s| if s > 0.0 { s } else { 1.0 })
        .collect();
    let data = w
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    QuantizedWeight { data, scales }
}

impl Target {
    /// Whether the weight is quantized with `paired` scales (see
    /// [`quantize_per_channel`]): the convs whose input is quantized too, the ones
    /// that run on the integer kernels.
    pub fn paired_weights(&self) -> bool {
        self.op_type == "Conv" && self.axis == 0 && self.quantize_activation
    }
}

/// The ops to quantize: every Conv with an initializer weight, and with `head` the
/// Gemm/MatMul ops with an initializer weight too. Their activation inputs get Q/DQ
/// pairs, except residual-stream values unless `residual` (see [`is_residual_stream`]).
pub fn find_targets(model: &ModelProto, head: bool, residual: bool) -> Result<Vec<Target>> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut targets = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            continue;
        }
        let axis = match node.op_type.as_str() {
            "Conv" => 0,
            "Gemm" if head => {
                if int_attr(node, "transA").unwrap_or(0) != 0 {
                    continue;
                }
                if int_attr(node, "transB").unwrap_or(0) != 0 {
                    0
                } else {
                    1
                }
            }
            "MatMul" if head => 1,
            _ => continue,
        };
        if node.input.len() < 2 || !inits.contains(node.input[1].as_str()) {
            continue;
        }
        targets.push(Target {
            node: if node.name.is_empty() {
                format!("#{i}")
            } else {
                node.name.clone()
            },
            op_type: node.op_type.clone(),
            activation: node.input[0].clone(),
            weight: node.input[1].clone(),
            axis,
            quantize_activation: residual
                || !is_residual_stream(&node.input[0], &producers, &inits),
        });
    }
    Ok(targets)
}

/// Whether `value` is the sum of two computed tensors, as a residual connection
/// `x + branch` makes it (a norm's affine `x·γ + β` adds a constant instead). In a
/// MetaFormer the downsampling convs read this stream: it carries every block's
/// output unnormalized, and a per-tensor quantization error on it reaches every later
/// stage unattenuated (on synthetic S12 it alone cut the logits' SQNR from 41 to 22 dB).
pub fn is_residual_stream(
    value: &str,
    producers: &HashMap<&str, &NodeProto>,
    initializers: &HashSet<&str>,
) -> bool {
    producers.get(value).is_some_and(|n| {
        n.op_type == "Add"
            && n.input.len() == 2
            && n.input.iter().all(|i| {
                !initializers.contains(i.as_str())
                    && producers
                        .get(i.as_str())
                        .is_none_or(|p| p.op_type != "Constant")
            })
    })
}

/// What [`insert_qdq`] added.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QdqSummary {
    pub quantize_nodes: usize,
    pub dequantize_nodes: usize,
    pub quantized_weights: usize,
    /// Bytes of float weights replaced, and of the int8 data + scales replacing them.
    pub weight_bytes_before: usize,
    pub weight_bytes_after: usize,
}

/// Inserts the Q/DQ nodes of `targets` into `model`. `activations` holds the
/// parameters of each target's activation input.
pub fn insert_qdq(
    model: &mut ModelProto,
    targets: &[Target],
    activations: &BTreeMap<String, ActivationQuant>,
) -> Result<QdqSummary> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    ensure!(
        opset >= MIN_OPSET,
        "the model uses opset {opset}; per-channel DequantizeLinear needs opset {MIN_OPSET} or later (re-export the model)"
    );
    let graph = model.graph.as_mut().context("the model has no graph")?;
    let mut names: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .chain(graph.input.iter().map(|v| v.name.clone()))
        .collect();
    let mut claim = |name: String| -> Result<String> {
        ensure!(
            names.insert(name.clone()),
            "cannot add {name:?}: the model already has a value of that name"
        );
        Ok(name)
    };
    let by_node: HashMap<&str, &Target> = targets.iter().map(|t| (t.node.as_str(), t)).collect();
    let mut summary = QdqSummary::default();
    let mut new_inits: Vec<TensorProto> = vec![];
    let mut replaced_weights: HashSet<String> = HashSet::new();
    // Dequantized name of each activation already given a Q/DQ pair.
    let mut dequantized: HashMap<String, String> = HashMap::new();
    let old_nodes = std::mem::take(&mut graph.node);
    let mut nodes = Vec::with_capacity(old_nodes.len() + 3 * targets.len());

    for (i, mut node) in old_nodes.into_iter().enumerate() {
        let key = if node.name.is_empty() {
            format!("#{i}")
        } else {
            node.name.clone()
        };
        let Some(target) = by_node.get(key.as_str()) else {
            nodes.push(node);
            continue;
        };
        ensure!(
            node.input.get(1) == Some(&target.weight) && node.input[0] == target.activation,
            "node {key}: inputs do not match the quantization plan"
        );

        // Activation: one Q/DQ pair per value, shared by all its quantized consumers.
        let x = &target.activation;
        if target.quantize_activation && !dequantized.contains_key(x) {
            let q = activations
                .get(x)
                .with_context(|| format!("no calibration range for {x:?}"))?;
            let scale = claim(format!("{x}.scale"))?;
            let zero_point = claim(format!("{x}.zero_point"))?;
            new_inits.push(float_tensor(&scale, &[], &[q.scale]));
            new_inits.push(match q.dtype {
                ActivationType::Uint8 => {
                    int_tensor(&zero_point, &[], DataType::Uint8, &[q.zero_point as u8])
                }
                _ => int_tensor(
                    &zero_point,
                    &[],
                    DataType::Int8,
                    &[q.zero_point as i8 as u8],
                ),
            });
            let quantized = claim(format!("{x}.quantized"))?;
            let dq = claim(format!("{x}.dequantized"))?;
            nodes.push(qdq_node(
                "QuantizeLinear",
                &format!("{x}.QuantizeLinear"),
                [x, &scale, &zero_point],
                &quantized,
                None,
            ));
            nodes.push(qdq_node(
                "DequantizeLinear",
                &format!("{x}.DequantizeLinear"),
                [&quantized, &scale, &zero_point],
                &dq,
                None,
            ));
            summary.quantize_nodes += 1;
            summary.dequantize_nodes += 1;
            dequantized.insert(x.clone(), dq);
        }
        if target.quantize_activation {
            node.input[0] = dequantized[x].clone();
        }

        // Weight: int8 initializer → DequantizeLinear(axis).
        let w = &target.weight;
        ensure!(
            !replaced_weights.contains(w),
            "weight {w:?} is shared by several quantized ops"
        );
        let init = graph
            .initializer
            .iter()
            .find(|t| &t.name == w)
            .with_context(|| format!("no initializer {w:?}"))?;
        let shape: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
        let values = float_data(init).with_context(|| format!("reading weight {w:?}"))?;
        ensure!(
            target.axis < shape.len(),
            "weight {w:?} of shape {shape:?} has no axis {}",
            target.axis
        );
        let paired = target.paired_weights();
        let qw = quantize_per_channel(&values, &shape, target.axis, paired);
        let channels = shape[target.axis];
        let data_name = claim(format!("{w}.int8"))?;
        let scale_name = claim(format!("{w}.scale"))?;
        let zp_name = claim(format!("{w}.zero_point"))?;
        let dq_name = claim(format!("{w}.dequantized"))?;
        let raw: Vec<u8> = qw.data.iter().map(|&v| v as u8).collect();
        new_inits.push(int_tensor(&data_name, &shape, DataType::Int8, &raw));
        new_inits.push(float_tensor(&scale_name, &[channels], &qw.scales));
        new_inits.push(int_tensor(
            &zp_name,
            &[channels],
            DataType::Int8,
            &vec![0u8; channels],
        ));
        nodes.push(qdq_node(
            "DequantizeLinear",
            &format!("{w}.DequantizeLinear"),
            [&data_name, &scale_name, &zp_name],
            &dq_name,
            Some(target.axis as i64),
        ));
        summary.dequantize_nodes += 1;
        summary.quantized_weights += 1;
        summary.weight_bytes_before += values.len() * 4;
        summary.weight_bytes_after += values.len() + channels * 5;
        replaced_weights.insert(w.clone());
        node.input[1] = dq_name;
        nodes.push(node);
    }
    ensure!(
        summary.quantized_weights == targets.len(),
        "{} of {} ops to quantize were not found in the graph",
        targets.len() - summary.quantized_weights,
        targets.len()
    );
    // Drop the float weights nothing reads any more.
    let still_read: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(|s| s.as_str()))
        .collect();
    let unused: HashSet<String> = replaced_weights
        .iter()
        .filter(|w| !still_read.contains(w.as_str()))
        .cloned()
        .collect();
    graph.initializer.retain(|t| !unused.contains(&t.name));
    graph.input.retain(|v| !unused.contains(&v.name));
    graph.initializer.extend(new_inits);
    graph.node = nodes;
    Ok(summary)
}

fn qdq_node(
    op_type: &str,
    name: &str,
    inputs: [&String; 3],
    output: &str,
    axis: Option<i64>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: name.to_string(),
        op_type: op_type.to_string(),
        attribute: axis
            .map(|a| AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: a,
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

pub(crate) fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn int_tensor(name: &str, dims: &[usize], dtype: DataType, raw: &[u8]) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: dtype as i32,
        raw_data: raw.to_vec(),
        ..Default::default()
    }
}

/// The values of a float initializer, from `raw_data` or `float_data`.
pub fn float_data(t: &TensorProto) -> Result<Vec<f32>> {
    ensure!(
        t.data_type == DataType::Float as i32,
        "initializer {:?} is not float (ONNX type {})",
        t.name,
        t.data_type
    );
    ensure!(
        t.data_location != Some(1) && t.external_data.is_empty(),
        "initializer {:?} is stored in an external file, which the quantizer does not read",
        t.name
    );
    let count: usize = t.dims.iter().map(|&d| d as usize).product();
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != count {
        bail!(
            "initializer {:?} has {} values for shape {:?}",
            t.name,
            values.len(),
            t.dims
        );
    }
    Ok(values)
}
