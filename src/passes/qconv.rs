//! Integer convolutions → [`QuantConv`]: the i32-accumulator convolutions and 1×1
//! products the int8 pass wires (unit scales, requantized by the next node) that the
//! channel-MLP fusion did not absorb (the stem, the downsampling layers, and every
//! 1×1 conv of graphs quantized op by op, and a quantized classifier head applied to
//! one vector) run on this crate's u8 × i8 kernels. tract's
//! own quantized matrix path stays for the rest (grouped convs, dilations, the
//! targets where [`FUSES_MLP`] is off).

use std::sync::Arc;

use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::cnn::Conv;
use tract_core::ops::einsum::EinSum;

use super::conv::geometry;
use super::metaformer::{i8_weights, int_pointwise, konst, scalar_is, FUSES_MLP};
use super::PassReport;
use crate::kernels::im2col::ConvGeometry;
use crate::kernels::qgemm::PackedI8;
use crate::ops::eltwise::{ElementwiseChain, Head, Tail};
use crate::ops::qconv::{QuantConv, QuantConvChain};

pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    if !FUSES_MLP {
        return Ok(());
    }
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let found = if let Some(conv) = node.op_as::<Conv>() {
            match_conv(model, id, conv)?
        } else if node.op_as::<EinSum>().is_some() {
            match match_pointwise(model, id)? {
                Some(op) => Some(op),
                None => match_vector_matmul(model, id)?,
            }
        } else {
            None
        };
        if let Some(op) = found {
            let node = model.node(id);
            let mut patch = TypedModelPatch::new("int8 convolution");
            let x = patch.tap_model(model, node.inputs[0])?;
            let y = patch.wire_node(format!("{}.pfe_quant_conv", node.name), op, &[x])?[0];
            patch.shunt_outside(model, OutletId::new(id, 0), y)?;
            patch.apply(model)?;
            count += 1;
        }
    }
    if count > 0 {
        model.compact()?;
        report
            .rewrites
            .push(format!("int8 convolution on u8×i8 kernels ×{count}"));
    }
    Ok(())
}

/// [`QuantConv`] → [`ElementwiseChain`] with a requantizing head, the chain the conv's
/// only reader, on one image → [`QuantConvChain`]. Runs after the element-wise pass.
pub fn fuse_chains(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(chain) = node.op_as::<ElementwiseChain>() else {
            continue;
        };
        // A summing chain writes no tensor for the conv's row blocks.
        if !matches!(chain.head, Head::Requant(_)) || chain.tail == Tail::Sum {
            continue;
        }
        let source = node.inputs[0];
        let producer = model.node(source.node);
        let Some(conv) = producer.op_as::<QuantConv>() else {
            continue;
        };
        let readers = &producer.outputs[source.slot].successors;
        if conv.input_shape.first() != Some(&1)
            || readers.len() != 1
            || model.output_outlets()?.contains(&source)
        {
            continue;
        }
        let op = QuantConvChain {
            conv: conv.clone(),
            chain: chain.clone(),
        };
        let mut patch = TypedModelPatch::new("int8 convolution with its chain");
        let mut inputs = vec![patch.tap_model(model, producer.inputs[0])?];
        for &i in &node.inputs[1..] {
            inputs.push(patch.tap_model(model, i)?);
        }
        let name = format!("{}.pfe_quant_conv_chain", node.name);
        let y = patch.wire_node(name, op, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        count += 1;
    }
    if count > 0 {
        model.compact()?;
        report.rewrites.push(format!(
            "int8 convolution with its element-wise chain ×{count}"
        ));
    }
    Ok(())
}

/// The input's element type: `Some(true)` for i8, `Some(false)` for u8.
fn signed_input(model: &TypedModel, x: OutletId) -> TractResult<Option<bool>> {
    let dt = model.outlet_fact(x)?.datum_type.unquantized();
    Ok(if dt == i8::datum_type() {
        Some(true)
    } else if dt == u8::datum_type() {
        Some(false)
    } else {
        None
    })
}

fn shape_of(model: &TypedModel, o: OutletId) -> TractResult<Option<TVec<usize>>> {
    Ok(model
        .outlet_fact(o)?
        .shape
        .as_concrete()
        .map(|s| s.iter().copied().collect()))
}

