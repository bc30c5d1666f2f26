//! A dense f32 convolution as patch extraction plus one matrix product, for the
//! strided stem and downsampling convolutions of PoolFormer (7×7/4 and 3×3/2), where
//! tract's lazy im2col path runs well below the matrix kernels' speed.

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::im2col::ConvGeometry;

use super::{executor_threads, in_pool};

/// The weight matrix `[out_channels, in_channels·kh·kw]`, row-major (OIHW flattened).
#[derive(Debug, Clone, PartialEq)]
pub enum ConvWeights {
    F32(Arc<Vec<f32>>),
    /// Integers with a scale and a zero point per output channel (a DequantizeLinear
    /// of int8 weights in the graph): `w[o, k] = (q[o, k] − zero[o])·scale[o]`, computed
    /// in f32 as DequantizeLinear does, a block of [`I8_BLOCK_ROWS`] rows at a time
    /// during the run, so that only the int8 values stay resident (a quarter of the
    /// f32 matrix: 1.9 instead of 7.7 MB for PoolFormer-S12's downsampling convs).
    I8 {
        q: Arc<Vec<i8>>,
        scale: Arc<Vec<f32>>,
        zero: Arc<Vec<i32>>,
    },
}

/// Output channels dequantized per matrix product for [`ConvWeights::I8`].
pub const I8_BLOCK_ROWS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct PatchConv {
    pub geometry: ConvGeometry,
    pub out_channels: usize,
    pub weights: ConvWeights,
    pub bias: Arc<Vec<f32>>,
}

impl Eq for PatchConv {}

impl Op for PatchConv {
    fn name(&self) -> StaticName {
        "PfePatchConv".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        let weights = match self.weights {
            ConvWeights::F32(_) => "f32",
            ConvWeights::I8 { .. } => "int8",
        };
        Ok(vec![format!(
            "{}→{} {}×{}/{} → {}×{}, {weights} weights",
            g.in_channels, self.out_channels, g.kernel.0, g.kernel.1, g.stride.0, g.out_h, g.out_w
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for PatchConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let g = self.geometry;
        ensure!(
            x.shape() == [1, g.in_channels, g.in_h, g.in_w],
            "patch conv: input {:?}, expected [1, {}, {}, {}]",
            x.shape(),
            g.in_channels,
            g.in_h,
            g.in_w
        );
        let xs: &[f32] = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (k, p) = (g.k(), g.out_pixels());
        let mut patches = vec![0f32; k * p];
        let mut out =
            unsafe { Tensor::uninitialized::<f32>(&[1, self.out_channels, g.out_h, g.out_w])? };
        let (executor, threads) = executor_threads();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let os = view.as_slice_mut::<f32>()?;
            for (row, &b) in os.chunks_exact_mut(p).zip(self.bias.iter()) {
                row.fill(b);
            }
            in_pool(&executor, || {
                if threads > 1 {
                    let rows_per = k.div_ceil(threads * 4).max(1);
                    patches
                        .par_chunks_mut(rows_per * p)
                        .enumerate()
                        .for_each(|(i, chunk)| g.fill_rows(xs, i * rows_per, chunk));
                } else {
                    g.fill_rows(xs, 0, &mut patches);
                }
                let parallelism = if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                };
                match &self.weights {
                    ConvWeights::F32(w) => {
                        product(os, w, 0, self.out_channels, &patches, k, p, parallelism)
                    }
                    ConvWeights::I8 { q, scale, zero } => {
                        let mut block = vec![0f32; I8_BLOCK_ROWS.min(self.out_channels) * k];
                        let mut row0 = 0;
                        while row0 < self.out_channels {
                            let rows = I8_BLOCK_ROWS.min(self.out_channels - row0);
                            for (r, dst) in block.chunks_exact_mut(k).take(rows).enumerate() {
                                let o = row0 + r;
                                let (s, z) = (scale[o], zero[o]);
                                for (d, &v) in dst.iter_mut().zip(&q[o * k..(o + 1) * k]) {
                                    *d = (v as i32 - z) as f32 * s;
                                }
                            }
                            product(os, &block, row0, rows, &patches, k, p, parallelism);
                            row0 += rows;
                        }
                    }
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// `out[row0 + r, ·] += w[r, ·] · patches` for `r < rows`: `w` is `rows × k`, `patches`
/// `k × p`, `out` the whole `out_channels × p` output.
#[allow(clippy::too_many_arguments)]
fn product(
    out: &mut [f32],
    w: &[f32],
    row0: usize,
    rows: usize,
    patches: &[f32],
    k: usize,
    p: usize,
    parallelism: gemm::Parallelism,
) {
    assert!(w.len() >= rows * k && patches.len() >= k * p && out.len() >= (row0 + rows) * p);
    // SAFETY: row-major buffers of the sizes checked above.
    unsafe {
        gemm::gemm(
            rows,
            p,
            k,
            out.as_mut_ptr().add(row0 * p),
            1,
            p as isize,
            true,
            w.as_ptr(),
            1,
            k as isize,
            patches.as_ptr(),
            1,
            p as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl TypedOp for PatchConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        let g = &self.geometry;
        Ok(tvec!(f32::fact([1, self.out_channels, g.out_h, g.out_w])))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let g = &self.geometry;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (self.out_channels * g.k() * g.out_pixels()).into()
        )))
    }

    as_op!();
}
