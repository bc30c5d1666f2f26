//! Dense f32 convolutions with a spatial kernel or a stride (PoolFormer's stem and
//! downsampling layers) → [`PatchConv`]: patch extraction plus one matrix product.

use std::sync::Arc;

use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_core::ops::nn::DataFormat;

use super::PassReport;
use crate::kernels::im2col::ConvGeometry;
use crate::ops::conv::{ConvWeights, PatchConv};
use crate::ops::requant::DequantizeConst;

/// Same targets as the channel MLP: the matrix product comes from the `gemm` crate.
pub const ENABLED: bool = super::metaformer::FUSES_MLP;

pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    if !ENABLED {
        return Ok(());
    }
    let mut count = 0;
    for id in model.eval_order()? {
        if let Some(patch) = match_conv(model, id)? {
            patch.apply(model)?;
            count += 1;
        }
    }
    if count > 0 {
        model.compact()?;
        report.rewrites.push(format!(
            "strided convolution as patches + matrix product ×{count}"
        ));
    }
    Ok(())
}

/// Marks the int8 weights of the float convolutions this pass will take
/// ([`DequantizeConst`] `keep`), so that tract's declutter does not fold them into f32
/// constants: the patch convolution then holds them as int8 ([`ConvWeights::I8`]),
/// a quarter of the memory. Runs before the declutter; returns how many it marked.
pub fn keep_int8_weights(model: &mut TypedModel) -> TractResult<usize> {
    if !ENABLED {
        return Ok(0);
    }
    let mut marked = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let spec = &conv.pool_spec;
        let pointwise = spec.kernel_shape.iter().all(|&k| k == 1)
            && spec
                .strides
                .as_ref()
                .is_none_or(|s| s.iter().all(|&v| v == 1));
        if conv.q_params.is_some() || pointwise || node.inputs.len() < 2 {
            continue;
        }
        let w = node.inputs[1];
        let wnode = model.node(w.node);
        let Some(dq) = wnode.op_as::<DequantizeConst>() else {
            continue;
        };
        let per_axis = dq.scale.len() > 1 || dq.zero_point.len() > 1;
        let int8 = match wnode.inputs.as_slice() {
            [q] => model
                .outlet_fact(*q)?
                .konst
                .as_ref()
                .is_some_and(|k| k.datum_type() == i8::datum_type()),
            _ => false,
        };
        let only_use = model.outlet_successors(w).len() == 1;
        if dq.keep || !int8 || !only_use || (per_axis && dq.axis != 0) {
            continue;
        }
        let op = DequantizeConst {
            keep: true,
            ..dq.clone()
        };
        model.node_mut(w.node).op = Box::new(op);
        marked += 1;
    }
    Ok(marked)
}

fn concrete(model: &TypedModel, o: OutletId) -> Option<(DatumType, Vec<usize>)> {
    let f = model.outlet_fact(o).ok()?;
    Some((f.datum_type, f.shape.as_concrete()?.to_vec()))
}

/// The weights at `o` and their shape: a constant f32 tensor, or a [`DequantizeConst`]
/// of a constant integer tensor. int8 with a scale and zero point per output channel
/// (or per tensor) stays int8 ([`ConvWeights::I8`]); other integer weights are
/// dequantized here.
fn weights(model: &TypedModel, o: OutletId) -> TractResult<Option<(ConvWeights, Vec<usize>)>> {
    if let Some(k) = &model.outlet_fact(o)?.konst {
        if k.datum_type() != f32::datum_type() {
            return Ok(None);
        }
        let w = k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        return Ok(Some((ConvWeights::F32(Arc::new(w)), k.shape().to_vec())));
    }
    let node = model.node(o.node);
    let (Some(dq), [input]) = (node.op_as::<DequantizeConst>(), node.inputs.as_slice()) else {
        return Ok(None);
    };
    let Some(q) = &model.outlet_fact(*input)?.konst else {
        return Ok(None);
    };
    let shape = q.shape().to_vec();
    let rows = shape.first().copied().unwrap_or(1);
    let per_axis = dq.scale.len() > 1 || dq.zero_point.len() > 1;
    if q.datum_type() == i8::datum_type() && (dq.axis == 0 || !per_axis) {
        if let (Some(scale), Some(zero)) = (dq.scales(rows), dq.zero_points(rows)) {
            let q = q.try_as_plain_ram()?.as_slice::<i8>()?.to_vec();
            let w = ConvWeights::I8 {
                q: Arc::new(q),
                scale: Arc::new(scale),
                zero: Arc::new(zero),
            };
            return Ok(Some((w, shape)));
        }
    }
    let w = dq
        .dequantize(q)?
        .into_plain_array::<f32>()?
        .into_raw_vec_and_offset()
        .0;
    Ok(Some((ConvWeights::F32(Arc::new(w)), shape)))
}

