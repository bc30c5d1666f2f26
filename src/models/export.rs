//! safetensors state dict → fp32 ONNX graph with timm's PoolFormer semantics.
//!
//! The graph is built from tract-onnx's own protobuf types (`tract_onnx::pb`) and
//! serialized by prost, so what we write is what tract (and every other ONNX reader)
//! parses. Only standard opset-17 operators are used; GroupNorm and GELU are spelled
//! out in primitive ops so that onnxruntime, tract and our own passes all see the
//! same arithmetic (opset 17 has no GroupNormalization with timm's per-channel affine,
//! and no Gelu).
//!
//! Names: nodes carry timm's module paths (`stages.1.blocks.0.token_mixer.pool`), the
//! value a node produces has the node's name, initializers carry timm's state-dict keys.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::{ArchConfig, Weights};

pub const OPSET_VERSION: i64 = 17;
/// IR version 8 is the one that goes with opset 17 (onnx 1.12).
pub const IR_VERSION: i64 = 8;
pub const PRODUCER_NAME: &str = "poolformer-edge";
pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "logits";
/// Metadata key holding the architecture's timm name.
pub const METADATA_ARCH: &str = "poolformer_edge.arch";
/// Metadata key holding the whole [`ArchConfig`] as JSON.
pub const METADATA_ARCH_JSON: &str = "poolformer_edge.arch_json";

/// Serialized ONNX model (opset 17) of `arch` with `weights`.
///
/// Input `input`: f32 `[batch, 3, height, width]` (symbolic batch and size); output
/// `logits`: f32 `[batch, num_classes]`.
pub fn export_onnx(arch: &ArchConfig, weights: &Weights) -> Result<Vec<u8>> {
    let model =
        build_model(arch, weights).with_context(|| format!("exporting {} to ONNX", arch.name))?;
    Ok(model.encode_to_vec())
}

/// [`export_onnx`] written to `path`.
pub fn export_onnx_to_path(
    arch: &ArchConfig,
    weights: &Weights,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = export_onnx(arch, weights)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The ONNX model of `arch` with `weights`, before serialization.
pub fn build_model(arch: &ArchConfig, weights: &Weights) -> Result<ModelProto> {
    arch.validate()?;
    weights.validate(arch)?;
    let mut graph = GraphBuilder::new(weights);
    let logits = graph.poolformer(arch)?;
    ensure!(
        logits == OUTPUT_NAME,
        "graph ends in {logits:?}, not {OUTPUT_NAME:?}"
    );

    let input = tensor_value_info(
        INPUT_NAME,
        &[
            Dim::Symbol("batch"),
            Dim::Fixed(arch.in_chans),
            Dim::Symbol("height"),
            Dim::Symbol("width"),
        ],
    );
    let output = tensor_value_info(
        OUTPUT_NAME,
        &[Dim::Symbol("batch"), Dim::Fixed(arch.num_classes)],
    );
    let arch_json = serde_json::to_string(arch).context("serializing the architecture")?;
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
        }],
        producer_name: PRODUCER_NAME.to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        doc_string: format!("{} (timm PoolFormer semantics), fp32", arch.name),
        graph: Some(GraphProto {
            name: arch.name.clone(),
            node: graph.nodes,
            initializer: graph.initializers,
            input: vec![input],
            output: vec![output],
            ..Default::default()
        }),
        metadata_props: vec![
            metadata(METADATA_ARCH, &arch.name),
            metadata(METADATA_ARCH_JSON, &arch_json),
        ],
        ..Default::default()
    })
}

/// Accumulates nodes and initializers, and guarantees that every value name is unique.
struct GraphBuilder<'w> {
    weights: &'w Weights,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
}

