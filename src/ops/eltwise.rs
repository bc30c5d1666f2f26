//! [`ElementwiseChain`]: a run of element-wise nodes evaluated in one pass over
//! memory, split over tract's thread pool by groups of channel planes.
//!
//! Graphs quantized op by op (onnxruntime's QDQ format with every op quantized) leave
//! long element-wise chains between the integer convolutions: a decomposed GroupNorm
//! (`x − mean`, square, `× rstd`, `× γ`, `+ β`), the pooling mixer's `− x`, layer scales,
//! residual additions, an erf GELU, each followed by a quantize → dequantize round
//! trip. Run node by node, each step reads and writes the whole tensor. Here a chain is
//! applied to slices of at most a few thousand elements that stay in L1 (part of a
//! plane, several small planes, or, where no operand is per channel, any run of the
//! tensor), an arithmetic step and the round trip after it in one loop, and every step is the
//! same arithmetic as the node it replaces (the same f32 operation, the same kernels:
//! `crate::kernels::quant` for the quantization steps, tract-linalg's erf), so the
//! output is bit-identical to the unfused graph. The pass that builds chains is
//! `crate::passes::eltwise`.
//!
//! A chain that starts at a requantization onto an 8-bit grid and reads nothing else
//! per element (per-tensor operands, the head's own value) is a function of the head's
//! integer level alone, as an erf GELU after a quantized conv is: the chain runs once
//! on the grid's 256 values to fill a table, and each element is its level's entry.
//! The table holds the chain's own results, so the output keeps the same bits.

use std::sync::Arc;

use tract_core::internal::*;

use crate::kernels::quant::{self as k, quantize_i8, quantize_u8, ByteTable, FakeQuantOne, Grid};
use crate::kernels::{pool, Isa};

use super::for_runs;
use super::requant::{FakeQuant, Quantize, Requant, RequantOut};

/// `+`, `−` or `×` between the chain's value and an operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    Add,
    /// `value − operand`.
    Sub,
    /// `operand − value`.
    SubFrom,
    Mul,
}

impl Arith {
    // Each loop applies `post` to the result, the step that follows folded into the
    // same pass (a quantization round trip, or nothing). `for` loops with the match
    // outside: they inline into the instruction-set builds of `apply_slice`, where an
    // iterator's `fold` may be left out of line and built for the baseline instead.

    #[inline(always)]
    fn slice_by_tensor(self, xs: &mut [f32], t: &[f32], post: impl Fn(f32) -> f32) {
        let pairs = xs.iter_mut().zip(t);
        match self {
            Arith::Add => {
                for (x, &y) in pairs {
                    *x = post(*x + y);
                }
            }
            Arith::Sub => {
                for (x, &y) in pairs {
                    *x = post(*x - y);
                }
            }
            Arith::SubFrom => {
                for (x, &y) in pairs {
                    *x = post(y - *x);
                }
            }
            Arith::Mul => {
                for (x, &y) in pairs {
                    *x = post(*x * y);
                }
            }
        }
    }

    /// `out[i] = post(x[i] ∘ o)`.
    #[inline(always)]
    fn by_scalar_into(self, x: &[f32], out: &mut [f32], o: f32, post: impl Fn(f32) -> f32) {
        let pairs = out.iter_mut().zip(x);
        match self {
            Arith::Add => {
                for (v, &x) in pairs {
                    *v = post(x + o);
                }
            }
            Arith::Sub => {
                for (v, &x) in pairs {
                    *v = post(x - o);
                }
            }
            Arith::SubFrom => {
                for (v, &x) in pairs {
                    *v = post(o - x);
                }
            }
            Arith::Mul => {
                for (v, &x) in pairs {
                    *v = post(x * o);
                }
            }
        }
    }

    #[inline(always)]
    fn slice_by_scalar(self, xs: &mut [f32], o: f32, post: impl Fn(f32) -> f32) {
        match self {
            Arith::Add => {
                for v in xs.iter_mut() {
                    *v = post(*v + o);
                }
            }
            Arith::Sub => {
                for v in xs.iter_mut() {
                    *v = post(*v - o);
                }
            }
            Arith::SubFrom => {
                for v in xs.iter_mut() {
                    *v = post(o - *v);
                }
            }
            Arith::Mul => {
                for v in xs.iter_mut() {
                    *v = post(*v * o);
                }
            }
        }
    }
}

/// `out[i] = post(x[i]²)`.
#[inline(always)]
fn square_into(x: &[f32], out: &mut [f32], post: impl Fn(f32) -> f32) {
    for (v, &x) in out.iter_mut().zip(x) {
        *v = post(x * x);
    }
}

/// Where a per-tensor or per-channel operand comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// One value, or one per channel.
    Const(Arc<Vec<f32>>),
    /// The op's input of this index, holding one value or one per channel.
    Input(usize),
}

/// One element-wise step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `v ∘ operand[channel]` (tract's `OptBinByScalar`).
    Scalar(Arith, Operand),
    /// `v ∘ t[i]` with `t` the op's input of this index, shaped like the chain
    /// (tract's `OptBinUnicast`).
    Tensor(Arith, usize),
    /// `v ∘ h[i]` with `h` the value the head produced (a requantized tensor the graph
    /// reads twice, as GELU's `x·(1 + erf(x/√2))/2` does), kept for the slice instead of
    /// being written out and read back.
    TensorHead(Arith),
    FakeQuant(FakeQuant),
    Square,
    Erf,
}

