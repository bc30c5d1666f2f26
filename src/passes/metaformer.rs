//! The MetaFormer pass: finds PoolFormer blocks in the decluttered graph and rewires
//! each half into one fused op (`crate::ops::metaformer`).
//!
//! Matched, per block half (operand order of commutative ops is free):
//!
//! ```text
//! token mixer:  n = GroupNorm₁(x)·γ + β;  y = x + ls·(AvgPool3x3(n) − n)
//! channel MLP:  n = GroupNorm₁(x)·γ + β;  y = x + ls·(fc2(gelu(fc1(n) + b1)) + b2)
//! ```
//!
//! `GroupNorm₁` (one group: mean and variance over C, H, W) is spelled differently by
//! each exporter — a chain of reductions, InstanceNormalization over a reshape, tract's
//! RmsNorm. The pass does not match its ops: it takes the subgraph between `x` and the
//! affine `Mul`, checks that nothing outside uses its intermediate values, and
//! evaluates it on two probe tensors against the definition (one probe with a variance
//! below ε, so that ε itself is checked). Anything that does not match exactly stays
//! as tract runs it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use anyhow::Result;
use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::cnn::{PaddingSpec, SumPool};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::element_wise::ElementWiseOp;
use tract_core::ops::nn::{DataFormat, RmsNorm};

use super::PassReport;
use crate::kernels::mlp::MlpWeights;
use crate::kernels::qmlp::{Dequant, QLayer, QuantMlp};
use crate::kernels::quant::Grid;
use crate::ops::metaformer::{ChannelMlp, TokenMixer};
use crate::ops::qmlp::QuantChannelMlp;
use crate::ops::requant::{Quantize, Requant, RequantOut};

/// Whether the channel-MLP fusion runs on this target: its matrix products come from
/// the `gemm` crate, which has SIMD kernels for x86-64 and aarch64 only (elsewhere
/// tract's own kernels are faster).
pub const FUSES_MLP: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// Rewrites every PoolFormer block half the graph contains.
pub fn rewrite(model: &mut TypedModel, report: &mut PassReport) -> Result<()> {
    let mut mixers = 0;
    let mut mlps = 0;
    let mut quant_mlps = 0;
    let mut verified = VerifiedNorms::default();
    let ids: Vec<usize> = model.eval_order()?;
    for id in ids {
        let name = model.node(id).op().name();
        let patch = if model.node(id).op_as::<SumPool>().is_some() {
            match_mixer(model, id, &mut verified)?
        } else if FUSES_MLP && name == "EinSum" {
            match_mlp(model, id, &mut verified)?
        } else if FUSES_MLP && model.node(id).op_as::<Quantize>().is_some() {
            match_quant_mlp(model, id, &mut verified)?
        } else {
            None
        };
        if let Some((patch, what)) = patch {
            patch.apply(model)?;
            match what {
                Fused::Mixer => mixers += 1,
                Fused::Mlp => mlps += 1,
                Fused::QuantMlp => quant_mlps += 1,
            }
        }
    }
    if mixers + mlps + quant_mlps > 0 {
        model.compact()?;
    }
    if mixers > 0 {
        report.rewrites.push(format!(
            "token mixer (norm + pool + scale + residual) ×{mixers}"
        ));
    }
    if mlps > 0 {
        report.rewrites.push(format!(
            "channel MLP (norm + fc1 + GELU + fc2 + scale + residual) ×{mlps}"
        ));
    }
    if quant_mlps > 0 {
        report.rewrites.push(format!(
            "int8 channel MLP (norm + quantize + int8 fc1 + GELU + quantize + int8 fc2 + scale + residual) ×{quant_mlps}"
        ));
    }
    Ok(())
}

enum Fused {
    Mixer,
    Mlp,
    QuantMlp,
}

macro_rules! want {
    ($cond:expr) => {
        if !$cond {
            return Ok(None);
        }
    };
}

