//! [`QuantConv`]: an integer convolution as the int8 pass leaves it (u8 or i8
//! activations, i8 weights with an optional zero point, an i32 accumulator with unit
//! scales, requantized by the next node), run as patch extraction in the k4 layout
//! plus one u8 × i8 product on this crate's kernels ([`crate::kernels::qgemm`])
//! instead of tract's quantized matrix path. It covers the strided stem and
//! downsampling convolutions, the 1×1 convolutions the channel-MLP fusion does not
//! absorb, and a quantized head applied to one vector (a 1×1 conv of one pixel).

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::im2col::ConvGeometry;
use crate::kernels::qgemm::{gemm_u8i8, PackedI8, QKernel};
use crate::kernels::Isa;

use super::eltwise::{ElementwiseChain, OutSlice};

use super::{executor_threads, in_pool};

/// `acc[o, p] = Σ_k (w[o, k] − w0)·(x_k,p − a0) + bias[o]` over the patches `x_k,p` of
/// each image, padding taps reading `a0` (they add nothing), as i32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantConv {
    /// One image's geometry (a 1×1 stride-1 conv is a matrix product over the tokens).
    pub geometry: ConvGeometry,
    pub out_channels: usize,
    /// `[out_channels, in_channels·kh·kw]`, or `[out_channels, c4_k]` in the (tap,
    /// channel) order where `c4`.
    pub weights: Arc<PackedI8>,
    /// Per output channel: `bias[o] − a0·Σ_k w[o, k]`, added to the raw u8 × i8 product.
    pub correction: Arc<Vec<i32>>,
    /// The weights' zero point `w0` (0 for symmetric weights). Otherwise each token
    /// also gets `−w0·Σ_k (x_k,p − a0)`, from the patch matrix's column sums.
    pub weight_zero: i32,
    /// The activation zero point on the u8 scale (an i8 input's plus 128).
    pub a0: u8,
    /// Whether the input is i8 (read as u8 after flipping the sign bit).
    pub signed_input: bool,
    /// The patch rows in the (tap, channel) order of an input interleaved by 4
    /// channels ([`ConvGeometry::fill_k4_groups_c4`]; `weights` in that order, see
    /// [`ConvGeometry::c4_weights`]): a k4 group is then one 4-byte word per token,
    /// copied whole. Otherwise the (channel, tap) order of the weights as given, for
    /// 1×1 convs, whose patches are the input's planes interleaved.
    pub c4: bool,
    /// Input and output shapes, batch first; channels on axis 1.
    pub input_shape: TVec<usize>,
    pub output_shape: TVec<usize>,
}

impl QuantConv {
    fn batch(&self) -> usize {
        self.input_shape[0]
    }