/// How the chain's first value is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Head {
    /// The f32 input as is.
    F32,
    /// i32 accumulators through a [`Requant`] to f32 (its `out` is `F32` or `Grid`,
    /// its axis the channel axis 1).
    Requant(Requant),
    /// 3×3 average pooling of the `[1, C, H, W]` f32 input, stride 1, padding 1,
    /// padding not counted (tract's `SumPool`, see [`crate::kernels::pool`]).
    AvgPool3x3,
}

/// How the chain's last value is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Tail {
    F32,
    /// Quantized to u8 / i8 by a [`Quantize`].
    Quantize(Quantize),
    /// Summed into one value of shape `[1, 1, …]`, as tract's `Reduce<Sum>` over every
    /// axis but the first adds a contiguous f32 tensor: ndarray's eightfold unrolled
    /// fold over the elements in memory order (see [`OrderedSum`]). The chain's values
    /// are never written out; the sum runs on the calling thread, as tract's does.
    Sum,
}

/// A chain over tensors `[1, C, …]`: input 0 is the stream, the others the operands
/// named by the steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementwiseChain {
    pub head: Head,
    pub steps: Vec<Step>,
    pub tail: Tail,
    /// Names of the nodes replaced, in order, for `pfe info` and profiles.
    pub fused: Vec<String>,
}

impl Eq for ElementwiseChain {}

/// Elements per slice: small enough to stay in L1 with the operand slices.
const SLICE: usize = 2048;
/// Below this many elements the chain runs on the calling thread.
const PARALLEL_MIN: usize = 32_768;

/// Values a table lookup takes at a time where planes are smaller: whole planes of one
/// or more channels.
const TABLE_GROUP: usize = 4096;

impl ElementwiseChain {
    /// Whether a step reads the head's value again.
    pub fn saves_head(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::TensorHead(_)))
    }

    pub fn out_dt(&self) -> DatumType {
        match &self.tail {
            Tail::F32 | Tail::Sum => f32::datum_type(),
            Tail::Quantize(q) => q.dt,
        }
    }

    /// The grid a requantized head lands on and the f32 value of each of its levels,
    /// where the chain's output depends on that level alone (see the module doc).
    fn levels(&self, b: &Bound) -> Option<(Grid, Vec<f32>)> {
        let Head::Requant(r) = &self.head else {
            return None;
        };
        if self.tail == Tail::Sum {
            return None;
        }
        let RequantOut::Grid {
            grid,
            dq_zero_point,
            dq_scale,
        } = r.out
        else {
            return None;
        };
        let per_level = self
            .steps
            .iter()
            .zip(&b.operands)
            .all(|(step, operand)| match step {
                Step::Scalar(..) => operand.len() == 1,
                Step::Tensor(..) => false,
                Step::TensorHead(_) | Step::FakeQuant(_) | Step::Square | Step::Erf => true,
            });
        if !per_level || grid.lo > grid.hi || grid.hi - grid.lo >= 256 {
            return None;
        }
        // The head's value for level q: (round(v) + zp − dzp)·dscale with round(v) =
        // q − zp, the same exact integer sum and the same product as the head computes.
        let shift = (grid.zero_point - dq_zero_point) as f32;
        let values = (grid.lo..=grid.hi)
            .map(|q| ((q - grid.zero_point) as f32 + shift) * dq_scale)
            .collect();
        Some((grid, values))
    }

    /// The chain's output for each level: the chain itself (head read as is) on
    /// `values`, then `tail` into a 256-entry table.
    fn table<T: Copy + Default>(
        &self,
        isa: Isa,
        b: &Bound,
        values: &[f32],
        tail: impl Fn(&[f32], &mut [T]),
    ) -> TractResult<Box<[T; 256]>> {
        let n = values.len();
        let plain = ElementwiseChain {
            head: Head::F32,
            steps: self.steps.clone(),
            tail: Tail::F32,
            fused: vec![],
        };
        let on_levels = Bound {
            x_f32: values,
            x_i32: &[],
            x_base: 0,
            x_add: &[],
            operands: b.operands.clone(),
            inner: n,
            flat: false,
            planes: 1,
            width: n,
            slice: n,
            scratch: n,
            pool_recip: vec![],
            saves_head: b.saves_head,
            erf: match b.erf {
                Some(_) => Some(tract_linalg::Func::Erf.ew_f32()?),
                None => None,
            },
        };
        let (mut v, mut head) = (vec![0f32; n], vec![0f32; n]);
        apply_slice(isa, &plain, &on_levels, 0, 0, &mut v, &mut head)?;
        let mut table = Box::new([T::default(); 256]);
        tail(&v, &mut table[..n]);
        Ok(table)
    }

    /// [`Self::run`] for a chain with a table: each accumulator requantized to its
    /// level's index, then looked up.
    fn run_table<T: ByteTable>(
        isa: Isa,
        b: &Bound,
        r: &Requant,
        grid: Grid,
        table: &[T; 256],
        out: &mut [T],
        first: Option<usize>,
    ) -> TractResult<()> {
        // Indices 0..=hi − lo: the same clamp and rounding with the zero point moved.
        let index = Grid {
            zero_point: grid.zero_point - grid.lo,
            lo: 0,
            hi: grid.hi - grid.lo,
        };
        let inner = b.inner;
        if inner > TABLE_GROUP {
            return Self::run(b, out, first, |ch, at, o, _| {
                let mut idx = [0u8; 256];
                let acc = &b.x_i32[at - b.x_base..][..o.len()];
                let add = b.acc_offset(ch);
                for (a, o) in acc.chunks(256).zip(o.chunks_mut(256)) {
                    let idx = &mut idx[..a.len()];
                    level_indices(isa, a, add, idx, r.mult[ch], r.offset[ch], index);
                    T::lookup(isa, idx, table, o);
                }
                Ok(())
            });
        }
        // Small planes (the 14×14 and 7×7 stages: 196 and 49 values per channel) are
        // taken several at a time, so that the cost of a call is not paid per channel:
        // the indices of a group of whole planes, then one lookup over them.
        let per = TABLE_GROUP / inner.max(1);
        let planes = |first: usize, planes: &mut [T], _: &mut Vec<f32>| -> TractResult<()> {
            let mut idx = vec![0u8; per * inner];
            for (g, group) in planes.chunks_mut(per * inner).enumerate() {
                let ch = first + g * per;
                let acc = &b.x_i32[ch * inner - b.x_base..][..group.len()];
                let idx = &mut idx[..group.len()];
                level_indices_planes(isa, acc, inner, ch, b.x_add, &r.mult, &r.offset, idx, index);
                T::lookup(isa, idx, table, group);
            }
            Ok(())
        };
        match first {
            None => for_runs(out, inner, PARALLEL_MIN, planes),
            Some(first) if inner > 0 => planes(first, out, &mut Vec::new()),
            Some(_) => Ok(()),
        }
    }

    fn in_dt(&self) -> DatumType {
        match &self.head {
            Head::F32 | Head::AvgPool3x3 => f32::datum_type(),
            Head::Requant(_) => i32::datum_type(),
        }
    }
}

