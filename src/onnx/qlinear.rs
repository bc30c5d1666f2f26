//! onnxruntime's quantized element-wise contrib ops (domain `com.microsoft`):
//! `QLinearAdd` and `QLinearMul`, plus the quantization plumbing the other
//! QOperator ops of this module family share.
//!
//! Each op is an [`Expansion`] that wires ordinary tract core ops: dequantize its
//! inputs to f32, run the float op, quantize the result (round half to even,
//! saturate). tract's optimizer then sees plain `DequantizeLinearF32` / binary /
//! `QuantizeLinear` nodes, which it already folds (constant operands) and which a
//! later int8 pass can recognize. The results match onnxruntime's kernels within
//! one quantization step: those requantize their own way (QLinearAdd on x86 with
//! fixed-point multipliers, for one), so a value near a .5 tie can round the other way.

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::quant::{
    quantize_linear_i8, quantize_linear_u8, DequantizeLinearF32,
};
use tract_onnx::tract_hir::internal::*;

/// "node \"name\" (OpType)" for error messages; nameless nodes go by their first output.
pub(crate) fn node_label(node: &NodeProto) -> String {
    match (node.name.is_empty(), node.output.first()) {
        (true, Some(output)) => format!("node producing {output:?} ({})", node.op_type),
        _ => format!("node {:?} ({})", node.name, node.op_type),
    }
}

/// Where each logical input of a node sits among the inputs tract wires: absent
/// optional inputs (empty names) are not wired, so later ones shift down.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub(crate) struct InputSlots {
    /// The node's name and op type, for error messages.
    pub node: String,
    slots: Vec<Option<usize>>,
}

impl InputSlots {
    /// Slots of `node`, which has `max` logical inputs of which the first `required`
    /// must be present, and also those listed in `also_required`.
    pub fn of(
        node: &NodeProto,
        required: usize,
        max: usize,
        also_required: &[usize],
    ) -> TractResult<InputSlots> {
        let label = node_label(node);
        ensure!(
            node.input.len() <= max,
            "{label}: {} inputs, at most {max} expected",
            node.input.len()
        );
        let slots: Vec<Option<usize>> = optional_inputs(node).take(max).collect();
        for (ix, slot) in slots.iter().enumerate() {
            if (ix < required || also_required.contains(&ix)) && slot.is_none() {
                bail!("{label}: required input #{ix} is missing");
            }
        }
        Ok(InputSlots { node: label, slots })
    }

    /// Position of logical input `ix` among the wired inputs, if present.
    pub fn get(&self, ix: usize) -> Option<usize> {
        self.slots.get(ix).copied().flatten()
    }