/// The geometry of a dense 2-D NCHW convolution (group 1, no dilation, explicit or
/// no padding) with concrete shapes, with its input and output shapes; `None` for
/// anything else, or where the output size is not the one the padding gives.
pub(super) fn geometry(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> Option<(ConvGeometry, Vec<usize>, Vec<usize>)> {
    let spec = &conv.pool_spec;
    if conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || spec.kernel_shape.len() != 2
        || spec
            .dilations
            .as_ref()
            .is_some_and(|d| d.iter().any(|&v| v != 1))
    {
        return None;
    }
    let (pad_before, pad_after): (Vec<usize>, Vec<usize>) = match &spec.padding {
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, false) => {
            (b.to_vec(), a.to_vec())
        }
        PaddingSpec::Valid => (vec![0, 0], vec![0, 0]),
        _ => return None,
    };
    let strides: Vec<usize> = spec
        .strides
        .as_ref()
        .map(|s| s.to_vec())
        .unwrap_or(vec![1, 1]);
    let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
    let (_, xs) = concrete(model, node.inputs[0])?;
    let (_, ys) = concrete(model, OutletId::new(node.id, 0))?;
    if xs.len() != 4 || ys.len() != 4 || xs[0] != ys[0] {
        return None;
    }
    // The output size must be the one this padding gives.
    let expect = |n: usize, k: usize, s: usize, a: usize, b: usize| {
        (n + a + b).checked_sub(k).map(|v| v / s + 1)
    };
    if expect(xs[2], kh, strides[0], pad_before[0], pad_after[0]) != Some(ys[2])
        || expect(xs[3], kw, strides[1], pad_before[1], pad_after[1]) != Some(ys[3])
    {
        return None;
    }
    let geometry = ConvGeometry {
        in_channels: xs[1],
        in_h: xs[2],
        in_w: xs[3],
        kernel: (kh, kw),
        stride: (strides[0], strides[1]),
        pad: (pad_before[0], pad_before[1]),
        out_h: ys[2],
        out_w: ys[3],
    };
    Some((geometry, xs, ys))
}

fn match_conv(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    if conv.q_params.is_some() || node.inputs.len() != 3 {
        return Ok(None);
    }
    let Some((geometry, xs, ys)) = geometry(model, node, conv) else {
        return Ok(None);
    };
    let (kh, kw) = geometry.kernel;
    if kh * kw == 1 && geometry.stride == (1, 1) {
        return Ok(None); // a 1×1 convolution: tract makes it a plain matrix product
    }
    let dt = model.outlet_fact(node.inputs[0])?.datum_type;
    let odt = model.outlet_fact(OutletId::new(id, 0))?.datum_type;
    if dt != f32::datum_type() || odt != dt || xs[0] != 1 {
        return Ok(None);
    }
    let Some((weights, wshape)) = weights(model, node.inputs[1])? else {
        return Ok(None);
    };
    let Some(b) = model.outlet_fact(node.inputs[2])?.konst.clone() else {
        return Ok(None);
    };
    let o = ys[1];
    if wshape != [o, xs[1], kh, kw] || b.datum_type() != dt {
        return Ok(None);
    }
    let bias: Vec<f32> = match b.len() {
        1 => vec![b.cast_to_scalar::<f32>()?; o],
        n if n == o => b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        _ => return Ok(None),
    };
    let op = PatchConv {
        geometry,
        out_channels: o,
        weights,
        bias: Arc::new(bias),
    };
    let mut patch = TypedModelPatch::new("patch convolution");
    let x = patch.tap_model(model, node.inputs[0])?;
    let y = patch.wire_node(format!("{}.pfe_patch_conv", node.name), op, &[x])?[0];
    patch.shunt_outside(model, OutletId::new(id, 0), y)?;
    Ok(Some(patch))
}
