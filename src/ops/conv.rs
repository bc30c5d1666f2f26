//! A dense f32 convolution as patch extraction plus one matrix product, for the
//! strided stem and downsampling convolutions of PoolFormer (7×7/4 and 3×3/2), where
//! tract's lazy im2col path runs well below the matrix kernels' speed.

use std::sync::Arc;

use rayon::prelude::*;
use tract_core::internal::*;

use crate::kernels::im2col::ConvGeometry;
use crate::kernels::qgemm::{gemm_q16_planes, gemm_u8i8_with, PackedI8, QKernel};
use crate::kernels::sgemm::{self, Epilogue, PackedCols, PackedWeights, PackedWeightsI8};
use crate::kernels::{split16, Isa};

use super::{executor_threads, in_pool};

/// The weight matrix `[out_channels, in_channels·kh·kw]`, row-major (OIHW flattened),
/// or packed for the crate's `sgemm` kernels.
#[derive(Debug, Clone)]
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
    /// `I8`, packed for the `sgemm` kernels of one instruction set ([`PatchConv`]'s
    /// codegen does this where those kernels are the faster path); a few panels at a
    /// time are dequantized into f32 while the op runs (`sgemm::gemm_i8`).
    PackedI8(Arc<PackedWeightsI8>),
    /// `F32`, packed for the `sgemm` kernels of one instruction set.
    PackedF32(Arc<PackedWeights>),
    /// `I8` with every zero point 0, where an integer product beats the f32 one
    /// ([`split16_pays`], [`fused16_pays`]): the input is quantized to 16 bits at each
    /// run and split into two byte planes ([`crate::kernels::split16`]). The columns of
    /// `q` are ordered by tap, then channel, with `channels` rounded up to 4 by zero
    /// weights, the order of `ConvGeometry::fill_k4_groups_c4`'s patch rows.
    ///
    /// Without `fused`, each plane is one u8 × i8 product and the two are summed in
    /// f32; the grid has 2·32767 + 1 levels. With `fused`, one product takes both planes
    /// as i16 values and sums in i32 ([`gemm_q16_planes`]), so the grid is narrowed to
    /// `grid` levels each side, where no output can leave an i32
    /// ([`ConvWeights::input_grid`]).
    Split16 {
        q: Arc<PackedI8>,
        scale: Arc<Vec<f32>>,
        channels: usize,
        fused: bool,
        grid: f32,
    },
}

/// Whether int8 weights with a float input run faster as [`ConvWeights::Split16`] on
/// `isa`: where the u8 × i8 kernel adds four byte products per 32-bit lane (AVX-512
/// VNNI, NEON dot product), two of its products cost about half an f32 one. Elsewhere
/// (AVX2 on full-range weights, NEON without the dot product) they would not.
pub fn split16_pays(isa: Isa) -> bool {
    matches!(
        QKernel::for_isa(isa),
        QKernel::Avx512Vnni | QKernel::NeonDot
    )
}

/// Whether int8 weights with a float input run faster as a fused [`ConvWeights::Split16`]
/// on `isa`: with AVX2 but no VNNI, one `vpmaddwd` per pair of 16-bit inputs
/// ([`gemm_q16_planes`]) multiplies twice as many values per instruction as an f32 FMA.
pub fn fused16_pays(isa: Isa) -> bool {
    QKernel::for_isa(isa) == QKernel::Avx2
}

impl ConvWeights {
    /// Whether the weights are held as int8 values.
    pub fn is_int8(&self) -> bool {
        matches!(
            self,
            ConvWeights::I8 { .. } | ConvWeights::PackedI8(_) | ConvWeights::Split16 { .. }
        )
    }

    /// Row `o` of int8 weights as f32 into `dst` (`in_channels·kh·kw` values), as
    /// DequantizeLinear computes it.
    fn dequantize_row(&self, o: usize, dst: &mut [f32]) {
        let k = dst.len();
        match self {
            ConvWeights::I8 { q, scale, zero } => {
                let (s, z) = (scale[o], zero[o]);
                for (d, &v) in dst.iter_mut().zip(&q[o * k..(o + 1) * k]) {
                    *d = (v as i32 - z) as f32 * s;
                }
            }
            ConvWeights::Split16 {
                q, scale, channels, ..
            } => {
                // Back from (tap, channel) order to (channel, tap).
                let (taps, cp) = (k / channels, channels.div_ceil(4) * 4);
                let row = q.row(o);
                for (c, d) in dst.chunks_exact_mut(taps).enumerate() {
                    for (t, d) in d.iter_mut().enumerate() {
                        *d = row[t * cp + c] as f32 * scale[o];
                    }
                }
            }
            _ => unreachable!("dequantize_row on weights that are not int8 rows"),
        }
    }

