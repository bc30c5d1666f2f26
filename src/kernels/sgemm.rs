//! Packed single-precision matrix products with fused epilogues, for the channel MLP.
//!
//! `out = W·X` with `W` a constant `M×K` weight matrix and `X` a `K×N` block of
//! activations whose rows are tokens (the `C×HW` layout of the residual stream).
//! Tokens go in the SIMD lanes and `W` is the broadcast operand, so a tile of
//! results is a few rows of `MR` outputs × `NR` tokens, stored straight into rows.
//!
//! Layouts:
//! - [`PackedWeights`]: `W` packed once, in panels of `MR` rows, each panel
//!   `[K][MR]` (a column of the panel per step of the reduction; rows past `M` are 0).
//! - [`PackedCols`]: `X` packed per call in column panels of one to three vectors of
//!   tokens, each panel `[K][width]` (zero past the last token). The first product's
//!   epilogue writes its results (the hidden activations) in this layout, so they are
//!   the second product's packed operand without another pass.
//!
//! Epilogues ([`Epilogue`]), applied in registers before the store:
//! - `Gelu`: `gelu(scale·acc + bias[row])` (exact erf GELU, [`super::mlp::erf`]'s
//!   approximation), into a [`PackedCols`];
//! - `Residual`: `acc + x[row, col] + bias[row]` into row-major output.
//!
//! Builds: AVX-512 (8 rows × 16/32/48 tokens, 24 zmm accumulators at most), AVX2+FMA
//! (6 rows × 8/16 tokens, 12 ymm accumulators at most) and a portable scalar build,
//! which is the definition the others are tested against; the engine uses the `gemm`
//! crate where only the portable build exists. Weights are packed for one build
//! ([`panel_rows`] differs between them).

use std::ops::Range;

use super::mlp::gelu;
use super::Isa;

/// Rows of a packed weight panel on `isa`: 8 for AVX-512 (8 × 48-token tiles in 24 of
/// its 32 registers) and the portable build, 6 for AVX2 (6 × 16-token tiles: 12
/// accumulators, two token vectors and a broadcast weight in its 16 registers, two
/// 256-bit loads per 12 FMAs, so the FMA units rather than the loads set the pace).
pub fn panel_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 6,
        Isa::Avx512 | Isa::Portable => 8,
    }
}

/// Weight panels per stretch of the outer loop: the weights of a stretch (up to
/// `MC_FLOATS` f32, 384 KiB) stay in L2 while every column panel goes through them.
const MC_FLOATS: usize = 96 * 1024;

/// Longest stretch of the reduction per pass on `isa`: a column panel stays close while
/// the weight panels go through it; the partial sums of longer reductions are stored and
/// reloaded once per stretch. AVX-512: ≤ 48 tokens × 256 (48 KiB, the L1 of the CPU it
/// was tuned on). AVX2: 16 tokens × 512 (32 KiB); on Zen 3 this runs S12's stage 3 and 4
/// MLPs 4–9 % faster than 256, and longer stretches gain nothing more (thread CPU time,
/// alternating in one process).
fn stretch(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 512,
        Isa::Avx512 | Isa::Portable => 256,
    }
}

/// Whether the engine runs these kernels on `isa` rather than the `gemm` crate's: on
/// AVX-512 and AVX2, where they are measured faster (docs/fusion.md; on Zen 3 the
/// AVX2 build takes whole MLP blocks of the four S12 stages from 29.7–37.5 to
/// 33.8–37.6 GMAC/s, `cargo run --release --example mlp_ab`). Where only the portable
/// build exists, the crate's kernels (NEON on aarch64) are faster.
pub fn preferred(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx2) && isa.is_supported()
}

/// Most tokens of a one-vector panel that the narrow kernels (one matrix-vector
/// product per token) run instead of a whole tile.
pub const NARROW_COLS: usize = 4;

/// Tokens of the widest column panel on `isa`.
pub fn panel_cols(isa: Isa) -> usize {
    let (lanes, vectors) = geometry(isa);
    lanes * vectors
}