macro_rules! want_some {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

fn bin_name(model: &TypedModel, id: usize) -> Option<String> {
    model
        .node(id)
        .op_as::<TypedBinOp>()
        .map(|b| b.0.name().to_string())
}

/// The only consumer of node `id`'s single output.
fn only_succ(model: &TypedModel, id: usize) -> Option<usize> {
    let node = model.node(id);
    (node.outputs.len() == 1 && node.outputs[0].successors.len() == 1)
        .then(|| node.outputs[0].successors[0].node)
}

pub(super) fn konst(model: &TypedModel, o: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(o).ok().and_then(|f| f.konst.clone())
}

/// A per-channel f32 constant shaped `[1, C, 1, 1]` or `[C, 1, 1]`.
fn channel_const(t: &Tensor, c: usize) -> Option<Vec<f32>> {
    let shape = t.shape();
    let ok = t.datum_type() == f32::datum_type()
        && t.len() == c
        && (shape == [1, c, 1, 1] || shape == [c, 1, 1]);
    ok.then(|| {
        t.try_as_plain_ram()
            .ok()
            .and_then(|v| v.as_slice::<f32>().ok().map(|s| s.to_vec()))
    })
    .flatten()
}

/// For a binary node with one constant operand: (the other operand, the constant).
fn split_const(model: &TypedModel, id: usize) -> Option<(OutletId, Arc<Tensor>)> {
    let node = model.node(id);
    if node.inputs.len() != 2 {
        return None;
    }
    match (konst(model, node.inputs[0]), konst(model, node.inputs[1])) {
        (None, Some(k)) => Some((node.inputs[0], k)),
        (Some(k), None) => Some((node.inputs[1], k)),
        _ => None,
    }
}

/// `[1, C, H, W]` f32.
fn nchw(model: &TypedModel, o: OutletId) -> Option<[usize; 4]> {
    let f = model.outlet_fact(o).ok()?;
    let s = f.shape.as_concrete()?;
    (f.datum_type == f32::datum_type() && s.len() == 4 && s[0] == 1)
        .then(|| [s[0], s[1], s[2], s[3]])
}

/// A recognized `GroupNorm₁(x)·γ + β`.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

/// Matches `n = GroupNorm₁(x)·γ + β`, `n` the output of the affine `Add`.
fn match_norm(
    model: &TypedModel,
    n: OutletId,
    x: OutletId,
    verified: &mut VerifiedNorms,
) -> TractResult<Option<Norm>> {
    let shape = want_some!(nchw(model, x));
    let c = shape[1];
    want!(n.slot == 0 && bin_name(model, n.node).as_deref() == Some("Add"));
    let (m, beta) = want_some!(split_const(model, n.node));
    let beta = want_some!(channel_const(&beta, c));
    want!(m.slot == 0 && bin_name(model, m.node).as_deref() == Some("Mul"));
    want!(only_succ(model, m.node) == Some(n.node));
    let (z, gamma) = want_some!(split_const(model, m.node));
    let gamma = want_some!(channel_const(&gamma, c));
    want!(only_succ(model, z.node) == Some(m.node) && z != x);
    let nodes = want_some!(region_between(model, x, z)?);
    let eps = want_some!(find_eps(model, &nodes));
    let region = NormRegion {
        nodes,
        x,
        z,
        shape,
        eps,
    };
    want!(verified.check(model, &region)?);
    Ok(Some(Norm { gamma, beta, eps }))
}

/// The nodes computing `z` from `x` and constants, in evaluation order, when none of
/// their values is used outside (the source `x` and constants excepted).
fn region_between(model: &TypedModel, x: OutletId, z: OutletId) -> TractResult<Option<Vec<usize>>> {
    let mut seen = HashSet::new();
    let mut stack = vec![z.node];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let node = model.node(id);
        if node.inputs.is_empty() && konst(model, OutletId::new(id, 0)).is_none() {
            return Ok(None); // a model input other than x
        }
        if seen.len() > 64 {
            return Ok(None);
        }
        for &i in &node.inputs {
            if i != x {
                stack.push(i.node);
            }
        }
    }
    want!(!seen.contains(&x.node));
    for &id in &seen {
        let node = model.node(id);
        let is_const = node.inputs.is_empty();
        if id == z.node || is_const {
            continue;
        }
        for out in &node.outputs {
            want!(out.successors.iter().all(|s| seen.contains(&s.node)));
        }
    }
    // Depth-first from z over inputs, each node after its inputs: an evaluation order
    // that depends on the wiring only, not on node ids (see `RegionKey`).
    fn walk(
        model: &TypedModel,
        seen: &HashSet<usize>,
        x: OutletId,
        id: usize,
        order: &mut Vec<usize>,
    ) {
        if order.contains(&id) || !seen.contains(&id) {
            return;
        }
        for &i in &model.node(id).inputs {
            if i != x {
                walk(model, seen, x, i.node, order);
            }
        }
        order.push(id);
    }
    let mut order = Vec::with_capacity(seen.len());
    walk(model, &seen, x, z.node, &mut order);
    want!(order.len() == seen.len());
    Ok(Some(order))
}

/// The ε of the normalization: the eps of a tract `RmsNorm`, or a small positive
/// scalar added in the region.
fn find_eps(model: &TypedModel, region: &[usize]) -> Option<f32> {
    for &id in region {
        if let Some(rms) = model.node(id).op_as::<RmsNorm>() {
            return rms.eps.cast_to_scalar::<f32>().ok();
        }
        if bin_name(model, id).as_deref() == Some("Add") {
            if let Some((_, k)) = split_const(model, id) {
                if k.len() == 1 {
                    if let Ok(v) = k.cast_to_scalar::<f32>() {
                        if v > 0.0 && v <= 1e-2 {
                            return Some(v);
                        }
                    }
                }
            }
        }
    }
    None
}