/// Inputs resolved to slices for one evaluation.
pub struct Bound<'a> {
    x_f32: &'a [f32],
    /// A requantized head's accumulators, from element `x_base` of the stream on.
    x_i32: &'a [i32],
    x_base: usize,
    /// Per channel, an integer added to a requantized head's accumulators before
    /// they are converted (empty: none); see [`Bound::with_acc_offsets`].
    x_add: &'a [i32],
    /// Per step: the per-channel / per-tensor operand, or the tensor operand.
    operands: Vec<&'a [f32]>,
    inner: usize,
    /// The chain treats every channel alike (an f32 head, operands of one value or
    /// whole tensors): it runs over the stream in slices that ignore plane bounds.
    flat: bool,
    /// Whole planes per slice where planes are small (the 14×14 and 7×7 stages), so
    /// that the cost of a slice is not paid per channel; 1 otherwise.
    planes: usize,
    /// The last axis (pooling's row length).
    width: usize,
    /// Elements per slice: at most [`SLICE`] of one plane, `planes` whole planes, any
    /// run of the stream for a flat chain, or for a pooling head whole rows.
    slice: usize,
    /// Scratch values per slice beside the chain's values.
    scratch: usize,
    /// A pooling head's reciprocal tap counts ([`pool::tap_reciprocals`]).
    pool_recip: Vec<f32>,
    /// A step reads the head's value again ([`ElementwiseChain::saves_head`]).
    saves_head: bool,
    erf: Option<Box<dyn tract_linalg::element_wise::ElementWise<f32>>>,
}

impl<'a> Bound<'a> {
    /// Adds `offsets[c]` to each accumulator of channel `c` of a requantized head,
    /// in i32 before it is converted: a conv's per-channel correction folded into
    /// the read of its accumulators (the same sums as adding it to them first).
    pub fn with_acc_offsets(self, offsets: &'a [i32]) -> TractResult<Self> {
        ensure!(
            offsets.is_empty() || offsets.len() * self.inner >= self.x_base + self.x_i32.len(),
            "element-wise chain: {} accumulator offsets for the channels read",
            offsets.len()
        );
        Ok(Bound {
            x_add: offsets,
            ..self
        })
    }

    /// How the stream is cut for the threads: units of this many
    /// elements (each taken in slices of at most `slice`), and the channels a unit
    /// moves on by. A plane per unit; a slice's worth of planes where planes are small;
    /// for a flat chain its slices, where the channel index is never read.
    fn units(&self) -> (usize, usize) {
        if self.flat {
            (self.slice.max(1), 0)
        } else if self.planes > 1 {
            (self.slice, self.planes)
        } else {
            (self.inner, 1)
        }
    }

    fn acc_offset(&self, ch: usize) -> i32 {
        self.x_add.get(ch).copied().unwrap_or(0)
    }
}