    /// Number of inputs tract wires for this node.
    pub fn wired(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// The wired outlet of logical input `ix`, if present.
    pub fn outlet(&self, inputs: &[OutletId], ix: usize) -> Option<OutletId> {
        self.get(ix).and_then(|i| inputs.get(i).copied())
    }

    /// The wired outlet of logical input `ix`, which must be present.
    pub fn required(&self, inputs: &[OutletId], ix: usize) -> TractResult<OutletId> {
        self.outlet(inputs, ix)
            .with_context(|| format!("{}: input #{ix} is missing", self.node))
    }

    /// A quantized input (logical slots `value`, `scale`, `zero_point`): its outlet,
    /// its integer type and its quantization. `what` names it in errors ("A", "x").
    pub fn quantized_input(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
        what: &str,
        [value, scale, zero_point]: [usize; 3],
    ) -> TractResult<(OutletId, DatumType, QParams)> {
        let outlet = self.required(inputs, value)?;
        let dt = model.outlet_fact(outlet)?.datum_type;
        let q = QParams::read(
            model,
            &self.node,
            what,
            self.required(inputs, scale)?,
            self.outlet(inputs, zero_point),
            Some(dt),
        )?;
        Ok((outlet, dt, q))
    }

    /// The quantization of an output (logical slots `scale`, `zero_point`): its type
    /// is the zero point's, or `default_dt` without one.
    pub fn output_qparams(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
        what: &str,
        [scale, zero_point]: [usize; 2],
        default_dt: DatumType,
    ) -> TractResult<QParams> {
        QParams::read(
            model,
            &self.node,
            what,
            self.required(inputs, scale)?,
            self.outlet(inputs, zero_point),
            self.get(zero_point).is_none().then_some(default_dt),
        )
    }
}

/// The constant value behind `outlet`, or an error naming `what`.
fn constant(
    model: &TypedModel,
    outlet: OutletId,
    node: &str,
    what: &str,
) -> TractResult<Arc<Tensor>> {
    model
        .outlet_fact(outlet)?
        .konst
        .clone()
        .with_context(|| format!("{node}: {what} must be a constant (an initializer)"))
}

/// Quantization parameters of one tensor, read from constant inputs.
#[derive(Debug, Clone)]
pub(crate) struct QParams {
    /// One scale, or one per channel along the quantized axis.
    pub scale: Vec<f32>,
    /// One zero point, or one per channel; same length as `scale` or 1.
    pub zero_point: Vec<i32>,
    /// Integer type of the quantized tensor: the zero point's, or the data's when absent.
    pub datum_type: DatumType,
}

impl QParams {
    /// Reads `scale` and the optional `zero_point` of a tensor of type `data_dt`
    /// (`None` when the type is only known from the zero point). `what` names the
    /// tensor in errors ("A", "y").
    pub fn read(
        model: &TypedModel,
        node: &str,
        what: &str,
        scale: OutletId,
        zero_point: Option<OutletId>,
        data_dt: Option<DatumType>,
    ) -> TractResult<QParams> {
        let scale_t = constant(model, scale, node, &format!("{what} scale"))?;
        ensure!(
            scale_t.datum_type() == f32::datum_type(),
            "{node}: {what} scale is {:?}, f32 expected",
            scale_t.datum_type()
        );
        ensure!(
            scale_t.rank() <= 1,
            "{node}: {what} scale has rank {}, 0 or 1 expected",
            scale_t.rank()
        );
        let scale = scale_t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        ensure!(!scale.is_empty(), "{node}: {what} scale is empty");
        ensure!(
            scale.iter().all(|s| s.is_finite() && *s > 0.0),
            "{node}: {what} scale must be finite and positive, got {scale:?}"
        );
        let (zero_point, datum_type) = match zero_point {
            Some(zp) => {
                let zp_t = constant(model, zp, node, &format!("{what} zero point"))?;
                let dt = zp_t.datum_type();
                ensure!(
                    matches!(dt, DatumType::U8 | DatumType::I8),
                    "{node}: {what} zero point is {dt:?}, u8 or i8 expected"
                );
                ensure!(
                    zp_t.rank() <= 1,
                    "{node}: {what} zero point has rank {}, 0 or 1 expected",
                    zp_t.rank()
                );
                if let Some(data_dt) = data_dt {
                    ensure!(
                        data_dt == dt,
                        "{node}: {what} is {data_dt:?} but its zero point is {dt:?}"
                    );
                }
                let values = zp_t
                    .cast_to::<i32>()?
                    .try_as_plain_ram()?
                    .as_slice::<i32>()?
                    .to_vec();
                ensure!(!values.is_empty(), "{node}: {what} zero point is empty");
                (values, dt)
            }
            None => {
                let dt = data_dt.unwrap_or(DatumType::U8);
                ensure!(
                    matches!(dt, DatumType::U8 | DatumType::I8),
                    "{node}: {what} is {dt:?}, u8 or i8 expected"
                );
                (vec![0], dt)
            }
        };
        if scale.len() > 1 && zero_point.len() > 1 {
            ensure!(
                scale.len() == zero_point.len(),
                "{node}: {what} has {} scales but {} zero points",
                scale.len(),
                zero_point.len()
            );
        }
        Ok(QParams {
            scale,
            zero_point,
            datum_type,
        })
    }

    pub fn is_per_tensor(&self) -> bool {
        self.scale.len() == 1 && self.zero_point.len() == 1
    }

    /// Number of channels of a per-axis quantization (1 when per-tensor).
    pub fn channels(&self) -> usize {
        self.scale.len().max(self.zero_point.len())
    }

    /// The scale of a per-tensor quantization.
    pub fn single_scale(&self, node: &str, what: &str) -> TractResult<f32> {
        ensure!(
            self.scale.len() == 1,
            "{node}: {what} must be quantized per tensor"
        );
        Ok(self.scale[0])
    }

    /// `(x - zero_point) * scale` as f32; per-axis parameters broadcast along `axis`.
    pub fn wire_dequantize(
        &self,
        model: &mut TypedModel,
        name: &str,
        x: OutletId,
        axis: usize,
    ) -> TractResult<OutletId> {
        let fact = model.outlet_fact(x)?.clone();
        ensure!(
            fact.datum_type == self.datum_type,
            "{name}: input is {:?}, its zero point says {:?}",
            fact.datum_type,
            self.datum_type
        );
        if self.is_per_tensor() {
            let op = DequantizeLinearF32::new(self.scale[0], self.zero_point[0]);
            return Ok(model.wire_node(name, op, &[x])?[0]);
        }
        let rank = fact.rank();
        ensure!(
            axis < rank,
            "{name}: quantization axis {axis} out of range for rank {rank}"
        );
        let channels = self.channels();
        let dim = &fact.shape[axis];
        if let Ok(dim) = dim.to_usize() {
            ensure!(
                dim == channels,
                "{name}: {channels} per-channel quantization parameters for an axis of {dim}"
            );
        }
        let per_axis = |values: Vec<f32>| -> TractResult<Tensor> {
            let mut shape = tvec![1; rank];
            shape[axis] = values.len();
            tensor1(&values).into_shape(&shape)
        };
        let zero_point = per_axis(self.zero_point.iter().map(|z| *z as f32).collect())?;
        let scale = per_axis(self.scale.clone())?;
        let zero_point = model.add_const(format!("{name}.zero_point"), zero_point)?;
        let scale = model.add_const(format!("{name}.scale"), scale)?;
        let wire = model.wire_node(format!("{name}.cast"), cast(f32::datum_type()), &[x])?;
        let wire = model.wire_node(format!("{name}.sub"), math::sub(), &[wire[0], zero_point])?;
        Ok(model.wire_node(name, math::mul(), &[wire[0], scale])?[0])
    }

