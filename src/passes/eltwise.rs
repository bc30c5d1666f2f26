//! Element-wise chains → [`ElementwiseChain`], on the optimized graph (after tract's
//! code generation, where its binary ops have become `OptBinByScalar` and
//! `OptBinUnicast`).
//!
//! A chain is a run of nodes where each one's only consumer is the next, all on one
//! tensor shape `[1, C, …]`:
//!
//! - head (optional): this crate's `Requant` from i32 to f32, per channel on axis 1,
//!   or tract's `SumPool` as ONNX's AveragePool 3×3 / 1 / pad 1 without counting the
//!   padding (the pooling mixer), computed exactly as tract does;
//! - steps: `FakeQuant`, `Square`, `Erf`, and `+ − ×` by a value or one per channel
//!   (`OptBinByScalar`, the operand a constant or a computed tensor such as a
//!   GroupNorm's mean) or by a tensor of the chain's shape (`OptBinUnicast`);
//! - tail (optional): this crate's `Quantize` to u8 / i8, or tract's `Reduce<Sum>` over
//!   every axis but the first (a GroupNorm's variance: the squares are summed as they
//!   are made, never written out).
//!
//! One exception to "only consumer": a `Requant` head whose readers are all in the chain
//! (an erf GELU reads its input twice) is kept, and the later readers take the head's
//! value from the chain's scratch (`Step::TensorHead`).
//!
//! Two or more such nodes become one op; so does a lone `Reduce<Sum>` of that kind,
//! which the op adds faster in the same order. This is where graphs quantized op by op
//! spend their time outside the convolutions (see `crate::ops::eltwise`); graphs the
//! MetaFormer pass fused have few such chains left.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::binary::{OptBinByScalar, OptBinUnicast};
use tract_core::ops::cnn::{OptSumPool, PaddingSpec};
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::{DataFormat, Reduce, Reducer};
use tract_linalg::BinOp;

use super::PassReport;
use crate::ops::eltwise::{Arith, ElementwiseChain, Head, Operand, Step, Tail};
use crate::ops::requant::{FakeQuant, Quantize, Requant, RequantOut};

/// Chains on fewer elements are left alone.
const MIN_ELEMENTS: usize = 1024;

pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let mut taken: HashSet<usize> = HashSet::new();
    let mut chains = Vec::new();
    let order = model.eval_order()?;
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    for id in order {
        if taken.contains(&id) {
            continue;
        }
        if let Some(chain) = grow(model, id, &taken, &position)? {
            taken.extend(chain.nodes.iter().copied());
            chains.push(chain);
        }
    }
    if chains.is_empty() {
        return Ok(());
    }
    let fused: usize = chains.iter().map(|c| c.nodes.len()).sum();
    // A chain's input may be the output of a chain replaced before it.
    let mut replaced: HashMap<OutletId, OutletId> = HashMap::new();
    for chain in &chains {
        let last = OutletId::new(*chain.nodes.last().unwrap(), 0);
        let new = apply(model, chain, &replaced)?;
        replaced.insert(last, new);
    }
    model.compact()?;
    report.rewrites.push(format!(
        "element-wise chains ×{} ({fused} nodes)",
        chains.len()
    ));
    Ok(())
}

/// A chain found in the graph: its nodes, what each does, and the operand outlets.
struct Found {
    nodes: Vec<usize>,
    stream: OutletId,
    head: Head,
    steps: Vec<Step>,
    /// Per step, the outlet of a computed operand (`Operand::Input` / `Step::Tensor`),
    /// numbered later.
    step_inputs: Vec<Option<OutletId>>,
    tail: Tail,
}

/// What one node contributes to a chain.
enum Link {
    Head(Head),
    Step(Step, Option<OutletId>),
    Tail(Tail),
}

