//! onnxruntime's quantized pooling contrib ops (domain `com.microsoft`):
//! `QLinearAveragePool` and `QLinearGlobalAveragePool`.
//!
//! Inputs of both: `X, x_scale, x_zero_point, y_scale, y_zero_point` (zero points
//! optional). They dequantize, pool in f32 with tract's own pooling (the op tract's
//! ONNX `AveragePool` becomes) and quantize again.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::{DataFormat, Reduce, Reducer};
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::cnn::{HirSumPool, PaddingSpec, PoolSpec};

use super::qlinear::{node_label as label, quantized_type_rule, InputSlots, QParams};

const X: usize = 0;
const X_SCALE: usize = 1;
const X_ZP: usize = 2;
const Y_SCALE: usize = 3;
const Y_ZP: usize = 4;

/// The `channels_last` attribute: 0 (NCHW, the default) or 1 (NHWC).
fn data_format(node: &NodeProto) -> TractResult<DataFormat> {
    match node.get_attr_opt::<i64>("channels_last")?.unwrap_or(0) {
        0 => Ok(DataFormat::NCHW),
        1 => Ok(DataFormat::NHWC),
        v => bail!(
            "{}: attribute channels_last = {v} is not supported (0 or 1)",
            label(node)
        ),
    }
}

/// Padding from `pads` / `auto_pad` / `ceil_mode`, with ONNX pooling rules (the
/// same reading tract applies to `AveragePool`).
fn padding(node: &NodeProto, spatial_rank: usize) -> TractResult<PaddingSpec> {
    let ceil_mode = match node.get_attr_opt::<i64>("ceil_mode")?.unwrap_or(0) {
        0 => false,
        1 => true,
        v => bail!(
            "{}: attribute ceil_mode = {v} is not supported (0 or 1)",
            label(node)
        ),
    };
    let auto_pad = node.get_attr_opt::<&str>("auto_pad")?.unwrap_or("NOTSET");
    if let Some(pads) = node.get_attr_opt_tvec::<usize>("pads")? {
        ensure!(
            pads.len() == 2 * spatial_rank,
            "{}: attribute pads has {} values, {} expected",
            label(node),
            pads.len(),
            2 * spatial_rank
        );
        ensure!(
            auto_pad == "NOTSET",
            "{}: attributes pads and auto_pad = {auto_pad} are exclusive",
            label(node)
        );
        let (left, right) = pads.split_at(spatial_rank);
        return Ok(PaddingSpec::ExplicitOnnxPool(
            left.into(),
            right.into(),
            ceil_mode,
        ));
    }
    match auto_pad {
        "NOTSET" => Ok(PaddingSpec::ExplicitOnnxPool(
            tvec![0; spatial_rank],
            tvec![0; spatial_rank],
            ceil_mode,
        )),
        "VALID" => Ok(PaddingSpec::Valid),
        "SAME_UPPER" => Ok(PaddingSpec::SameUpper),
        "SAME_LOWER" => Ok(PaddingSpec::SameLower),
        other => bail!(
            "{}: attribute auto_pad = {other} is not supported",
            label(node)
        ),
    }
}

/// The channel axis of a tensor of `rank` in `format`.
fn channel_axis(format: DataFormat, rank: usize) -> usize {
    if format == DataFormat::NHWC {
        rank - 1
    } else {
        1
    }
}

fn pool_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    slots: &InputSlots,
    format: DataFormat,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, slots.wired())?;
    check_output_arity(outputs, 1)?;
    let node = slots.node.clone();
    let x = &inputs[slots.get(X).context("X")?];
    quantized_type_rule(s, x)?;
    match slots.get(Y_ZP) {
        Some(y_zp) => s.equals(&outputs[0].datum_type, &inputs[y_zp].datum_type)?,
        None => s.equals(&outputs[0].datum_type, &x.datum_type)?,
    }
    s.equals(&outputs[0].rank, &x.rank)?;
    s.equals(&outputs[0].shape[0], &x.shape[0])?;
    s.given(&x.rank, move |s, rank| {
        ensure!(
            rank >= 3,
            "{node}: input of rank {rank}, at least 3 expected"
        );
        let c = channel_axis(format, rank as usize);
        s.equals(&outputs[0].shape[c], &x.shape[c])
    })
}

/// Reads the x and y quantization of a pooling node.
fn pool_qparams(
    slots: &InputSlots,
    model: &TypedModel,
    inputs: &[OutletId],
) -> TractResult<(QParams, QParams)> {
    let node = &slots.node;
    let (_, x_dt, qx) = slots.quantized_input(model, inputs, "x", [X, X_SCALE, X_ZP])?;
    let qy = slots.output_qparams(model, inputs, "y", [Y_SCALE, Y_ZP], x_dt)?;
    ensure!(qx.is_per_tensor(), "{node}: x must be quantized per tensor");
    Ok((qx, qy))
}

/// `QLinearAveragePool`: attributes as `AveragePool` (kernel_shape, pads, strides,
/// auto_pad, ceil_mode, count_include_pad, dilations) plus `channels_last`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QLinearAveragePool {
    slots: InputSlots,
    pool: HirSumPool,
}

