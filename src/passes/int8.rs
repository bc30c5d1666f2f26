//! QDQ → integer rewrites: run ONNX QDQ graphs (onnxruntime's `quantize_static`
//! output and the like) on tract's int8 kernels instead of as fake quantization.
//!
//! # Why tract runs QDQ graphs in float
//!
//! tract imports `DequantizeLinear(W_q) → Conv` as a float Conv: the DequantizeLinear
//! of a constant weight is evaluated during inference analysis and the typed graph
//! only sees `W_f = (W_q − z)·s`. The activations go through QuantizeLinear →
//! DequantizeLinear passes and every matmul runs in f32.
//!
//! # Design
//!
//! 1. **Keep the integer weights** (`dequantize_linear`, which [`crate::onnx::loader`]
//!    registers).
//!    DequantizeLinear nodes whose input is an integer initializer load as
//!    [`DequantizeConst`]: the integer tensor stays a `Const` input and the scales and
//!    zero points are attributes, so nothing has to be recovered from float weights.
//!    The wrapper only stops the early constant folding; tract's declutter folds
//!    every `DequantizeConst` this pass leaves alone, so unmatched graphs (and
//!    `fuse: false`) compute exactly what tract computes without it. One whose f32
//!    value exceeds tract's 4 MiB folding budget is not folded (it declines
//!    out-of-plan evaluation, so that the declutter does not compute and drop it on
//!    every round): a strided conv reading it keeps the int8 values
//!    ([`crate::ops::conv::ConvWeights::I8`]), anything else evaluates it on every
//!    run, as tract's own DequantizeLinear of such a weight was.
//! 2. **Integer conv** ([`rewrite`], on the typed graph before declutter). For
//!    `DequantizeLinearF32(x_q) → Conv(·, DequantizeConst(W_q), bias)` with
//!    per-tensor activations (u8 or i8) and per-tensor or per-output-channel weights
//!    (i8 or u8, one zero point for the tensor), the conv becomes tract's quantized
//!    `cnn::Conv` with `q_params = Some(I32)` and unit scales:
//!    `acc = Σ (x_q − z_x)(W_q − z_w)` (a dense 1×1 one directly as the integer
//!    `EinSum` tract's declutter would make of it). Dense ones then run on this crate's u8×i8
//!    kernels ([`super::qconv`], after the MetaFormer fusion has taken the channel
//!    MLPs); grouped ones, and every one where that pass is off, on tract-linalg's
//!    i8×i8→i32 kernels (1×1 through the matmul path, k×k through im2col).
//!    One [`Requant`] pass then maps `acc` per output channel `o`:
//!    - when the conv's only consumer is a per-tensor QuantizeLinear(s_y, z_y):
//!      `y_q = clamp(round(acc·s_x·s_w[o]/s_y + B[o]/s_y) + z_y)` as u8 / i8;
//!    - otherwise: `y = acc·s_x·s_w[o] + B[o]` as f32 (no Q → DQ round trip).
//!
//!    `B` is the float bias the original graph adds (an int32 bias with its
//!    DequantizeLinear is dequantized exactly as the graph does).
//!
//!    ONNX MatMul and Gemm (`DequantizeLinearF32(x_q) × DequantizeConst(W_q)`, tract's
//!    `EinSum`) are rewritten the same way into the 9-input quantized `EinSum`, with
//!    Gemm's bias `Add` folded into the `Requant` offset.
//! 3. **Requantize and dequantize in one pass.** A `Requant` to u8/i8 feeding
//!    DequantizeLinear (the next ops run in float: GroupNorm, GELU, residual adds)
//!    gets one `Requant` to f32 on the same quantization grid for them.
//! 4. **Q → DQ round trips** left between float ops (per tensor) become one
//!    [`FakeQuant`] pass. Per-tensor QuantizeLinear nodes that remain (the inputs of
//!    the integer convs) become the vectorized [`Quantize`].
//!
//! Steps 3 and 4 keep the rounding and clamping to each tensor's grid by default:
//! they are part of the graph's semantics and onnxruntime applies them too.
//! [`rewrite_with`]`(…, keep_float_qdq: false)` (or `PFE_INT8_DROP_FLOAT_QDQ=1` for
//! [`rewrite`]) removes them instead, except at graph outputs: int8 convs feeding
//! float ops output f32 directly and the float ops read each other's f32 outputs,
//! so tract fuses the element-wise chains as in an fp32 graph. Faster, but each
//! removed round trip changes its tensor by up to half a step (more where the graph
//! clamps), so the output drifts from the quantized graph's towards the fp32 model's.
//!
//! Anything that does not match exactly (per-axis activations, several weight zero
//! points, a conv output that is also a graph output fed to a Q, non-constant
//! weights) is left as it was. So are weights of fewer than 16 values: tract's
//! `wire_node` evaluates ops on such small constants as it wires them, so they
//! reach the pass as f32.
//!
//! # Accuracy
//!
//! The integer accumulation is exact; the float path rounds `Σ x_f·W_f` in f32. The
//! requantized value differs from the float graph's only by f32 rounding of the
//! affine map (relative ~1e-6 of the pre-rounding value), so a quantized output
//! differs by at most one quantization step, and only where the float value is
//! within ~1e-6 of a rounding boundary. Tests assert ≤ 1 step per quantized tensor
//! (2 after two chained requantizations, where a first one-step difference propagates).

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use tract_core::internal::{AxisOp, InOut, StaticName, ToDim};
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::cast::Cast;
use tract_core::ops::cnn::PaddingSpec;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::DataFormat;
use tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{tensor_proto::DataType, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{
    expand, Expansion, InferenceOp, InferenceResult, Solver, TensorProxy,
};

use super::metaformer::FUSES_MLP;
use super::PassReport;
use crate::kernels::quant::Grid;
use crate::ops::requant::{DequantizeConst, FakeQuant, Quantize, Requant, RequantOut};

/// The DequantizeLinear builder that keeps integer constant weights (see the module
/// documentation); the loader registers it behind its checks (`crate::onnx`).
pub(crate) fn dequantize_linear(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let (op, closures) = crate::onnx::tract_builder("DequantizeLinear")?(ctx, node)?;
    let integer_initializer = node.input.first().is_some_and(|name| {
        ctx.model.graph.as_ref().is_some_and(|g| {
            g.initializer.iter().any(|t| {
                &t.name == name
                    && [DataType::Int8, DataType::Uint8, DataType::Int32]
                        .iter()
                        .any(|&dt| t.data_type == dt as i32)
            })
        })
    });
    let Some(inner) =
        tract_core::downcast_rs::Downcast::as_any(&*op).downcast_ref::<Box<dyn Expansion>>()
    else {
        return Ok((op, closures));
    };
    if !integer_initializer {
        return Ok((op, closures));
    }
    let axis = node.get_attr_opt::<i64>("axis")?.unwrap_or(1);
    Ok((
        expand(KeepIntegerConst {
            inner: inner.clone(),
            axis,
        }),
        closures,
    ))
}

/// DequantizeLinear of an integer initializer: tract's expansion, except that it is
/// not evaluated at load and wires a [`DequantizeConst`] when its inputs are constant.
#[derive(Debug, Clone)]
struct KeepIntegerConst {
    inner: Box<dyn Expansion>,
    axis: i64,
}

impl Expansion for KeepIntegerConst {
    fn name(&self) -> StaticName {
        "DequantizeLinear".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.inner.rules(s, inputs, outputs)
    }

    fn runs_out_of_plan(&self) -> bool {
        false
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |ix: usize| -> TractResult<Option<Arc<Tensor>>> {
            Ok(match inputs.get(ix) {
                Some(&o) => model.outlet_fact(o)?.konst.clone(),
                None => None,
            })
        };
        let (Some(x), Some(scale)) = (konst(0)?, konst(1)?) else {
            return self.inner.wire(prefix, model, inputs);
        };
        let zero_point = match inputs.len() {
            2 => Some(Arc::new(tensor0(0i32))),
            _ => konst(2)?,
        };
        let Some(zero_point) = zero_point else {
            return self.inner.wire(prefix, model, inputs);
        };
        let rank = x.rank() as i64;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        let per_axis = scale.len() > 1 || zero_point.len() > 1;
        if per_axis && !(0..rank).contains(&axis) {
            bail!(
                "DequantizeLinear: axis {} out of range for rank {rank}",
                self.axis
            );
        }
        let scale = scale.cast_to::<f32>()?;
        let zero_point = zero_point.cast_to::<i32>()?;
        let op = DequantizeConst {
            axis: axis.max(0) as usize,
            scale: Arc::new(scale.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()),
            zero_point: Arc::new(zero_point.try_as_plain_ram()?.as_slice::<i32>()?.to_vec()),
            keep: false,
        };
        if per_axis {
            let c = x.shape()[op.axis];
            ensure!(
                op.scales(c).is_some() && op.zero_points(c).is_some(),
                "DequantizeLinear: {} scales and {} zero points for {c} channels",
                op.scale.len(),
                op.zero_point.len()
            );
        }
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// Environment switch: set to `1` to remove the quantize → dequantize round trips
/// between float ops instead of keeping them (see [`rewrite_with`]).
pub const DROP_FLOAT_QDQ_ENV: &str = "PFE_INT8_DROP_FLOAT_QDQ";

/// Rewrites the QDQ patterns described in the module documentation, keeping the
/// graph's quantize → dequantize round trips between float ops (one pass each)
/// unless [`DROP_FLOAT_QDQ_ENV`] is `1`.
pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let drop = std::env::var(DROP_FLOAT_QDQ_ENV).is_ok_and(|v| v == "1");
    rewrite_with(model, report, !drop)
}

/// As [`rewrite`]. With `keep_float_qdq` the round trips between float ops are kept
/// (one pass each), so the result follows the graph's quantization of every
/// intermediate tensor as onnxruntime does. Without it they are removed (and an int8
/// conv feeding float ops outputs f32 directly): tract then fuses the float
/// element-wise chains as in an fp32 graph, faster, but each removed round trip
/// changes its tensor by up to half a quantization step (more where the graph
/// clamps to its calibrated range), so the output drifts from the graph's towards
/// the fp32 model's.
pub fn rewrite_with(
    model: &mut TypedModel,
    report: &mut PassReport,
    keep_float_qdq: bool,
) -> Result<()> {
    let mut requantized = 0;
    let mut dequantized = 0;
    for id in model.eval_order()? {
        let found = match int_conv(model, id)? {
            Some(found) => Some(found),
            None => match int_matmul(model, id)? {
                Some(found) => Some(found),
                None => qlinear_conv(model, id)?,
            },
        };
        if let Some((patch, to_int)) = found {
            patch.apply(model)?;
            if to_int {
                requantized += 1;
            } else {
                dequantized += 1;
            }
        }
    }
    model.compact()?;
    let mut counts = [0usize; 4];
    for id in model.eval_order()? {
        for (patch, kind) in dequantize_after(model, id, keep_float_qdq)? {
            patch.apply(model)?;
            counts[kind as usize] += 1;
        }
    }
    let [grid, float, fake, removed] = counts;
    model.compact()?;
    let mut quantized = 0;
    for id in model.eval_order()? {
        if let Some(patch) = vectorized_quantize(model, id)? {
            patch.apply(model)?;
            quantized += 1;
        }
    }
    model.compact()?;
    if requantized + dequantized > 0 {
        report.rewrites.push(format!(
            "int8 conv/matmul ×{} ({requantized} to int8, {dequantized} to f32)",
            requantized + dequantized
        ));
    }
    if grid > 0 {
        report
            .rewrites
            .push(format!("int8 requantize+dequantize ×{grid}"));
    }
    if float > 0 {
        report
            .rewrites
            .push(format!("int8 conv output read in f32 ×{float}"));
    }
    if fake > 0 {
        report
            .rewrites
            .push(format!("quantize→dequantize in one pass ×{fake}"));
    }
    if removed > 0 {
        report
            .rewrites
            .push(format!("quantize→dequantize removed ×{removed}"));
    }
    if quantized > 0 {
        report
            .rewrites
            .push(format!("vectorized quantize ×{quantized}"));
    }
    Ok(())
}

/// Replaces a per-tensor QuantizeLinear of f32 with [`Quantize`].
fn vectorized_quantize(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((inv_scale, grid, dt)) = as_quantize(node) else {
        return Ok(None);
    };
    if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let op = Quantize {
        inv_scale,
        grid,
        dt,
    };
    Ok(Some(TypedModelPatch::replace_single_op(
        model,
        node,
        &node.inputs,
        op,
    )?))
}

/// A per-tensor QuantizeLinear: (1/scale, grid).
fn as_quantize(node: &TypedNode) -> Option<(f32, Grid, DatumType)> {
    let ew = node.op_as::<ElementWiseOp>()?;
    if let Some(q) = ew.0.downcast_ref::<QuantizeLinearU8>() {
        return Some((
            q.scale,
            Grid::of::<u8>(q.zero_point as i32),
            u8::datum_type(),
        ));
    }
    if let Some(q) = ew.0.downcast_ref::<QuantizeLinearI8>() {
        return Some((
            q.scale,
            Grid::of::<i8>(q.zero_point as i32),
            i8::datum_type(),
        ));
    }
    None
}

/// The value of `outlet` when it only depends on constants through casts, axis
/// ops, [`DequantizeConst`] and element-wise arithmetic (evaluated here).
fn const_value(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    const_value_depth(model, outlet, 8)
}

fn const_value_depth(
    model: &TypedModel,
    outlet: OutletId,
    depth: usize,
) -> TractResult<Option<Arc<Tensor>>> {
    let fact = model.outlet_fact(outlet)?;
    if let Some(k) = &fact.konst {
        return Ok(Some(k.clone()));
    }
    let node = model.node(outlet.node);
    let evaluable = node.op_is::<Cast>()
        || node.op_is::<AxisOp>()
        || node.op_is::<DequantizeConst>()
        || node.op_is::<TypedBinOp>();
    if depth == 0 || !evaluable || node.outputs.len() != 1 {
        return Ok(None);
    }
    let mut inputs = tvec![];
    for &i in &node.inputs {
        let Some(v) = const_value_depth(model, i, depth - 1)? else {
            return Ok(None);
        };
        inputs.push(v.into_tvalue());
    }
    if let Some(dq) = node.op_as::<DequantizeConst>() {
        return Ok(Some(dq.dequantize(&inputs[0])?.into_arc_tensor()));
    }
    let Some(out) = node.op.eval_out_of_plan(inputs)? else {
        return Ok(None);
    };
    Ok(out.into_iter().next().map(|t| t.into_arc_tensor()))
}

/// A dequantized activation and weight: (activation dequantizer, `x_q`, weight
/// dequantizer, `W_q`).
type DequantizedOperands<'m> = (
    &'m DequantizeLinearF32,
    OutletId,
    &'m DequantizeConst,
    Arc<Tensor>,
);

/// The operands of a conv or matmul node whose inputs 0 and 1 are a per-tensor
/// DequantizeLinear of u8/i8 activations and a [`DequantizeConst`] of integer weights.
fn dequantized_operands<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<DequantizedOperands<'m>>> {
    let dq = model.node(node.inputs[0].node);
    let Some(dqx) = dq.op_as::<DequantizeLinearF32>() else {
        return Ok(None);
    };
    let x_q = dq.inputs[0];
    let x_dt = model.outlet_fact(x_q)?.datum_type;
    if x_dt != u8::datum_type() && x_dt != i8::datum_type() {
        return Ok(None);
    }
    let wnode = model.node(node.inputs[1].node);
    let Some(wdq) = wnode.op_as::<DequantizeConst>() else {
        return Ok(None);
    };
    let Some(w_q) = model.outlet_fact(wnode.inputs[0])?.konst.clone() else {
        return Ok(None);
    };
    if w_q.datum_type() != i8::datum_type() && w_q.datum_type() != u8::datum_type() {
        return Ok(None);
    }
    Ok(Some((dqx, x_q, wdq, w_q)))
}

