//! Graph passes over tract's `TypedModel`, run between loading and tract's own
//! optimizer. Each pass rewrites the patterns it recognizes exactly and leaves
//! everything else as it was, so a graph that matches nothing runs unchanged.
//!
//! Order: `int8` sees the graph as it comes out of the ONNX importer (before tract
//! constant-folds the Q/DQ structure away); `metaformer` sees the decluttered graph,
//! then `qconv` takes the integer convolutions it left and `conv` the float ones;
//! `eltwise` runs on tract's optimized graph and fuses the element-wise chains left
//! between them; then `qconv::fuse_chains` hands each chain that alone reads an
//! integer conv's output to that conv, to run on its output rows as they are made;
//! last, `rows` takes the sums and RMS norms over a channel axis followed only by unit
//! axes (the head's norm), where tract runs a slow generic path. Large constants with a
//! unit axis are pinned ([`crate::ops::konst`]) while tract declutters, which spares a
//! copy of every 1×1 conv weight on each declutter round.

use anyhow::Result;
use tract_onnx::prelude::*;

pub mod conv;
pub mod eltwise;
pub mod int8;
pub mod metaformer;
pub mod qconv;
pub mod rows;

/// What the passes did to one model, for `pfe info` and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    /// One line per rewrite kind, e.g. `token mixer ×12`.
    pub rewrites: Vec<String>,
}

/// Constants from this many values up are pinned during the declutter: the weights,
/// not the small per-channel vectors some of tract's own patterns look for.
const PIN_MIN_LEN: usize = 4096;

/// Runs this crate's passes, then tract's optimizer, on a freshly typed model.
pub fn optimize(model: TypedModel, fuse: bool) -> Result<(TypedModel, PassReport)> {
    let (mut model, mut report) = optimize_graph(model, fuse)?;
    if fuse {
        eltwise::rewrite(&mut model, &mut report)?;
        qconv::fuse_chains(&mut model, &mut report)?;
        rows::rewrite(&mut model, &mut report)?;
    }
    Ok((model, report))
}

/// [`optimize`] without its last pass (`eltwise`, which works on the optimized graph):
/// with it, the graph the element-wise chains are fused in.
pub fn optimize_graph(model: TypedModel, fuse: bool) -> Result<(TypedModel, PassReport)> {
    let mut report = PassReport::default();
    let mut model = model;
    if fuse {
        int8::rewrite(&mut model, &mut report)?;
        conv::keep_int8_weights(&mut model)?;
        crate::ops::konst::pin(&mut model, PIN_MIN_LEN);
    }
    let mut model = model.into_decluttered()?;
    if fuse {
        metaformer::rewrite(&mut model, &mut report)?;
        qconv::rewrite(&mut model, &mut report)?;
        conv::rewrite(&mut model, &mut report)?;
    }
    crate::ops::konst::unpin(&mut model)?;
    Ok((model.into_optimized()?, report))
}
