//! QuantizeLinear and DequantizeLinear, checked when they are read.
//!
//! tract takes a node's scale and zero point as they come: a zero scale quantizes
//! everything to the zero point (a network of zeros), a NaN one makes NaN outputs, a
//! float zero point fails deep in a pass with a tensor type error. Where the scale and
//! zero point are initializers, their values are checked here, before tract builds
//! the op: every scale finite and positive, zero points of an integer type ONNX
//! allows for the op, as many zero points as scales, and a scale input present.
//! Parameters computed by the graph are left to tract.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{tensor_proto::DataType, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceOp;
use tract_onnx::Onnx;

type OnnxBuilder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// Registers the checked QuantizeLinear and DequantizeLinear builders.
pub(super) fn register(onnx: &mut Onnx) {
    onnx.op_register.insert("QuantizeLinear", quantize_linear);
    onnx.op_register
        .insert("DequantizeLinear", dequantize_linear);
}

/// tract's own QuantizeLinear builder (looked up once: building tract's operator
/// table is not free).
fn tract_quantize_linear() -> TractResult<OnnxBuilder> {
    static BUILDER: OnceLock<Option<OnnxBuilder>> = OnceLock::new();
    BUILDER
        .get_or_init(|| {
            tract_onnx::onnx()
                .op_register
                .0
                .get("QuantizeLinear")
                .copied()
        })
        .context("tract has no QuantizeLinear builder")
}

fn quantize_linear(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    check(
        ctx,
        node,
        &[
            DataType::Uint8,
            DataType::Int8,
            DataType::Uint16,
            DataType::Int16,
        ],
    )?;
    tract_quantize_linear()?(ctx, node)
}

fn dequantize_linear(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    check(
        ctx,
        node,
        &[
            DataType::Uint8,
            DataType::Int8,
            DataType::Uint16,
            DataType::Int16,
            DataType::Int32,
        ],
    )?;
    crate::passes::int8::dequantize_linear(ctx, node)
}

/// The initializer of the top-level graph named `name`.
fn initializer<'a>(ctx: &'a ParsingContext, name: &str) -> Option<&'a TensorProto> {
    ctx.model
        .graph
        .as_ref()?
        .initializer
        .iter()
        .find(|t| !name.is_empty() && t.name == name)
}

fn type_name(t: &TensorProto) -> String {
    DataType::try_from(t.data_type)
        .map(|d| d.as_str_name().to_string())
        .unwrap_or_else(|_| format!("type {}", t.data_type))
}

/// Number of values of `t` (a scalar is one).
fn len(t: &TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

/// `node`'s scale values where its scale is a float initializer stored in the file.
fn scale_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 || t.data_location == Some(1) {
        return None;
    }
    Some(if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn check(ctx: &ParsingContext, node: &NodeProto, zero_point_types: &[DataType]) -> TractResult<()> {
    let what = match (node.name.as_str(), node.output.first()) {
        ("", Some(out)) => format!("{} (output {out:?})", node.op_type),
        (name, _) => format!("{} {name:?}", node.op_type),
    };
    let scale_name = node.input.get(1).map(String::as_str).unwrap_or("");
    ensure!(!scale_name.is_empty(), "{what}: no scale input");
    let scale = initializer(ctx, scale_name);
    if let Some(values) = scale.and_then(scale_values) {
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v > 0.0))
        {
            bail!("{what}: scale {scale_name:?} must be finite and positive, element {i} is {v}");
        }
    }
    let Some(zero_point) = node.input.get(2).and_then(|n| initializer(ctx, n)) else {
        return Ok(());
    };
    if !zero_point_types
        .iter()
        .any(|&d| zero_point.data_type == d as i32)
    {
        let allowed: Vec<&str> = zero_point_types.iter().map(|d| d.as_str_name()).collect();
        bail!(
            "{what}: zero point {:?} is {}, expected {}",
            zero_point.name,
            type_name(zero_point),
            allowed.join(", ")
        );
    }
    if let Some(scale) = scale {
        ensure!(
            len(scale) == len(zero_point),
            "{what}: {} scales and {} zero points",
            len(scale),
            len(zero_point)
        );
    }
    // DequantizeLinear's zero point has its input's type.
    if node.op_type == "DequantizeLinear" {
        if let Some(x) = node.input.first().and_then(|n| initializer(ctx, n)) {
            ensure!(
                x.data_type == zero_point.data_type,
                "{what}: input {:?} is {} but its zero point {:?} is {}",
                x.name,
                type_name(x),
                zero_point.name,
                type_name(zero_point)
            );
        }
    }
    Ok(())
}
