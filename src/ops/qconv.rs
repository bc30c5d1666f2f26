//! [`QuantConv`]: an integer convolution as the int8 pass leaves it (u8 or i8
//! activations, i8 weights with an optional zero point, an i32 accumulator with unit
//! scales, requantized by the next node), run as patch extraction in the k4 layout
//! plus one u8 × i8 product on this crate's kernels ([`crate::kernels::qgemm`])
//! instead of tract's quantized matrix path. It covers the strided stem and
//! downsampling convolutions, the 1×1 convolutions the channel-MLP fusion does not
//! absorb, and a quantized head applied to one vector (a 1×1 conv of one pixel).

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::im2col::ConvGeometry;
use crate::kernels::qgemm::{gemm_u8i8, PackedI8, QKernel};
use crate::kernels::Isa;

use super::{executor_threads, in_pool};

/// `acc[o, p] = Σ_k (w[o, k] − w0)·(x_k,p − a0) + bias[o]` over the patches `x_k,p` of
/// each image, padding taps reading `a0` (they add nothing), as i32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantConv {
    /// One image's geometry (a 1×1 stride-1 conv is a matrix product over the tokens).
    pub geometry: ConvGeometry,
    pub out_channels: usize,
    /// `[out_channels, in_channels·kh·kw]`.
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
    /// Input and output shapes, batch first; channels on axis 1.
    pub input_shape: TVec<usize>,
    pub output_shape: TVec<usize>,
}

impl QuantConv {
    fn batch(&self) -> usize {
        self.input_shape[0]
    }

    /// Runs one image: `x` holds its `in_channels·in_h·in_w` bytes, `out` its
    /// `out_channels·out_pixels` accumulators.
    fn run_image(&self, isa: Isa, x: &[u8], out: &mut [i32], threads: usize) {
        let g = &self.geometry;
        let p = g.out_pixels();
        let groups = g.k().div_ceil(4);
        let flip = if self.signed_input { 0x80 } else { 0 };
        let mut patches = vec![0u8; groups * 4 * p];
        if threads > 1 && groups >= 2 * threads {
            let per = groups.div_ceil(threads);
            patches
                .par_chunks_mut(per * 4 * p)
                .enumerate()
                .for_each(|(t, part)| {
                    let first = t * per;
                    g.fill_k4_groups(x, flip, self.a0, first..first + part.len() / (4 * p), part)
                });
        } else {
            g.fill_k4_groups(x, flip, self.a0, 0..groups, &mut patches);
        }
        let o = self.out_channels;
        let rows_per = if threads > 1 { o.div_ceil(threads) } else { o };
        // Rows a block: their accumulators (at most ~256 KiB) still in cache when the
        // correction is added.
        let block = (65_536 / p).max(8) / 8 * 8;
        let run = |t: usize, chunk: &mut [i32]| {
            let first = t * rows_per;
            for (b, part) in chunk.chunks_mut(block * p).enumerate() {
                let rows = first + b * block..first + b * block + part.len() / p;
                gemm_u8i8(isa, &self.weights, rows.clone(), &patches, p, part, p);
                for (acc, &c) in part.chunks_exact_mut(p).zip(&self.correction[rows]) {
                    for v in acc {
                        *v = v.wrapping_add(c);
                    }
                }
            }
        };
        if threads > 1 {
            out.par_chunks_mut(rows_per * p)
                .enumerate()
                .for_each(|(t, chunk)| run(t, chunk));
        } else {
            run(0, out);
        }
        if self.weight_zero != 0 {
            // Σ_k (x_k,p − a0) per token: the padding bytes of the last group are 0.
            let mut sums = vec![-(g.k() as i64) * self.a0 as i64; p];
            for group in patches.chunks_exact(4 * p) {
                for (s, q) in sums.iter_mut().zip(group.chunks_exact(4)) {
                    *s += q.iter().map(|&v| v as i64).sum::<i64>();
                }
            }
            let fix: Vec<i32> = sums
                .iter()
                .map(|&s| (-(self.weight_zero as i64) * s) as i32)
                .collect();
            for row in out.chunks_exact_mut(p) {
                for (v, &f) in row.iter_mut().zip(&fix) {
                    *v = v.wrapping_add(f);
                }
            }
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
        let view = x.try_as_plain_ram()?;
        let bytes: &[u8] = if self.signed_input {
            let s = view.as_slice::<i8>()?;
            // SAFETY: i8 and u8 have the same size and alignment; the bits are read as is.
            unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, s.len()) }
        } else {
            view.as_slice::<u8>()?
        };
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