/// The chain starting at `id`, if it has two nodes or more.
///
/// A `Requant` head whose value is read by several nodes is taken when all of them end
/// up in the chain: the stream goes on through the reader that runs first, and the
/// others read the kept head value (`Step::TensorHead`).
fn grow(
    model: &TypedModel,
    id: usize,
    taken: &HashSet<usize>,
    position: &HashMap<usize, usize>,
) -> TractResult<Option<Found>> {
    let node = model.node(id);
    if node.inputs.is_empty() || node.outputs.len() != 1 {
        return Ok(None);
    }
    let stream = node.inputs[0];
    let Some(shape) = chain_shape(model, stream)? else {
        return Ok(None);
    };
    if sums_all_but_first(model, id, &shape)? {
        // A sum of a tensor no chain made (a GroupNorm's mean of the residual stream):
        // the same additions in the same order, eight lanes at a time.
        return Ok(Some(Found {
            nodes: vec![id],
            stream,
            head: Head::F32,
            steps: vec![],
            step_inputs: vec![],
            tail: Tail::Sum,
        }));
    }
    let mut found = Found {
        nodes: vec![],
        stream,
        head: Head::F32,
        steps: vec![],
        step_inputs: vec![],
        tail: Tail::F32,
    };
    match link(model, id, stream, &shape)? {
        Some(Link::Head(h)) => found.head = h,
        Some(Link::Step(s, o)) => {
            found.steps.push(s);
            found.step_inputs.push(o);
        }
        _ => return Ok(None),
    }
    found.nodes.push(id);
    loop {
        let last = *found.nodes.last().unwrap();
        let out = OutletId::new(last, 0);
        if model.output_outlets()?.contains(&out) {
            break;
        }
        let succ = model.outlet_successors(out);
        let shared_head = last == id && matches!(found.head, Head::Requant(_));
        if succ.len() != 1 && !(shared_head && succ.len() > 1) {
            break;
        }
        let next = succ
            .iter()
            .map(|s| s.node)
            .min_by_key(|n| position.get(n).copied().unwrap_or(usize::MAX))
            .unwrap();
        if taken.contains(&next) || model.node(next).outputs.len() != 1 {
            break;
        }
        match link(model, next, out, &shape)? {
            Some(Link::Step(s, o)) => {
                found.steps.push(s);
                found.step_inputs.push(o);
                found.nodes.push(next);
            }
            Some(Link::Tail(t)) => {
                found.tail = t;
                found.nodes.push(next);
                break;
            }
            _ => break,
        }
    }
    if found.tail == Tail::F32 {
        if let Some(reduce) = sum_reader(model, *found.nodes.last().unwrap(), &shape)? {
            found.tail = Tail::Sum;
            found.nodes.push(reduce);
        }
    }
    let head_out = OutletId::new(id, 0);
    let readers = model.outlet_successors(head_out);
    if readers.len() > 1 {
        // Every reader of the head's value must be in the chain, and all but the
        // stream's next node read it as a tensor operand.
        if !readers.iter().all(|r| found.nodes.contains(&r.node)) {
            return Ok(None);
        }
        for (step, input) in found.steps.iter_mut().zip(found.step_inputs.iter_mut()) {
            if *input == Some(head_out) {
                match step {
                    Step::Tensor(op, _) => *step = Step::TensorHead(*op),
                    _ => return Ok(None),
                }
                *input = None;
            }
        }
    }
    Ok((found.nodes.len() >= 2).then_some(found))
}

/// The node that alone reads `id`'s output and sums it as [`Tail::Sum`] does.
fn sum_reader(model: &TypedModel, id: usize, shape: &[usize]) -> TractResult<Option<usize>> {
    let out = OutletId::new(id, 0);
    let succ = model.outlet_successors(out);
    if succ.len() != 1 || model.output_outlets()?.contains(&out) {
        return Ok(None);
    }
    let reader = succ[0].node;
    Ok(sums_all_but_first(model, reader, shape)?.then_some(reader))
}

