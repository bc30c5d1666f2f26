//! tract's `Reduce<Sum>` and `RmsNorm` over a non-last axis followed only by unit axes
//! → [`RowReduce`], which gives the same bits without tract's generic per-element
//! path (see [`crate::ops::rows`]). Runs on the optimized graph.

use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::PassReport;
use crate::ops::rows::{RowOp, RowReduce};

pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.inputs.len() != 1 {
            continue;
        }
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if fact.datum_type != f32::datum_type() || fact.konst.is_some() {
            continue;
        }
        let row = if let Some(r) = node.op_as::<Reduce>() {
            match (r.reducer, r.axes.as_slice()) {
                (Reducer::Sum, &[axis]) => Some(RowReduce {
                    axis,
                    op: RowOp::Sum,
                }),
                _ => None,
            }
        } else if let Some(n) = node.op_as::<RmsNorm>() {
            n.eps.cast_to_scalar::<f32>().ok().map(|eps| RowReduce {
                axis: n.axis,
                op: RowOp::RmsNorm { eps },
            })
        } else {
            None
        };
        let Some(row) = row.filter(|r| RowReduce::fits(shape, r.axis)) else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, row)?;
        patch.apply(model)?;
        count += 1;
    }
    if count > 0 {
        report
            .rewrites
            .push(format!("sum / RMS norm over a unit-tailed axis ×{count}"));
    }
    Ok(())
}