    /// The input's bytes (an i8 input's read as u8), its shape and type checked.
    fn input_bytes<'a>(&self, x: &Tensor, view: &'a PlainView<'_>) -> TractResult<&'a [u8]> {
        ensure!(
            x.shape() == &*self.input_shape,
            "int8 conv: input {:?}, expected {:?}",
            x.shape(),
            self.input_shape
        );
        let want = if self.signed_input {
            i8::datum_type()
        } else {
            u8::datum_type()
        };
        ensure!(
            x.datum_type().unquantized() == want,
            "int8 conv: {:?} input, expected {want:?}",
            x.datum_type()
        );
        Ok(if self.signed_input {
            let s = view.as_slice::<i8>()?;
            // SAFETY: i8 and u8 have the same size and alignment; the bits are read as is.
            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, s.len()) }
        } else {
            view.as_slice::<u8>()?
        })
    }

    /// One image's patch matrix in the k4 layout, filled by `threads` threads.
    fn patches(&self, isa: Isa, x: &[u8], threads: usize) -> Vec<u8> {
        let g = &self.geometry;
        let p = g.out_pixels();
        let groups = self.patch_rows().div_ceil(4);
        let flip = if self.signed_input { 0x80 } else { 0 };
        let c4 = self.c4.then(|| {
            // The padding channels read a0 too: their weights are 0 and the
            // correction of a weight zero point counts their rows.
            let mut c4 = vec![0u8; g.c4_channels() * g.in_h * g.in_w];
            g.to_c4(isa, x, flip, self.a0, &mut c4);
            c4
        });
        let fill = |range: Range<usize>, part: &mut [u8]| match &c4 {
            Some(c4) => g.fill_k4_groups_c4(c4, [self.a0; 4], range, part),
            None => g.fill_k4_groups(x, flip, range, part),
        };
        let mut patches = vec![0u8; groups * 4 * p];
        if threads > 1 && groups >= 2 * threads {
            let per = groups.div_ceil(threads);
            patches
                .par_chunks_mut(per * 4 * p)
                .enumerate()
                .for_each(|(t, part)| {
                    let first = t * per;
                    fill(first..first + part.len() / (4 * p), part)
                });
        } else {
            fill(0..groups, &mut patches);
        }
        patches
    }

    /// Rows of the patch matrix whose bytes hold an activation or `a0`: `k`, or
    /// `c4_k` in the c4 order.
    fn patch_rows(&self) -> usize {
        if self.c4 {
            self.geometry.c4_k()
        } else {
            self.geometry.k()
        }
    }

    /// With a weight zero point, each token's `−w0·Σ_k (x_k,p − a0)`, from the patch
    /// matrix's column sums (the padding bytes of the last group are 0).
    fn token_fix(&self, patches: &[u8]) -> Option<Vec<i32>> {
        if self.weight_zero == 0 {
            return None;
        }
        let g = &self.geometry;
        let p = g.out_pixels();
        let mut sums = vec![-(self.patch_rows() as i64) * self.a0 as i64; p];
        for group in patches.chunks_exact(4 * p) {
            for (s, q) in sums.iter_mut().zip(group.chunks_exact(4)) {
                *s += q.iter().map(|&v| v as i64).sum::<i64>();
            }
        }
        Some(
            sums.iter()
                .map(|&s| (-(self.weight_zero as i64) * s) as i32)
                .collect(),
        )
    }

    /// Output rows per block: their accumulators (at most ~256 KiB) still in cache when
    /// the correction, and an epilogue, run over them.
    fn block_rows(&self) -> usize {
        (65_536 / self.geometry.out_pixels()).max(8) / 8 * 8
    }

    /// The accumulators of output rows `rows` into `acc` (`rows.len()·p` values).
    fn product(
        &self,
        isa: Isa,
        patches: &[u8],
        fix: Option<&[i32]>,
        rows: Range<usize>,
        acc: &mut [i32],
    ) {
        self.raw_product(isa, patches, rows.clone(), acc);
        let p = self.geometry.out_pixels();
        for (acc, &c) in acc.chunks_exact_mut(p).zip(&self.correction[rows]) {
            match fix {
                None => acc.iter_mut().for_each(|v| *v = v.wrapping_add(c)),
                Some(fix) => {
                    for (v, &f) in acc.iter_mut().zip(fix) {
                        *v = v.wrapping_add(c).wrapping_add(f);
                    }
                }
            }
        }
    }

    /// The u8 × i8 product alone, without the correction (see [`Self::product`]).
    fn raw_product(&self, isa: Isa, patches: &[u8], rows: Range<usize>, acc: &mut [i32]) {
        let p = self.geometry.out_pixels();
        gemm_u8i8(isa, &self.weights, rows, patches, p, acc, p);
    }

    /// Runs one image: `x` holds its `in_channels·in_h·in_w` bytes, `out` its
    /// `out_channels·out_pixels` accumulators.
    fn run_image(&self, isa: Isa, x: &[u8], out: &mut [i32], threads: usize) {
        let patches = self.patches(isa, x, threads);
        let fix = self.token_fix(&patches);
        let p = self.geometry.out_pixels();
        let rows_per = self.out_channels.div_ceil(threads.max(1));
        let block = self.block_rows();
        let run = |t: usize, chunk: &mut [i32]| {
            let first = t * rows_per;
            for (b, part) in chunk.chunks_mut(block * p).enumerate() {
                let rows = first + b * block..first + b * block + part.len() / p;
                self.product(isa, &patches, fix.as_deref(), rows, part);
            }
        };
        if threads > 1 {
            out.par_chunks_mut(rows_per * p)
                .enumerate()
                .for_each(|(t, chunk)| run(t, chunk));
        } else {
            run(0, out);
        }
    }
}