/// The normalization regions [`verifies_group_norm`] has judged, by structure. A
/// region whose nodes have the same ops (constants included, compared by value) wired
/// the same way, on the same shape and ε, computes the same function, so its verdict
/// is reused: PoolFormer repeats one region per block half, and each evaluation runs
/// the region on full-size probes.
#[derive(Default)]
struct VerifiedNorms(Vec<(RegionKey, bool)>);

/// A candidate normalization: `nodes` (from [`region_between`]) compute `z` from `x` of
/// `shape`, with ε `eps`.
struct NormRegion {
    nodes: Vec<usize>,
    x: OutletId,
    z: OutletId,
    shape: [usize; 4],
    eps: f32,
}

/// A node's input: the region's input `x`, or output `slot` of the region's node `index`.
type RegionInput = Option<(usize, usize)>;

struct RegionKey {
    shape: [usize; 4],
    eps: u32,
    nodes: Vec<(Box<dyn TypedOp>, TVec<RegionInput>)>,
}

impl RegionKey {
    fn new(model: &TypedModel, region: &NormRegion) -> Option<RegionKey> {
        // The nodes are in the order a depth-first walk from z meets them
        // (`region_between`), so equal wiring gives equal keys whatever the node ids.
        let index = |id: usize| region.nodes.iter().position(|&r| r == id);
        let mut nodes = Vec::with_capacity(region.nodes.len() + 1);
        for &id in &region.nodes {
            let node = model.node(id);
            let inputs = node
                .inputs
                .iter()
                .map(|&i| match i == region.x {
                    true => Some(None),
                    false => index(i.node).map(|n| Some((n, i.slot))),
                })
                .collect::<Option<TVec<RegionInput>>>()?;
            nodes.push((node.op.clone(), inputs));
        }
        // Which outlet is the output: an identity reading it.
        let z = region.z;
        let out = tvec![Some((index(z.node)?, z.slot))];
        nodes.push((
            Box::new(tract_core::ops::identity::Identity) as Box<dyn TypedOp>,
            out,
        ));
        Some(RegionKey {
            shape: region.shape,
            eps: region.eps.to_bits(),
            nodes,
        })
    }

    fn same(&self, other: &RegionKey) -> bool {
        self.shape == other.shape
            && self.eps == other.eps
            && self.nodes.len() == other.nodes.len()
            && self
                .nodes
                .iter()
                .zip(&other.nodes)
                .all(|((a, ai), (b, bi))| ai == bi && **a == **b)
    }
}

impl VerifiedNorms {
    /// [`verifies_group_norm`], or the verdict on an identical region.
    fn check(&mut self, model: &TypedModel, region: &NormRegion) -> TractResult<bool> {
        let Some(key) = RegionKey::new(model, region) else {
            return verifies_group_norm(model, region);
        };
        if let Some((_, verdict)) = self.0.iter().find(|(k, _)| k.same(&key)) {
            return Ok(*verdict);
        }
        let verdict = verifies_group_norm(model, region)?;
        self.0.push((key, verdict));
        Ok(verdict)
    }
}