    /// `I8` weights with zero points 0 as [`ConvWeights::Split16`], `fused` or not (any
    /// CPU runs either: every integer kernel is exact; [`split16_pays`] and
    /// [`fused16_pays`] say where each is the fast path).
    pub fn split16(&self, g: &ConvGeometry, rows: usize, fused: bool) -> TractResult<ConvWeights> {
        let ConvWeights::I8 { q, scale, zero } = self else {
            bail!("16-bit input: the weights must be int8 rows");
        };
        ensure!(
            zero.iter().all(|&z| z == 0),
            "16-bit input: the int8 weights must have zero points 0"
        );
        let k = g.k();
        ensure!(
            q.len() == rows * k,
            "conv weights: {} values for {rows}×{k}",
            q.len()
        );
        let q = PackedI8::new(rows, g.c4_k(), &g.c4_weights(rows, q))?;
        let l1 = q.max_row_l1();
        let grid = if fused && l1 > 0 {
            ((i32::MAX as i64 / l1) as f32).min(split16::Q16_MAX)
        } else {
            split16::Q16_MAX
        };
        Ok(ConvWeights::Split16 {
            q: Arc::new(q),
            scale: scale.clone(),
            channels: g.in_channels,
            fused,
            grid,
        })
    }

    /// For [`ConvWeights::Split16`], the largest magnitude of the input's 16-bit grid:
    /// 32767, or for `fused` weights at most `i32::MAX / max_o Σ_k |q[o, k]|`, so that
    /// every output of the fused product fits an i32. `None` for other weights.
    pub fn input_grid(&self) -> Option<f32> {
        match self {
            ConvWeights::Split16 { grid, .. } => Some(*grid),
            _ => None,
        }
    }

    /// The weights in the form the engine runs on `isa`: int8 ones with zero points 0
    /// as [`ConvWeights::Split16`] where that pays, otherwise packed for the `sgemm`
    /// kernels where those are the faster path (`sgemm::preferred`: AVX2 and AVX-512);
    /// `None` where the form they have is the one to run.
    pub fn prepared(
        &self,
        isa: Isa,
        g: &ConvGeometry,
        rows: usize,
    ) -> TractResult<Option<ConvWeights>> {
        Ok(match self {
            // With 3 input channels (a stem) a quarter of the products would be padding:
            // slower than the f32 kernels there.
            ConvWeights::I8 { zero, .. }
                if (split16_pays(isa) || fused16_pays(isa))
                    && g.in_channels >= 8
                    && zero.iter().all(|&z| z == 0) =>
            {
                Some(self.split16(g, rows, fused16_pays(isa))?)
            }
            ConvWeights::I8 { .. } | ConvWeights::F32(_) if sgemm::preferred(isa) => {
                Some(self.packed(isa, rows))
            }
            _ => None,
        })
    }

    /// The weights packed for the `sgemm` kernels on `isa` (packed ones as they are).
    pub fn packed(&self, isa: Isa, rows: usize) -> ConvWeights {
        match self {
            ConvWeights::I8 { q, scale, zero } => {
                let depth = q.len() / rows.max(1);
                ConvWeights::PackedI8(Arc::new(PackedWeightsI8::pack(
                    isa, q, scale, zero, rows, depth,
                )))
            }
            ConvWeights::F32(w) => {
                let depth = w.len() / rows.max(1);
                ConvWeights::PackedF32(Arc::new(PackedWeights::pack(isa, w, rows, depth)))
            }
            packed => packed.clone(),
        }
    }
}