/// Where and how the i32 accumulator of an integer conv or matmul is mapped, per
/// output channel `o`: into the trailing QuantizeLinear's grid when there is one
/// (`acc·s_x·s_w[o]/s_y + B[o]/s_y`), otherwise to f32 (`acc·s_x·s_w[o] + B[o]`) in
/// place of `float_out`. Returns (replaced outlet, output kind, multipliers, offsets).
fn requant_plan(
    quantize: Option<(usize, (f32, Grid, DatumType))>,
    w_scale: &[f32],
    sx: f32,
    bias: Vec<f32>,
    float_out: OutletId,
) -> (OutletId, RequantOut, Vec<f32>, Vec<f32>) {
    match quantize {
        Some((qid, (inv_sy, grid, dt))) => {
            let out = requant_out(dt, grid.zero_point);
            let mult = w_scale.iter().map(|&sw| sx * sw * inv_sy).collect();
            let offset = bias.iter().map(|&b| b * inv_sy).collect();
            (OutletId::new(qid, 0), out, mult, offset)
        }
        None => {
            let mult = w_scale.iter().map(|&sw| sx * sw).collect();
            (float_out, RequantOut::F32, mult, bias)
        }
    }
}

/// A u8 output for `u8`, an i8 one otherwise.
fn requant_out(dt: DatumType, zero_point: i32) -> RequantOut {
    if dt == u8::datum_type() {
        RequantOut::U8 { zero_point }
    } else {
        RequantOut::I8 { zero_point }
    }
}