/// Whether node `id` is tract's `Reduce<Sum>` of an f32 tensor of `shape`, rank 3 or
/// more, over axes `1..rank`: the path where tract sums the whole contiguous tensor
/// with ndarray, which [`Tail::Sum`] reproduces (a single last axis goes to
/// tract-linalg's own kernel instead, leading axes to a blocked column sum).
fn sums_all_but_first(model: &TypedModel, id: usize, shape: &[usize]) -> TractResult<bool> {
    let node = model.node(id);
    let Some(reduce) = node.op_as::<Reduce>() else {
        return Ok(false);
    };
    Ok(reduce.reducer == Reducer::Sum
        && shape.len() >= 3
        && reduce.axes.iter().copied().eq(1..shape.len())
        && node.inputs.len() == 1
        && model.outlet_fact(node.inputs[0])?.datum_type == f32::datum_type())
}

/// The stream's shape if a chain can run on it: concrete, `[1, C, …]`, large enough.
fn chain_shape(model: &TypedModel, stream: OutletId) -> TractResult<Option<Vec<usize>>> {
    let fact = model.outlet_fact(stream)?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let ok = shape.len() >= 2 && shape[0] == 1 && shape.iter().product::<usize>() >= MIN_ELEMENTS;
    Ok(ok.then(|| shape.to_vec()))
}

/// What node `id` does to the value arriving on `stream`, if it is a chain link whose
/// output keeps the chain's shape.
fn link(
    model: &TypedModel,
    id: usize,
    stream: OutletId,
    shape: &[usize],
) -> TractResult<Option<Link>> {
    let node = model.node(id);
    let out = &node.outputs[0].fact;
    if out.shape.as_concrete() != Some(shape) {
        return Ok(None);
    }
    let in_dt = model.outlet_fact(stream)?.datum_type;
    let f32_in = in_dt == f32::datum_type();
    let f32_out = out.datum_type == f32::datum_type();
    let single = node.inputs.len() == 1 && node.inputs[0] == stream;

    if let Some(fq) = node.op_as::<FakeQuant>() {
        return Ok((single && f32_in).then(|| Link::Step(Step::FakeQuant(fq.clone()), None)));
    }
    if let Some(r) = node.op_as::<Requant>() {
        let to_f32 = matches!(r.out, RequantOut::F32 | RequantOut::Grid { .. });
        let ok = single && in_dt == i32::datum_type() && r.axis == 1 && to_f32;
        return Ok(ok.then(|| Link::Head(Head::Requant(r.clone()))));
    }
    if let Some(pool) = node.op_as::<OptSumPool>() {
        let ok = single && f32_in && f32_out && shape.len() == 4 && is_avg_pool3x3(pool);
        return Ok(ok.then_some(Link::Head(Head::AvgPool3x3)));
    }
    if let Some(q) = node.op_as::<Quantize>() {
        return Ok((single && f32_in).then(|| Link::Tail(Tail::Quantize(q.clone()))));
    }
    if !(f32_in && f32_out) {
        return Ok(None);
    }
    if let Some(ew) = node.op_as::<ElementWiseOp>() {
        let step = match ew.0.name().as_str() {
            "Erf" => Step::Erf,
            "Square" => Step::Square,
            _ => return Ok(None),
        };
        return Ok((single && ew.1.is_none()).then_some(Link::Step(step, None)));
    }
    if node.inputs.len() != 2 {
        return Ok(None);
    }
    if let Some(op) = node.op_as::<OptBinByScalar>() {
        if node.inputs[0] != stream || node.inputs[1] == stream {
            return Ok(None);
        }
        let arith = match op.linalg_op {
            BinOp::Add => Arith::Add,
            BinOp::Sub => Arith::Sub,
            BinOp::SubF => Arith::SubFrom,
            BinOp::Mul => Arith::Mul,
            _ => return Ok(None),
        };
        let b = node.inputs[1];
        let fact = model.outlet_fact(b)?;
        let Some(b_shape) = fact.shape.as_concrete() else {
            return Ok(None);
        };
        let per_tensor = b_shape.iter().all(|&d| d == 1);
        let per_channel = b_shape.len() == shape.len()
            && b_shape[1] == shape[1]
            && b_shape.iter().enumerate().all(|(i, &d)| i == 1 || d == 1);
        if fact.datum_type != f32::datum_type() || !(per_tensor || per_channel) {
            return Ok(None);
        }
        return Ok(Some(match &fact.konst {
            Some(k) => {
                let values = k
                    .cast_to::<f32>()?
                    .try_as_plain_ram()?
                    .as_slice::<f32>()?
                    .to_vec();
                Link::Step(Step::Scalar(arith, Operand::Const(Arc::new(values))), None)
            }
            None => Link::Step(Step::Scalar(arith, Operand::Input(0)), Some(b)),
        }));
    }
    if let Some(op) = node.op_as::<OptBinUnicast>() {
        let (other, stream_first) = if node.inputs[0] == stream && node.inputs[1] != stream {
            (node.inputs[1], true)
        } else if node.inputs[1] == stream && node.inputs[0] != stream {
            (node.inputs[0], false)
        } else {
            return Ok(None);
        };
        let fact = model.outlet_fact(other)?;
        if fact.datum_type != f32::datum_type() || fact.shape.as_concrete() != Some(shape) {
            return Ok(None);
        }
        let arith = match (op.binop.name(), stream_first) {
            ("Add", _) => Arith::Add,
            ("Mul", _) => Arith::Mul,
            ("Sub", true) => Arith::Sub,
            ("Sub", false) => Arith::SubFrom,
            _ => return Ok(None),
        };
        return Ok(Some(Link::Step(Step::Tensor(arith, 0), Some(other))));
    }
    Ok(None)
}