/// Evaluates the region on probe tensors and compares with `(x − μ)/√(σ² + ε)`.
fn verifies_group_norm(model: &TypedModel, region: &NormRegion) -> TractResult<bool> {
    let &NormRegion {
        x, z, shape, eps, ..
    } = region;
    let mut sub = TypedModel::default();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    map.insert(x, sub.add_source("x", f32::fact(shape))?);
    for &id in &region.nodes {
        let node = model.node(id);
        let inputs: TVec<OutletId> = match node.inputs.iter().map(|i| map.get(i).copied()).collect()
        {
            Some(v) => v,
            None => return Ok(false),
        };
        let outs = sub.wire_node(&node.name, node.op.clone(), &inputs)?;
        for (slot, o) in outs.into_iter().enumerate() {
            map.insert(OutletId::new(id, slot), o);
        }
    }
    let Some(out) = map.get(&z).copied() else {
        return Ok(false);
    };
    sub.select_output_outlets(&[out])?;
    let plan = match sub.into_runnable() {
        Ok(p) => p,
        Err(_) => return Ok(false),
    };
    let n: usize = shape.iter().product();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let base: Vec<f32> = (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            2.0 * u - 1.0 + 0.4 * ((i % 7) as f32 / 7.0)
        })
        .collect();
    // Unit-scale probe, then one whose variance (~1e-7·…) is well below ε.
    // The small probe has no offset: a reduction's f32 rounding of a large common
    // offset, amplified by 1/√ε, would otherwise hide the comparison.
    for (scale, offset) in [(1.0f32, 0.25f32), (3e-4, 0.0)] {
        let probe: Vec<f32> = base.iter().map(|v| v * scale + offset).collect();
        let got = match plan.run(tvec!(Tensor::from_shape(&shape, &probe)?.into_tvalue())) {
            Ok(o) => o,
            Err(_) => return Ok(false),
        };
        let got = got[0].to_plain_array_view::<f32>()?;
        if got.len() != n {
            return Ok(false);
        }
        let mean = probe.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = probe
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let r = 1.0 / (var + eps as f64).sqrt();
        let worst = probe
            .iter()
            .zip(got.iter())
            .map(|(&p, &g)| ((p as f64 - mean) * r - g as f64).abs())
            .fold(0.0, f64::max);
        // Normalized values are O(1); f32 evaluation errs by ~1e-6.
        if worst.is_nan() || worst > 1e-3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// 3×3, stride 1, padding 1, NCHW average pool excluding padding.
fn is_poolformer_pool(pool: &SumPool) -> bool {
    let s = &pool.pool_spec;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
    let pad_one = match &s.padding {
        PaddingSpec::Explicit(b, a) | PaddingSpec::ExplicitOnnxPool(b, a, _) => {
            b.iter().chain(a.iter()).all(|&p| p == 1)
        }
        PaddingSpec::SameUpper | PaddingSpec::SameLower => true,
        PaddingSpec::Valid => false,
    };
    pool.normalize
        && !pool.count_include_pad
        && s.data_format == DataFormat::NCHW
        && s.kernel_shape.as_slice() == [3, 3]
        && ones(&s.strides)
        && ones(&s.dilations)
        && pad_one
}

fn match_mixer(
    model: &TypedModel,
    pool_id: usize,
    verified: &mut VerifiedNorms,
) -> TractResult<Option<(TypedModelPatch, Fused)>> {
    let pool = model.node(pool_id);
    want!(is_poolformer_pool(want_some!(pool.op_as::<SumPool>())));
    let n = pool.inputs[0];
    let sub = want_some!(only_succ(model, pool_id));
    want!(bin_name(model, sub).as_deref() == Some("Sub"));
    want!(model.node(sub).inputs.as_slice() == [OutletId::new(pool_id, 0), n]);
    let mut users: Vec<usize> = model.outlet_successors(n).iter().map(|s| s.node).collect();
    users.sort();
    let mut expected = vec![pool_id, sub];
    expected.sort();
    want!(users == expected);
    let mul = want_some!(only_succ(model, sub));
    want!(bin_name(model, mul).as_deref() == Some("Mul"));
    let (_, ls) = want_some!(split_const(model, mul));
    let add = want_some!(only_succ(model, mul));
    want!(bin_name(model, add).as_deref() == Some("Add"));
    let ins = &model.node(add).inputs;
    let mul_out = OutletId::new(mul, 0);
    let x = want_some!(ins.iter().find(|&&i| i != mul_out).copied());
    want!(ins.contains(&mul_out));
    let shape = want_some!(nchw(model, x));
    want!(nchw(model, OutletId::new(add, 0)) == Some(shape));
    let ls = want_some!(channel_const(&ls, shape[1]));
    let norm = want_some!(match_norm(model, n, x, verified)?);
    let scale: Vec<f32> = ls.iter().zip(&norm.gamma).map(|(l, g)| l * g).collect();
    let op = TokenMixer {
        scale,
        eps: norm.eps,
    };
    let mut patch = TypedModelPatch::new("metaformer token mixer");
    let tx = patch.tap_model(model, x)?;
    let name = format!("{}.pfe_token_mixer", model.node(add).name);
    let y = patch.wire_node(name, op, &[tx])?[0];
    patch.shunt_outside(model, OutletId::new(add, 0), y)?;
    Ok(Some((patch, Fused::Mixer)))
}

/// A 1×1 convolution as tract declutters it: an f32 EinSum of the activation with a
/// constant `[O, I]` matrix contracted over I, keeping H and W.
fn pointwise_weights(
    model: &TypedModel,
    id: usize,
    input: OutletId,
) -> Option<(usize, usize, Vec<f32>)> {
    let node = model.node(id);
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return None;
    }
    if node.inputs[0] != input {
        return None;
    }
    let formula = op.axes.to_string();
    let formula = formula.split_whitespace().next()?;
    let (ins, out) = formula.split_once("->")?;
    let (a, b) = ins.split_once(',')?;
    let ok = matches!(a, "NIHW" | "IHW") && b == "OI" && matches!(out, "OHW" | "NOHW");
    let w = konst(model, node.inputs[1])?;
    if !ok || w.rank() != 2 || w.datum_type() != f32::datum_type() {
        return None;
    }
    Some((
        w.shape()[0],
        w.shape()[1],
        w.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec(),
    ))
}