/// Builds the integer conv patch for node `id` if it matches; the flag says whether
/// the result is quantized (true) or f32.
fn int_conv(model: &TypedModel, id: usize) -> TractResult<Option<(TypedModelPatch, bool)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || conv.pool_spec.data_format != DataFormat::NCHW
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let Some((dqx, x_q, wdq, w_q)) = dequantized_operands(model, node)? else {
        return Ok(None);
    };
    if w_q.rank() < 3 {
        return Ok(None);
    }
    let out_channels = w_q.shape()[0];
    if out_channels != conv.pool_spec.output_channels {
        return Ok(None);
    }
    let per_channel = wdq.scale.len() > 1 || wdq.zero_point.len() > 1;
    if per_channel && wdq.axis != 0 {
        return Ok(None);
    }
    let (Some(w_scale), Some(w_zp)) = (wdq.scales(out_channels), wdq.zero_points(out_channels))
    else {
        return Ok(None);
    };
    if w_zp.iter().any(|&z| z != w_zp[0]) {
        return Ok(None);
    }
    // Bias: any constant, scalar or one per output channel.
    let Some(bias) = const_value(model, node.inputs[2])? else {
        return Ok(None);
    };
    let bias = bias.cast_to::<f32>()?;
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let Some(bias) = broadcast_f32(&bias, out_channels) else {
        return Ok(None);
    };
    // Output: requantized when the only consumer is a per-tensor QuantizeLinear.
    let conv_out = OutletId::new(id, 0);
    let is_output = model.output_outlets()?.contains(&conv_out);
    let succs = &node.outputs[0].successors;
    let quantize = if succs.len() == 1 && !is_output {
        let q = model.node(succs[0].node);
        as_quantize(q).map(|qp| (q.id, qp))
    } else {
        None
    };

    let sx = dqx.scale;
    let name = &node.name;
    let mut patch = TypedModelPatch::new(format!("int8 conv {name}"));
    let x = patch.tap_model(model, x_q)?;
    // A 1×1 stride-1 unpadded conv is a matmul over H·W. Where tract's quantized
    // einsum runs it (no MetaFormer fusion and no `qconv` on the target), fold H and W
    // into one axis so that it runs one [O×C]·[C×HW] product instead of one per row.
    let x_shape = model.outlet_fact(x_q)?.shape.to_tvec();
    let flatten_hw = !FUSES_MLP && is_pointwise(conv) && x_shape.len() == 4;
    let x = if flatten_hw {
        let hw = x_shape[2].clone() * x_shape[3].clone();
        patch.wire_node(
            format!("{name}.flatten_hw"),
            AxisOp::Reshape(2, x_shape[2..].into(), tvec![1.to_dim(), hw]),
            &[x],
        )?[0]
    } else {
        x
    };
    let acc = wire_int_conv(
        &mut patch,
        name,
        conv,
        x,
        w_q.clone(),
        tensor0(dqx.zero_point),
        w_zp[0],
    )?;
    // NCHW: channels are axis 1.
    let c_axis = 1;
    let (target, out, mult, offset) = requant_plan(quantize, &w_scale, sx, bias, conv_out);
    let acc = if flatten_hw {
        let out_shape = model.outlet_fact(conv_out)?.shape.to_tvec();
        let hw = out_shape[2].clone() * out_shape[3].clone();
        patch.wire_node(
            format!("{name}.unflatten_hw"),
            AxisOp::Reshape(2, tvec![1.to_dim(), hw], out_shape[2..].into()),
            &[acc],
        )?[0]
    } else {
        acc
    };
    let y = patch.wire_node(
        format!("{name}.requant"),
        Requant {
            axis: c_axis,
            mult: Arc::new(mult),
            offset: Arc::new(offset),
            out,
        },
        &[acc],
    )?[0];
    patch.shunt_outside(model, target, y)?;
    Ok(Some((patch, quantize.is_some())))
}

