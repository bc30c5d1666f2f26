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
//! 1. **Keep the integer weights** ([`register`], called by [`crate::onnx::loader`]).
//!    DequantizeLinear nodes whose input is an integer initializer load as
//!    [`DequantizeConst`]: the integer tensor stays a `Const` input and the scales and
//!    zero points are attributes, so nothing has to be recovered from float weights.
//!    The wrapper only stops the early constant folding; tract's declutter folds
//!    every `DequantizeConst` this pass leaves alone, so unmatched graphs (and
//!    `fuse: false`) compute exactly what tract computes without it.
//! 2. **Integer conv** ([`rewrite`], on the typed graph before declutter). For
//!    `DequantizeLinearF32(x_q) → Conv(·, DequantizeConst(W_q), bias)` with
//!    per-tensor activations (u8 or i8) and per-tensor or per-output-channel weights
//!    (i8 or u8, one zero point for the tensor), the conv becomes tract's quantized
//!    `cnn::Conv` with `q_params = Some(I32)` and unit scales:
//!    `acc = Σ (x_q − z_x)(W_q − z_w)`, computed by tract-linalg's i8×i8→i32 kernels
//!    (1×1 through the matmul path, k×k / strided / padded / grouped through im2col).
//!    One [`Requant`] pass then maps `acc` per output channel `o`:
//!    - when the conv's only consumer is a per-tensor QuantizeLinear(s_y, z_y):
//!      `y_q = clamp(round(acc·s_x·s_w[o]/s_y + B[o]/s_y) + z_y)` as u8 / i8;
//!    - otherwise: `y = acc·s_x·s_w[o] + B[o]` as f32 (no Q → DQ round trip).
//!
//!    `B` is the float bias the original graph adds (an int32 bias with its
//!    DequantizeLinear is dequantized exactly as the graph does).
//! 3. **Requantize and dequantize in one pass.** A `Requant` to u8/i8 whose consumers
//!    are all DequantizeLinear (the next ops run in float: GroupNorm, GELU, residual
//!    adds) becomes one `Requant` to f32 on the same quantization grid.
//! 4. **Q → DQ round trips** left between float ops (per tensor) become one
//!    [`FakeQuant`] pass. They are kept, not removed: they are part of the graph's
//!    semantics (rounding and clamping to the calibrated range), and onnxruntime
//!    applies them too.
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
//! within ~1e-6 of a rounding boundary. Tests assert ≤ 1 step per quantized tensor.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use tract_core::internal::{AxisOp, StaticName, ToDim};
use tract_core::ops::cast::Cast;
use tract_core::ops::cnn::PaddingSpec;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::DataFormat;
use tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{tensor_proto::DataType, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{
    expand, Expansion, InferenceOp, InferenceResult, Solver, TensorProxy,
};
use tract_onnx::Onnx;

use super::PassReport;
use crate::kernels::quant::Grid;
use crate::ops::requant::{DequantizeConst, FakeQuant, Quantize, Requant, RequantOut};

type OnnxBuilder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own DequantizeLinear builder.
fn tract_dequantize_linear() -> Option<OnnxBuilder> {
    static BUILDER: OnceLock<Option<OnnxBuilder>> = OnceLock::new();
    *BUILDER.get_or_init(|| {
        tract_onnx::onnx()
            .op_register
            .0
            .get("DequantizeLinear")
            .copied()
    })
}

/// Registers the DequantizeLinear loader that keeps integer constant weights (see
/// the module documentation).
pub fn register(onnx: &mut Onnx) {
    if tract_dequantize_linear().is_some() {
        onnx.op_register
            .insert("DequantizeLinear", dequantize_linear);
    }
}

fn dequantize_linear(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let tract_builder =
        tract_dequantize_linear().context("tract has no DequantizeLinear builder")?;
    let (op, closures) = tract_builder(ctx, node)?;
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

/// Rewrites the QDQ patterns described in the module documentation.
pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let mut requantized = 0;
    let mut dequantized = 0;
    for id in model.eval_order()? {
        if let Some((patch, to_int)) = int_conv(model, id)? {
            patch.apply(model)?;
            if to_int {
                requantized += 1;
            } else {
                dequantized += 1;
            }
        }
    }
    model.compact()?;
    let mut grid = 0;
    let mut fake = 0;
    for id in model.eval_order()? {
        for (patch, is_requant) in dequantize_after(model, id)? {
            patch.apply(model)?;
            if is_requant {
                grid += 1;
            } else {
                fake += 1;
            }
        }
    }
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
            "int8 conv ×{} ({requantized} to int8, {dequantized} to f32)",
            requantized + dequantized
        ));
    }
    if grid > 0 {
        report
            .rewrites
            .push(format!("int8 requantize+dequantize ×{grid}"));
    }
    if fake > 0 {
        report
            .rewrites
            .push(format!("quantize→dequantize in one pass ×{fake}"));
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

/// The value of `outlet` when it is a constant, possibly behind casts, axis ops or
/// a [`DequantizeConst`] (evaluated here).
fn const_value(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    let fact = model.outlet_fact(outlet)?;
    if let Some(k) = &fact.konst {
        return Ok(Some(k.clone()));
    }
    let node = model.node(outlet.node);
    if node.inputs.len() != 1
        || !(node.op_is::<Cast>() || node.op_is::<AxisOp>() || node.op_is::<DequantizeConst>())
    {
        return Ok(None);
    }
    let Some(input) = const_value(model, node.inputs[0])? else {
        return Ok(None);
    };
    let Some(out) = node.op.eval_out_of_plan(tvec!(input.into_tvalue()))? else {
        return Ok(None);
    };
    Ok(out.into_iter().next().map(|t| t.into_arc_tensor()))
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
    // Activation: per-tensor DequantizeLinear of u8 / i8.
    let dq = model.node(node.inputs[0].node);
    let Some(dqx) = dq.op_as::<DequantizeLinearF32>() else {
        return Ok(None);
    };
    let x_q = dq.inputs[0];
    let x_dt = model.outlet_fact(x_q)?.datum_type;
    if x_dt != u8::datum_type() && x_dt != i8::datum_type() {
        return Ok(None);
    }
    // Weights: DequantizeConst of an integer constant, one zero point.
    let wnode = model.node(node.inputs[1].node);
    let Some(wdq) = wnode.op_as::<DequantizeConst>() else {
        return Ok(None);
    };
    let Some(w_q) = model.outlet_fact(wnode.inputs[0])?.konst.clone() else {
        return Ok(None);
    };
    if (w_q.datum_type() != i8::datum_type() && w_q.datum_type() != u8::datum_type())
        || w_q.rank() < 3
    {
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
    let w = patch.add_const(format!("{name}.w_q"), w_q.clone())?;
    let zero_i32 = patch.add_const(format!("{name}.zero_i32"), tensor0(0i32))?;
    let one = patch.add_const(format!("{name}.one"), tensor0(1f32))?;
    let x0 = patch.add_const(format!("{name}.x0"), tensor0(dqx.zero_point))?;
    let k0 = patch.add_const(format!("{name}.k0"), tensor0(w_zp[0]))?;
    let int_conv = Conv {
        q_params: Some(i32::datum_type()),
        ..conv.clone()
    };
    // A 1×1 stride-1 unpadded conv is a matmul over H·W: fold H and W into one axis so
    // that tract's einsum runs one [O×C]·[C×HW] product instead of one per row.
    let x_shape = model.outlet_fact(x_q)?.shape.to_tvec();
    let flatten_hw = is_pointwise(conv) && x_shape.len() == 4;
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
    let acc = patch.wire_node(
        format!("{name}.i32"),
        int_conv,
        &[x, w, zero_i32, x0, one, k0, one, zero_i32, one],
    )?[0];
    // NCHW: channels are axis 1.
    let c_axis = 1;
    let (target, out, mult, offset) = if let Some((qid, (inv_sy, grid, dt))) = quantize {
        let out = if dt == u8::datum_type() {
            RequantOut::U8 {
                zero_point: grid.zero_point,
            }
        } else {
            RequantOut::I8 {
                zero_point: grid.zero_point,
            }
        };
        let mult = w_scale.iter().map(|&sw| sx * sw * inv_sy).collect();
        let offset = bias.iter().map(|&b| b * inv_sy).collect();
        (OutletId::new(qid, 0), out, mult, offset)
    } else {
        let mult = w_scale.iter().map(|&sw| sx * sw).collect();
        (conv_out, RequantOut::F32, mult, bias)
    };
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

/// A 1×1 conv with unit strides and no padding.
fn is_pointwise(conv: &Conv) -> bool {
    let spec = &conv.pool_spec;
    let zeros = |v: &[usize]| v.iter().all(|&p| p == 0);
    spec.kernel_shape.iter().all(|&k| k == 1)
        && spec
            .strides
            .as_ref()
            .map_or(true, |s| s.iter().all(|&s| s == 1))
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

/// For a per-tensor QuantizeLinear or a quantizing [`Requant`] whose consumers are
/// all per-tensor DequantizeLinear: one patch per consumer, replacing it with a
/// single f32 pass. The flag says whether the producer was a `Requant`.
fn dequantize_after(model: &TypedModel, id: usize) -> TractResult<Vec<(TypedModelPatch, bool)>> {
    let node = model.node(id);
    let out = OutletId::new(id, 0);
    if node.outputs.len() != 1 || model.output_outlets()?.contains(&out) {
        return Ok(vec![]);
    }
    let succs = &node.outputs[0].successors;
    if succs.is_empty()
        || !succs
            .iter()
            .all(|s| model.node(s.node).op_is::<DequantizeLinearF32>())
    {
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
    let mut patches = vec![];
    for s in succs {
        let dq_node = model.node(s.node);
        let dq = dq_node.op_as::<DequantizeLinearF32>().unwrap();
        let mut patch = TypedModelPatch::new(format!("dequantize {}", dq_node.name));
        let input = patch.tap_model(model, node.inputs[0])?;
        let y = if let Some(r) = requant {
            let op = Requant {
                out: RequantOut::Grid {
                    grid,
                    dq_zero_point: dq.zero_point,
                    dq_scale: dq.scale,
                },
                ..r.clone()
            };
            patch.wire_node(format!("{}.dequantized", node.name), op, &[input])?[0]
        } else {
            let (inv_scale, _, _) = quantize.unwrap();
            let op = FakeQuant {
                inv_scale,
                grid,
                dq_zero_point: dq.zero_point,
                dq_scale: dq.scale,
            };
            patch.wire_node(format!("{}.fake_quant", dq_node.name), op, &[input])?[0]
        };
        patch.shunt_outside(model, OutletId::new(dq_node.id, 0), y)?;
        patches.push((patch, requant.is_some()));
    }
    Ok(patches)
}
