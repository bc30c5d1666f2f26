//! [`QuantChannelMlp`]: a PoolFormer block's channel-MLP half as an int8 graph
//! defines it (quantized norm output, integer fc1, GELU, quantized, integer fc2,
//! layer scale, residual), in one op over the residual stream `[1, C, H, W]` f32.
//! The arithmetic is in [`crate::kernels::qmlp`].

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::qgemm::{k4_len, QKernel};
use crate::kernels::qmlp::{
    acc_len, hidden_rows, output_rows, quantize_input, run_block, QScratch, QuantMlp,
};
use crate::kernels::Isa;

use super::metaformer::{plane_dims, same_fact, stats, SendPtr};
use super::{executor_threads, in_pool};

#[derive(Debug, Clone, PartialEq)]
pub struct QuantChannelMlp {
    pub mlp: Arc<QuantMlp>,
    pub eps: f32,
}

// Parameters compare exactly; NaN never comes out of the pass.
impl Eq for QuantChannelMlp {}

impl Op for QuantChannelMlp {
    fn name(&self) -> StaticName {
        "PfeQuantChannelMlp".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "GroupNorm(1) + Q + int8 fc1 + GELU + Q + int8 fc2 + layer scale + residual, {}→{}→{}, {} / {}",
            self.mlp.channels,
            self.mlp.hidden,
            self.mlp.channels,
            QKernel::for_weights(Isa::best(), &self.mlp.fc1.weights).name(),
            QKernel::for_weights(Isa::best(), &self.mlp.fc2.weights).name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantChannelMlp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (c, h, w) = plane_dims(x.shape())?;
        let mlp = &*self.mlp;
        ensure!(
            c == mlp.channels,
            "int8 channel MLP: {c} channels, weights for {}",
            mlp.channels
        );
        let hw = h * w;
        let isa = Isa::best();
        let xs: &[f32] = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (executor, threads) = executor_threads();
        let stats = stats(isa, xs, self.eps, &executor, threads);
        let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        let blocks = mlp.blocks(hw, threads);
        let mut view = out.try_as_plain_ram_mut()?;
        let op = SendPtr(view.as_slice_mut::<f32>()?.as_mut_ptr());
        let xp = xs.as_ptr() as usize;
        // SAFETY (all branches): each call writes only its own columns (or, split by
        // rows, its own rows of its block's columns) of `out`, which outlives the
        // calls; `x` is only read.
        if threads > 1 && blocks.len() >= threads {
            in_pool(&executor, || {
                blocks
                    .par_iter()
                    .for_each_init(QScratch::default, |scratch, &cols| unsafe {
                        run_block(
                            isa,
                            mlp,
                            xp as *const f32,
                            op.get(),
                            hw,
                            cols,
                            stats,
                            scratch,
                        )
                    })
            });
        } else if threads > 1 {
            in_pool(&executor, || {
                for &cols in &blocks {
                    unsafe { block_split_by_rows(isa, mlp, xs, op, hw, cols, stats, threads) }
                }
            });
        } else {
            let mut scratch = QScratch::default();
            for &cols in &blocks {
                unsafe {
                    run_block(
                        isa,
                        mlp,
                        xp as *const f32,
                        op.get(),
                        hw,
                        cols,
                        stats,
                        &mut scratch,
                    )
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// One column block with both matrix products split by rows over `threads` (for the
/// last stage, whose few columns make one block).
///
/// # Safety
/// `out` must be valid for writes of `channels·hw` f32 that no one else accesses.
#[allow(clippy::too_many_arguments)]
unsafe fn block_split_by_rows(
    isa: Isa,
    mlp: &QuantMlp,
    xs: &[f32],
    out: SendPtr,
    hw: usize,
    (j0, j1): (usize, usize),
    stats: (f32, f32),
    threads: usize,
) {
    let cols = j1 - j0;
    let (c, h) = (mlp.channels, mlp.hidden);
    let xs = &xs[j0..];
    let mut q1 = vec![0u8; k4_len(c, cols)];
    quantize_input(isa, mlp, xs, hw, cols, stats, &mut q1);
    let mut q2 = vec![0u8; k4_len(h, cols)];
    // Hidden rows in whole k4 groups per thread.
    let per = h.div_ceil(4).div_ceil(threads) * 4;
    q2.par_chunks_mut(per * cols)
        .enumerate()
        .for_each(|(t, q2_part)| {
            let rows = t * per..((t + 1) * per).min(h);
            let mut acc = vec![0i32; acc_len(rows.len(), cols)];
            hidden_rows(isa, mlp, &q1, cols, rows, &mut acc, q2_part);
        });
    let per = c.div_ceil(threads);
    (0..threads).into_par_iter().for_each(|t| {
        let rows = (t * per).min(c)..((t + 1) * per).min(c);
        if rows.is_empty() {
            return;
        }
        let mut acc = vec![0i32; acc_len(rows.len(), cols)];
        output_rows(isa, mlp, &q2, cols, rows, &mut acc, |r| {
            let dst = std::slice::from_raw_parts_mut(out.get().add(r * hw + j0), cols);
            (&xs[r * hw..r * hw + cols], dst)
        });
    });
}

impl TypedOp for QuantChannelMlp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        same_fact(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let tokens = inputs[0].shape.iter().skip(2).product::<TDim>();
        let macs = 2 * self.mlp.channels * self.mlp.hidden;
        Ok(tvec!((Cost::FMA(i8::datum_type()), tokens * macs)))
    }

    as_op!();
}