/// A QLinearConv with per-output-channel weight scales (tract's quantized `cnn::Conv`
/// with a vector `k_scale`), whose requantization tract runs as six to nine unfused
/// passes over the i32 accumulator: the same conv with unit scales (i32 output, the
/// bias and zero-point corrections fused into the matrix kernel), then one
/// [`Requant`]: `y = clamp(round((acc + bias[o])·s_x·s_w[o]/s_y) + z_y)`.
///
/// Per-tensor QLinearConvs take the same form where [`super::qconv`] then runs them
/// on this crate's u8×i8 kernels ([`FUSES_MLP`] targets); elsewhere they are left to
/// tract, which fuses them whole. Weights with one zero point `k0` whose `W − k0`
/// fits i8 are stored as `W − k0` with a zero point of 0 (the cheapest form for those
/// kernels; others keep `k0`, which they take too).
fn qlinear_conv(model: &TypedModel, id: usize) -> TractResult<Option<(TypedModelPatch, bool)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let Some(out_dt) = conv.q_params else {
        return Ok(None);
    };
    let out_dt = out_dt.unquantized();
    if out_dt != u8::datum_type() && out_dt != i8::datum_type() {
        return Ok(None);
    }
    if conv.kernel_fmt != KernelFormat::OIHW
        || conv.pool_spec.data_format != DataFormat::NCHW
        || node.inputs.len() != 9
    {
        return Ok(None);
    }
    let o = conv.pool_spec.output_channels;
    let mut consts = vec![];
    for &i in &node.inputs[1..] {
        let Some(c) = const_value(model, i)? else {
            return Ok(None);
        };
        consts.push(c);
    }
    let scalar_f32 = |t: &Tensor| -> Option<f32> {
        (t.len() == 1)
            .then(|| t.cast_to_scalar::<f32>().ok())
            .flatten()
    };
    let scalar_i32 = |t: &Tensor| -> Option<i32> {
        (t.len() == 1)
            .then(|| t.cast_to_scalar::<i32>().ok())
            .flatten()
    };
    let [w, bias, x0, x_scale, k0, k_scale, y0, y_scale] = &consts[..] else {
        return Ok(None);
    };
    let (Some(sx), Some(sy), Some(zy)) = (scalar_f32(x_scale), scalar_f32(y_scale), scalar_i32(y0))
    else {
        return Ok(None);
    };
    // Per tensor only where the result is a dense conv `qconv` takes.
    let per_channel = k_scale.len() == o && o >= 2;
    let per_tensor =
        FUSES_MLP && k_scale.len() == 1 && super::conv::geometry(model, node, conv).is_some();
    if x0.len() != 1 || !(per_channel || per_tensor) || !(sx > 0.0 && sy > 0.0) {
        return Ok(None);
    }
    let k0s = k0.cast_to::<i32>()?;
    let k0s = k0s.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
    if k0s.iter().any(|&z| z != k0s[0]) {
        return Ok(None);
    }
    let sw = k_scale.cast_to::<f32>()?;
    let sw = sw.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let Some(sw) = broadcast_f32(&sw, o) else {
        return Ok(None);
    };
    // W − k0 as i8 with a zero point of 0, where it fits.
    let (w, k0s) = match centered_i8(w, k0s[0])? {
        Some(centered) => (centered, vec![0]),
        None => (w.clone(), k0s),
    };
    let b = bias.cast_to::<i32>()?;
    let Some(b) = broadcast_f32(
        &b.try_as_plain_ram()?
            .as_slice::<i32>()?
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>(),
        o,
    ) else {
        return Ok(None);
    };
    let name = &node.name;
    let mut patch = TypedModelPatch::new(format!("QLinearConv {name}"));
    let x = patch.tap_model(model, node.inputs[0])?;
    let acc = wire_int_conv(
        &mut patch,
        name,
        conv,
        x,
        w.into_arc_tensor(),
        x0.clone(),
        k0s[0],
    )?;
    let mult: Vec<f32> = sw.iter().map(|&w| sx * w / sy).collect();
    let offset: Vec<f32> = b.iter().zip(&mult).map(|(&b, &m)| b * m).collect();
    let y = patch.wire_node(
        format!("{name}.requant"),
        Requant {
            axis: 1,
            mult: Arc::new(mult),
            offset: Arc::new(offset),
            out: requant_out(out_dt, zy),
        },
        &[acc],
    )?[0];
    patch.shunt_outside(model, OutletId::new(id, 0), y)?;
    Ok(Some((patch, true)))
}

