//! tract's `Reduce<Sum>` and `RmsNorm` over one axis that is not the last but has
//! only unit axes after it, so that its values lie side by side in memory: on such an
//! axis tract takes a generic path (an ndarray view per element, about 100 ns each),
//! while its fast paths want the reduced axis last. PoolFormer's head has two, in its
//! LayerNorm over the 512 pooled channels of a `1×512×1×1` tensor: 55 and 68 µs of
//! tract's time for 512 values each.
//!
//! [`RowReduce`] computes the same additions in the same order as that generic path
//! (`((0 + x₀) + x₁) + …`, ndarray's `sum_axis` on an axis it does not iterate as
//! lanes), so its results are tract's bit for bit.

use tract_core::internal::*;

/// What [`RowReduce`] computes over each row (the values along `axis`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowOp {
    /// The row's sum; the output has length 1 on `axis` (tract's `Reduce<Sum>`).
    Sum,
    /// `x / √(mean(x²) + eps)` for each value (tract's `RmsNorm`).
    RmsNorm { eps: f32 },
}

/// [`RowOp`] along `axis` of an f32 tensor whose axes after `axis` all have length 1.
#[derive(Debug, Clone, PartialEq)]
pub struct RowReduce {
    pub axis: usize,
    pub op: RowOp,
}

impl Eq for RowReduce {}

impl std::hash::Hash for RowReduce {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.axis.hash(state);
        match self.op {
            RowOp::Sum => 0u32.hash(state),
            RowOp::RmsNorm { eps } => eps.to_bits().hash(state),
        }
    }
}

impl RowReduce {
    /// Whether the op applies to `shape`: `axis` is not the last axis and every
    /// later axis has length 1.
    pub fn fits(shape: &[usize], axis: usize) -> bool {
        axis + 1 < shape.len() && shape[axis + 1..].iter().all(|&d| d == 1)
    }

    /// The op on a plain f32 array of `shape`, into `out` (`xs.len()` values for
    /// `RmsNorm`, one per row for `Sum`).
    pub fn apply(&self, shape: &[usize], xs: &[f32], out: &mut [f32]) -> TractResult<()> {
        ensure!(
            Self::fits(shape, self.axis),
            "row reduction over axis {} of shape {shape:?}",
            self.axis
        );
        let len = shape[self.axis];
        ensure!(xs.len() == shape.iter().product::<usize>());
        if len == 0 {
            return Ok(());
        }
        match self.op {
            RowOp::Sum => {
                ensure!(out.len() == xs.len() / len);
                for (o, row) in out.iter_mut().zip(xs.chunks_exact(len)) {
                    *o = row.iter().fold(0.0, |s, &x| s + x);
                }
            }
            RowOp::RmsNorm { eps } => {
                ensure!(out.len() == xs.len());
                // tract's factor: output length over input length, in f32.
                let rows = xs.len() / len;
                let norm = rows as f32 / xs.len() as f32;
                for (o, row) in out.chunks_exact_mut(len).zip(xs.chunks_exact(len)) {
                    let squares = row.iter().fold(0.0, |s, &x| s + x * x);
                    let r = (squares * norm + eps).sqrt().recip();
                    for (o, &x) in o.iter_mut().zip(row) {
                        *o = r * x;
                    }
                }
            }
        }
        Ok(())
    }

    fn output_shape(&self, shape: &[usize]) -> TVec<usize> {
        let mut s: TVec<usize> = shape.into();
        if self.op == RowOp::Sum {
            s[self.axis] = 1;
        }
        s
    }
}

impl Op for RowReduce {
    fn name(&self) -> StaticName {
        match self.op {
            RowOp::Sum => "PfeRowSum".into(),
            RowOp::RmsNorm { .. } => "PfeRowRmsNorm".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis: {}, {:?}", self.axis, self.op)])
    }

    op_as_typed_op!();
}

impl EvalOp for RowReduce {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        ensure!(
            x.datum_type() == f32::datum_type(),
            "row reduction expects f32, got {:?}",
            x.datum_type()
        );
        let mut out = Tensor::zero::<f32>(&self.output_shape(x.shape()))?;
        {
            let xs = x.try_as_plain_ram()?;
            let mut view = out.try_as_plain_ram_mut()?;
            self.apply(
                x.shape(),
                xs.as_slice::<f32>()?,
                view.as_slice_mut::<f32>()?,
            )?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for RowReduce {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        ensure!(fact.datum_type == f32::datum_type());
        let shape = fact
            .shape
            .as_concrete()
            .context("row reduction needs a concrete shape")?;
        ensure!(Self::fits(shape, self.axis));
        Ok(tvec!(f32::fact(self.output_shape(shape))))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape.volume()
        )))
    }

    as_op!();
}
