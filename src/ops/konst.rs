//! A constant that declines axis changes, for large weights during tract's declutter.
//!
//! tract's `ChangeAxes` pass tries to remove every unit axis of every value, and each
//! try that reaches a `Const` deep-copies its tensor first (`Const::change_axes`), even
//! when a consumer then refuses the change. For the `[O, I, 1, 1]` weights of 1×1
//! convs that is a full copy of every weight on every declutter round: about a third
//! of the load time of PoolFormer-S12. Before the declutter, [`pin`] replaces such
//! constants by [`PinnedConst`]: its output fact carries the value (`konst`), so every
//! pass that reads constants sees it, but it declines axis changes without copying,
//! and constant propagation leaves it in place. [`unpin`] turns the ones left into
//! plain `Const`s before tract optimizes the graph.

use tract_core::internal::*;
use tract_core::ops::konst::Const;

#[derive(Debug, Clone, PartialEq)]
pub struct PinnedConst(pub Arc<Tensor>);

impl Eq for PinnedConst {}

impl Op for PinnedConst {
    fn name(&self) -> StaticName {
        "PinnedConst".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} {:?}",
            self.0.datum_type(),
            self.0.shape()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PinnedConst {
    /// Declines, so that constant propagation does not turn it into a `Const`.
    fn eval_out_of_plan(&self, _inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(None)
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.is_empty(), "PinnedConst takes no input");
        Ok(tvec!(self.0.clone().into_tvalue()))
    }
}

impl TypedOp for PinnedConst {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.is_empty(), "PinnedConst takes no input");
        Ok(tvec!(TypedFact::try_from(self.0.clone())?))
    }

    as_op!();
}

/// Replaces every `Const` of `model` holding at least `min_len` values and a unit
/// axis (the ones `ChangeAxes` would copy) by a [`PinnedConst`].
pub fn pin(model: &mut TypedModel, min_len: usize) {
    for node in &mut model.nodes {
        if let Some(k) = node.op_as::<Const>() {
            let v = k.val();
            if v.len() >= min_len && v.shape().contains(&1) && v.is_plain_ram() {
                node.op = Box::new(PinnedConst(v.clone()));
            }
        }
    }
}

/// Replaces every [`PinnedConst`] of `model` by a `Const` of the same tensor.
pub fn unpin(model: &mut TypedModel) -> TractResult<()> {
    for node in &mut model.nodes {
        if let Some(p) = node.op_as::<PinnedConst>() {
            node.op = Box::new(Const::new(p.0.clone())?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::math;

    /// `x·c + d` with `c: [1, 3, 1, 1]` (unit axes) and `d: [2, 3, 4, 4]` (none).
    fn model() -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3, 4, 4]))?;
        let c = model.add_const("c", tensor4(&[[[[0.5f32]], [[-2.0]], [[3.0]]]]))?;
        let d = model.add_const("d", Tensor::from_shape(&[2, 3, 4, 4], &[0.25f32; 96])?)?;
        let y = model.wire_node("mul", math::mul(), &[x, c])?[0];
        let z = model.wire_node("add", math::add(), &[y, d])?[0];
        model.select_output_outlets(&[z])?;
        Ok(model)
    }

    fn run(model: TypedModel) -> TractResult<Tensor> {
        let x = Tensor::from_shape(
            &[1, 3, 4, 4],
            &(0..48).map(|i| i as f32).collect::<Vec<_>>(),
        )?;
        let out = model.into_runnable()?.run(tvec!(x.into_tvalue()))?;
        Ok(out[0].clone().into_tensor())
    }

    #[test]
    fn pins_large_constants_with_a_unit_axis_and_runs_the_same() -> TractResult<()> {
        let want = run(model()?.into_optimized()?)?;
        let mut pinned = model()?;
        pin(&mut pinned, 3);
        let names = |m: &TypedModel, op: &str| -> Vec<String> {
            m.nodes
                .iter()
                .filter(|n| n.op.name() == op)
                .map(|n| n.name.clone())
                .collect()
        };
        // `c` has unit axes and 3 values, `d` none; a larger threshold pins nothing.
        assert_eq!(names(&pinned, "PinnedConst"), ["c"]);
        let mut none = model()?;
        pin(&mut none, 4);
        assert!(names(&none, "PinnedConst").is_empty());
        // Its fact still carries the value, for every pass that reads constants.
        let c = pinned.node_by_name("c")?.id;
        assert_eq!(
            pinned.outlet_fact(c.into())?.konst.as_deref(),
            Some(&tensor4(&[[[[0.5f32]], [[-2.0]], [[3.0]]]]))
        );
        let mut pinned = pinned.into_decluttered()?;
        unpin(&mut pinned)?;
        assert!(names(&pinned, "PinnedConst").is_empty());
        assert_eq!(run(pinned.into_optimized()?)?, want);
        Ok(())
    }
}