pub fn qlinear_average_pool(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let slots = InputSlots::of(node, 4, 5, &[])?;
    let format = data_format(node)?;
    let kernel_shape: TVec<usize> = node
        .get_attr_opt_tvec("kernel_shape")?
        .with_context(|| format!("{}: attribute kernel_shape is required", label(node)))?;
    ensure!(
        !kernel_shape.is_empty() && kernel_shape.iter().all(|k| *k > 0),
        "{}: attribute kernel_shape = {kernel_shape:?} is not valid",
        label(node)
    );
    let spatial_rank = kernel_shape.len();
    let padding = padding(node, spatial_rank)?;
    let strides: Option<TVec<usize>> = node.get_attr_opt_tvec("strides")?;
    let dilations: Option<TVec<usize>> = node.get_attr_opt_tvec("dilations")?;
    for (what, values) in [("strides", &strides), ("dilations", &dilations)] {
        if let Some(values) = values {
            ensure!(
                values.len() == spatial_rank && values.iter().all(|v| *v > 0),
                "{}: attribute {what} = {values:?} is not valid for a {spatial_rank}-d kernel",
                label(node)
            );
        }
    }
    let count_include_pad = match node.get_attr_opt::<i64>("count_include_pad")?.unwrap_or(0) {
        0 => false,
        1 => true,
        v => bail!(
            "{}: attribute count_include_pad = {v} is not supported (0 or 1)",
            label(node)
        ),
    };
    let pool_spec = PoolSpec::new(format, kernel_shape, padding, dilations, strides, 0, 0);
    let pool = HirSumPool::new(pool_spec, count_include_pad, true);
    Ok((expand(QLinearAveragePool { slots, pool }), vec![]))
}

impl Expansion for QLinearAveragePool {
    fn name(&self) -> StaticName {
        "QLinearAveragePool".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        pool_rules(
            s,
            &self.slots,
            self.pool.pool_spec.data_format,
            inputs,
            outputs,
        )
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let node = &self.slots.node;
        let (qx, qy) = pool_qparams(&self.slots, model, inputs)?;
        let x = self.slots.required(inputs, X)?;
        let rank = model.outlet_fact(x)?.rank();
        let spatial = self.pool.pool_spec.kernel_shape.len();
        ensure!(
            rank == spatial + 2,
            "{node}: input of rank {rank} for a {spatial}-d kernel (rank {} expected)",
            spatial + 2
        );
        let x = qx.wire_dequantize(model, &format!("{prefix}.dequantize"), x, 0)?;
        let pooled = self
            .pool
            .wire(&format!("{prefix}.pool"), model, &[x])
            .with_context(|| format!("{node}: pooling"))?[0];
        Ok(tvec!(qy.wire_quantize(model, node, prefix, pooled)?))
    }
}

/// `QLinearGlobalAveragePool`: mean over the spatial axes; attribute `channels_last`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QLinearGlobalAveragePool {
    slots: InputSlots,
    format: DataFormat,
}

pub fn qlinear_global_average_pool(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let slots = InputSlots::of(node, 4, 5, &[])?;
    let format = data_format(node)?;
    Ok((expand(QLinearGlobalAveragePool { slots, format }), vec![]))
}

impl Expansion for QLinearGlobalAveragePool {
    fn name(&self) -> StaticName {
        "QLinearGlobalAveragePool".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        pool_rules(s, &self.slots, self.format, inputs, outputs)?;
        let x = &inputs[self.slots.get(X).context("X")?];
        let format = self.format;
        s.given(&x.rank, move |s, rank| {
            let rank = rank as usize;
            if rank < 3 {
                return Ok(());
            }
            let c = channel_axis(format, rank);
            for axis in (1..rank).filter(|a| *a != c) {
                s.equals(&outputs[0].shape[axis], TDim::from(1))?;
            }
            Ok(())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let node = &self.slots.node;
        let (qx, qy) = pool_qparams(&self.slots, model, inputs)?;
        let x = self.slots.required(inputs, X)?;
        let fact = model.outlet_fact(x)?.clone();
        let rank = fact.rank();
        ensure!(
            rank >= 3,
            "{node}: input of rank {rank}, at least 3 expected"
        );
        let c = channel_axis(self.format, rank);
        let axes: TVec<usize> = (1..rank).filter(|a| *a != c).collect();
        let count: TDim = axes.iter().map(|a| fact.shape[*a].clone()).product();
        if let Ok(count) = count.to_usize() {
            ensure!(count > 0, "{node}: empty spatial dimensions");
            // Sum the integers (x - x_zero_point), exact in f32, and requantize with
            // the one multiplier x_scale / (count · y_scale), as onnxruntime's kernel
            // does: this avoids a rounding per element.
            let centered = QParams {
                scale: vec![1.0],
                ..qx.clone()
            };
            let x = centered.wire_dequantize(model, &format!("{prefix}.center"), x, 0)?;
            let sum = model.wire_node(
                format!("{prefix}.sum"),
                Reduce::new(axes, Reducer::Sum),
                &[x],
            )?[0];
            let multiplier = qx.scale[0] / (count as f32 * qy.single_scale(node, "y")?);
            return Ok(tvec!(
                qy.wire_requantize(model, node, prefix, sum, multiplier)?
            ));
        }
        let x = qx.wire_dequantize(model, &format!("{prefix}.dequantize"), x, 0)?;
        let sum = model.wire_node(
            format!("{prefix}.sum"),
            Reduce::new(axes, Reducer::Sum),
            &[x],
        )?[0];
        let count = model.add_const(format!("{prefix}.count"), tensor0(count))?;
        let count = model.wire_node(
            format!("{prefix}.count_f32"),
            tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
            &[count],
        )?[0];
        let mean = tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast(
            format!("{prefix}.mean"),
            model,
            math::div(),
            &[sum, count],
        )?[0];
        Ok(tvec!(qy.wire_quantize(model, node, prefix, mean)?))
    }
}