/// `w − k0` as an i8 tensor when every value fits (u8 or i8 weights), else `None`:
/// `w` itself when it already is plain i8 with `k0 = 0` (onnxruntime's symmetric
/// weights), otherwise one i8 copy (S12's largest weight is 1 M values, so no wider
/// copy is made of it).
fn centered_i8(w: &Arc<Tensor>, k0: i32) -> TractResult<Option<Arc<Tensor>>> {
    fn centered<T: Datum + Copy + Into<i32>>(w: &Tensor, k0: i32) -> TractResult<Option<Vec<i8>>> {
        Ok(w.try_as_plain_ram()?
            .as_slice::<T>()?
            .iter()
            .map(|&v| i8::try_from(v.into() - k0).ok())
            .collect())
    }
    let centered: Option<Vec<i8>> = match w.datum_type() {
        DatumType::I8 if k0 == 0 => return Ok(Some(w.clone())),
        DatumType::I8 => centered::<i8>(w, k0)?,
        DatumType::U8 => centered::<u8>(w, k0)?,
        dt if dt.unquantized() == u8::datum_type() || dt.unquantized() == i8::datum_type() => {
            let wi = w.cast_to::<i32>()?;
            wi.try_as_plain_ram()?
                .as_slice::<i32>()?
                .iter()
                .map(|&v| i8::try_from(v - k0).ok())
                .collect()
        }
        _ => return Ok(None),
    };
    Ok(match centered {
        Some(c) => Some(Arc::new(Tensor::from_shape(w.shape(), &c)?)),
        None => None,
    })
}