impl Op for ElementwiseChain {
    fn name(&self) -> StaticName {
        "PfeElementwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let n = self.fused.len();
        let steps = if n == 1 { "step" } else { "steps" };
        Ok(vec![format!(
            "{n} {steps} in one pass: {}",
            self.fused.join(", ")
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ElementwiseChain {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        ensure!(
            x.datum_type() == self.in_dt(),
            "element-wise chain: input is {:?}, expected {:?}",
            x.datum_type(),
            self.in_dt()
        );
        let plains: Vec<_> = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<_>>()?;
        let (x_f32, x_i32): (&[f32], &[i32]) = match self.head {
            Head::F32 | Head::AvgPool3x3 => (plains[0].as_slice::<f32>()?, &[]),
            Head::Requant(_) => (&[], plains[0].as_slice::<i32>()?),
        };
        let isa = Isa::best();
        let bound = self.bind(shape, x_f32, x_i32, 0, &inputs, &plains)?;
        if self.tail == Tail::Sum {
            let sum = self.sum(isa, &bound, shape.iter().product())?;
            let ones = vec![1; shape.len()];
            return Ok(tvec!(tensor0(sum).into_shape(&ones)?.into_tvalue()));
        }
        let table = self.level_table(isa, &bound)?;
        let mut out = unsafe { Tensor::uninitialized_dt(self.out_dt(), shape)? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let out = match self.out_dt() {
                DatumType::F32 => OutSlice::F32(plain.as_slice_mut::<f32>()?),
                DatumType::U8 => OutSlice::U8(plain.as_slice_mut::<u8>()?),
                DatumType::I8 => OutSlice::I8(plain.as_slice_mut::<i8>()?),
                dt => bail!("element-wise chain: cannot write {dt:?}"),
            };
            self.write(isa, &bound, table.as_ref(), out, None)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// The output of a chain, typed as its tail writes it.
pub enum OutSlice<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
    I8(&'a mut [i8]),
}

/// A chain's table of outputs per level of its head (see the module doc), typed as its
/// tail writes them.
pub enum LevelTable {
    F32(Grid, Box<[f32; 256]>),
    U8(Grid, Box<[u8; 256]>),
    I8(Grid, Box<[i8; 256]>),
}

impl ElementwiseChain {
    /// The chain's inputs resolved for one evaluation over a stream of shape `shape`:
    /// `x_f32` the stream for an f32 or pooling head (whole: `x_base` must be 0),
    /// `x_i32` a requantized head's accumulators from element `x_base` on (a block of
    /// channel planes, or all of them); `plains` the views of `inputs`, whose indices
    /// the steps name.
    pub fn bind<'a, 'p: 'a>(
        &'a self,
        shape: &[usize],
        x_f32: &'a [f32],
        x_i32: &'a [i32],
        x_base: usize,
        inputs: &[TValue],
        plains: &'a [PlainView<'p>],
    ) -> TractResult<Bound<'a>> {
        ensure!(
            shape.len() >= 2 && shape[0] == 1,
            "element-wise chain takes [1, C, …], got {shape:?}"
        );
        let c = shape[1];
        let inner: usize = shape[2..].iter().product();
        ensure!(
            x_base == 0 || matches!(self.head, Head::Requant(_)),
            "element-wise chain: only a requantized head reads a block of the stream"
        );
        match self.head {
            Head::F32 => {}
            Head::AvgPool3x3 => ensure!(
                shape.len() == 4,
                "element-wise chain: pooling takes [1, C, H, W], got {shape:?}"
            ),
            Head::Requant(ref r) => ensure!(
                r.axis == 1 && r.mult.len() == c && r.offset.len() == c,
                "element-wise chain: requantization for {} channels on axis {}, input {shape:?}",
                r.mult.len(),
                r.axis
            ),
        }
        let mut operands: Vec<&[f32]> = Vec::with_capacity(self.steps.len());
        let mut erf = None;
        for step in &self.steps {
            let o: &[f32] = match step {
                Step::Scalar(_, Operand::Const(v)) => v.as_slice(),
                Step::Scalar(_, Operand::Input(i)) => {
                    ensure!(*i < inputs.len(), "element-wise chain: no input {i}");
                    plains[*i].as_slice::<f32>()?
                }
                Step::Tensor(_, i) => {
                    ensure!(*i < inputs.len(), "element-wise chain: no input {i}");
                    ensure!(
                        inputs[*i].shape() == shape,
                        "element-wise chain: operand {:?}, stream {shape:?}",
                        inputs[*i].shape()
                    );
                    plains[*i].as_slice::<f32>()?
                }
                Step::Erf => {
                    if erf.is_none() {
                        erf = Some(tract_linalg::Func::Erf.ew_f32()?);
                    }
                    &[]
                }
                _ => &[],
            };
            if let Step::Scalar(..) = step {
                ensure!(
                    o.len() == 1 || o.len() == c,
                    "element-wise chain: operand of {} values for {c} channels",
                    o.len()
                );
            }
            operands.push(o);
        }
        let flat = self.head == Head::F32
            && self
                .steps
                .iter()
                .zip(&operands)
                .all(|(step, o)| !matches!(step, Step::Scalar(..)) || o.len() == 1);
        let width = *shape.last().unwrap_or(&1);
        let planes = if !flat && inner > 0 && inner <= SLICE / 2 {
            (SLICE / inner).min(c)
        } else {
            1
        };
        let (slice, scratch, pool_recip) = match self.head {
            Head::AvgPool3x3 if planes > 1 => {
                let h = shape[2];
                let scratch = (planes * inner).max(pool::scratch_len_planes(planes, h, width));
                (
                    planes * inner,
                    scratch,
                    pool::tap_reciprocals_planes(planes, h, width),
                )
            }
            Head::AvgPool3x3 => {
                // Empty planes are never sliced; the max keeps the sizes defined.
                let rows = (SLICE / width.max(1)).min(shape[2]).max(1);
                let scratch = (rows * width).max(pool::scratch_len(rows, width));
                (
                    rows * width,
                    scratch,
                    pool::tap_reciprocals(shape[2], width),
                )
            }
            _ if flat => {
                let len = c * inner;
                (SLICE.min(len), SLICE.min(len), vec![])
            }
            _ => {
                let slice = if planes > 1 {
                    planes * inner
                } else {
                    SLICE.min(inner)
                };
                (slice, slice, vec![])
            }
        };
        Ok(Bound {
            x_f32,
            x_i32,
            x_base,
            x_add: &[],
            operands,
            inner,
            flat,
            planes,
            width,
            slice,
            scratch,
            pool_recip,
            saves_head: self.saves_head(),
            erf,
        })
    }

    /// The chain's [`LevelTable`], where its output depends on its head's level alone.
    pub fn level_table(&self, isa: Isa, b: &Bound) -> TractResult<Option<LevelTable>> {
        let Some((grid, values)) = self.levels(b) else {
            return Ok(None);
        };
        Ok(Some(match &self.tail {
            Tail::Sum => return Ok(None),
            Tail::F32 => LevelTable::F32(
                grid,
                self.table(isa, b, &values, |v, t| t.copy_from_slice(v))?,
            ),
            Tail::Quantize(q) => match q.dt {
                DatumType::U8 => LevelTable::U8(
                    grid,
                    self.table(isa, b, &values, |v, t| {
                        quantize_u8(isa, v, t, q.inv_scale, q.grid)
                    })?,
                ),
                DatumType::I8 => LevelTable::I8(
                    grid,
                    self.table(isa, b, &values, |v, t| {
                        quantize_i8(isa, v, t, q.inv_scale, q.grid)
                    })?,
                ),
                dt => bail!("element-wise chain: cannot quantize to {dt:?}"),
            },
        }))
    }

    /// The chain over `b` into `out`: every channel plane, split over the threads, with
    /// `first` `None`; otherwise on this thread the planes from channel `first` on that
    /// `out` holds (and `b`'s accumulators, from element `first·inner` on).
    pub fn write(
        &self,
        isa: Isa,
        b: &Bound,
        table: Option<&LevelTable>,
        out: OutSlice,
        first: Option<usize>,
    ) -> TractResult<()> {
        if let (Some(table), Head::Requant(r)) = (table, &self.head) {
            return match (table, out) {
                (LevelTable::F32(g, t), OutSlice::F32(o)) => {
                    Self::run_table(isa, b, r, *g, t, o, first)
                }
                (LevelTable::U8(g, t), OutSlice::U8(o)) => {
                    Self::run_table(isa, b, r, *g, t, o, first)
                }
                (LevelTable::I8(g, t), OutSlice::I8(o)) => {
                    Self::run_table(isa, b, r, *g, t, o, first)
                }
                _ => bail!("element-wise chain: table and output of different types"),
            };
        }
        match (&self.tail, out) {
            (Tail::F32, OutSlice::F32(o)) => Self::run(b, o, first, |ch, at, o, buf| {
                apply_slice(isa, self, b, ch, at, o, buf)
            }),
            (Tail::Quantize(q), OutSlice::U8(o)) => {
                self.run_quantized(isa, b, o, first, q, quantize_u8)
            }
            (Tail::Quantize(q), OutSlice::I8(o)) => {
                self.run_quantized(isa, b, o, first, q, quantize_i8)
            }
            (Tail::Sum, _) => bail!("element-wise chain: a summing chain writes no tensor"),
            _ => bail!("element-wise chain: output of another type than its tail"),
        }
    }

    /// The sum of the chain's values over the `len` elements of the stream (a
    /// [`Tail::Sum`] chain), slice by slice in memory order on this thread.
    fn sum(&self, isa: Isa, b: &Bound, len: usize) -> TractResult<f32> {
        let mut sum = OrderedSum::default();
        if b.inner == 0 || len == 0 {
            return Ok(0.0);
        }
        if self.head == Head::F32 && self.steps.is_empty() {
            sum.feed(isa, &b.x_f32[..len]);
            return Ok(sum.total());
        }
        let mut buf = vec![0f32; b.slice + b.scratch];
        let (unit, channels) = b.units();
        for u in 0..len.div_ceil(unit) {
            let mut at = u * unit;
            let end = (at + unit).min(len);
            while at < end {
                let n = b.slice.min(end - at);
                let (v, head) = buf.split_at_mut(b.slice);
                let v = &mut v[..n];
                apply_slice(isa, self, b, u * channels, at, v, head)?;
                sum.feed(isa, v);
                at += n;
            }
        }
        Ok(sum.total())
    }

    /// Calls `slice(channel, offset, out_slice, scratch)` on every slice of `out` (see
    /// [`Bound::units`]: parts of a plane, groups of whole planes, or for a flat chain
    /// runs of the stream with channel 0), split over the threads by groups of units.
    /// `scratch` holds `b.slice + b.scratch` f32.
    fn run<T: Send>(
        b: &Bound,
        out: &mut [T],
        first: Option<usize>,
        slice: impl Fn(usize, usize, &mut [T], &mut [f32]) -> TractResult<()> + Sync,
    ) -> TractResult<()> {
        let (unit, channels) = b.units();
        if unit == 0 {
            return Ok(());
        }
        // Units from `first_unit` on of the planes from channel `base` on.
        let units = |base: usize, first_unit: usize, out: &mut [T], buf: &mut Vec<f32>| {
            buf.resize(b.slice + b.scratch, 0.0);
            for (i, o) in out.chunks_mut(unit).enumerate() {
                let u = first_unit + i;
                let at = base * b.inner + u * unit;
                for (j, part) in o.chunks_mut(b.slice).enumerate() {
                    slice(base + u * channels, at + j * b.slice, part, buf)?;
                }
            }
            Ok(())
        };
        match first {
            None => for_runs(out, unit, PARALLEL_MIN, |u, out, buf| units(0, u, out, buf)),
            Some(first) => units(first, 0, out, &mut Vec::new()),
        }
    }

    /// [`Self::run`] with a quantizing tail: the chain into the first `b.slice` values
    /// of the scratch, then `quantize` into `out`.
    fn run_quantized<T: Send>(
        &self,
        isa: Isa,
        b: &Bound,
        out: &mut [T],
        first: Option<usize>,
        q: &Quantize,
        quantize: fn(Isa, &[f32], &mut [T], f32, Grid),
    ) -> TractResult<()> {
        Self::run(b, out, first, |ch, at, o, buf| {
            let (v, head) = buf.split_at_mut(b.slice);
            let v = &mut v[..o.len()];
            apply_slice(isa, self, b, ch, at, v, head)?;
            quantize(isa, v, o, q.inv_scale, q.grid);
            Ok(())
        })
    }
}

crate::kernels::multiversion! {
    /// The chain on the elements `at..at + v.len()` of the stream, into `v`: part of
    /// the plane of channel `ch`, whole planes from channel `ch` on, or for a flat chain
    /// any run (`ch` unused). Built for each instruction set (the loops are the same f32
    /// operations, only wider).
    pub fn apply_slice(
        chain: &ElementwiseChain,
        b: &Bound<'_>,
        ch: usize,
        at: usize,
        v: &mut [f32],
        head: &mut [f32],
    ) -> TractResult<()> {
        let len = v.len();
        let steps = &chain.steps;
        // A slice lies in one plane, or holds whole planes (`b.planes`): per-channel
        // operands are read per plane of it.
        let plane = b.inner.max(1);
        // The round trip right after step `i`, folded into that step's loop.
        let fq_after = |i: usize| match steps.get(i + 1) {
            Some(Step::FakeQuant(fq)) => Some(FakeQuantOne::new(
                fq.inv_scale,
                fq.grid,
                fq.dq_zero_point,
                fq.dq_scale,
            )),
            _ => None,
        };
        // Steps already applied while reading the head.
        let mut done = 0;
        match &chain.head {
            Head::F32 => {
                let x = &b.x_f32[at..at + len];
                let first = steps.first().zip(b.operands.first());
                done = match first {
                    // The first step reads the input where it is instead of a copy.
                    Some((Step::Scalar(op, _), o)) if !b.saves_head => {
                        let per_plane = x.chunks(plane).zip(v.chunks_mut(plane));
                        for (j, (x, v)) in per_plane.enumerate() {
                            let o = if o.len() == 1 { o[0] } else { o[ch + j] };
                            match fq_after(0) {
                                Some(q) => op.by_scalar_into(x, v, o, |v| q.apply(v)),
                                None => op.by_scalar_into(x, v, o, |v| v),
                            }
                        }
                        1
                    }
                    Some((Step::Square, _)) if !b.saves_head => {
                        match fq_after(0) {
                            Some(q) => square_into(x, v, |v| q.apply(v)),
                            None => square_into(x, v, |v| v),
                        }
                        1
                    }
                    _ => {
                        v.copy_from_slice(x);
                        0
                    }
                };
                if done == 1 && fq_after(0).is_some() {
                    done = 2;
                }
            }
            Head::AvgPool3x3 => {
                let w = b.width;
                let (h, recip) = (b.inner / w, &b.pool_recip);
                // A round trip first in the steps is applied to the pooled values as
                // they are made.
                let fq = match steps.first() {
                    Some(Step::FakeQuant(fq)) => {
                        done = 1;
                        Some(FakeQuantOne::new(fq.inv_scale, fq.grid, fq.dq_zero_point, fq.dq_scale))
                    }
                    _ => None,
                };
                if b.planes > 1 {
                    let x = &b.x_f32[at..at + len];
                    match fq {
                        Some(q) => pool::avg_pool3x3_planes(x, h, w, v, recip, head, |v| q.apply(v)),
                        None => pool::avg_pool3x3_planes(x, h, w, v, recip, head, |v| v),
                    }
                } else {
                    let x = &b.x_f32[ch * b.inner..(ch + 1) * b.inner];
                    let y0 = (at - ch * b.inner) / w;
                    match fq {
                        Some(q) => pool::avg_pool3x3_rows(x, h, w, y0, v, recip, head, |v| q.apply(v)),
                        None => pool::avg_pool3x3_rows(x, h, w, y0, v, recip, head, |v| v),
                    }
                }
            }
            Head::Requant(r) => {
                let acc = &b.x_i32[at - b.x_base..][..len];
                let fused = match steps.first() {
                    Some(Step::Tensor(op, _)) if !b.saves_head => Some(*op),
                    _ => None,
                };
                if let Some(op) = fused {
                    // The head, a tensor operand's step (a residual addition) and the round
                    // trip after it in one loop.
                    let t = &b.operands[0][at..at + len];
                    let q = fq_after(0);
                    done = if q.is_some() { 2 } else { 1 };
                    macro_rules! combine {
                        ($f:ident => $body:expr) => {
                            match (op, q) {
                                (Arith::Add, Some(q)) => {
                                    let $f = move |h: f32, t: f32| q.apply(h + t);
                                    $body
                                }
                                (Arith::Add, None) => {
                                    let $f = |h: f32, t: f32| h + t;
                                    $body
                                }
                                (Arith::Sub, Some(q)) => {
                                    let $f = move |h: f32, t: f32| q.apply(h - t);
                                    $body
                                }
                                (Arith::Sub, None) => {
                                    let $f = |h: f32, t: f32| h - t;
                                    $body
                                }
                                (Arith::SubFrom, Some(q)) => {
                                    let $f = move |h: f32, t: f32| q.apply(t - h);
                                    $body
                                }
                                (Arith::SubFrom, None) => {
                                    let $f = |h: f32, t: f32| t - h;
                                    $body
                                }
                                (Arith::Mul, Some(q)) => {
                                    let $f = move |h: f32, t: f32| q.apply(h * t);
                                    $body
                                }
                                (Arith::Mul, None) => {
                                    let $f = |h: f32, t: f32| h * t;
                                    $body
                                }
                            }
                        };
                    }
                    let planes = acc.chunks(plane).zip(t.chunks(plane)).zip(v.chunks_mut(plane));
                    for (j, ((acc, t), v)) in planes.enumerate() {
                        let c = ch + j;
                        let (m, o, add) = (r.mult[c], r.offset[c], b.acc_offset(c));
                        match r.out {
                            RequantOut::F32 => combine!(f => k::dequant_row_with(acc, add, t, v, m, o, f)),
                            RequantOut::Grid {
                                grid,
                                dq_zero_point,
                                dq_scale,
                            } => combine!(f => k::requant_to_grid_row_with(
                                acc, add, t, v, m, o, grid, dq_zero_point, dq_scale, f
                            )),
                            _ => bail!("element-wise chain: requantization to an integer type"),
                        }
                    }
                } else {
                    for (j, (acc, v)) in acc.chunks(plane).zip(v.chunks_mut(plane)).enumerate() {
                        let c = ch + j;
                        let (m, o, add) = (r.mult[c], r.offset[c], b.acc_offset(c));
                        match r.out {
                            RequantOut::F32 => k::dequant_row(acc, add, v, m, o),
                            RequantOut::Grid {
                                grid,
                                dq_zero_point,
                                dq_scale,
                            } => k::requant_to_grid_row(acc, add, v, m, o, grid, dq_zero_point, dq_scale),
                            _ => bail!("element-wise chain: requantization to an integer type"),
                        }
                    }
                }
            }
        }
        let saved = if b.saves_head {
            head[..len].copy_from_slice(v);
            &head[..len]
        } else {
            &head[..0]
        };
        let mut i = done;
        while i < steps.len() {
            let operand = b.operands[i];
            // An arithmetic step and the round trip after it run as one loop.
            let fq = match steps[i] {
                Step::Scalar(..) | Step::Tensor(..) | Step::TensorHead(_) | Step::Square => {
                    fq_after(i)
                }
                _ => None,
            };
            macro_rules! then {
                ($post:ident => $body:expr) => {
                    match fq {
                        Some(q) => {
                            let $post = move |v: f32| q.apply(v);
                            $body
                        }
                        None => {
                            let $post = |v: f32| v;
                            $body
                        }
                    }
                };
            }
            match &steps[i] {
                Step::Scalar(op, _) if operand.len() == 1 => {
                    let o = operand[0];
                    then!(post => op.slice_by_scalar(v, o, post));
                }
                Step::Scalar(op, _) => {
                    for (j, v) in v.chunks_mut(plane).enumerate() {
                        let o = operand[ch + j];
                        then!(post => op.slice_by_scalar(v, o, post));
                    }
                }
                Step::Tensor(op, _) => {
                    let t = &operand[at..at + len];
                    then!(post => op.slice_by_tensor(v, t, post));
                }
                Step::TensorHead(op) => then!(post => op.slice_by_tensor(v, saved, post)),
                Step::FakeQuant(fq) => {
                    k::fake_quant_in_place(v, fq.inv_scale, fq.grid, fq.dq_zero_point, fq.dq_scale)
                }
                Step::Square => then!(post => {
                    for x in v.iter_mut() {
                        *x = post(*x * *x);
                    }
                }),
                Step::Erf => {
                    if let Some(erf) = &b.erf {
                        erf.run(v)?;
                    }
                }
            }
            i += if fq.is_some() { 2 } else { 1 };
        }
        Ok(())
    }
}

/// A sum of f32 values fed in parts, added in the order of ndarray's `unrolled_fold`
/// over the whole sequence (what `ArrayBase::sum` does on a contiguous array): value
/// `i` goes to partial sum `i mod 8`, the partials are combined as
/// `((((0 + (p0 + p4)) + (p1 + p5)) + (p2 + p6)) + (p3 + p7))`, and the last
/// `len mod 8` values are added one by one. The same additions in the same order give
/// the same bits.
#[derive(Debug, Default, Clone)]
pub struct OrderedSum {
    lanes: [f32; 8],
    pending: [f32; 8],
    n_pending: usize,
}

impl OrderedSum {
    pub fn feed(&mut self, isa: Isa, mut xs: &[f32]) {
        if self.n_pending > 0 {
            let take = (8 - self.n_pending).min(xs.len());
            self.pending[self.n_pending..][..take].copy_from_slice(&xs[..take]);
            self.n_pending += take;
            xs = &xs[take..];
            if self.n_pending < 8 {
                return;
            }
            add_lanes(isa, &mut self.lanes, &self.pending);
            self.n_pending = 0;
        }
        let whole = xs.len() / 8 * 8;
        add_lanes(isa, &mut self.lanes, &xs[..whole]);
        let rest = &xs[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.n_pending = rest.len();
    }

    pub fn total(&self) -> f32 {
        let p = &self.lanes;
        let mut acc = 0f32;
        acc += p[0] + p[4];
        acc += p[1] + p[5];
        acc += p[2] + p[6];
        acc += p[3] + p[7];
        self.pending[..self.n_pending]
            .iter()
            .fold(acc, |acc, &x| acc + x)
    }
}

crate::kernels::multiversion! {
    /// `lanes[j] += xs[8i + j]` for each whole group of eight, in order (eight
    /// independent sums: one vector add per group).
    pub fn add_lanes(lanes: &mut [f32; 8], xs: &[f32]) {
        let mut p = *lanes;
        for c in xs.chunks_exact(8) {
            for j in 0..8 {
                p[j] += c[j];
            }
        }
        *lanes = p;
    }
}

crate::kernels::multiversion! {
    /// [`k::requant_row`] to u8 indices, built for each instruction set.
    pub fn level_indices(
        acc: &[i32],
        add: i32,
        out: &mut [u8],
        mult: f32,
        offset: f32,
        grid: Grid,
    ) {
        k::requant_row(acc, add, out, mult, offset, grid)
    }
}

crate::kernels::multiversion! {
    /// [`level_indices`] of whole planes of `inner` accumulators from channel `first`
    /// on, each with its channel's multiplier, offset and added integer (`adds`
    /// empty: none).
    #[allow(clippy::too_many_arguments)]
    pub fn level_indices_planes(
        acc: &[i32],
        inner: usize,
        first: usize,
        adds: &[i32],
        mult: &[f32],
        offset: &[f32],
        out: &mut [u8],
        grid: Grid,
    ) {
        for (i, (a, o)) in acc.chunks(inner).zip(out.chunks_mut(inner)).enumerate() {
            let ch = first + i;
            let add = adds.get(ch).copied().unwrap_or(0);
            k::requant_row(a, add, o, mult[ch], offset[ch], grid)
        }
    }
}

impl TypedOp for ElementwiseChain {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == self.in_dt());
        if self.tail == Tail::Sum {
            let ones: TVec<usize> = tvec![1; inputs[0].rank()];
            return Ok(tvec!(f32::fact(ones)));
        }
        Ok(tvec!(self.out_dt().fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = inputs[0].shape.volume();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            n * (self.steps.len() + 1)
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`OrderedSum`] fed in parts of every length against ndarray's own sum of the
    /// whole sequence (the oracle: what tract's `Reduce<Sum>` calls), bit for bit.
    /// Values span six decades so that another order of additions changes low bits.
    #[test]
    fn ordered_sum_matches_ndarray_in_any_parts() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for len in [0usize, 1, 7, 8, 9, 63, 1000, 4099] {
            let xs: Vec<f32> = (0..len)
                .map(|_| {
                    let (a, b) = (next(), next());
                    let m = (a >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    m * 10f32.powi((b % 7) as i32 - 3)
                })
                .collect();
            let want = tract_ndarray::Array1::from(xs.clone()).sum();
            for isa in Isa::available() {
                for part in [1, 3, 8, 13, 2048] {
                    let mut sum = OrderedSum::default();
                    for chunk in xs.chunks(part) {
                        sum.feed(isa, chunk);
                    }
                    assert_eq!(
                        sum.total().to_bits(),
                        want.to_bits(),
                        "{len} values in parts of {part}, {isa:?}"
                    );
                }
            }
        }
    }
}