/// Tokens per vector and the most vectors in a column panel, per instruction set.
pub fn geometry(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (16, 3),
        Isa::Avx2 => (8, 2),
        Isa::Portable => (8, 2),
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

/// f32 storage aligned to cache lines.
#[derive(Clone, Default)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// Makes room for `len` values; new room is zero, old values are unspecified.
    pub fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(16), Line([0.0; 16]));
        self.len = len;
    }
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` contiguous f32.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} f32)", self.len)
    }
}

/// A constant `rows × depth` matrix packed for one instruction set, in panels of
/// [`panel_rows`] rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedWeights {
    isa: Isa,
    mr: usize,
    rows: usize,
    depth: usize,
    data: AlignedBuf,
}

impl PackedWeights {
    /// Packs row-major `w` (`rows × depth`) for [`gemm()`] on `isa`.
    pub fn pack(isa: Isa, w: &[f32], rows: usize, depth: usize) -> PackedWeights {
        assert_eq!(w.len(), rows * depth, "weight size");
        let mr = panel_rows(isa);
        let panels = rows.div_ceil(mr);
        let mut data = AlignedBuf::default();
        data.resize(panels * mr * depth);
        let d = data.as_mut_slice();
        for p in 0..panels {
            for r in 0..mr.min(rows - p * mr) {
                let src = &w[(p * mr + r) * depth..][..depth];
                for (k, &v) in src.iter().enumerate() {
                    d[(p * depth + k) * mr + r] = v;
                }
            }
        }
        PackedWeights {
            isa,
            mr,
            rows,
            depth,
            data,
        }
    }
    /// The instruction set the panels are laid out for.
    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn depth(&self) -> usize {
        self.depth
    }
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(self.mr)
    }
}

/// Steps of the reduction per run of [`PackedWeightsI8::dequantize`]'s inner loop: a
/// whole number of vectors whatever the panel's row count.
const DQ_STEPS: usize = 8;

/// A constant `rows × depth` int8 matrix with a scale and zero point per row, packed in
/// [`PackedWeights`]' panel layout: `w[r, k] = (q[r, k] − zero[r])·scale[r]`, computed in
/// f32 as ONNX's DequantizeLinear does. [`Self::dequantize`] turns a few panels at a
/// time into f32 for [`gemm()`], so only the int8 values stay resident.
#[derive(Clone, Debug)]
pub struct PackedWeightsI8 {
    isa: Isa,
    mr: usize,
    rows: usize,
    depth: usize,
    q: Vec<i8>,
    /// Per panel, the scale and zero point of its rows repeated for [`DQ_STEPS`] steps
    /// (`[panels][DQ_STEPS·mr]`): the pattern under consecutive packed values. Rows past
    /// `rows` have scale and zero point 0.
    scale: Vec<f32>,
    zero: Vec<f32>,
}

impl PackedWeightsI8 {
    /// Packs row-major `q` (`rows × depth`) with its rows' `scale` and `zero` for
    /// [`gemm()`] on `isa`.
    pub fn pack(
        isa: Isa,
        q: &[i8],
        scale: &[f32],
        zero: &[i32],
        rows: usize,
        depth: usize,
    ) -> PackedWeightsI8 {
        assert_eq!(q.len(), rows * depth, "weight size");
        assert!(
            scale.len() == rows && zero.len() == rows,
            "scale or zero point size"
        );
        let mr = panel_rows(isa);
        let panels = rows.div_ceil(mr);
        let mut data = vec![0i8; panels * mr * depth];
        let pattern = DQ_STEPS * mr;
        let (mut sp, mut zp) = (vec![0f32; panels * pattern], vec![0f32; panels * pattern]);
        for p in 0..panels {
            for r in 0..mr.min(rows - p * mr) {
                let row = p * mr + r;
                for (k, &v) in q[row * depth..][..depth].iter().enumerate() {
                    data[(p * depth + k) * mr + r] = v;
                }
                for step in 0..DQ_STEPS {
                    sp[p * pattern + step * mr + r] = scale[row];
                    zp[p * pattern + step * mr + r] = zero[row] as f32;
                }
            }
        }
        PackedWeightsI8 {
            isa,
            mr,
            rows,
            depth,
            q: data,
            scale: sp,
            zero: zp,
        }
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn depth(&self) -> usize {
        self.depth
    }
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(self.mr)
    }

    /// The f32 values of the panels `panels` into `dst`, which becomes a
    /// [`PackedWeights`] of those panels' rows (its row 0 is row `panels.start·mr`).
    pub fn dequantize(&self, panels: Range<usize>, dst: &mut PackedWeights) {
        self.dequantize_part(panels, 0..self.depth, dst)
    }

    /// [`Self::dequantize`] over the steps `depth` of the reduction only: `dst` is as
    /// deep as `depth` is long.
    pub fn dequantize_part(
        &self,
        panels: Range<usize>,
        depth: Range<usize>,
        dst: &mut PackedWeights,
    ) {
        assert!(panels.start <= panels.end && panels.end <= self.panels());
        assert!(depth.start <= depth.end && depth.end <= self.depth);
        let mr = self.mr;
        let (len, pattern) = (depth.len(), DQ_STEPS * mr);
        dst.isa = self.isa;
        dst.mr = mr;
        dst.depth = len;
        dst.rows = (panels.end * mr).min(self.rows) - (panels.start * mr).min(self.rows);
        dst.data.resize(panels.len() * mr * len);
        let d = dst.data.as_mut_slice();
        for (i, p) in panels.enumerate() {
            // A panel's values start on a row boundary of the pattern at every step.
            dequantize_panel(
                self.isa,
                &self.q[(p * self.depth + depth.start) * mr..][..len * mr],
                &self.scale[p * pattern..][..pattern],
                &self.zero[p * pattern..][..pattern],
                &mut d[i * len * mr..][..len * mr],
            );
        }
    }
}

super::multiversion! {
    /// `dst[i] = (q[i] − zero[i % n])·scale[i % n]` with `n` the patterns' length.
    pub fn dequantize_panel(q: &[i8], scale: &[f32], zero: &[f32], dst: &mut [f32]) {
        let n = scale.len();
        let mut dc = dst.chunks_exact_mut(n);
        let mut qc = q.chunks_exact(n);
        for (d, q) in (&mut dc).zip(&mut qc) {
            for (((d, &q), &s), &z) in d.iter_mut().zip(q).zip(scale).zip(zero) {
                *d = (q as f32 - z) * s;
            }
        }
        for (((d, &q), &s), &z) in dc.into_remainder().iter_mut().zip(qc.remainder()).zip(scale).zip(zero) {
            *d = (q as f32 - z) * s;
        }
    }
}

/// A `depth × cols` block of activations in column panels (see the module notes).
#[derive(Clone, Debug, Default)]
pub struct PackedCols {
    depth: usize,
    cols: usize,
    /// First column of each panel, and one past the last panel's padded end.
    starts: Vec<usize>,
    data: AlignedBuf,
}

impl PackedCols {
    /// Sets the panel layout for `depth × cols` on `isa`: as few panels as the widest
    /// kernel allows, of even widths (in whole vectors).
    pub fn set_layout(&mut self, isa: Isa, depth: usize, cols: usize) {
        let (lanes, max_vectors) = geometry(isa);
        // A last vector of at most `NARROW_COLS` tokens gets a panel of its own, which
        // the narrow kernels run at a cost per token, not per vector: 49 tokens are a
        // 48-token panel and one of a single token instead of two of 32.
        let (full, rest) = (cols / lanes, cols % lanes);
        let (vectors, narrow) = if full > 0 && (1..=NARROW_COLS).contains(&rest) {
            (full, true)
        } else {
            (cols.div_ceil(lanes), false)
        };
        let panels = vectors.div_ceil(max_vectors);
        self.starts.clear();
        self.starts.push(0);
        for p in 0..panels {
            let v = vectors / panels + usize::from(p < vectors % panels);
            self.starts.push(self.starts[p] + v * lanes);
        }
        if narrow {
            self.starts.push(self.starts[panels] + lanes);
        }
        self.depth = depth;
        self.cols = cols;
        self.data.resize(depth * self.starts[self.starts.len() - 1]);
    }

    /// The same panels as `other`, `depth` deep.
    pub fn set_layout_like(&mut self, other: &PackedCols, depth: usize) {
        self.starts.clone_from(&other.starts);
        self.depth = depth;
        self.cols = other.cols;
        self.data.resize(depth * other.padded_cols());
    }

    /// Packs `src[k·stride + j] − shift` for `k < depth`, `j < cols`, in `isa`'s layout.
    pub fn pack(
        &mut self,
        isa: Isa,
        src: &[f32],
        stride: usize,
        depth: usize,
        cols: usize,
        shift: f32,
    ) {
        assert!(depth == 0 || cols == 0 || src.len() >= (depth - 1) * stride + cols);
        self.set_layout(isa, depth, cols);
        let starts = self.starts.clone();
        pack_panels(
            isa,
            src,
            stride,
            depth,
            cols,
            shift,
            &starts,
            self.data.as_mut_slice(),
        );
    }

    pub fn depth(&self) -> usize {
        self.depth
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The panels for a caller to fill: each one's columns (padded end included) and
    /// its data, `depth` rows of the panel's width, row `k` holding step `k` of the
    /// reduction for those columns (columns past [`Self::cols`] must be zero).
    pub fn panels_mut(&mut self) -> Vec<(Range<usize>, &mut [f32])> {
        let depth = self.depth;
        let mut rest = self.data.as_mut_slice();
        let mut panels = Vec::with_capacity(self.starts.len());
        for pair in self.starts.windows(2) {
            let (panel, tail) = std::mem::take(&mut rest).split_at_mut(depth * (pair[1] - pair[0]));
            panels.push((pair[0]..pair[1], panel));
            rest = tail;
        }
        panels
    }

    /// The packed data, for an [`Epilogue::Gelu`] to write.
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.data.as_mut_slice().as_mut_ptr()
    }
    fn padded_cols(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }
    fn panels(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// Row-major `depth × cols` copy (for tests and inspection).
    pub fn unpack(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.depth * self.cols];
        let d = self.data.as_slice();
        for p in 0..self.panels() {
            let (s, e) = (self.starts[p], self.starts[p + 1]);
            let w = e - s;
            for k in 0..self.depth {
                for j in s..e.min(self.cols) {
                    out[k * self.cols + j] = d[self.depth * s + k * w + j - s];
                }
            }
        }
        out
    }
}

super::multiversion! {
    /// [`PackedCols::pack`]'s loop, panels starting at the columns `starts`.
    #[allow(clippy::too_many_arguments)]
    pub fn pack_panels(
        src: &[f32],
        stride: usize,
        depth: usize,
        cols: usize,
        shift: f32,
        starts: &[usize],
        dst: &mut [f32],
    ) {
        for p in 0..starts.len().saturating_sub(1) {
            let (s, e) = (starts[p], starts[p + 1]);
            let w = e - s;
            let valid = e.min(cols) - s;
            let panel = &mut dst[depth * s..depth * e];
            for (k, row) in panel.chunks_exact_mut(w).enumerate() {
                let from = &src[k * stride + s..][..valid];
                for (d, &v) in row.iter_mut().zip(from) {
                    *d = v - shift;
                }
                row[valid..].fill(0.0);
            }
        }
    }
}

/// What a product does with its results.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// `dst = gelu(scale·acc + bias[row])`, `dst` the data of a [`PackedCols`] laid
    /// out like the product's `X`, as deep as `W` has rows.
    Gelu {
        scale: f32,
        bias: &'a [f32],
        dst: *mut f32,
    },
    /// `out[row·ldo + col] = acc + x[row·ldx + col] + bias[row]`.
    Residual {
        bias: &'a [f32],
        x: *const f32,
        ldx: usize,
        out: *mut f32,
        ldo: usize,
    },
    /// `out[row·ldo + col] = acc + bias[row]`.
    Bias {
        bias: &'a [f32],
        out: *mut f32,
        ldo: usize,
    },
}

impl<'a> Epilogue<'a> {
    fn bias(&self) -> &'a [f32] {
        match *self {
            Epilogue::Gelu { bias, .. }
            | Epilogue::Residual { bias, .. }
            | Epilogue::Bias { bias, .. } => bias,
        }
    }

    /// The epilogue of the rows from `r` on, as row 0 (row-major epilogues only).
    fn offset_rows(&self, r: usize) -> Epilogue<'a> {
        match *self {
            Epilogue::Gelu { .. } => panic!("a Gelu epilogue's rows cannot be offset"),
            Epilogue::Residual {
                bias,
                x,
                ldx,
                out,
                ldo,
            } => Epilogue::Residual {
                bias: &bias[r..],
                x: x.wrapping_add(r * ldx),
                ldx,
                out: out.wrapping_add(r * ldo),
                ldo,
            },
            Epilogue::Bias { bias, out, ldo } => Epilogue::Bias {
                bias: &bias[r..],
                out: out.wrapping_add(r * ldo),
                ldo,
            },
        }
    }

    /// For the row-major epilogues: `(bias, x, ldx, out, ldo)`, `x` null for `Bias`.
    fn rows(&self) -> Option<(&'a [f32], *const f32, usize, *mut f32, usize)> {
        match *self {
            Epilogue::Gelu { .. } => None,
            Epilogue::Residual {
                bias,
                x,
                ldx,
                out,
                ldo,
            } => Some((bias, x, ldx, out, ldo)),
            Epilogue::Bias { bias, out, ldo } => Some((bias, std::ptr::null(), 0, out, ldo)),
        }
    }
}

/// `epilogue(W·X)` for the rows of weight panels `panels` (all columns of `x`).
///
/// # Safety
/// The epilogue's pointers must be valid for the rows and columns it touches:
/// `Gelu`'s `dst` for a [`PackedCols`] like `x` of depth `w.rows()`, `Residual`'s `x`
/// and `out` (`Bias`'s `out`) for rows `< w.rows()` and columns `< x.cols()`. Calls on disjoint panel
/// ranges write disjoint rows, so they may run at the same time.
pub unsafe fn gemm(
    isa: Isa,
    w: &PackedWeights,
    panels: Range<usize>,
    x: &PackedCols,
    epilogue: &Epilogue,
) {
    assert_eq!(w.depth, x.depth, "inner dimensions");
    assert_eq!(w.isa, isa, "weights packed for another instruction set");
    assert!(panels.end <= w.panels());
    assert!(epilogue.bias().len() >= w.rows, "bias size");
    if x.cols == 0 {
        return;
    }
    if w.depth == 0 {
        // An empty sum: the epilogue of zero, as a product of depth 1 with zeros.
        let zero_w = PackedWeights::pack(isa, &vec![0.0; w.rows], w.rows, 1);
        let mut zero_x = PackedCols::default();
        zero_x.set_layout_like(x, 1);
        return gemm(isa, &zero_w, panels, &zero_x, epilogue);
    }
    let k_blocks = w.depth.div_ceil(stretch(isa));
    for kb in 0..k_blocks {
        let depth = kb * w.depth / k_blocks..(kb + 1) * w.depth / k_blocks;
        let chunk = (MC_FLOATS / (depth.len() * w.mr)).max(1);
        let mut p0 = panels.start;
        while p0 < panels.end {
            let p1 = (p0 + chunk).min(panels.end);
            for c in 0..x.panels() {
                let (s, e) = (x.starts[c], x.starts[c + 1]);
                let strip = Strip {
                    w,
                    panels: p0..p1,
                    depth: depth.clone(),
                    first: kb == 0,
                    last: kb + 1 == k_blocks,
                    x: x.data.as_slice().as_ptr().add(x.depth * s),
                    col0: s,
                    valid: e.min(x.cols) - s,
                };
                strip.run(isa, e - s, epilogue);
            }
            p0 = p1;
        }
    }
}

/// Most f32 values [`gemm_i8`] dequantizes at once (128 KiB), so that they are
/// still in L2 while every column panel goes through them.
const DQ_FLOATS: usize = 32 * 1024;

/// [`gemm()`] on int8 weights: each stretch of the reduction of a few weight panels is
/// dequantized into `scratch` (at most `DQ_FLOATS` values) just before the column
/// panels go through it, so every weight is turned into f32 once per call.
///
/// # Safety
/// As for [`gemm()`]; `Gelu` epilogues are not supported here.
pub unsafe fn gemm_i8(
    isa: Isa,
    w: &PackedWeightsI8,
    panels: Range<usize>,
    x: &PackedCols,
    epilogue: &Epilogue,
    scratch: &mut PackedWeights,
) {
    assert_eq!(w.depth, x.depth, "inner dimensions");
    assert_eq!(w.isa, isa, "weights packed for another instruction set");
    assert!(panels.end <= w.panels());
    assert!(epilogue.bias().len() >= w.rows, "bias size");
    assert!(
        epilogue.rows().is_some(),
        "int8 weights take a row-major epilogue"
    );
    if x.cols == 0 || panels.is_empty() {
        return;
    }
    if w.depth == 0 {
        w.dequantize(panels.clone(), scratch);
        let epi = epilogue.offset_rows(panels.start * w.mr);
        return gemm(isa, scratch, 0..scratch.panels(), x, &epi);
    }
    let k_blocks = w.depth.div_ceil(stretch(isa));
    for kb in 0..k_blocks {
        let depth = kb * w.depth / k_blocks..(kb + 1) * w.depth / k_blocks;
        let chunk = (DQ_FLOATS / (depth.len() * w.mr)).max(1);
        let mut p0 = panels.start;
        while p0 < panels.end {
            let p1 = (p0 + chunk).min(panels.end);
            w.dequantize_part(p0..p1, depth.clone(), scratch);
            let epi = epilogue.offset_rows(p0 * w.mr);
            for c in 0..x.panels() {
                let (s, e) = (x.starts[c], x.starts[c + 1]);
                let strip = Strip {
                    w: scratch,
                    panels: 0..p1 - p0,
                    depth: 0..depth.len(),
                    first: kb == 0,
                    last: kb + 1 == k_blocks,
                    x: x.data
                        .as_slice()
                        .as_ptr()
                        .add(x.depth * s + depth.start * (e - s)),
                    col0: s,
                    valid: e.min(x.cols) - s,
                };
                strip.run(isa, e - s, &epi);
            }
            p0 = p1;
        }
    }
}

/// One column panel of `X` against a range of weight panels, over one stretch of the
/// reduction: the first one starts from the epilogue's additive terms (or zero), the
/// last one applies the epilogue, those between add onto the stored partial sums.
struct Strip<'a> {
    w: &'a PackedWeights,
    panels: Range<usize>,
    depth: Range<usize>,
    first: bool,
    last: bool,
    /// The panel's start (row 0 of the reduction).
    x: *const f32,
    col0: usize,
    valid: usize,
}

impl Strip<'_> {
    /// The panel, `width` tokens wide, on `isa`'s kernel.
    unsafe fn run(&self, isa: Isa, width: usize, epi: &Epilogue) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if isa.is_supported() => match (width / 16, self.valid) {
                (1, 1) => x86::strip_narrow::<8, 16, 1>(self, epi),
                (1, 2) => x86::strip_narrow::<8, 16, 2>(self, epi),
                (1, 3) => x86::strip_narrow::<8, 16, 3>(self, epi),
                (1, 4) => x86::strip_narrow::<8, 16, 4>(self, epi),
                (1, _) => x86::strip_avx512::<1>(self, epi),
                (2, _) => x86::strip_avx512::<2>(self, epi),
                _ => x86::strip_avx512::<3>(self, epi),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => match (width / 8, self.valid) {
                (1, 1) => x86::strip_narrow::<6, 8, 1>(self, epi),
                (1, 2) => x86::strip_narrow::<6, 8, 2>(self, epi),
                (1, 3) => x86::strip_narrow::<6, 8, 3>(self, epi),
                (1, 4) => x86::strip_narrow::<6, 8, 4>(self, epi),
                (1, _) => x86::strip_avx2::<1>(self, epi),
                _ => x86::strip_avx2::<2>(self, epi),
            },
            _ => self.portable(width, epi),
        }
    }

    /// The plain definition, any panel width.
    unsafe fn portable(&self, width: usize, epi: &Epilogue) {
        let k = self.w.depth;
        let (k0, k1) = (self.depth.start, self.depth.end);
        let wd = self.w.data.as_slice();
        let xs = std::slice::from_raw_parts(self.x.add(k0 * width), (k1 - k0) * width);
        let mr = self.w.mr;
        let mut acc = vec![0f32; mr * width];
        for p in self.panels.clone() {
            acc.fill(0.0);
            let a = &wd[(p * k + k0) * mr..(p * k + k1) * mr];
            for (av, xv) in a.chunks_exact(mr).zip(xs.chunks_exact(width)) {
                for (r, &a) in av.iter().enumerate() {
                    for (o, &b) in acc[r * width..(r + 1) * width].iter_mut().zip(xv) {
                        *o += a * b;
                    }
                }
            }
            let row0 = p * mr;
            for r in 0..mr.min(self.w.rows - row0) {
                let row = row0 + r;
                let acc = &acc[r * width..(r + 1) * width];
                match *epi {
                    Epilogue::Gelu { scale, bias, dst } => {
                        let d = dst.add(self.w.rows * self.col0 + row * width);
                        for (l, &v) in acc.iter().enumerate() {
                            let v = if self.first { v } else { v + *d.add(l) };
                            *d.add(l) = if self.last {
                                gelu(v * scale + bias[row])
                            } else {
                                v
                            };
                        }
                    }
                    Epilogue::Residual { .. } | Epilogue::Bias { .. } => {
                        let (bias, x, ldx, out, ldo) = epi.rows().unwrap();
                        let or = out.add(row * ldo + self.col0);
                        for (l, &v) in acc[..self.valid].iter().enumerate() {
                            *or.add(l) = if !self.first {
                                v + *or.add(l)
                            } else if x.is_null() {
                                v + bias[row]
                            } else {
                                v + *x.add(row * ldx + self.col0 + l) + bias[row]
                            };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epilogue, Strip};
    use core::arch::x86_64::*;

    use crate::kernels::mlp::ERF_A as A;

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    #[inline]
    fn gelu512(a: __m512) -> __m512 {
        let z = _mm512_mul_ps(a, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let t = _mm512_abs_ps(z);
        let mut p = _mm512_set1_ps(A[5]);
        for &c in A[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0));
        let p2 = _mm512_mul_ps(p, p);
        let p4 = _mm512_mul_ps(p2, p2);
        let p8 = _mm512_mul_ps(p4, p4);
        let p16 = _mm512_mul_ps(p8, p8);
        let e = _mm512_sub_ps(_mm512_set1_ps(1.0), _mm512_div_ps(_mm512_set1_ps(1.0), p16));
        // erf(z) has the sign of z; e ≥ 0.
        let sign = _mm512_and_ps(z, _mm512_set1_ps(-0.0));
        let erf = _mm512_or_ps(e, sign);
        let half_a = _mm512_mul_ps(a, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half_a, erf, half_a)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn gelu256(a: __m256) -> __m256 {
        let z = _mm256_mul_ps(a, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let sign_bit = _mm256_set1_ps(-0.0);
        let t = _mm256_andnot_ps(sign_bit, z);
        let mut p = _mm256_set1_ps(A[5]);
        for &c in A[..5].iter().rev() {
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
        }
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0));
        let p2 = _mm256_mul_ps(p, p);
        let p4 = _mm256_mul_ps(p2, p2);
        let p8 = _mm256_mul_ps(p4, p4);
        let p16 = _mm256_mul_ps(p8, p8);
        let e = _mm256_sub_ps(_mm256_set1_ps(1.0), _mm256_div_ps(_mm256_set1_ps(1.0), p16));
        let erf = _mm256_or_ps(e, _mm256_and_ps(z, sign_bit));
        let half_a = _mm256_mul_ps(a, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_a, erf, half_a)
    }

    /// AVX-512: tiles of 8 rows × `NV`·16 tokens.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    pub(super) unsafe fn strip_avx512<const NV: usize>(s: &Strip, epi: &Epilogue) {
        const MR: usize = 8;
        let w = s.w;
        debug_assert_eq!(w.mr, MR);
        let (k, k0) = (w.depth, s.depth.start);
        let width = NV * 16;
        let base = w.data.as_slice().as_ptr();
        let x0 = s.x.add(k0 * width);
        for p in s.panels.clone() {
            let a = base.add((p * k + k0) * MR);
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            for kk in 0..s.depth.len() {
                let xp = x0.add(kk * width);
                let mut xv = [_mm512_setzero_ps(); NV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm512_load_ps(xp.add(v * 16));
                }
                let ap = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r));
                    for v in 0..NV {
                        acc[v] = _mm512_fmadd_ps(av, xv[v], acc[v]);
                    }
                }
            }
            let row0 = p * MR;
            let rows = MR.min(w.rows - row0);
            match *epi {
                Epilogue::Gelu { scale, bias, dst } => {
                    let sc = _mm512_set1_ps(scale);
                    let d = dst.add(w.rows * s.col0 + row0 * width);
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        let b = _mm512_set1_ps(*bias.get_unchecked(row0 + r));
                        for (v, &a) in acc.iter().enumerate() {
                            let dv = d.add(r * width + v * 16);
                            let a = if s.first {
                                a
                            } else {
                                _mm512_add_ps(a, _mm512_load_ps(dv))
                            };
                            let y = if s.last {
                                gelu512(_mm512_fmadd_ps(a, sc, b))
                            } else {
                                a
                            };
                            _mm512_store_ps(dv, y);
                        }
                    }
                }
                Epilogue::Residual { .. } | Epilogue::Bias { .. } => {
                    let (bias, x, ldx, out, ldo) = epi.rows().unwrap_unchecked();
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        let row = row0 + r;
                        let b = _mm512_set1_ps(*bias.get_unchecked(row));
                        let or = out.add(row * ldo + s.col0);
                        // First stretch: acc + b + x (x absent for `Bias`); later ones:
                        // acc + out.
                        let (src, b) = if !s.first {
                            (or as *const f32, _mm512_setzero_ps())
                        } else if x.is_null() {
                            (x, b)
                        } else {
                            (x.add(row * ldx + s.col0), b)
                        };
                        for (v, &a) in acc.iter().enumerate() {
                            let n = s.valid.saturating_sub(v * 16).min(16);
                            let y = _mm512_add_ps(a, b);
                            if n == 16 {
                                let y = if src.is_null() {
                                    y
                                } else {
                                    _mm512_add_ps(y, _mm512_loadu_ps(src.add(v * 16)))
                                };
                                _mm512_storeu_ps(or.add(v * 16), y);
                            } else if n > 0 {
                                let m: __mmask16 = ((1u32 << n) - 1) as u16;
                                let y = if src.is_null() {
                                    y
                                } else {
                                    _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, src.add(v * 16)))
                                };
                                _mm512_mask_storeu_ps(or.add(v * 16), m, y);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A one-vector panel (`WIDTH` tokens) with only `NV` ≤ 4 tokens in it (the end of
    /// a block whose width is not a multiple of the vector): one matrix-vector product
    /// per token, a weight panel's `MR` rows (6 for AVX2, 8 for AVX-512) in the lanes of
    /// one 256-bit vector (lanes past `MR` are ignored). Per step of the reduction that
    /// is one load and `NV` broadcasts and FMAs, where a whole tile spends `MR`
    /// broadcasts and FMAs on mostly padding.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strip_narrow<const MR: usize, const WIDTH: usize, const NV: usize>(
        s: &Strip,
        epi: &Epilogue,
    ) {
        const { assert!(MR <= 8) };
        let w = s.w;
        debug_assert_eq!(w.mr, MR);
        debug_assert_eq!(s.valid, NV);
        let (k, k0, n) = (w.depth, s.depth.start, s.depth.len());
        let base = w.data.as_slice().as_ptr();
        let x0 = s.x.add(k0 * WIDTH);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let head = _mm256_cmpgt_epi32(_mm256_set1_epi32(MR as i32), lane);
        for p in s.panels.clone() {
            let row0 = p * MR;
            let a = base.add((p * k + k0) * MR);
            // `chains` partial sums per token over alternate steps, so that at least
            // 4 FMAs are independent (an FMA's latency is 4 cycles on the CPUs tuned for).
            let chains = 4usize.div_ceil(NV);
            let mut partial = [[_mm256_setzero_ps(); 4]; NV];
            let step = |kk: usize, partial: &mut [[__m256; 4]; NV], j: usize| {
                // 8 values from step kk's `MR`: the last step's load stops at the panel's
                // end.
                let wv = if MR == 8 || kk + 1 < n {
                    _mm256_loadu_ps(a.add(kk * MR))
                } else {
                    _mm256_maskload_ps(a.add(kk * MR), head)
                };
                let xp = x0.add(kk * WIDTH);
                for (c, p) in partial.iter_mut().enumerate() {
                    p[j] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(&*xp.add(c)), p[j]);
                }
            };
            let mut kk = 0;
            while kk + chains <= n {
                for j in 0..chains {
                    step(kk + j, &mut partial, j);
                }
                kk += chains;
            }
            for (j, kk) in (kk..n).enumerate() {
                step(kk, &mut partial, j);
            }
            let acc: [__m256; NV] = std::array::from_fn(|c| {
                let p = &partial[c];
                match chains {
                    1 => p[0],
                    2 => _mm256_add_ps(p[0], p[1]),
                    _ => _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])),
                }
            });
            let rows = MR.min(w.rows - row0);
            let mut v = [0f32; 8];
            match *epi {
                Epilogue::Gelu { scale, bias, dst } => {
                    let mut b = [0f32; 8];
                    b[..rows].copy_from_slice(&bias[row0..row0 + rows]);
                    let (sc, b) = (_mm256_set1_ps(scale), _mm256_loadu_ps(b.as_ptr()));
                    let d = dst.add(w.rows * s.col0 + row0 * WIDTH);
                    for (c, &acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(v.as_mut_ptr(), acc);
                        if !s.first {
                            for (r, v) in v.iter_mut().enumerate().take(rows) {
                                *v += *d.add(r * WIDTH + c);
                            }
                        }
                        if s.last {
                            let y = gelu256(_mm256_fmadd_ps(_mm256_loadu_ps(v.as_ptr()), sc, b));
                            _mm256_storeu_ps(v.as_mut_ptr(), y);
                        }
                        for (r, &v) in v.iter().enumerate().take(rows) {
                            *d.add(r * WIDTH + c) = v;
                        }
                    }
                }
                Epilogue::Residual { .. } | Epilogue::Bias { .. } => {
                    let (bias, x, ldx, out, ldo) = epi.rows().unwrap_unchecked();
                    for (c, &acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(v.as_mut_ptr(), acc);
                        for (r, &a) in v.iter().enumerate().take(rows) {
                            let row = row0 + r;
                            let o = out.add(row * ldo + s.col0 + c);
                            *o = if !s.first {
                                a + *o
                            } else if x.is_null() {
                                a + bias[row]
                            } else {
                                (a + bias[row]) + *x.add(row * ldx + s.col0 + c)
                            };
                        }
                    }
                }
            }
        }
    }

    /// AVX2: tiles of 6 rows × `NV`·8 tokens.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strip_avx2<const NV: usize>(s: &Strip, epi: &Epilogue) {
        const MR: usize = 6;
        let w = s.w;
        debug_assert_eq!(w.mr, MR);
        let (k, k0) = (w.depth, s.depth.start);
        let width = NV * 8;
        let base = w.data.as_slice().as_ptr();
        let x0 = s.x.add(k0 * width);
        for p in s.panels.clone() {
            let row0 = p * MR;
            let a = base.add((p * k + k0) * MR);
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            for kk in 0..s.depth.len() {
                let xp = x0.add(kk * width);
                let mut xv = [_mm256_setzero_ps(); NV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm256_load_ps(xp.add(v * 8));
                }
                let ap = a.add(kk * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*ap.add(r));
                    for v in 0..NV {
                        acc[v] = _mm256_fmadd_ps(av, xv[v], acc[v]);
                    }
                }
            }
            let rows = MR.min(w.rows - row0);
            match *epi {
                Epilogue::Gelu { scale, bias, dst } => {
                    let sc = _mm256_set1_ps(scale);
                    let d = dst.add(w.rows * s.col0 + row0 * width);
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        let b = _mm256_set1_ps(*bias.get_unchecked(row0 + r));
                        for (v, &a) in acc.iter().enumerate() {
                            let dv = d.add(r * width + v * 8);
                            let a = if s.first {
                                a
                            } else {
                                _mm256_add_ps(a, _mm256_load_ps(dv))
                            };
                            let y = if s.last {
                                gelu256(_mm256_fmadd_ps(a, sc, b))
                            } else {
                                a
                            };
                            _mm256_store_ps(dv, y);
                        }
                    }
                }
                Epilogue::Residual { .. } | Epilogue::Bias { .. } => {
                    let (bias, x, ldx, out, ldo) = epi.rows().unwrap_unchecked();
                    for (r, acc) in acc.iter().enumerate().take(rows) {
                        let row = row0 + r;
                        let b = _mm256_set1_ps(*bias.get_unchecked(row));
                        let or = out.add(row * ldo + s.col0);
                        let (src, b) = if !s.first {
                            (or as *const f32, _mm256_setzero_ps())
                        } else if x.is_null() {
                            (x, b)
                        } else {
                            (x.add(row * ldx + s.col0), b)
                        };
                        for (v, &a) in acc.iter().enumerate() {
                            let n = s.valid.saturating_sub(v * 8).min(8);
                            let y = _mm256_add_ps(a, b);
                            if n == 8 {
                                let y = if src.is_null() {
                                    y
                                } else {
                                    _mm256_add_ps(y, _mm256_loadu_ps(src.add(v * 8)))
                                };
                                _mm256_storeu_ps(or.add(v * 8), y);
                            } else if n > 0 {
                                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                                let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
                                let y = if src.is_null() {
                                    y
                                } else {
                                    _mm256_add_ps(y, _mm256_maskload_ps(src.add(v * 8), m))
                                };
                                _mm256_maskstore_ps(or.add(v * 8), m, y);
                            }
                        }
                    }
                }
            }
        }
    }
}