/// The op, given the parts every match supplies.
#[allow(clippy::too_many_arguments)]
fn quant_conv(
    geometry: ConvGeometry,
    out_channels: usize,
    weights: &[i8],
    weight_zero: i32,
    bias: &[i32],
    a0: i32,
    signed: bool,
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
) -> Result<Option<QuantConv>> {
    // Empty products stay with tract.
    if out_channels == 0 || geometry.k() == 0 || geometry.out_pixels() == 0 {
        return Ok(None);
    }
    let a0 = a0 + if signed { 128 } else { 0 };
    let Ok(a0) = u8::try_from(a0) else {
        return Ok(None);
    };
    // Strided and k×k convs take their patches from an input interleaved by 4
    // channels, a word per token and tap (several times faster to gather than the
    // bytes of the (channel, tap) order, for the 3-channel stem too, whose padding
    // channel adds a third to its product).
    let c4 = !geometry.is_pointwise();
    let weights = if c4 {
        PackedI8::new(
            out_channels,
            geometry.c4_k(),
            &geometry.c4_weights(out_channels, weights),
        )?
    } else {
        PackedI8::new(out_channels, geometry.k(), weights)?
    };
    let correction: Option<Vec<i32>> = bias
        .iter()
        .zip(weights.row_sums())
        .map(|(&b, &s)| i32::try_from(b as i64 - a0 as i64 * s as i64).ok())
        .collect();
    let Some(correction) = correction else {
        return Ok(None);
    };
    Ok(Some(QuantConv {
        geometry,
        out_channels,
        weights: Arc::new(weights),
        correction: Arc::new(correction),
        weight_zero,
        a0,
        signed_input: signed,
        c4,
        input_shape,
        output_shape,
    }))
}

/// The constant operands of a 9-input integer conv or EinSum with unit scales and a
/// zero output zero point: `[x, W, bias(i32), a0, 1, w0, 1, 0, 1]`.
struct IntOperands {
    w: Arc<Tensor>,
    bias: Arc<Tensor>,
    a0: i32,
    w0: i32,
}

fn int_operands(model: &TypedModel, node: &TypedNode) -> Option<IntOperands> {
    let unit = [4, 6, 8]
        .iter()
        .all(|&i| scalar_is(model, node.inputs[i], 1.0))
        && scalar_is(model, node.inputs[7], 0.0);
    let scalar = |i: usize| {
        konst(model, node.inputs[i])
            .filter(|k| k.len() == 1)
            .and_then(|k| k.cast_to_scalar::<i32>().ok())
    };
    let bias = konst(model, node.inputs[2]).filter(|b| b.datum_type() == i32::datum_type())?;
    unit.then_some(IntOperands {
        w: konst(model, node.inputs[1])?,
        bias,
        a0: scalar(3)?,
        w0: scalar(5)?,
    })
}

/// tract's quantized `Conv` as the int8 pass wires it: inputs `[x, W_q, bias(i32),
/// x0, 1, w0, 1, 0, 1]` (unit scales, one weight zero point, a zero output zero
/// point), i32 out.
fn match_conv(model: &TypedModel, id: usize, conv: &Conv) -> Result<Option<QuantConv>> {
    let node = model.node(id);
    if conv.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
        return Ok(None);
    }
    let Some(signed) = signed_input(model, node.inputs[0])? else {
        return Ok(None);
    };
    let Some((geometry, xs, ys)) = geometry(model, node, conv) else {
        return Ok(None);
    };
    let Some(IntOperands { w, bias, a0, w0 }) = int_operands(model, node) else {
        return Ok(None);
    };
    let o = ys[1];
    let (kh, kw) = geometry.kernel;
    if w.shape() != [o, xs[1], kh, kw] {
        return Ok(None);
    }
    let Some((weights, w0)) = i8_weights(&w, w0) else {
        return Ok(None);
    };
    let bias = bias.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
    let bias = match bias.len() {
        1 => vec![bias[0]; o],
        n if n == o => bias,
        _ => return Ok(None),
    };
    quant_conv(
        geometry,
        o,
        &weights,
        w0,
        &bias,
        a0,
        signed,
        xs.into(),
        ys.into(),
    )
}