    /// `saturate(round_half_even(x / scale) + zero_point)` of an f32 wire, to this
    /// type (tract multiplies by `1 / scale`). Output quantization is per tensor for
    /// every op of this family.
    pub fn wire_quantize(
        &self,
        model: &mut TypedModel,
        node: &str,
        name: &str,
        x: OutletId,
    ) -> TractResult<OutletId> {
        ensure!(
            self.is_per_tensor(),
            "{node}: output quantization must be per tensor"
        );
        self.wire_requantize(model, node, name, x, self.scale[0].recip())
    }

    /// `saturate(round_half_even(x · multiplier) + zero_point)` of an f32 wire, to
    /// this type.
    pub fn wire_requantize(
        &self,
        model: &mut TypedModel,
        node: &str,
        name: &str,
        x: OutletId,
        multiplier: f32,
    ) -> TractResult<OutletId> {
        ensure!(
            self.is_per_tensor(),
            "{node}: output quantization must be per tensor"
        );
        let zp = self.zero_point[0];
        let op = match self.datum_type {
            DatumType::U8 => quantize_linear_u8(multiplier, zp as u8),
            DatumType::I8 => quantize_linear_i8(multiplier, zp as i8),
            dt => bail!("{node}: cannot quantize to {dt:?}"),
        };
        Ok(model.wire_node(name, op, &[x])?[0])
    }
}

/// Rejects a quantized data input that is not u8 or i8 once its type is known.
pub(crate) fn quantized_type_rule<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    data: &'p TensorProxy,
) -> InferenceResult {
    s.given(&data.datum_type, |_, dt| {
        ensure!(
            matches!(dt, DatumType::U8 | DatumType::I8),
            "quantized input is {dt:?}, u8 or i8 expected"
        );
        Ok(())
    })
}

/// Which float op a [`QLinearBinary`] applies.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Mul,
}

/// `QLinearAdd` / `QLinearMul`: inputs `A, A_scale, A_zero_point, B, B_scale,
/// B_zero_point, C_scale, C_zero_point` (zero points optional), numpy broadcasting.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QLinearBinary {
    kind: BinaryKind,
    slots: InputSlots,
}

const A: usize = 0;
const A_SCALE: usize = 1;
const A_ZP: usize = 2;
const B: usize = 3;
const B_SCALE: usize = 4;
const B_ZP: usize = 5;
const C_SCALE: usize = 6;
const C_ZP: usize = 7;

pub fn qlinear_add(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    qlinear_binary(node, BinaryKind::Add)
}

pub fn qlinear_mul(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    qlinear_binary(node, BinaryKind::Mul)
}

fn qlinear_binary(
    node: &NodeProto,
    kind: BinaryKind,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let slots = InputSlots::of(node, 2, 8, &[B, B_SCALE, C_SCALE])?;
    Ok((expand(QLinearBinary { kind, slots }), vec![]))
}

impl Expansion for QLinearBinary {
    fn name(&self) -> StaticName {
        match self.kind {
            BinaryKind::Add => "QLinearAdd".into(),
            BinaryKind::Mul => "QLinearMul".into(),
        }
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.slots.wired())?;
        check_output_arity(outputs, 1)?;
        let a = &inputs[self.slots.get(A).context("A")?];
        let b = &inputs[self.slots.get(B).context("B")?];
        quantized_type_rule(s, a)?;
        quantized_type_rule(s, b)?;
        match self.slots.get(C_ZP) {
            Some(c_zp) => s.equals(&outputs[0].datum_type, &inputs[c_zp].datum_type)?,
            None => s.equals(&outputs[0].datum_type, &a.datum_type)?,
        }
        s.given_2(&a.shape, &b.shape, move |s, a, b| {
            s.equals(
                &outputs[0].shape,
                tract_onnx::tract_core::broadcast::multi_broadcast(&[a, b])?,
            )
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let node = &self.slots.node;
        let slots = &self.slots;
        let (a, a_dt, qa) = slots.quantized_input(model, inputs, "A", [A, A_SCALE, A_ZP])?;
        let (b, _, qb) = slots.quantized_input(model, inputs, "B", [B, B_SCALE, B_ZP])?;
        let qc = slots.output_qparams(model, inputs, "C", [C_SCALE, C_ZP], a_dt)?;
        ensure!(
            qa.is_per_tensor() && qb.is_per_tensor(),
            "{node}: per-channel scales or zero points are not supported on A or B"
        );
        let a = qa.wire_dequantize(model, &format!("{prefix}.dequantize_a"), a, 0)?;
        let b = qb.wire_dequantize(model, &format!("{prefix}.dequantize_b"), b, 0)?;
        let op = match self.kind {
            BinaryKind::Add => math::add(),
            BinaryKind::Mul => math::mul(),
        };
        let c = wire_with_rank_broadcast(format!("{prefix}.float"), model, op, &[a, b])?[0];
        Ok(tvec!(qc.wire_quantize(model, node, prefix, c)?))
    }
}
