//! The fused PoolFormer ops the MetaFormer pass (`crate::passes::metaformer`) wires
//! in: [`TokenMixer`] for a block's first half and [`ChannelMlp`] for its second.
//! Both take and return the residual stream, `[1, C, H, W]` f32. At code generation
//! (tract's last optimizer phase) a [`ChannelMlp`] becomes a [`PackedChannelMlp`]
//! where the packed kernels are the faster path on this CPU, so the weights are packed
//! once per loaded model.

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::mlp::{run_block, run_block_packed, MlpWeights, PackedMlp, Scratch};
use crate::kernels::{mixer, norm, sgemm, Isa};

use tract_linalg::multithread::Executor;

use super::{executor_threads, in_pool};

/// `x + k·(avgpool3x3(x) − x)` with `k = ls·γ·r` per channel, `r` the one-group
/// GroupNorm's reciprocal standard deviation of `x` (see `kernels::mixer`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMixer {
    /// Layer scale times the norm's γ, per channel.
    pub scale: Vec<f32>,
    pub eps: f32,
}

/// A block's channel-MLP half: `x + ls ⊙ fc2(gelu(fc1(groupnorm(x))))`, with the norm
/// affine and layer scale folded into the weights (see `kernels::mlp`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMlp {
    pub weights: Arc<MlpWeights>,
    pub eps: f32,
}

// Weights compare exactly; NaN weights never come out of the pass.
impl Eq for TokenMixer {}
impl Eq for ChannelMlp {}

/// Fewest values a thread mixes in one task of [`TokenMixer`] (about 10 µs of work).
const MIXER_TASK_MIN: usize = 16_384;

/// [`norm::mean_rstd`], split over the executor's threads for large tensors.
pub(super) fn stats(
    isa: Isa,
    xs: &[f32],
    eps: f32,
    executor: &Executor,
    threads: usize,
) -> (f32, f32) {
    if threads < 2 || xs.len() < 65_536 {
        return norm::mean_rstd(isa, xs, eps);
    }
    norm::mean_rstd_in_parts(isa, xs, eps, threads, |parts, f| {
        in_pool(executor, || parts.par_iter().map(|p| f(p)).collect())
    })
}

pub(super) fn plane_dims(shape: &[usize]) -> TractResult<(usize, usize, usize)> {
    ensure!(
        shape.len() == 4 && shape[0] == 1,
        "fused PoolFormer ops take [1, C, H, W], got {shape:?}"
    );
    Ok((shape[1], shape[2], shape[3]))
}

pub(super) fn same_fact(inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
    ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
    Ok(tvec!(f32::fact(inputs[0].shape.clone())))
}

/// Raw pointer that may cross to worker threads; users keep their accesses disjoint.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