impl Op for QuantConv {
    fn name(&self) -> StaticName {
        "PfeQuantConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}→{} {}×{}/{} → {}×{}, {} × i8 → i32, {}",
            g.in_channels,
            self.out_channels,
            g.kernel.0,
            g.kernel.1,
            g.stride.0,
            g.out_h,
            g.out_w,
            if self.signed_input { "i8" } else { "u8" },
            QKernel::for_weights(Isa::best(), &self.weights).name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let view = x.try_as_plain_ram()?;
        let bytes = self.input_bytes(&x, &view)?;
        let g = &self.geometry;
        let (in_len, out_len) = (
            g.in_channels * g.in_h * g.in_w,
            self.out_channels * g.out_pixels(),
        );
        ensure!(
            in_len > 0 && out_len > 0,
            "int8 conv: empty input or output"
        );
        let mut out = unsafe { Tensor::uninitialized::<i32>(&self.output_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let acc = view.as_slice_mut::<i32>()?;
            let isa = Isa::best();
            let (executor, threads) = executor_threads();
            in_pool(&executor, || {
                for (x, acc) in bytes
                    .chunks_exact(in_len)
                    .zip(acc.chunks_exact_mut(out_len))
                {
                    self.run_image(isa, x, acc, threads);
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1);
        Ok(tvec!(i32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((
            Cost::FMA(i8::datum_type()),
            (self.batch() * self.out_channels * g.k() * g.out_pixels()).into()
        )))
    }

    as_op!();
}

/// A [`QuantConv`] and the [`ElementwiseChain`] that alone reads its output, a chain
/// with a requantizing head (an erf GELU after a channel MLP's first conv, a residual
/// addition after its second): the chain runs on each block of output rows right
/// after their product, while the accumulators are in cache, and the i32 tensor is
/// never written whole. Same arithmetic, same bits as the two ops.
///
/// Inputs: the conv's, then the chain's operands (the chain's input `i ≥ 1` is this
/// op's input `i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantConvChain {
    pub conv: QuantConv,
    pub chain: ElementwiseChain,
}

/// Element types a chain writes.
trait ChainOut: Datum + Send {
    fn slice(s: &mut [Self]) -> OutSlice<'_>;
}

impl ChainOut for f32 {
    fn slice(s: &mut [f32]) -> OutSlice<'_> {
        OutSlice::F32(s)
    }
}

impl ChainOut for u8 {
    fn slice(s: &mut [u8]) -> OutSlice<'_> {
        OutSlice::U8(s)
    }
}

impl ChainOut for i8 {
    fn slice(s: &mut [i8]) -> OutSlice<'_> {
        OutSlice::I8(s)
    }
}

impl QuantConvChain {
    /// The op on one image `x` into `out`: per block of output rows, the product, then
    /// the chain over those channels.
    fn run<T: ChainOut>(
        &self,
        x: &[u8],
        inputs: &[TValue],
        plains: &[PlainView<'_>],
        out: &mut [T],
    ) -> TractResult<()> {
        let isa = Isa::best();
        let conv = &self.conv;
        let shape = &conv.output_shape;
        let table = {
            let b = self.chain.bind(shape, &[], &[], 0, inputs, plains)?;
            self.chain.level_table(isa, &b)?
        };
        let p = conv.geometry.out_pixels();
        let (executor, threads) = executor_threads();
        in_pool(&executor, || {
            let patches = conv.patches(isa, x, threads);
            let fix = conv.token_fix(&patches);
            let rows_per = conv.out_channels.div_ceil(threads.max(1));
            let block = conv.block_rows();
            let run = |t: usize, chunk: &mut [T]| -> TractResult<()> {
                let first = t * rows_per;
                let mut acc = vec![0i32; block.min(chunk.len() / p) * p];
                for (b, part) in chunk.chunks_mut(block * p).enumerate() {
                    let rows = first + b * block..first + b * block + part.len() / p;
                    let acc = &mut acc[..part.len()];
                    let bound = match fix.as_deref() {
                        // The per-channel correction is added as the chain reads
                        // the accumulators, not in a pass of its own.
                        None => {
                            conv.raw_product(isa, &patches, rows.clone(), acc);
                            self.chain
                                .bind(shape, &[], acc, rows.start * p, inputs, plains)?
                                .with_acc_offsets(&conv.correction)?
                        }
                        Some(fix) => {
                            conv.product(isa, &patches, Some(fix), rows.clone(), acc);
                            self.chain
                                .bind(shape, &[], acc, rows.start * p, inputs, plains)?
                        }
                    };
                    self.chain.write(
                        isa,
                        &bound,
                        table.as_ref(),
                        T::slice(part),
                        Some(rows.start),
                    )?;
                }
                Ok(())
            };
            if threads > 1 {
                out.par_chunks_mut(rows_per * p)
                    .enumerate()
                    .try_for_each(|(t, chunk)| run(t, chunk))
            } else {
                run(0, out)
            }
        })
    }
}

impl Op for QuantConvChain {
    fn name(&self) -> StaticName {
        "PfeQuantConvChain".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.conv.info()?;
        info.extend(self.chain.info()?);
        Ok(info)
    }

    op_as_typed_op!();
}

impl EvalOp for QuantConvChain {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(!inputs.is_empty(), "int8 conv: no input");
        ensure!(
            self.conv.batch() == 1,
            "int8 conv with a chain: batch {}, expected 1",
            self.conv.batch()
        );
        let plains: Vec<_> = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<_>>()?;
        let x = self.conv.input_bytes(&inputs[0], &plains[0])?;
        let g = &self.conv.geometry;
        ensure!(
            g.out_pixels() > 0 && self.conv.out_channels > 0 && !x.is_empty(),
            "int8 conv: empty input or output"
        );
        let dt = self.chain.out_dt();
        let mut out = unsafe { Tensor::uninitialized_dt(dt, &self.conv.output_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            match dt {
                DatumType::F32 => self.run(x, &inputs, &plains, view.as_slice_mut::<f32>()?)?,
                DatumType::U8 => self.run(x, &inputs, &plains, view.as_slice_mut::<u8>()?)?,
                DatumType::I8 => self.run(x, &inputs, &plains, view.as_slice_mut::<i8>()?)?,
                dt => bail!("int8 conv with a chain: cannot write {dt:?}"),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantConvChain {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.chain.out_dt().fact(&*self.conv.output_shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let mut cost = self.conv.cost(&inputs[..1])?;
        let out = i32::fact(&*self.conv.output_shape);
        let mut chain_inputs: Vec<&TypedFact> = vec![&out];
        chain_inputs.extend(&inputs[1..]);
        cost.extend(self.chain.cost(&chain_inputs)?);
        Ok(cost)
    }

    as_op!();
}