/// The matmul counterpart of [`int_conv`]: `DequantizeLinearF32(x_q)` times
/// `DequantizeConst(W_q)` (ONNX MatMul, or Gemm's product) as tract's 9-input
/// quantized `EinSum` with an i32 output, then a [`Requant`] along the output axis
/// the weights' columns map to. Gemm's bias (`Add` of a constant, possibly through
/// `Mul(β)`) is folded into the `Requant` offset.
fn int_matmul(model: &TypedModel, id: usize) -> TractResult<Option<(TypedModelPatch, bool)>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
        || einsum.axes.output_count() != 1
    {
        return Ok(None);
    }
    let Some((dqx, x_q, wdq, w_q)) = dequantized_operands(model, node)? else {
        return Ok(None);
    };
    if w_q.rank() != 2 {
        return Ok(None);
    }
    // The weights' output axis: the one of B that reaches the output and not A.
    let axes = &einsum.axes;
    let out_axes: Vec<(usize, usize)> = (0..2)
        .filter_map(|b_pos| {
            let axis = axes.axis((InOut::In(1), b_pos)).ok()?;
            let out = axis.outputs[0].first().copied()?;
            axis.inputs[0].is_empty().then_some((b_pos, out))
        })
        .collect();
    let &[(w_axis, c_axis)] = &out_axes[..] else {
        return Ok(None);
    };
    let channels = w_q.shape()[w_axis];
    let per_channel = wdq.scale.len() > 1 || wdq.zero_point.len() > 1;
    if per_channel && wdq.axis != w_axis {
        return Ok(None);
    }
    let (Some(w_scale), Some(w_zp)) = (wdq.scales(channels), wdq.zero_points(channels)) else {
        return Ok(None);
    };
    if w_zp.iter().any(|&z| z != w_zp[0]) {
        return Ok(None);
    }
    let out_rank = model.outlet_fact(OutletId::new(id, 0))?.rank();
    // Optional bias: the product's only consumer is an Add of a constant that only
    // varies along the channel axis.
    let outputs = model.output_outlets()?;
    let mut last = OutletId::new(id, 0);
    let mut bias = vec![0f32; channels];
    let succs = &node.outputs[0].successors;
    if succs.len() == 1 && !outputs.contains(&last) {
        let add = model.node(succs[0].node);
        let is_add = add
            .op_as::<TypedBinOp>()
            .is_some_and(|b| b.0.is::<tract_core::ops::math::Add>());
        if is_add {
            let other = add.inputs[1 - succs[0].slot];
            if let Some(b) = const_value(model, other)? {
                let shape = b.shape();
                let along_channel = shape.len() <= out_rank
                    && shape.iter().enumerate().all(|(ix, &d)| {
                        d == 1 || (ix + out_rank - shape.len() == c_axis && d == channels)
                    });
                if along_channel && b.datum_type() == f32::datum_type() {
                    let values = b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
                    let Some(values) = broadcast_f32(&values, channels) else {
                        return Ok(None);
                    };
                    bias = values;
                    last = OutletId::new(add.id, 0);
                }
            }
        }
    }
    let last_succs = model.outlet_successors(last);
    let quantize = if last_succs.len() == 1 && !outputs.contains(&last) {
        let q = model.node(last_succs[0].node);
        as_quantize(q).map(|qp| (q.id, qp))
    } else {
        None
    };

    let sx = dqx.scale;
    let name = &node.name;
    let mut patch = TypedModelPatch::new(format!("int8 matmul {name}"));
    let x = patch.tap_model(model, x_q)?;
    let w = patch.add_const(format!("{name}.w_q"), w_q.clone())?;
    let zero_i32 = patch.add_const(format!("{name}.zero_i32"), tensor0(0i32))?;
    let one = patch.add_const(format!("{name}.one"), tensor0(1f32))?;
    let x0 = patch.add_const(format!("{name}.x0"), tensor0(dqx.zero_point))?;
    let k0 = patch.add_const(format!("{name}.k0"), tensor0(w_zp[0]))?;
    let mut q_axes = axes.clone();
    for slot in 2..9 {
        q_axes = q_axes.with_extra_input(slot)?;
    }
    let acc = patch.wire_node(
        format!("{name}.i32"),
        EinSum::newq(q_axes, i32::datum_type(), i32::datum_type()),
        &[x, w, zero_i32, x0, one, k0, one, zero_i32, one],
    )?[0];
    let (target, out, mult, offset) = requant_plan(quantize, &w_scale, sx, bias, last);
    let y = patch.wire_node(
        format!("{name}.requant"),
        Requant {
            axis: c_axis,
            mult: Arc::new(mult),
            offset: Arc::new(offset),
            out,
        },
        &[acc],
    )?[0];
    patch.shunt_outside(model, target, y)?;
    Ok(Some((patch, quantize.is_some())))
}