/// A bias or scale constant of `len` values along the channel axis of a rank-3 or
/// rank-4 activation.
fn vector_const(t: &Tensor, len: usize) -> Option<Vec<f32>> {
    let shape = t.shape();
    let ok = t.datum_type() == f32::datum_type()
        && t.len() == len
        && (shape == [len, 1, 1] || shape == [1, len, 1, 1]);
    ok.then(|| {
        t.try_as_plain_ram()
            .ok()
            .and_then(|v| v.as_slice::<f32>().ok().map(|s| s.to_vec()))
    })
    .flatten()
}

/// Scalar constant operand of a binary node close to `value`; returns the other operand.
fn with_scalar(model: &TypedModel, id: usize, op: &str, value: f32) -> Option<OutletId> {
    if bin_name(model, id).as_deref() != Some(op) {
        return None;
    }
    let (other, k) = split_const(model, id)?;
    let v = (k.len() == 1)
        .then(|| k.cast_to_scalar::<f32>().ok())
        .flatten()?;
    ((v - value).abs() <= 1e-6 * value.abs().max(1.0)).then_some(other)
}

/// The input `a` of an exact (erf) GELU ending at node `g`: tract's `GeluExact`, or
/// `a · ((erf(a/√2) + 1) · 0.5)` as the dynamo exporter writes it.
fn gelu_input(model: &TypedModel, g: usize) -> Option<OutletId> {
    let node = model.node(g);
    if node.op().name() == "GeluExact" && node.op_as::<ElementWiseOp>().is_some() {
        let a = node.inputs[0];
        return (model.outlet_successors(a).len() == 1).then_some(a);
    }
    if bin_name(model, g).as_deref() != Some("Mul") || node.inputs.len() != 2 {
        return None;
    }
    for (a, half) in [
        (node.inputs[0], node.inputs[1]),
        (node.inputs[1], node.inputs[0]),
    ] {
        let Some(plus_one) = with_scalar(model, half.node, "Mul", 0.5) else {
            continue;
        };
        let Some(erf) = with_scalar(model, plus_one.node, "Add", 1.0) else {
            continue;
        };
        if model.node(erf.node).op().name() != "Erf" {
            continue;
        }
        let scaled = model.node(erf.node).inputs[0];
        let Some(src) = with_scalar(model, scaled.node, "Mul", std::f32::consts::FRAC_1_SQRT_2)
        else {
            continue;
        };
        let chain = [half.node, plus_one.node, erf.node, scaled.node];
        let single = chain
            .iter()
            .all(|&id| model.node(id).outputs[0].successors.len() == 1);
        let mut users: Vec<usize> = model.outlet_successors(a).iter().map(|s| s.node).collect();
        users.sort();
        let mut expected = vec![g, scaled.node];
        expected.sort();
        if src == a && single && users == expected {
            return Some(a);
        }
    }
    None
}

fn match_mlp(
    model: &TypedModel,
    e2: usize,
    verified: &mut VerifiedNorms,
) -> TractResult<Option<(TypedModelPatch, Fused)>> {
    let gelu_id = model.node(e2).inputs[0].node;
    let gelu_out = OutletId::new(gelu_id, 0);
    want!(model.node(e2).inputs[0] == gelu_out && only_succ(model, gelu_id) == Some(e2));
    let a = want_some!(gelu_input(model, gelu_id));
    let add1 = a.node;
    want!(a.slot == 0 && bin_name(model, add1).as_deref() == Some("Add"));
    let (e1_out, b1) = want_some!(split_const(model, add1));
    let e1 = e1_out.node;
    want!(only_succ(model, e1) == Some(add1));
    let n2 = model.node(e1).inputs[0];
    let (hidden, channels, w1) = want_some!(pointwise_weights(model, e1, n2));
    let b1 = want_some!(vector_const(&b1, hidden));
    let (c_out, h_in, w2) = want_some!(pointwise_weights(model, e2, gelu_out));
    want!(c_out == channels && h_in == hidden);
    let add2 = want_some!(only_succ(model, e2));
    want!(bin_name(model, add2).as_deref() == Some("Add"));
    let (_, b2) = want_some!(split_const(model, add2));
    let b2 = want_some!(vector_const(&b2, channels));
    let mul = want_some!(only_succ(model, add2));
    want!(bin_name(model, mul).as_deref() == Some("Mul"));
    let (_, ls) = want_some!(split_const(model, mul));
    let ls = want_some!(vector_const(&ls, channels));
    let add3 = want_some!(only_succ(model, mul));
    want!(bin_name(model, add3).as_deref() == Some("Add"));
    let mul_out = OutletId::new(mul, 0);
    let ins = &model.node(add3).inputs;
    want!(ins.contains(&mul_out));
    let x = want_some!(ins.iter().find(|&&i| i != mul_out).copied());
    let shape = want_some!(nchw(model, x));
    want!(shape[1] == channels && nchw(model, OutletId::new(add3, 0)) == Some(shape));
    want!(model.outlet_successors(n2).len() == 1);
    let norm = want_some!(match_norm(model, n2, x, verified)?);

    let mut fw1 = vec![0f32; hidden * channels];
    let mut c1 = vec![0f32; hidden];
    for o in 0..hidden {
        let mut acc = b1[o] as f64;
        for i in 0..channels {
            let wv = w1[o * channels + i];
            fw1[o * channels + i] = wv * norm.gamma[i];
            acc += wv as f64 * norm.beta[i] as f64;
        }
        c1[o] = acc as f32;
    }
    let mut fw2 = vec![0f32; channels * hidden];
    for c in 0..channels {
        for j in 0..hidden {
            fw2[c * hidden + j] = w2[c * hidden + j] * ls[c];
        }
    }
    let b2: Vec<f32> = b2.iter().zip(&ls).map(|(b, l)| b * l).collect();
    let weights = MlpWeights {
        channels,
        hidden,
        w1: fw1,
        c1,
        w2: fw2,
        b2,
    };
    weights.check()?;
    let op = ChannelMlp {
        weights: Arc::new(weights),
        eps: norm.eps,
    };
    let mut patch = TypedModelPatch::new("metaformer channel MLP");
    let tx = patch.tap_model(model, x)?;
    let name = format!("{}.pfe_channel_mlp", model.node(add3).name);
    let y = patch.wire_node(name, op, &[tx])?[0];
    patch.shunt_outside(model, OutletId::new(add3, 0), y)?;
    Ok(Some((patch, Fused::Mlp)))
}