impl<'w> GraphBuilder<'w> {
    fn new(weights: &'w Weights) -> GraphBuilder<'w> {
        let names = HashSet::from([INPUT_NAME.to_string()]);
        GraphBuilder {
            weights,
            nodes: vec![],
            initializers: vec![],
            names,
        }
    }

    /// The whole network, from `input` to `logits`; returns the output's name.
    fn poolformer(&mut self, arch: &ArchConfig) -> Result<String> {
        let mut x = self.conv(
            INPUT_NAME,
            "stem.conv",
            arch.dims[0],
            arch.in_chans,
            7,
            4,
            2,
        )?;
        for (i, (&blocks, &dim)) in arch.layers.iter().zip(&arch.dims).enumerate() {
            if arch.has_downsample(i) {
                let module = format!("stages.{i}.downsample.conv");
                x = self.conv(&x, &module, dim, arch.dims[i - 1], 3, 2, 1)?;
            }
            for j in 0..blocks {
                x = self.block(
                    &x,
                    &format!("stages.{i}.blocks.{j}"),
                    dim,
                    dim * arch.mlp_ratio,
                )?;
            }
        }
        self.head(&x, arch.num_features())
    }

    /// timm's `MetaFormerBlock` with PoolFormer v1 choices (no res scales):
    /// `x + ls1·(pool(norm1(x)) − norm1(x))`, then `x + ls2·mlp(norm2(x))`.
    fn block(&mut self, x: &str, path: &str, dim: usize, hidden: usize) -> Result<String> {
        let normed = self.group_norm(x, &format!("{path}.norm1"), dim)?;
        let pad = (ArchConfig::POOL_SIZE / 2) as i64;
        let kernel = ArchConfig::POOL_SIZE as i64;
        let pooled = self.node(
            "AveragePool",
            &format!("{path}.token_mixer.pool"),
            &[&normed],
            vec![
                attr_ints("kernel_shape", &[kernel, kernel]),
                attr_ints("strides", &[1, 1]),
                attr_ints("pads", &[pad, pad, pad, pad]),
                // timm: nn.AvgPool2d(..., count_include_pad=False); borders average fewer taps.
                attr_int("count_include_pad", 0),
            ],
        )?;
        let mixed = self.node(
            "Sub",
            &format!("{path}.token_mixer"),
            &[&pooled, &normed],
            vec![],
        )?;
        let x = self.scaled_residual(x, &mixed, path, 1, dim)?;

        let normed = self.group_norm(&x, &format!("{path}.norm2"), dim)?;
        let h = self.conv(&normed, &format!("{path}.mlp.fc1"), hidden, dim, 1, 1, 0)?;
        let h = self.gelu(&h, &format!("{path}.mlp.act"))?;
        let h = self.conv(&h, &format!("{path}.mlp.fc2"), dim, hidden, 1, 1, 0)?;
        self.scaled_residual(&x, &h, path, 2, dim)
    }

    /// `x + scale·branch` for residual `index` (1: token mixer, 2: MLP) of the block at
    /// `path`, the scale being `{path}.layer_scale{index}.scale` as `[C, 1, 1]`.
    fn scaled_residual(
        &mut self,
        x: &str,
        branch: &str,
        path: &str,
        index: usize,
        dim: usize,
    ) -> Result<String> {
        let layer_scale = format!("{path}.layer_scale{index}");
        let scale = self.weight(&format!("{layer_scale}.scale"), &[dim, 1, 1])?;
        let scaled = self.node("Mul", &layer_scale, &[branch, &scale], vec![])?;
        self.node(
            "Add",
            &format!("{path}.residual{index}"),
            &[x, &scaled],
            vec![],
        )
    }

    /// timm's `GroupNorm1` (one group over C, H, W; biased variance; eps inside the
    /// root) as `(x − mean)/sqrt(mean((x − mean)²) + eps)·w + b`. Two passes: the
    /// one-pass `E[x²] − E[x]²` loses all precision on large, nearly constant maps.
    fn group_norm(&mut self, x: &str, module: &str, dim: usize) -> Result<String> {
        let over_chw = || vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)];
        let mean = self.node("ReduceMean", &format!("{module}.mean"), &[x], over_chw())?;
        let centered = self.node("Sub", &format!("{module}.centered"), &[x, &mean], vec![])?;
        let squared = self.node(
            "Mul",
            &format!("{module}.squared"),
            &[&centered, &centered],
            vec![],
        )?;
        let variance = self.node(
            "ReduceMean",
            &format!("{module}.variance"),
            &[&squared],
            over_chw(),
        )?;
        let eps = self.shared_scalar("groupnorm.eps", ArchConfig::GROUPNORM_EPS)?;
        let variance = self.node(
            "Add",
            &format!("{module}.variance_eps"),
            &[&variance, &eps],
            vec![],
        )?;
        let std = self.node("Sqrt", &format!("{module}.std"), &[&variance], vec![])?;
        let normalized = self.node(
            "Div",
            &format!("{module}.normalized"),
            &[&centered, &std],
            vec![],
        )?;
        let weight = self.weight(&format!("{module}.weight"), &[dim, 1, 1])?;
        let bias = self.weight(&format!("{module}.bias"), &[dim, 1, 1])?;
        let scaled = self.node(
            "Mul",
            &format!("{module}.scaled"),
            &[&normalized, &weight],
            vec![],
        )?;
        self.node("Add", module, &[&scaled, &bias], vec![])
    }

    /// Exact (erf) GELU, as torch's `nn.GELU()`: `0.5·x·(1 + erf(x/√2))`.
    fn gelu(&mut self, x: &str, module: &str) -> Result<String> {
        let sqrt2 = self.shared_scalar("gelu.sqrt2", std::f32::consts::SQRT_2)?;
        let one = self.shared_scalar("gelu.one", 1.0)?;
        let half = self.shared_scalar("gelu.half", 0.5)?;
        let scaled = self.node("Div", &format!("{module}.div_sqrt2"), &[x, &sqrt2], vec![])?;
        let erf = self.node("Erf", &format!("{module}.erf"), &[&scaled], vec![])?;
        let erf1 = self.node("Add", &format!("{module}.add_one"), &[&erf, &one], vec![])?;
        let times_x = self.node("Mul", &format!("{module}.mul_input"), &[x, &erf1], vec![])?;
        self.node("Mul", module, &[&times_x, &half], vec![])
    }

    /// Global average pool → LayerNorm over channels → linear, producing `logits`.
    /// timm normalizes before flattening (`LayerNorm2d` on `[N, C, 1, 1]`); flattening
    /// first is the same arithmetic and lets the standard LayerNormalization do it.
    fn head(&mut self, x: &str, features: usize) -> Result<String> {
        let pooled = self.node("GlobalAveragePool", "head.global_pool", &[x], vec![])?;
        let flat = self.node(
            "Flatten",
            "head.flatten",
            &[&pooled],
            vec![attr_int("axis", 1)],
        )?;
        let weight = self.weight("head.norm.weight", &[features])?;
        let bias = self.weight("head.norm.bias", &[features])?;
        let normed = self.node(
            "LayerNormalization",
            "head.norm",
            &[&flat, &weight, &bias],
            vec![
                attr_int("axis", -1),
                attr_float("epsilon", ArchConfig::HEAD_LAYERNORM_EPS),
            ],
        )?;
        let fc_weight = self.weight_as_stored("head.fc.weight")?;
        let fc_bias = self.weight_as_stored("head.fc.bias")?;
        self.node_with_output(
            "Gemm",
            "head.fc",
            OUTPUT_NAME,
            &[&normed, &fc_weight, &fc_bias],
            vec![attr_int("transB", 1)],
        )
    }

    /// Conv with bias, square kernel, symmetric padding; weights `{module}.weight`
    /// `[out, in, k, k]` and `{module}.bias` `[out]`.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        x: &str,
        module: &str,
        out_channels: usize,
        in_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<String> {
        let weight = self.weight(
            &format!("{module}.weight"),
            &[out_channels, in_channels, kernel, kernel],
        )?;
        let bias = self.weight(&format!("{module}.bias"), &[out_channels])?;
        let (k, s, p) = (kernel as i64, stride as i64, pad as i64);
        self.node(
            "Conv",
            module,
            &[x, &weight, &bias],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[s, s]),
                attr_ints("pads", &[p, p, p, p]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
            ],
        )
    }

    /// A node whose output value has the node's name.
    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<String> {
        self.node_with_output(op_type, name, name, inputs, attributes)
    }

    fn node_with_output(
        &mut self,
        op_type: &str,
        name: &str,
        output: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Result<String> {
        self.claim(output)?;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute: attributes,
            ..Default::default()
        });
        Ok(output.to_string())
    }

    /// The state-dict tensor `key` as an initializer of shape `dims` (same values,
    /// possibly reshaped: `[C]` layer scales and norm affines become `[C, 1, 1]`).
    fn weight(&mut self, key: &str, dims: &[usize]) -> Result<String> {
        let param = self.weights.get(key)?;
        ensure!(
            param.data.len() == dims.iter().product::<usize>(),
            "tensor {key:?} has shape {:?}, cannot be used as {dims:?}",
            param.shape
        );
        self.initializer(key, dims, &param.data)
    }

    fn weight_as_stored(&mut self, key: &str) -> Result<String> {
        let shape = self.weights.get(key)?.shape.clone();
        self.weight(key, &shape)
    }

    /// A scalar f32 constant shared by every node that needs it; created on first use.
    fn shared_scalar(&mut self, name: &str, value: f32) -> Result<String> {
        if !self.names.contains(name) {
            self.initializer(name, &[], &[value])?;
        }
        Ok(name.to_string())
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<String> {
        self.claim(name)?;
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        Ok(name.to_string())
    }

    /// ONNX requires each value to be produced once; a clash here is a bug in this file.
    fn claim(&mut self, name: &str) -> Result<()> {
        ensure!(
            self.names.insert(name.to_string()),
            "ONNX value name {name:?} used twice"
        );
        Ok(())
    }
}