/// Wires the integer convolution `acc = Σ (x − x0)(w − k0)` (i32, unit scales, no
/// bias: the 9-input quantized form of tract's `Conv`) of `x` by the constant `w`.
///
/// A dense 1×1 stride-1 unpadded one on a 4-D input is wired as the `EinSum` tract's
/// declutter makes of that conv (`NIHW,OI->NOHW`), with the weights reshaped to
/// `[O, I]` here. From the conv, the declutter would wire the reshapes as axis ops
/// on the weight constant and copy the weights twice to fold them, and its axis
/// search would then remove the unit axes it wired around the product: together
/// more than half of the declutter of an int8 PoolFormer-S12.
fn wire_int_conv(
    patch: &mut TypedModelPatch,
    name: &str,
    conv: &Conv,
    x: OutletId,
    w: Arc<Tensor>,
    x0: impl IntoArcTensor,
    k0: i32,
) -> TractResult<OutletId> {
    let zero_i32 = patch.add_const(format!("{name}.zero_i32"), tensor0(0i32))?;
    let one = patch.add_const(format!("{name}.one"), tensor0(1f32))?;
    let x0 = patch.add_const(format!("{name}.x0"), x0)?;
    let k0 = patch.add_const(format!("{name}.k0"), tensor0(k0))?;
    let dense_pointwise = conv.group == 1
        && is_pointwise(conv)
        && w.rank() == 4
        && w.shape()[2..] == [1, 1]
        && patch.outlet_fact(x)?.rank() == 4;
    let (op, w): (Box<dyn TypedOp>, Arc<Tensor>) = if dense_pointwise {
        let shape = [w.shape()[0], w.shape()[1]];
        let w = Arc::try_unwrap(w).unwrap_or_else(|shared| (*shared).clone());
        let einsum = EinSum {
            axes: "NIHW,OI,,,,,,,->NOHW".parse()?,
            operating_dt: i32::datum_type(),
            q_params: Some(i32::datum_type()),
        };
        (Box::new(einsum), w.into_shape(&shape)?.into_arc_tensor())
    } else {
        let conv = Conv {
            q_params: Some(i32::datum_type()),
            ..conv.clone()
        };
        (Box::new(conv), w)
    };
    let w = patch.add_const(format!("{name}.w_q"), w)?;
    Ok(patch.wire_node(
        format!("{name}.i32"),
        op,
        &[x, w, zero_i32, x0, one, k0, one, zero_i32, one],
    )?[0])
}