/// An integer 1×1 convolution as the int8 pass builds it and tract declutters it: an
/// EinSum with i32 output of the u8/i8 activation `input` and constant i8 or u8
/// `[O, I]` weights, contracted over I (axis 1 of an NCHW activation), unit scales,
/// one weight zero point and a zero output zero point.
pub(super) struct IntPointwise {
    pub rows: usize,
    pub depth: usize,
    /// The weights as i8 (u8 ones minus 128) …
    pub weights: Vec<i8>,
    /// … and their zero point on that scale.
    pub w0: i32,
    /// Accumulator bias, per output row.
    pub bias: Vec<i32>,
    /// Activation zero point.
    pub a0: i32,
}

pub(super) fn scalar_is(model: &TypedModel, o: OutletId, value: f64) -> bool {
    konst(model, o)
        .filter(|k| k.len() == 1)
        .and_then(|k| k.cast_to_scalar::<f64>().ok())
        .is_some_and(|v| v == value)
}

pub(super) fn int_pointwise(
    model: &TypedModel,
    id: usize,
    input: OutletId,
) -> Option<IntPointwise> {
    let node = model.node(id);
    let op = node.op_as::<EinSum>()?;
    if op.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 || node.inputs[0] != input {
        return None;
    }
    let formula = op.axes.to_string();
    let formula = formula.split_whitespace().next()?;
    let (ins, out) = formula.split_once("->")?;
    let (a, b) = ins
        .split(',')
        .collect::<Vec<_>>()
        .get(..2)
        .map(|v| (v[0], v[1]))?;
    let ok = a.len() == 4
        && a.chars().nth(1) == Some('I')
        && !a.contains('O')
        && a.replace('I', "O") == out
        && b == "OI";
    let w = konst(model, node.inputs[1])?;
    if !ok || w.rank() != 2 {
        return None;
    }
    let (rows, depth) = (w.shape()[0], w.shape()[1]);
    let unit = [4, 6, 8]
        .iter()
        .all(|&i| scalar_is(model, node.inputs[i], 1.0))
        && scalar_is(model, node.inputs[7], 0.0);
    if !unit {
        return None;
    }
    let w0 = konst(model, node.inputs[5]).filter(|k| k.len() == 1)?;
    let w0 = w0.cast_to_scalar::<i32>().ok()?;
    let (weights, w0) = i8_weights(&w, w0)?;
    let a0 = konst(model, node.inputs[3]).filter(|k| k.len() == 1)?;
    let a0 = a0.cast_to_scalar::<i32>().ok()?;
    let bias = konst(model, node.inputs[2])?;
    if bias.datum_type() != i32::datum_type() {
        return None;
    }
    let bias = bias
        .try_as_plain_ram()
        .ok()?
        .as_slice::<i32>()
        .ok()?
        .to_vec();
    let bias = match bias.len() {
        1 => vec![bias[0]; rows],
        n if n == rows => bias,
        _ => return None,
    };
    Some(IntPointwise {
        rows,
        depth,
        weights,
        w0,
        bias,
        a0,
    })
}