enum Dim<'a> {
    Fixed(usize),
    Symbol(&'a str),
}

fn tensor_value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Symbol(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

fn metadata(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.to_string(),
        value: value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::synth::synthesize;
    use crate::models::weights::Param;
    use tract_onnx::prelude::*;

    fn tiny() -> ArchConfig {
        ArchConfig::custom("tiny", &[1, 1, 2, 1], &[8, 16, 24, 32], 10).unwrap()
    }

    /// Runs exported bytes through tract on a deterministic 1×3×size×size input.
    fn run_with_tract(bytes: &[u8], size: usize) -> TractResult<Vec<f32>> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])?
            .with_input_fact(0, f32::fact([1, 3, size, size]).into())?
            .into_optimized()?
            .into_runnable()?;
        let len = 3 * size * size;
        let data: Vec<f32> = (0..len)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let input = Tensor::from_shape(&[1, 3, size, size], &data)?;
        let out = plan.run(tvec!(input.into_tvalue()))?;
        assert_eq!(out[0].shape(), [1, 10]);
        Ok(out[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    }

    fn set(weights: &mut Weights, key: &str, f: impl Fn(usize) -> f32) {
        let p = weights.params.get_mut(key).unwrap();
        for (i, v) in p.data.iter_mut().enumerate() {
            *v = f(i);
        }
    }

    #[test]
    fn tract_loads_and_runs_the_export() {
        let arch = tiny();
        let bytes = export_onnx(&arch, &synthesize(&arch, 5).unwrap()).unwrap();
        let logits = run_with_tract(&bytes, 64).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "{logits:?}");
        assert!(
            logits.iter().any(|&v| v != logits[0]),
            "constant logits {logits:?}"
        );
    }

    #[test]
    fn model_carries_names_and_metadata() {
        let arch = tiny();
        let bytes = export_onnx(&arch, &synthesize(&arch, 5).unwrap()).unwrap();
        let model = ModelProto::decode(&bytes[..]).unwrap();
        assert_eq!((model.ir_version, model.opset_import[0].version), (8, 17));
        let meta = |k: &str| {
            model
                .metadata_props
                .iter()
                .find(|p| p.key == k)
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(meta(METADATA_ARCH), "tiny");
        let back: ArchConfig = serde_json::from_str(&meta(METADATA_ARCH_JSON)).unwrap();
        assert_eq!(back, arch);

        let graph = model.graph.unwrap();
        let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        for (key, _) in arch.parameter_shapes() {
            assert!(inits.contains(key.as_str()), "no initializer {key}");
        }
        let nodes: Vec<&str> = graph.node.iter().map(|n| n.name.as_str()).collect();
        assert!(nodes.contains(&"stages.1.blocks.0.token_mixer.pool"));
        assert_eq!(
            nodes.iter().collect::<HashSet<_>>().len(),
            nodes.len(),
            "duplicate node names"
        );
        let ls = graph
            .initializer
            .iter()
            .find(|t| t.name == "stages.2.blocks.1.layer_scale2.scale");
        assert_eq!(ls.unwrap().dims, [24, 1, 1]);
    }

    #[test]
    fn zero_head_weights_give_the_head_bias() {
        let arch = tiny();
        let mut w = synthesize(&arch, 9).unwrap();
        set(&mut w, "head.fc.weight", |_| 0.0);
        let bias = w.params["head.fc.bias"].data.clone();
        let logits = run_with_tract(&export_onnx(&arch, &w).unwrap(), 64).unwrap();
        assert_eq!(logits, bias);
    }

    /// With every conv weight zero each stage's map is constant per channel. Then the
    /// token mixer contributes exactly 0 — only if its pooling leaves borders alone
    /// (count_include_pad = 0) — and, with fc1's bias 0 too, the MLP branch is fc2's
    /// bias: the last stage ends in `b_down + Σ ls2·b_fc2` per channel, and LayerNorm
    /// and the linear head follow by hand. Guards broadcast axes, the pool's padding
    /// rule, the head's LayerNorm and Gemm's transB.
    #[test]
    fn constant_maps_give_hand_computed_logits() {
        let arch = tiny();
        let mut w = synthesize(&arch, 11).unwrap();
        let keys: Vec<String> = w.params.keys().cloned().collect();
        for key in &keys {
            let zeroed = ["conv.weight", "fc1.weight", "fc1.bias", "fc2.weight"];
            if zeroed.iter().any(|suffix| key.ends_with(suffix)) {
                set(&mut w, key, |_| 0.0);
            }
        }
        // Constant maps of the last stage, per channel.
        let last = arch.layers.len() - 1;
        let mut x: Vec<f64> = w.params[&format!("stages.{last}.downsample.conv.bias")]
            .data
            .iter()
            .map(|&v| v as f64)
            .collect();
        for j in 0..arch.layers[last] {
            let p = format!("stages.{last}.blocks.{j}");
            let ls2 = &w.params[&format!("{p}.layer_scale2.scale")].data;
            let fc2_bias = &w.params[&format!("{p}.mlp.fc2.bias")].data;
            for c in 0..x.len() {
                x[c] += ls2[c] as f64 * fc2_bias[c] as f64;
            }
        }
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let (g, b) = (
            &w.params["head.norm.weight"].data,
            &w.params["head.norm.bias"].data,
        );
        let normed: Vec<f64> = (0..x.len())
            .map(|c| (x[c] - mean) / (var + 1e-6).sqrt() * g[c] as f64 + b[c] as f64)
            .collect();
        let (fc, fc_bias) = (
            &w.params["head.fc.weight"].data,
            &w.params["head.fc.bias"].data,
        );
        let expected: Vec<f64> = (0..arch.num_classes)
            .map(|k| {
                let dot: f64 = (0..x.len())
                    .map(|c| fc[k * x.len() + c] as f64 * normed[c])
                    .sum();
                dot + fc_bias[k] as f64
            })
            .collect();

        let logits = run_with_tract(&export_onnx(&arch, &w).unwrap(), 64).unwrap();
        for (k, (&got, &want)) in logits.iter().zip(&expected).enumerate() {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "logit {k}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn layer_scales_stored_as_c11_are_accepted() {
        let arch = tiny();
        let mut w = synthesize(&arch, 5).unwrap();
        let reference = export_onnx(&arch, &w).unwrap();
        for p in w
            .params
            .iter_mut()
            .filter(|(k, _)| k.contains("layer_scale"))
            .map(|(_, p)| p)
        {
            p.shape = vec![p.shape[0], 1, 1];
        }
        assert_eq!(export_onnx(&arch, &w).unwrap(), reference);
    }

    #[test]
    fn missing_tensor_is_named() {
        let arch = tiny();
        let mut w = synthesize(&arch, 5).unwrap();
        w.params.remove("stages.2.blocks.1.mlp.fc2.bias");
        let err = format!("{:#}", export_onnx(&arch, &w).unwrap_err());
        assert!(err.contains("stages.2.blocks.1.mlp.fc2.bias"), "{err}");
    }

    #[test]
    fn wrong_shape_is_named() {
        let arch = tiny();
        let mut w = synthesize(&arch, 5).unwrap();
        w.insert(
            "stages.1.downsample.conv.weight",
            Param::new(vec![16, 8, 1, 1], vec![0.0; 128]).unwrap(),
        );
        let err = format!("{:#}", export_onnx(&arch, &w).unwrap_err());
        assert!(err.contains("stages.1.downsample.conv.weight"), "{err}");
    }
}