/// A 1×1 conv with unit strides and no padding.
fn is_pointwise(conv: &Conv) -> bool {
    let spec = &conv.pool_spec;
    let zeros = |v: &[usize]| v.iter().all(|&p| p == 0);
    spec.kernel_shape.iter().all(|&k| k == 1)
        && spec
            .strides
            .as_ref()
            .is_none_or(|s| s.iter().all(|&s| s == 1))
        && match &spec.padding {
            PaddingSpec::Valid | PaddingSpec::SameUpper | PaddingSpec::SameLower => true,
            PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
                zeros(b) && zeros(a)
            }
        }
}

fn broadcast_f32(v: &[f32], len: usize) -> Option<Vec<f32>> {
    match v.len() {
        0 => Some(vec![0.0; len]),
        1 => Some(vec![v[0]; len]),
        n if n == len => Some(v.to_vec()),
        _ => None,
    }
}

/// What replaced a DequantizeLinear.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DqRewrite {
    /// A quantizing `Requant` and its dequantization fused, on the same grid.
    RequantGrid,
    /// A `Requant` to f32 instead (the rounding to the grid dropped).
    RequantFloat,
    /// QuantizeLinear → DequantizeLinear as one [`FakeQuant`] pass.
    FakeQuant,
    /// QuantizeLinear → DequantizeLinear removed: consumers read the f32 input.
    Removed,
}

/// For a per-tensor QuantizeLinear or a quantizing [`Requant`]: one patch per
/// DequantizeLinear consumer, replacing it with a single f32 pass or nothing.
/// With `keep_float_qdq`, or when the DequantizeLinear is a graph output, the
/// rounding and clamping to the quantization grid are kept.
fn dequantize_after(
    model: &TypedModel,
    id: usize,
    keep_float_qdq: bool,
) -> TractResult<Vec<(TypedModelPatch, DqRewrite)>> {
    let node = model.node(id);
    if node.outputs.len() != 1 {
        return Ok(vec![]);
    }
    let requant = node.op_as::<Requant>();
    let quantize = as_quantize(node);
    let grid = match (requant.map(|r| r.out), quantize) {
        (Some(RequantOut::U8 { zero_point }), _) => Grid::of::<u8>(zero_point),
        (Some(RequantOut::I8 { zero_point }), _) => Grid::of::<i8>(zero_point),
        (None, Some((_, grid, _))) => grid,
        _ => return Ok(vec![]),
    };
    if quantize.is_some() && model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
        return Ok(vec![]);
    }
    let outputs = model.output_outlets()?;
    let mut patches = vec![];
    for s in &node.outputs[0].successors {
        let dq_node = model.node(s.node);
        let Some(dq) = dq_node.op_as::<DequantizeLinearF32>() else {
            continue;
        };
        let dq_out = OutletId::new(dq_node.id, 0);
        let keep = keep_float_qdq || outputs.contains(&dq_out);
        let mut patch = TypedModelPatch::new(format!("dequantize {}", dq_node.name));
        let input = patch.tap_model(model, node.inputs[0])?;
        let (y, kind) = if let Some(r) = requant {
            if keep {
                let op = Requant {
                    out: RequantOut::Grid {
                        grid,
                        dq_zero_point: dq.zero_point,
                        dq_scale: dq.scale,
                    },
                    ..r.clone()
                };
                let y = patch.wire_node(format!("{}.dequantized", dq_node.name), op, &[input])?;
                (y[0], DqRewrite::RequantGrid)
            } else {
                // (v + zq − zd)·sd with v = acc·m + o, before rounding.
                let shift = (grid.zero_point - dq.zero_point) as f32;
                let op = Requant {
                    mult: Arc::new(r.mult.iter().map(|m| m * dq.scale).collect()),
                    offset: Arc::new(r.offset.iter().map(|o| (o + shift) * dq.scale).collect()),
                    out: RequantOut::F32,
                    ..r.clone()
                };
                let y = patch.wire_node(format!("{}.float", dq_node.name), op, &[input])?;
                (y[0], DqRewrite::RequantFloat)
            }
        } else {
            let (inv_scale, _, _) = quantize.unwrap();
            let identity =
                grid.zero_point == dq.zero_point && (inv_scale * dq.scale - 1.0).abs() < 1e-6;
            if keep || !identity {
                let op = FakeQuant {
                    inv_scale,
                    grid,
                    dq_zero_point: dq.zero_point,
                    dq_scale: dq.scale,
                };
                let y = patch.wire_node(format!("{}.fake_quant", dq_node.name), op, &[input])?;
                (y[0], DqRewrite::FakeQuant)
            } else {
                (input, DqRewrite::Removed)
            }
        };
        patch.shunt_outside(model, dq_out, y)?;
        patches.push((patch, kind));
    }
    Ok(patches)
}