/// ONNX AveragePool 3×3, stride 1, padding 1 on each side, padding not counted, NCHW.
fn is_avg_pool3x3(pool: &OptSumPool) -> bool {
    let spec = &pool.pool_spec;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    let pad_one = match &spec.padding {
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
            b.len() == 2 && b.iter().chain(a.iter()).all(|&p| p == 1)
        }
        // With a 3×3 kernel at stride 1, "same" padding is 1 on each side.
        PaddingSpec::SameUpper | PaddingSpec::SameLower => true,
        PaddingSpec::Valid => false,
    };
    pool.normalize
        && !pool.count_include_pad
        && spec.data_format == DataFormat::NCHW
        && *spec.kernel_shape == [3, 3]
        && ones(&spec.strides)
        && ones(&spec.dilations)
        && pad_one
}

/// Replaces the chain's nodes by one [`ElementwiseChain`]; returns its output.
fn apply(
    model: &mut TypedModel,
    chain: &Found,
    replaced: &HashMap<OutletId, OutletId>,
) -> TractResult<OutletId> {
    let current = |o: &OutletId| *replaced.get(o).unwrap_or(o);
    let mut patch = TypedModelPatch::new("element-wise chain");
    let mut inputs = vec![patch.tap_model(model, current(&chain.stream))?];
    let mut numbered: Vec<OutletId> = vec![];
    let mut steps = chain.steps.clone();
    for (step, outlet) in steps.iter_mut().zip(&chain.step_inputs) {
        let Some(outlet) = outlet else { continue };
        let index = match numbered.iter().position(|o| o == outlet) {
            Some(i) => i + 1,
            None => {
                numbered.push(*outlet);
                inputs.push(patch.tap_model(model, current(outlet))?);
                numbered.len()
            }
        };
        match step {
            Step::Scalar(_, Operand::Input(i)) | Step::Tensor(_, i) => *i = index,
            _ => bail!("element-wise chain: operand outlet on a step without one"),
        }
    }
    let last = *chain.nodes.last().unwrap();
    let op = ElementwiseChain {
        head: chain.head.clone(),
        steps,
        tail: chain.tail.clone(),
        fused: chain
            .nodes
            .iter()
            .map(|&n| model.node(n).op.name().to_string())
            .collect(),
    };
    let name = format!("{}.pfe_elementwise", model.node(last).name);
    let y = patch.wire_node(&name, op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), y)?;
    patch.apply(model)?;
    Ok(OutletId::new(model.node_id_by_name(&name)?, 0))
}