// Packed weights are a function of the unpacked ones: the same packing is the same
// weights.
impl PartialEq for ConvWeights {
    fn eq(&self, other: &Self) -> bool {
        use ConvWeights::*;
        match (self, other) {
            (F32(a), F32(b)) => a == b,
            (
                I8 { q, scale, zero },
                I8 {
                    q: q2,
                    scale: s2,
                    zero: z2,
                },
            ) => q == q2 && scale == s2 && zero == z2,
            (PackedI8(a), PackedI8(b)) => Arc::ptr_eq(a, b),
            (PackedF32(a), PackedF32(b)) => Arc::ptr_eq(a, b),
            (
                Split16 {
                    q, scale, fused, ..
                },
                Split16 {
                    q: q2,
                    scale: s2,
                    fused: f2,
                    ..
                },
            ) => q == q2 && scale == s2 && fused == f2,
            _ => false,
        }
    }
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
            ConvWeights::F32(_) => "f32 weights".to_string(),
            ConvWeights::I8 { .. } => "int8 weights".to_string(),
            ConvWeights::PackedI8(ref w) => format!("int8 weights packed for {}", w.isa().name()),
            ConvWeights::PackedF32(ref w) => format!("f32 weights packed for {}", w.isa().name()),
            ConvWeights::Split16 { fused: true, .. } => format!(
                "int8 weights × 16-bit input (one i16 product, grid ±{})",
                self.weights.input_grid().unwrap_or(0.0)
            ),
            ConvWeights::Split16 { ref q, .. } => format!(
                "int8 weights × 16-bit input ({})",
                QKernel::for_weights(Isa::best(), q).name()
            ),
        };
        Ok(vec![format!(
            "{}→{} {}×{}/{} → {}×{}, {weights}",
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
        let mut out =
            unsafe { Tensor::uninitialized::<f32>(&[1, self.out_channels, g.out_h, g.out_w])? };
        let (executor, threads) = executor_threads();
        let packed = match &self.weights {
            ConvWeights::PackedI8(w) => Some(Packed::I8(w)),
            ConvWeights::PackedF32(w) => Some(Packed::F32(w)),
            _ => None,
        };
        if let Some(w) = packed {
            self.eval_packed(w, xs, &mut out, &executor, threads)?;
            return Ok(tvec!(out.into_tvalue()));
        }
        let mut view = out.try_as_plain_ram_mut()?;
        let os = view.as_slice_mut::<f32>()?;
        ensure!(os.len() == self.out_channels * p && self.bias.len() == self.out_channels);
        if let ConvWeights::Split16 {
            q,
            scale,
            fused,
            grid,
            ..
        } = &self.weights
        {
            // A NaN or an infinity has no 16-bit code, and a largest magnitude so small
            // that the grid's step underflows has no grid: such inputs take the float
            // path, which carries them through as the graph does.
            let max = split16::max_abs(Isa::best(), xs)
                .filter(|&m| m == 0.0 || (split16::Q16_MAX / m).is_finite());
            if let Some(max) = max {
                let grid = Grid {
                    levels: *grid,
                    max,
                    fused: *fused,
                };
                self.eval_split16(q, scale, xs, grid, os, &executor, threads);
                return Ok(tvec!(out.into_tvalue()));
            }
        }
        let mut patches = vec![0f32; k * p];
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
            if let ConvWeights::F32(w) = &self.weights {
                product(os, w, 0, self.out_channels, &patches, k, p, parallelism);
                return;
            }
            // int8 weights, dequantized a block of rows at a time.
            let mut block = vec![0f32; I8_BLOCK_ROWS.min(self.out_channels) * k];
            let mut row0 = 0;
            while row0 < self.out_channels {
                let rows = I8_BLOCK_ROWS.min(self.out_channels - row0);
                for (r, dst) in block.chunks_exact_mut(k).take(rows).enumerate() {
                    self.weights.dequantize_row(row0 + r, dst);
                }
                product(os, &block, row0, rows, &patches, k, p, parallelism);
                row0 += rows;
            }
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl PatchConv {
    /// The op on packed weights: the patch matrix written straight into column panels,
    /// then the `sgemm` kernels over the weight panels, a range per thread; int8 weights
    /// dequantized a stretch at a time into each thread's scratch.
    fn eval_packed(
        &self,
        w: Packed,
        xs: &[f32],
        out: &mut Tensor,
        executor: &tract_linalg::multithread::Executor,
        threads: usize,
    ) -> TractResult<()> {
        let g = self.geometry;
        let (k, p) = (g.k(), g.out_pixels());
        let isa = Isa::best();
        let panels = w.panels();
        ensure!(
            w.isa() == isa,
            "patch conv: weights packed for {}, running on {}",
            w.isa().name(),
            isa.name()
        );
        let mut view = out.try_as_plain_ram_mut()?;
        let os = view.as_slice_mut::<f32>()?;
        ensure!(os.len() == self.out_channels * p && self.bias.len() == self.out_channels);
        if w.f32_bytes() <= COLUMN_TASK_WEIGHTS {
            return self.eval_packed_by_columns(w, xs, os, executor, threads);
        }
        // One range of weight panels per thread.
        let per = panels.div_ceil(threads).max(1);
        let ranges: Vec<std::ops::Range<usize>> = (0..panels)
            .step_by(per)
            .map(|s| s..(s + per).min(panels))
            .collect();
        // The patch matrix straight into column panels: a few panels per task, one row
        // of patches at a time through a small buffer.
        let mut cols = PackedCols::default();
        cols.set_layout(isa, k, p);
        let mut panel_list = cols.panels_mut();
        let groups = if threads > 1 {
            panel_list.len().div_ceil(threads * 4).max(1)
        } else {
            panel_list.len().max(1)
        };
        let fill = |group: &mut [(std::ops::Range<usize>, &mut [f32])], row: &mut Vec<f32>| {
            fill_panels(&g, xs, 0, p, group, row)
        };
        if threads > 1 {
            in_pool(executor, || {
                panel_list
                    .par_chunks_mut(groups)
                    .for_each_init(Vec::new, |row, group| fill(group, row))
            });
        } else {
            fill(&mut panel_list, &mut Vec::new());
        }
        drop(panel_list);
        let out_addr = os.as_mut_ptr() as usize;
        let bias = &self.bias[..];
        let run = |range: &std::ops::Range<usize>, scratch: &mut PackedWeights| {
            let out = out_addr as *mut f32;
            // SAFETY: each range of panels writes only its own rows of `out` (the
            // `out_channels × p` output, alive for the whole call), and `bias` has a value
            // for every row.
            unsafe {
                let epi = Epilogue::Bias { bias, out, ldo: p };
                match w {
                    Packed::I8(w) => sgemm::gemm_i8(isa, w, range.clone(), &cols, &epi, scratch),
                    Packed::F32(w) => sgemm::gemm(isa, w, range.clone(), &cols, &epi),
                }
            }
        };
        for_each_task(&ranges, executor, threads, run);
        Ok(())
    }

    /// The op on [`ConvWeights::Split16`] weights `q` for an input on `grid`: the input
    /// as two byte planes in the c4 layout, their patch matrices in the k4 layout, then
    /// per block of output rows the products (two u8 × i8 ones summed in f32, or one
    /// fused i16 one) into `os`. Threads split the patch rows, then the output rows.
    #[allow(clippy::too_many_arguments)]
    fn eval_split16(
        &self,
        q: &PackedI8,
        scale: &[f32],
        xs: &[f32],
        grid: Grid,
        os: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
        threads: usize,
    ) {
        let g = self.geometry;
        let isa = Isa::best();
        let kernel = QKernel::for_weights(isa, q);
        let p = g.out_pixels();
        let (s, inv) = if grid.max > 0.0 {
            (grid.max / grid.levels, grid.levels / grid.max)
        } else {
            (1.0, 1.0)
        };
        let (channels, pixels) = (g.in_channels, g.in_h * g.in_w);
        let len = g.c4_channels() * pixels;
        let (mut hi, mut lo) = (vec![0u8; len], vec![0u8; len]);
        // The high bytes as h + 128 (u8) for the u8 × i8 products, as h (i8) for the
        // fused one; padding taps read the bytes of 0, `flip` and 0.
        let flip = if grid.fused { 0 } else { 0x80 };
        split16::split_bytes_c4(isa, xs, channels, pixels, inv, flip, &mut hi, &mut lo);
        let groups = g.c4_k() / 4;
        let (mut ph, mut pl) = (vec![0u8; groups * 4 * p], vec![0u8; groups * 4 * p]);
        let fill = |first: usize, h: &mut [u8], l: &mut [u8]| {
            let range = first..first + h.len() / (4 * p);
            g.fill_k4_groups_c4(&hi, [flip; 4], range.clone(), h);
            g.fill_k4_groups_c4(&lo, [0; 4], range, l);
        };
        if threads > 1 {
            let per = groups.div_ceil(threads * 4).max(1) * 4 * p;
            in_pool(executor, || {
                ph.par_chunks_mut(per)
                    .zip(pl.par_chunks_mut(per))
                    .enumerate()
                    .for_each(|(i, (h, l))| fill(i * per / (4 * p), h, l))
            });
        } else {
            fill(0, &mut ph, &mut pl);
        }
        let (ph, pl) = (&ph[..], &pl[..]);
        let o = self.out_channels;
        let rows_per = if threads > 1 {
            o.div_ceil(threads).div_ceil(8) * 8
        } else {
            o
        };
        let run = |t: usize, chunk: &mut [f32], acc: &mut (Vec<i32>, Vec<i32>)| {
            let first = t * rows_per;
            let rows = chunk.len() / p;
            let mut r = 0;
            while r < rows {
                let n = SPLIT16_BLOCK_ROWS.min(rows - r);
                let range = first + r..first + r + n;
                let dst = &mut chunk[r * p..(r + n) * p];
                acc.0.resize(n * p, 0);
                if grid.fused {
                    gemm_q16_planes(isa, q, range.clone(), ph, pl, p, &mut acc.0, p);
                    for ((row, a), d) in range
                        .zip(acc.0.chunks_exact(p))
                        .zip(dst.chunks_exact_mut(p))
                    {
                        split16::scale_row(isa, a, d, s * scale[row], self.bias[row]);
                    }
                } else {
                    acc.1.resize(n * p, 0);
                    gemm_u8i8_with(kernel, q, range.clone(), ph, p, &mut acc.0, p);
                    gemm_u8i8_with(kernel, q, range.clone(), pl, p, &mut acc.1, p);
                    for (i, row) in range.enumerate() {
                        split16::combine_row(
                            isa,
                            &acc.0[i * p..(i + 1) * p],
                            &acc.1[i * p..(i + 1) * p],
                            &mut dst[i * p..(i + 1) * p],
                            q.row_sums()[row].wrapping_mul(-128),
                            s * scale[row],
                            self.bias[row],
                        );
                    }
                }
                r += n;
            }
        };
        if threads > 1 {
            in_pool(executor, || {
                os.par_chunks_mut(rows_per * p)
                    .enumerate()
                    .for_each_init(Default::default, |acc, (t, chunk)| run(t, chunk, acc))
            });
        } else {
            run(0, os, &mut Default::default());
        }
    }

    /// [`Self::eval_packed`] for small weights: tasks of a few column panels, each made
    /// and multiplied by every weight panel while it is in cache, so that the patch
    /// matrix is never whole in memory and the threads share no data but the weights
    /// (int8 ones dequantized once per call, for all tasks). `os` is the output, checked
    /// by the caller.
    fn eval_packed_by_columns(
        &self,
        w: Packed,
        xs: &[f32],
        os: &mut [f32],
        executor: &tract_linalg::multithread::Executor,
        threads: usize,
    ) -> TractResult<()> {
        let g = self.geometry;
        let (k, p) = (g.k(), g.out_pixels());
        let isa = w.isa();
        let panel = sgemm::panel_cols(isa);
        let per_task = (1..=COLUMN_TASK_PANELS)
            .rev()
            .find(|&n| p.div_ceil(panel * n) >= 4 * threads)
            .unwrap_or(1);
        let width = panel * per_task;
        let tasks: Vec<std::ops::Range<usize>> = (0..p)
            .step_by(width)
            .map(|c| c..(c + width).min(p))
            .collect();
        let dequantized;
        let weights: &PackedWeights = match w {
            Packed::F32(w) => w,
            Packed::I8(w) => {
                let mut f = PackedWeights::default();
                w.dequantize(0..w.panels(), &mut f);
                dequantized = f;
                &dequantized
            }
        };
        let out_addr = os.as_mut_ptr() as usize;
        let bias = &self.bias[..];
        let run = |cols: &std::ops::Range<usize>, task: &mut ColumnTask| {
            task.cols.set_layout(isa, k, cols.len());
            let mut panels = task.cols.panels_mut();
            fill_panels(&g, xs, cols.start, cols.len(), &mut panels, &mut task.row);
            drop(panels);
            // SAFETY: each task writes only its own columns `cols` of every row of `out`
            // (the `out_channels × p` output, alive for the whole call); `bias` has a
            // value for every row.
            unsafe {
                let out = (out_addr as *mut f32).add(cols.start);
                let epi = Epilogue::Bias { bias, out, ldo: p };
                sgemm::gemm(isa, weights, 0..weights.panels(), &task.cols, &epi)
            }
        };
        for_each_task(&tasks, executor, threads, run);
        Ok(())
    }
}

/// Weights (as f32) up to which [`PatchConv::eval_packed`] splits the work by output
/// pixels: they stay in L2 while each task makes its own patches and multiplies them.
/// Above, the patch matrix is made once and the weight panels are split instead.
const COLUMN_TASK_WEIGHTS: usize = 512 << 10;

/// The 16-bit grid of one run of [`PatchConv::eval_split16`]: `levels` each side of 0
/// ([`ConvWeights::input_grid`]) over the input's largest magnitude `max` (finite;
/// 0, or large enough for `levels / max` to be finite).
#[derive(Debug, Clone, Copy)]
struct Grid {
    levels: f32,
    max: f32,
    fused: bool,
}

/// Output rows per pair of products of [`PatchConv::eval_split16`]: their two i32
/// blocks (at most 2 · 32 · 3136 values at the stem's size) stay in L2.
const SPLIT16_BLOCK_ROWS: usize = 32;

/// Most column panels per task of [`PatchConv::eval_packed_by_columns`]; fewer where
/// that leaves less than four tasks per thread.
const COLUMN_TASK_PANELS: usize = 4;

/// Patches of output pixels `offset + c` into column panels laid out for `cols` pixels
/// (`c` in each panel's range, zero past `cols`), one patch-matrix row at a time
/// through `row`.
fn fill_panels(
    g: &ConvGeometry,
    xs: &[f32],
    offset: usize,
    cols: usize,
    group: &mut [(std::ops::Range<usize>, &mut [f32])],
    row: &mut Vec<f32>,
) {
    let (Some(first), Some(last)) = (group.first(), group.last()) else {
        return;
    };
    let (c0, c1) = (first.0.start, last.0.end.min(cols));
    row.resize(c1 - c0, 0.0);
    for r in 0..g.k() {
        g.fill_row_range(xs, r, offset + c0..offset + c1, row);
        for (range, data) in group.iter_mut() {
            let width = range.len();
            let valid = range.end.min(cols) - range.start;
            let dst = &mut data[r * width..][..width];
            dst[..valid].copy_from_slice(&row[range.start - c0..][..valid]);
            dst[valid..].fill(0.0);
        }
    }
}

/// Per-thread buffers of [`PatchConv::eval_packed_by_columns`].
#[derive(Default)]
struct ColumnTask {
    cols: PackedCols,
    row: Vec<f32>,
}

/// `run(task, scratch)` for every task: split over the executor's threads when there
/// are several of both, each thread with its own scratch.
fn for_each_task<T: Sync, S: Default>(
    tasks: &[T],
    executor: &tract_linalg::multithread::Executor,
    threads: usize,
    run: impl Fn(&T, &mut S) + Sync,
) {
    if threads > 1 && tasks.len() > 1 {
        in_pool(executor, || {
            tasks
                .par_iter()
                .for_each_init(S::default, |scratch, task| run(task, scratch))
        });
    } else {
        let mut scratch = S::default();
        tasks.iter().for_each(|task| run(task, &mut scratch));
    }
}

/// Packed weights of either kind, for [`PatchConv::eval_packed`].
#[derive(Clone, Copy)]
enum Packed<'a> {
    I8(&'a PackedWeightsI8),
    F32(&'a PackedWeights),
}

impl Packed<'_> {
    fn isa(&self) -> Isa {
        match self {
            Packed::I8(w) => w.isa(),
            Packed::F32(w) => w.isa(),
        }
    }

    fn panels(&self) -> usize {
        match self {
            Packed::I8(w) => w.panels(),
            Packed::F32(w) => w.panels(),
        }
    }

    /// Size of the weights as f32 values.
    fn f32_bytes(&self) -> usize {
        let (rows, depth) = match self {
            Packed::I8(w) => (w.rows(), w.depth()),
            Packed::F32(w) => (w.rows(), w.depth()),
        };
        rows * depth * std::mem::size_of::<f32>()
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

    /// Puts the weights in the form that runs fastest here ([`ConvWeights::prepared`]);
    /// where that is the plain one, the `gemm` crate runs.
    fn codegen(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        let prepared = self
            .weights
            .prepared(Isa::best(), &self.geometry, self.out_channels)?;
        let Some(weights) = prepared else {
            return Ok(None);
        };
        let op = PatchConv {
            weights,
            ..self.clone()
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
