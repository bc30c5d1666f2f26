//! A dense f32 convolution as patch extraction plus one matrix product, for the
//! strided stem and downsampling convolutions of PoolFormer (7×7/4 and 3×3/2), where
//! tract's lazy im2col path runs well below the matrix kernels' speed.

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::im2col::ConvGeometry;

use super::{executor_threads, in_pool};

#[derive(Debug, Clone, PartialEq)]
pub struct PatchConv {
    pub geometry: ConvGeometry,
    pub out_channels: usize,
    /// `[out_channels, in_channels·kh·kw]`, row-major (OIHW flattened).
    pub weights: Arc<Vec<f32>>,
    pub bias: Arc<Vec<f32>>,
}

impl Eq for PatchConv {}

impl Op for PatchConv {
    fn name(&self) -> StaticName {
        "PfePatchConv".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{}→{} {}×{}/{} → {}×{}",
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
                // out[O, P] += W[O, K] · patches[K, P]
                unsafe {
                    gemm::gemm(
                        self.out_channels,
                        p,
                        k,
                        os.as_mut_ptr(),
                        1,
                        p as isize,
                        true,
                        self.weights.as_ptr(),
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
            });
        }
        Ok(tvec!(out.into_tvalue()))
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
