//! What a model file contains: inputs, outputs, op histogram, parameters, MACs
//! and its quantization form — read from the ONNX protobuf and tract's cost model.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use tract_core::ops::Cost;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// How a graph is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantForm {
    /// Plain float graph.
    Fp32,
    /// QuantizeLinear/DequantizeLinear pairs around float ops.
    Qdq,
    /// Integer operators (QLinearConv, QGemm, MatMulInteger, …).
    QOperator,
}

impl std::fmt::Display for QuantForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantForm::Fp32 => "fp32",
            QuantForm::Qdq => "QDQ",
            QuantForm::QOperator => "QOperator",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<String>,
    pub dtype: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub producer: String,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub parameters: u64,
    pub quantization: QuantForm,
    /// Multiply-accumulates of one run at `input_size`, from tract's cost model.
    pub macs: Option<u64>,
    pub input_size: usize,
    pub metadata: BTreeMap<String, String>,
}

/// ONNX ops that only appear in integer-operator graphs.
const QOPERATOR_OPS: &[&str] = &[
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearConcat",
    "ConvInteger",
    "MatMulInteger",
];

pub fn quant_form<'a>(op_types: impl IntoIterator<Item = &'a str>) -> QuantForm {
    let mut form = QuantForm::Fp32;
    for op in op_types {
        if QOPERATOR_OPS.contains(&op) {
            return QuantForm::QOperator;
        }
        if op == "QuantizeLinear" || op == "DequantizeLinear" {
            form = QuantForm::Qdq;
        }
    }
    form
}

fn dtype_name(t: i32) -> String {
    pb::tensor_proto::DataType::try_from(t)
        .map(|d| format!("{d:?}").to_lowercase())
        .unwrap_or_else(|_| format!("type{t}"))
}

fn value_info(v: &pb::ValueInfoProto) -> TensorInfo {
    let mut shape = vec![];
    let mut dtype = String::from("?");
    if let Some(pb::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    {
        dtype = dtype_name(t.elem_type);
        if let Some(s) = &t.shape {
            for d in &s.dim {
                shape.push(match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                });
            }
        }
    }
    TensorInfo {
        name: v.name.clone(),
        shape,
        dtype,
    }
}

/// Inspects an ONNX file; MACs are counted at a 1×3×`input_size`×`input_size` input.
pub fn inspect(path: impl AsRef<Path>, input_size: usize) -> Result<ModelInfo> {
    let path = path.as_ref();
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_path(path)
        .with_context(|| format!("reading ONNX protobuf {}", path.display()))?;
    let graph = proto
        .graph
        .as_ref()
        .context("the ONNX model has no graph")?;
    let initializer_names: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut ops = BTreeMap::new();
    for n in &graph.node {
        *ops.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    let parameters = graph
        .initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>().max(0) as u64)
        .sum();
    let macs = count_macs(path, input_size).ok();
    Ok(ModelInfo {
        path: path.display().to_string(),
        producer: format!("{} {}", proto.producer_name, proto.producer_version)
            .trim()
            .to_string(),
        opsets: proto
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain.is_empty() {
                        "ai.onnx".into()
                    } else {
                        o.domain.clone()
                    },
                    o.version,
                )
            })
            .collect(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializer_names.contains(i.name.as_str()))
            .map(value_info)
            .collect(),
        outputs: graph.output.iter().map(value_info).collect(),
        nodes: graph.node.len(),
        quantization: quant_form(graph.node.iter().map(|n| n.op_type.as_str())),
        ops,
        parameters,
        macs,
        input_size,
        metadata: proto
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
    })
}

fn count_macs(path: &Path, size: usize) -> Result<u64> {
    let model = crate::onnx::loader()
        .model_for_path(path)?
        .with_input_fact(0, f32::fact([1, 3, size, size]).into())?
        .into_typed()?
        .into_decluttered()?;
    let mut macs = 0u64;
    for node in model.eval_order()? {
        let node = &model.nodes[node];
        let inputs = model.node_input_facts(node.id)?;
        for (cost, n) in node.op.cost(&inputs)? {
            if let Cost::FMA(_) = cost {
                macs += n.to_i64()? as u64;
            }
        }
    }
    Ok(macs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_form_is_detected_from_ops() {
        assert_eq!(quant_form(["Conv", "Add"]), QuantForm::Fp32);
        assert_eq!(
            quant_form(["QuantizeLinear", "DequantizeLinear", "Conv"]),
            QuantForm::Qdq
        );
        assert_eq!(
            quant_form(["QuantizeLinear", "QLinearConv", "DequantizeLinear"]),
            QuantForm::QOperator
        );
    }
}