/// A 1×1 convolution as tract declutters it: an integer EinSum over axis 1 of a
/// 4-D activation (see [`int_pointwise`]).
fn match_pointwise(model: &TypedModel, id: usize) -> Result<Option<QuantConv>> {
    let node = model.node(id);
    let Some(x) = node.inputs.first().copied() else {
        return Ok(None);
    };
    let Some(p) = int_pointwise(model, id, x) else {
        return Ok(None);
    };
    let Some(signed) = signed_input(model, x)? else {
        return Ok(None);
    };
    let (Some(xs), Some(ys)) = (shape_of(model, x)?, shape_of(model, OutletId::new(id, 0))?) else {
        return Ok(None);
    };
    if xs.len() != 4 || ys.len() != 4 || xs[1] != p.depth || ys[1] != p.rows {
        return Ok(None);
    }
    if xs[0] != ys[0] || xs[2..] != ys[2..] {
        return Ok(None);
    }
    let geometry = ConvGeometry {
        in_channels: p.depth,
        in_h: xs[2],
        in_w: xs[3],
        kernel: (1, 1),
        stride: (1, 1),
        pad: (0, 0),
        out_h: xs[2],
        out_w: xs[3],
    };
    quant_conv(
        geometry, p.rows, &p.weights, p.w0, &p.bias, p.a0, signed, xs, ys,
    )
}

/// A quantized matrix product of one row vector `[1, K]` (or `[1, K, 1, 1]`, summed
/// over the unit axes) and constant i8 weights
/// (`[N, K]` or `[K, N]`), as the int8 pass wires an ONNX Gemm or MatMul head: the
/// same product as a 1×1 convolution of a `K`-channel, one-pixel image.
fn match_vector_matmul(model: &TypedModel, id: usize) -> Result<Option<QuantConv>> {
    let node = model.node(id);
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if op.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
        return Ok(None);
    }
    let formula = op.axes.to_string();
    let Some((ins, out)) = formula
        .split_whitespace()
        .next()
        .and_then(|f| f.split_once("->"))
    else {
        return Ok(None);
    };
    let ins: Vec<Vec<char>> = ins.split(',').map(|s| s.chars().collect()).collect();
    let out: Vec<char> = out.chars().collect();
    let [a, b, ..] = &ins[..] else {
        return Ok(None);
    };
    if a.len() < 2 || b.len() != 2 || out.len() != 2 || a[0] != out[0] || a[1] == out[1] {
        return Ok(None);
    }
    // Weights [N, K] as they are, or [K, N] transposed.
    let transposed = if b[1] == a[1] && b[0] == out[1] {
        false
    } else if b[0] == a[1] && b[1] == out[1] {
        true
    } else {
        return Ok(None);
    };
    let x = node.inputs[0];
    let Some(signed) = signed_input(model, x)? else {
        return Ok(None);
    };
    let (Some(xs), Some(ys)) = (shape_of(model, x)?, shape_of(model, OutletId::new(id, 0))?) else {
        return Ok(None);
    };
    let Some(IntOperands { w, bias, a0, w0 }) = int_operands(model, node) else {
        return Ok(None);
    };
    // Axes of the input past the first two (a flattened `[1, K, 1, 1]`) must be 1.
    if xs.len() != a.len()
        || xs[0] != 1
        || xs[2..].iter().any(|&d| d != 1)
        || ys.len() != 2
        || ys[0] != 1
        || w.rank() != 2
    {
        return Ok(None);
    }
    let (k, n) = (xs[1], ys[1]);
    let Some((ws, w0)) = i8_weights(&w, w0) else {
        return Ok(None);
    };
    let weights = if transposed {
        if w.shape() != [k, n] {
            return Ok(None);
        }
        (0..n * k).map(|i| ws[(i % k) * n + i / k]).collect()
    } else {
        if w.shape() != [n, k] {
            return Ok(None);
        }
        ws
    };
    let bias = bias.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
    let bias = match bias.len() {
        1 => vec![bias[0]; n],
        len if len == n => bias,
        _ => return Ok(None),
    };
    let geometry = ConvGeometry {
        in_channels: k,
        in_h: 1,
        in_w: 1,
        kernel: (1, 1),
        stride: (1, 1),
        pad: (0, 0),
        out_h: 1,
        out_w: 1,
    };
    quant_conv(geometry, n, &weights, w0, &bias, a0, signed, xs, ys)
}