/// Constant i8 or u8 weights with zero point `w0` as i8 values and a zero point on the
/// same scale: u8 ones shifted by −128 (`w − w0 = (w − 128) − (w0 − 128)`).
pub(super) fn i8_weights(w: &Tensor, w0: i32) -> Option<(Vec<i8>, i32)> {
    let dt = w.datum_type().unquantized();
    let plain = w.try_as_plain_ram().ok()?;
    if dt == i8::datum_type() {
        Some((plain.as_slice::<i8>().ok()?.to_vec(), w0))
    } else if dt == u8::datum_type() {
        let v = plain.as_slice::<u8>().ok()?;
        Some((v.iter().map(|&b| (b ^ 0x80) as i8).collect(), w0 - 128))
    } else {
        None
    }
}

/// A per-tensor quantization onto u8, as (1/scale, grid on u8, shift of the
/// activation's zero point): i8 grids map to u8 by adding 128.
fn u8_grid(q: &Quantize) -> Option<(f32, Grid, i32)> {
    if q.dt == u8::datum_type() && q.grid == Grid::of::<u8>(q.grid.zero_point) {
        Some((q.inv_scale, q.grid, 0))
    } else if q.dt == i8::datum_type() && q.grid == Grid::of::<i8>(q.grid.zero_point) {
        Some((q.inv_scale, Grid::of::<u8>(q.grid.zero_point + 128), 128))
    } else {
        None
    }
}

/// A per-channel requantization of `len` channels on axis 1 to f32.
fn requant_layer(
    model: &TypedModel,
    id: usize,
    len: usize,
) -> Option<(Vec<f32>, Vec<f32>, Dequant)> {
    let r = model.node(id).op_as::<Requant>()?;
    if r.axis != 1 || r.mult.len() != len || r.offset.len() != len {
        return None;
    }
    let how = match r.out {
        RequantOut::F32 => Dequant::F32,
        RequantOut::Grid {
            grid,
            dq_zero_point,
            dq_scale,
        } => Dequant::Grid {
            grid,
            dq_zero_point,
            dq_scale,
        },
        _ => return None,
    };
    Some((r.mult.to_vec(), r.offset.to_vec(), how))
}

/// The node ending the exact GELU whose input is `a`.
fn gelu_after(model: &TypedModel, a: OutletId) -> Option<usize> {
    model
        .outlet_successors(a)
        .iter()
        .map(|s| s.node)
        .find(|&s| gelu_input(model, s) == Some(a))
}