impl Op for TokenMixer {
    fn name(&self) -> StaticName {
        "PfeTokenMixer".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "GroupNorm(1) + AvgPool3x3 − x + layer scale + residual, {} channels, {}",
            self.scale.len(),
            Isa::best().name()
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for TokenMixer {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (c, h, w) = plane_dims(x.shape())?;
        ensure!(
            c == self.scale.len(),
            "token mixer: {c} channels, {} scales",
            self.scale.len()
        );
        let isa = Isa::best();
        let xs: &[f32] = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (executor, threads) = executor_threads();
        let (_, rstd) = stats(isa, xs, self.eps, &executor, threads);
        let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        let plane = h * w;
        let taps = mixer::PoolTaps::new(h, w);
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let os = view.as_slice_mut::<f32>()?;
            let work = |(ch, o): (usize, &mut [f32]), sums: &mut Vec<f32>| {
                sums.resize(taps.scratch_len(), 0.0);
                let xp = &xs[ch * plane..(ch + 1) * plane];
                mixer::mix_plane(isa, xp, o, &taps, self.scale[ch] * rstd, sums);
            };
            if threads > 1 && c * plane >= 2 * MIXER_TASK_MIN {
                // Tasks of whole planes and at least MIXER_TASK_MIN values, so that a
                // small tensor does not wake more threads than it has work for.
                let min_planes = MIXER_TASK_MIN.div_ceil(plane.max(1));
                in_pool(&executor, || {
                    os.par_chunks_mut(plane)
                        .enumerate()
                        .with_min_len(min_planes)
                        .for_each_init(Vec::new, |sums, item| work(item, sums))
                });
            } else {
                let mut sums = Vec::new();
                os.chunks_mut(plane)
                    .enumerate()
                    .for_each(|item| work(item, &mut sums));
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TokenMixer {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        same_fact(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = inputs[0].shape.iter().product::<TDim>();
        Ok(tvec!((Cost::FMA(f32::datum_type()), n * 6)))
    }

    as_op!();
}

impl Op for ChannelMlp {
    fn name(&self) -> StaticName {
        "PfeChannelMlp".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "GroupNorm(1) + fc1 + GELU + fc2 + layer scale + residual, {}→{}→{}, {}",
            self.weights.channels,
            self.weights.hidden,
            self.weights.channels,
            Isa::best().name()
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for ChannelMlp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_mlp(&self.weights, None, self.eps, inputs)
    }
}

/// The channel MLP on `inputs[0]`: on the packed kernels when `packed` is given and
/// they are the faster path on this CPU, on the `gemm` crate's otherwise.
fn eval_mlp(
    wts: &MlpWeights,
    packed: Option<&PackedMlp>,
    eps: f32,
    inputs: TVec<TValue>,
) -> TractResult<TVec<TValue>> {
    let x = args_1!(inputs);
    let (c, h, w) = plane_dims(x.shape())?;
    ensure!(
        c == wts.channels,
        "channel MLP: {c} channels, weights for {}",
        wts.channels
    );
    let hw = h * w;
    let isa = Isa::best();
    match packed {
        // Packed where the engine was built, for the instruction set this process runs.
        Some(p) => ensure!(
            p.isa() == isa,
            "channel MLP: weights packed for {:?}, running {isa:?}",
            p.isa()
        ),
        // The unpacked path reads the matrices (a packed op's `mlp` has none).
        None => wts.check()?,
    }
    let xs: &[f32] = x.try_as_plain_ram()?.as_slice::<f32>()?;
    let (executor, threads) = executor_threads();
    let stats = stats(isa, xs, eps, &executor, threads);
    let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
    let align = packed.map_or(1, |p| sgemm::panel_cols(p.isa()));
    let blocks = wts.blocks(hw, threads, align);
    let xp = xs.as_ptr();
    let mut view = out.try_as_plain_ram_mut()?;
    let op = SendPtr(view.as_slice_mut::<f32>()?.as_mut_ptr());
    let xp_addr = xp as usize;
    // SAFETY (every branch): each call writes only its own columns of `out` (or, split
    // by rows, its own rows of them), which outlives the calls; `x` is only read.
    if threads > 1 && blocks.len() >= threads {
        // Token blocks shared between the threads.
        in_pool(&executor, || {
            blocks
                .par_iter()
                .try_for_each_init(Scratch::default, |scratch, &cols| unsafe {
                    match packed {
                        Some(p) => {
                            let x = xp_addr as *const f32;
                            let seq = &crate::kernels::mlp::sequential;
                            run_block_packed(p, x, op.get(), hw, cols, stats, scratch, 1, seq);
                            Ok(())
                        }
                        None => run_block(
                            isa,
                            wts,
                            xp_addr as *const f32,
                            op.get(),
                            hw,
                            cols,
                            stats,
                            scratch,
                            gemm::Parallelism::None,
                        ),
                    }
                })
        })?;
    } else {
        // Too few blocks to share (the 7×7 stage): each block's products are split
        // over the threads by rows.
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let for_each = |n: usize, f: &(dyn Fn(usize) + Sync)| {
            if n > 1 {
                (0..n).into_par_iter().for_each(f)
            } else {
                (0..n).for_each(f)
            }
        };
        let mut scratch = Scratch::default();
        in_pool(&executor, || -> TractResult<()> {
            for &cols in &blocks {
                let x = xp_addr as *const f32;
                unsafe {
                    match packed {
                        Some(p) => run_block_packed(
                            p,
                            x,
                            op.get(),
                            hw,
                            cols,
                            stats,
                            &mut scratch,
                            threads,
                            &for_each,
                        ),
                        None => run_block(
                            isa,
                            wts,
                            x,
                            op.get(),
                            hw,
                            cols,
                            stats,
                            &mut scratch,
                            parallelism,
                        )?,
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(tvec!(out.into_tvalue()))
}

impl TypedOp for ChannelMlp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        same_fact(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let s = &inputs[0].shape;
        let tokens = s.iter().skip(2).product::<TDim>();
        let macs = 2 * self.weights.channels * self.weights.hidden;
        Ok(tvec!((Cost::FMA(f32::datum_type()), tokens * macs)))
    }

    fn codegen(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        if !PackedMlp::preferred(Isa::best()) {
            return Ok(None);
        }
        let packed = PackedMlp::new(Isa::best(), self.weights.clone());
        // The unpacked matrices are not kept: the packed op reads the packed ones.
        let op = PackedChannelMlp {
            mlp: ChannelMlp {
                weights: packed.weights.clone(),
                eps: self.eps,
            },
            packed: Arc::new(packed),
        };
        Ok(Some(TypedModelPatch::replace_single_op(
            model,
            node,
            &node.inputs,
            op,
        )?))
    }

    as_op!();
}

/// [`ChannelMlp`] with its weights packed for the `sgemm` kernels (where
/// `sgemm::preferred`: AVX-512 and AVX2). `mlp` holds the sizes, biases and `eps`
/// only (empty matrices, see [`PackedMlp::weights`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedChannelMlp {
    pub mlp: ChannelMlp,
    pub packed: Arc<PackedMlp>,
}

// Packed weights compare exactly; NaN weights never come out of the pass.
impl Eq for PackedChannelMlp {}

impl Op for PackedChannelMlp {
    fn name(&self) -> StaticName {
        // The same op as far as profiles and dumps go.
        "PfeChannelMlp".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.mlp.info()?;
        info.push("weights packed for the sgemm kernels".into());
        Ok(info)
    }
    op_as_typed_op!();
}

impl EvalOp for PackedChannelMlp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_mlp(&self.mlp.weights, Some(&self.packed), self.mlp.eps, inputs)
    }
}

impl TypedOp for PackedChannelMlp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        same_fact(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.mlp.cost(inputs)
    }

    as_op!();
}
