//! QuantizeLinear, DequantizeLinear, QLinearConv and QLinearMatMul, checked when
//! they are read.
//!
//! tract takes a node's scales and zero points as they come: a zero scale quantizes
//! everything to the zero point (a network of zeros), a NaN one makes NaN outputs, a
//! zero weight scale of a QLinearConv silences its channel, a float zero point fails
//! deep in a pass with a tensor type error. Where the scales and zero points are
//! initializers, their values are checked here, before tract builds the op: every
//! scale finite and positive, zero points of an integer type ONNX allows for the op
//! and of the type of the values they apply to, as many zero points as scales (or one
//! of either, for the QLinear ops), the scale inputs present. Parameters computed by
//! the graph are left to tract.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{tensor_proto::DataType, NodeProto, TensorProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::InferenceOp;
use tract_onnx::Onnx;

type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;
type OnnxBuilder = fn(&ParsingContext, &NodeProto) -> Built;

/// Registers the checked builders.
pub(super) fn register(onnx: &mut Onnx) {
    let r = &mut onnx.op_register;
    r.insert("QuantizeLinear", quantize_linear);
    r.insert("DequantizeLinear", dequantize_linear);
    r.insert("QLinearConv", qlinear_conv);
    r.insert("QLinearMatMul", qlinear_matmul);
}

/// One (scale, zero point) pair of a node: their input indices, the input whose
/// integer type the zero point must have (if any), and whether the two may have
/// different lengths where one of them has one value (QLinearConv's and
/// QLinearMatMul's are described separately, each a scalar or per channel; Quantize-
/// and DequantizeLinear's have one shape).
struct Params {
    scale: usize,
    zero_point: usize,
    of: Option<usize>,
    broadcast: bool,
}

const fn params(scale: usize, zero_point: usize, of: Option<usize>) -> Params {
    Params {
        scale,
        zero_point,
        of,
        broadcast: false,
    }
}

const fn qlinear(scale: usize, zero_point: usize, of: Option<usize>) -> Params {
    Params {
        broadcast: true,
        ..params(scale, zero_point, of)
    }
}

/// QLinearConv's and QLinearMatMul's three pairs: input, weights, output.
const QLINEAR: [Params; 3] = [
    qlinear(1, 2, Some(0)),
    qlinear(4, 5, Some(3)),
    qlinear(6, 7, None),
];

const BYTES: &[DataType] = &[DataType::Uint8, DataType::Int8];
const SHORTS: &[DataType] = &[
    DataType::Uint8,
    DataType::Int8,
    DataType::Uint16,
    DataType::Int16,
];
const SHORTS_AND_I32: &[DataType] = &[
    DataType::Uint8,
    DataType::Int8,
    DataType::Uint16,
    DataType::Int16,
    DataType::Int32,
];

/// tract's own builder of `op` (its operator table built once: that is not free).
pub(crate) fn tract_builder(op: &str) -> TractResult<OnnxBuilder> {
    static TRACT: OnceLock<Onnx> = OnceLock::new();
    TRACT
        .get_or_init(tract_onnx::onnx)
        .op_register
        .0
        .get(op)
        .copied()
        .with_context(|| format!("tract has no {op} builder"))
}

fn quantize_linear(ctx: &ParsingContext, node: &NodeProto) -> Built {
    check(ctx, node, &[params(1, 2, None)], SHORTS)?;
    tract_builder("QuantizeLinear")?(ctx, node)
}

fn dequantize_linear(ctx: &ParsingContext, node: &NodeProto) -> Built {
    check(ctx, node, &[params(1, 2, Some(0))], SHORTS_AND_I32)?;
    crate::passes::int8::dequantize_linear(ctx, node)
}

fn qlinear_conv(ctx: &ParsingContext, node: &NodeProto) -> Built {
    check(ctx, node, &QLINEAR, BYTES)?;
    tract_builder("QLinearConv")?(ctx, node)
}

fn qlinear_matmul(ctx: &ParsingContext, node: &NodeProto) -> Built {
    check(ctx, node, &QLINEAR, BYTES)?;
    tract_builder("QLinearMatMul")?(ctx, node)
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
    t.dims
        .iter()
        .fold(1usize, |n, &d| n.saturating_mul(d.max(0) as usize))
}

/// The values of a scale initializer, read as tract reads it (inline or external
/// data, any float type); `None` where it cannot be read, which tract then reports.
fn scale_values(ctx: &ParsingContext, t: &TensorProto) -> Option<Vec<f32>> {
    let tensor = ctx.load_tensor(t).ok()?;
    let values = tensor.cast_to::<f32>().ok()?;
    Some(
        values
            .try_as_plain_ram()
            .ok()?
            .as_slice::<f32>()
            .ok()?
            .to_vec(),
    )
}

fn check(
    ctx: &ParsingContext,
    node: &NodeProto,
    pairs: &[Params],
    zero_point_types: &[DataType],
) -> TractResult<()> {
    let what = match (node.name.as_str(), node.output.first()) {
        ("", Some(out)) => format!("{} (output {out:?})", node.op_type),
        (name, _) => format!("{} {name:?}", node.op_type),
    };
    let input = |i: usize| node.input.get(i).map(String::as_str).unwrap_or("");
    for p in pairs {
        let scale_name = input(p.scale);
        ensure!(
            !scale_name.is_empty(),
            "{what}: no scale input (#{})",
            p.scale
        );
        let scale = initializer(ctx, scale_name);
        if let Some(values) = scale.and_then(|t| scale_values(ctx, t)) {
            let bad = values
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0));
            if let Some((i, v)) = bad {
                bail!(
                    "{what}: scale {scale_name:?} must be finite and positive, element {i} is {v}"
                );
            }
        }
        let Some(zero_point) = initializer(ctx, input(p.zero_point)) else {
            continue;
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
            let (ns, nz) = (len(scale), len(zero_point));
            ensure!(
                ns == nz || (p.broadcast && (ns == 1 || nz == 1)),
                "{what}: {ns} scales and {nz} zero points"
            );
        }
        // A zero point has the type of the values it applies to.
        if let Some(x) = p.of.and_then(|i| initializer(ctx, input(i))) {
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