/// The int8 channel-MLP half as the int8 pass leaves it, from the quantization of the
/// norm's output (node `q1`) to the residual add.
fn match_quant_mlp(
    model: &TypedModel,
    q1: usize,
    verified: &mut VerifiedNorms,
) -> TractResult<Option<(TypedModelPatch, Fused)>> {
    let quant1 = want_some!(model.node(q1).op_as::<Quantize>());
    let (inv_scale1, grid1, shift1) = want_some!(u8_grid(quant1));
    let n2 = model.node(q1).inputs[0];
    want!(model.outlet_successors(n2).len() == 1);
    let e1 = want_some!(only_succ(model, q1));
    let fc1 = want_some!(int_pointwise(model, e1, OutletId::new(q1, 0)));
    want!(fc1.w0 == 0);
    let (hidden, channels) = (fc1.rows, fc1.depth);
    let r1 = want_some!(only_succ(model, e1));
    let (mult1, offset1, how1) = want_some!(requant_layer(model, r1, hidden));
    let g = want_some!(gelu_after(model, OutletId::new(r1, 0)));
    let q2 = want_some!(only_succ(model, g));
    let quant2 = want_some!(model.node(q2).op_as::<Quantize>());
    let (inv_scale2, grid2, shift2) = want_some!(u8_grid(quant2));
    let e2 = want_some!(only_succ(model, q2));
    let fc2 = want_some!(int_pointwise(model, e2, OutletId::new(q2, 0)));
    want!(fc2.w0 == 0);
    want!(fc2.rows == channels && fc2.depth == hidden);
    let r2 = want_some!(only_succ(model, e2));
    let (mult2, offset2, how2) = want_some!(requant_layer(model, r2, channels));
    let next = want_some!(only_succ(model, r2));
    // An optional layer scale, then the residual add.
    let scaled = if bin_name(model, next).as_deref() == Some("Mul") {
        split_const(model, next)
            .filter(|(o, _)| *o == OutletId::new(r2, 0))
            .and_then(|(_, k)| vector_const(&k, channels))
            .map(|ls| (ls, next))
    } else {
        None
    };
    let (layer_scale, branch) = match scaled {
        Some((ls, mul)) => (ls, mul),
        None => (vec![1.0; channels], r2),
    };
    let add = if branch == r2 {
        next
    } else {
        want_some!(only_succ(model, branch))
    };
    want!(bin_name(model, add).as_deref() == Some("Add"));
    let branch_out = OutletId::new(branch, 0);
    let ins = &model.node(add).inputs;
    want!(ins.len() == 2 && ins.contains(&branch_out));
    let x = want_some!(ins.iter().find(|&&i| i != branch_out).copied());
    let shape = want_some!(nchw(model, x));
    want!(shape[1] == channels && nchw(model, OutletId::new(add, 0)) == Some(shape));
    let norm = want_some!(match_norm(model, n2, x, verified)?);

    let fc1 = QLayer::new(
        hidden,
        channels,
        &fc1.weights,
        &fc1.bias,
        fc1.a0 + shift1,
        mult1,
        offset1,
        how1,
    )?;
    let fc2 = QLayer::new(
        channels,
        hidden,
        &fc2.weights,
        &fc2.bias,
        fc2.a0 + shift2,
        mult2,
        offset2,
        how2,
    )?;
    let mlp = QuantMlp {
        channels,
        hidden,
        gamma: norm.gamma,
        beta: norm.beta,
        inv_scale1,
        grid1,
        fc1,
        inv_scale2,
        grid2,
        fc2,
        layer_scale,
        gelu_table: OnceLock::new(),
    };
    mlp.check()?;
    let op = QuantChannelMlp {
        mlp: Arc::new(mlp),
        eps: norm.eps,
    };
    let mut patch = TypedModelPatch::new("metaformer int8 channel MLP");
    let tx = patch.tap_model(model, x)?;
    let name = format!("{}.pfe_quant_channel_mlp", model.node(add).name);
    let y = patch.wire_node(name, op, &[tx])?[0];
    patch.shunt_outside(model, OutletId::new(add, 0), y)?;
    Ok(Some((patch, Fused::QuantMlp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::math;
    use tract_core::ops::nn::{Reduce, Reducer};

    const SHAPE: [usize; 4] = [1, 4, 3, 5];
    const EPS: f32 = 1e-5;

    /// `(x − mean(x))·rsqrt(mean((x − mean(x))²)·k + ε)` over C, H, W: GroupNorm₁ for
    /// k = 1, the same graph with another constant otherwise.
    fn norm(model: &mut TypedModel, x: OutletId, k: f32, tag: &str) -> TractResult<OutletId> {
        let n = SHAPE.iter().product::<usize>() as f32;
        let scalar = |v: f32| tensor4(&[[[[v]]]]);
        let all = || Reduce {
            axes: tvec![1, 2, 3],
            reducer: Reducer::Sum,
        };
        let sum = model.wire_node(format!("{tag}.sum"), all(), &[x])?[0];
        let inv_n = model.add_const(format!("{tag}.inv_n"), scalar(1.0 / n))?;
        let mean = model.wire_node(format!("{tag}.mean"), math::mul(), &[sum, inv_n])?[0];
        let d = model.wire_node(format!("{tag}.d"), math::sub(), &[x, mean])?[0];
        let sq = model.wire_node(format!("{tag}.sq"), math::mul(), &[d, d])?[0];
        let ssum = model.wire_node(format!("{tag}.ssum"), all(), &[sq])?[0];
        let var = model.wire_node(format!("{tag}.var"), math::mul(), &[ssum, inv_n])?[0];
        let k = model.add_const(format!("{tag}.k"), scalar(k))?;
        let var = model.wire_node(format!("{tag}.kvar"), math::mul(), &[var, k])?[0];
        let eps = model.add_const(format!("{tag}.eps"), scalar(EPS))?;
        let ve = model.wire_node(format!("{tag}.ve"), math::add(), &[var, eps])?[0];
        let r = model.wire_node(format!("{tag}.r"), math::rsqrt(), &[ve])?[0];
        Ok(model.wire_node(format!("{tag}.z"), math::mul(), &[d, r])?[0])
    }

    #[test]
    fn a_verdict_is_reused_only_for_an_identical_region() -> TractResult<()> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(SHAPE))?;
        let good = norm(&mut model, x, 1.0, "good")?;
        let bad = norm(&mut model, x, 2.0, "bad")?;
        let again = norm(&mut model, x, 1.0, "again")?;
        model.select_output_outlets(&[good, bad, again])?;
        let mut verified = VerifiedNorms::default();
        let mut check = |z: OutletId| -> TractResult<bool> {
            let nodes = region_between(&model, x, z)?.expect("a region");
            assert_eq!(find_eps(&model, &nodes), Some(EPS));
            let region = NormRegion {
                nodes,
                x,
                z,
                shape: SHAPE,
                eps: EPS,
            };
            verified.check(&model, &region)
        };
        // `bad` differs from `good` only in the value of one constant.
        assert!(check(good)?);
        assert!(!check(bad)?);
        assert!(check(again)?);
        // `again` took `good`'s verdict without an evaluation of its own.
        assert_eq!(verified.0.len(), 2);
        Ok(())
    }
}
