//! onnxruntime's `QGemm` contrib op (domain `com.microsoft`).
//!
//! Inputs `A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale,
//! y_zero_point` (C and y optional; without `y_scale` the output is f32);
//! attributes `alpha`, `transA`, `transB`. onnxruntime computes
//! `Y = alpha · a_scale · b_scale · (Σ (A - a_zp)(B - b_zp) + C)`: C is an i32 bias
//! in the accumulator's units. B may be quantized per output column (`b_scale`,
//! `b_zero_point` of length N).
//!
//! Wired as dequantize → f32 `EinSum` matmul → bias → quantize, like the other
//! ops of this family; the constant B is folded to f32 weights by tract.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_hir::internal::*;

use super::qlinear::{quantized_type_rule, InputSlots};

const A: usize = 0;
const A_SCALE: usize = 1;
const A_ZP: usize = 2;
const B: usize = 3;
const B_SCALE: usize = 4;
const B_ZP: usize = 5;
const C: usize = 6;
const Y_SCALE: usize = 7;
const Y_ZP: usize = 8;

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QGemm {
    slots: InputSlots,
    /// `alpha`'s bits (f32 is not `Hash`).
    alpha_bits: u32,
    trans_a: bool,
    trans_b: bool,
}

pub fn qgemm(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let slots = InputSlots::of(node, 5, 9, &[])?;
    let label = &slots.node;
    let alpha: f32 = node.get_attr_opt("alpha")?.unwrap_or(1.0);
    ensure!(
        alpha.is_finite(),
        "{label}: attribute alpha = {alpha} is not finite"
    );
    let flag = |name: &str| -> TractResult<bool> {
        match node.get_attr_opt::<i64>(name)?.unwrap_or(0) {
            0 => Ok(false),
            1 => Ok(true),
            v => bail!("{label}: attribute {name} = {v} is not supported (0 or 1)"),
        }
    };
    let trans_a = flag("transA")?;
    let trans_b = flag("transB")?;
    ensure!(
        slots.get(Y_ZP).is_none() || slots.get(Y_SCALE).is_some(),
        "{label}: y_zero_point without y_scale"
    );
    Ok((
        expand(QGemm {
            alpha_bits: alpha.to_bits(),
            trans_a,
            trans_b,
            slots,
        }),
        vec![],
    ))
}

impl Expansion for QGemm {
    fn name(&self) -> StaticName {
        "QGemm".into()
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
        s.equals(&a.rank, 2)?;
        s.equals(&b.rank, 2)?;
        s.equals(&outputs[0].rank, 2)?;
        match (self.slots.get(Y_SCALE), self.slots.get(Y_ZP)) {
            (None, _) => s.equals(&outputs[0].datum_type, f32::datum_type())?,
            (Some(_), Some(zp)) => s.equals(&outputs[0].datum_type, &inputs[zp].datum_type)?,
            (Some(_), None) => s.equals(&outputs[0].datum_type, &a.datum_type)?,
        }
        let (ka, ma) = if self.trans_a { (0, 1) } else { (1, 0) };
        let (nb, kb) = if self.trans_b { (0, 1) } else { (1, 0) };
        s.equals(&outputs[0].shape[0], &a.shape[ma])?;
        s.equals(&outputs[0].shape[1], &b.shape[nb])?;
        s.equals(&a.shape[ka], &b.shape[kb])
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
        ensure!(qa.is_per_tensor(), "{node}: A must be quantized per tensor");
        // B's output-column axis: N is axis 0 of a transposed [N, K] B.
        let n_axis = if self.trans_b { 0 } else { 1 };
        let a_f = qa.wire_dequantize(model, &format!("{prefix}.dequantize_a"), a, 0)?;
        let b_f = qb.wire_dequantize(model, &format!("{prefix}.dequantize_b"), b, n_axis)?;
        let axes = AxesMapping::for_numpy_matmul(2, self.trans_a, self.trans_b, false)?;
        let mut y = model.wire_node(
            format!("{prefix}.matmul"),
            EinSum::new(axes, f32::datum_type()),
            &[a_f, b_f],
        )?[0];
        if let Some(c) = slots.outlet(inputs, C) {
            let c_fact = model.outlet_fact(c)?.clone();
            ensure!(
                c_fact.datum_type == i32::datum_type(),
                "{node}: C is {:?}, i32 expected",
                c_fact.datum_type
            );
            ensure!(
                c_fact.rank() <= 2,
                "{node}: C has rank {}, at most 2 expected",
                c_fact.rank()
            );
            // C is in the accumulator's units: a_scale · b_scale, per column when B is.
            let a_scale = qa.scale[0];
            let scales: Vec<f32> = qb.scale.iter().map(|s| s * a_scale).collect();
            let scale = if scales.len() == 1 {
                tensor0(scales[0])
            } else {
                tensor1(&scales)
            };
            let scale = model.add_const(format!("{prefix}.bias_scale"), scale)?;
            let c =
                model.wire_node(format!("{prefix}.bias_cast"), cast(f32::datum_type()), &[c])?[0];
            let c = wire_with_rank_broadcast(
                format!("{prefix}.bias"),
                model,
                math::mul(),
                &[c, scale],
            )?[0];
            y = wire_with_rank_broadcast(
                format!("{prefix}.add_bias"),
                model,
                math::add(),
                &[y, c],
            )?[0];
        }
        let alpha = f32::from_bits(self.alpha_bits);
        if alpha != 1.0 {
            let alpha = model.add_const(format!("{prefix}.alpha"), tensor0(alpha))?;
            y = wire_with_rank_broadcast(
                format!("{prefix}.scale_alpha"),
                model,
                math::mul(),
                &[y, alpha],
            )?[0];
        }
        match slots.outlet(inputs, Y_SCALE) {
            None => Ok(tvec!(y)),
            Some(_) => {
                let qy = slots.output_qparams(model, inputs, "y", [Y_SCALE, Y_ZP], a_dt)?;
                Ok(tvec!(qy.wire_quantize(model, node, prefix, y)?))
            }
        }
    }
}
