//! One-pass quantization ops for int8 graphs (see [`crate::passes::int8`]).
//!
//! - [`Requant`]: i32 accumulators of an integer conv / matmul → u8, i8 or f32, with
//!   one multiplier and offset per channel (per-channel weight scales, bias, output
//!   scale and zero point folded into them). It replaces the 6–9 generic passes
//!   (Scale, Add, Min, Max, Cast, zero-point compensation) tract would emit.
//! - [`FakeQuant`]: QuantizeLinear then DequantizeLinear on f32 in one pass.
//!
//! Loops are in [`crate::kernels::quant`].

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::optim::CONST_FOLD_MEM_BUDGET;

use crate::kernels::quant::{self as k, quantize_i8, quantize_u8, Grid};
use crate::kernels::Isa;

/// What [`Requant`] produces from `v = acc·mult[c] + offset[c]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequantOut {
    /// `clamp(round(v) + zero_point)` as u8.
    U8 { zero_point: i32 },
    /// `clamp(round(v) + zero_point)` as i8.
    I8 { zero_point: i32 },
    /// `v` as f32.
    F32,
    /// The u8 / i8 value of `U8` / `I8` dequantized again:
    /// `(clamp(round(v) + grid.zero_point) − dq_zero_point)·dq_scale`, as f32.
    Grid {
        grid: Grid,
        dq_zero_point: i32,
        dq_scale: f32,
    },
}

impl RequantOut {
    pub fn datum_type(&self) -> DatumType {
        match self {
            RequantOut::U8 { .. } => u8::datum_type(),
            RequantOut::I8 { .. } => i8::datum_type(),
            RequantOut::F32 | RequantOut::Grid { .. } => f32::datum_type(),
        }
    }
}

/// i32 → u8 / i8 / f32 with a per-channel affine map along `axis`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    /// The channel axis of the input; `mult` and `offset` have its length.
    pub axis: usize,
    pub mult: Arc<Vec<f32>>,
    pub offset: Arc<Vec<f32>>,
    pub out: RequantOut,
}

impl Eq for Requant {}

impl Requant {
    /// Applies the op to a plain i32 array of `shape`.
    pub fn apply(&self, shape: &[usize], acc: &[i32], out: &mut Tensor) -> TractResult<()> {
        ensure!(
            self.axis < shape.len(),
            "Requant: axis {} out of range for shape {shape:?}",
            self.axis
        );
        let c = shape[self.axis];
        ensure!(
            self.mult.len() == c && self.offset.len() == c,
            "Requant: {} channels in shape {shape:?}, {} multipliers and {} offsets",
            c,
            self.mult.len(),
            self.offset.len()
        );
        let inner: usize = shape[self.axis + 1..].iter().product();
        let mut plain = out.try_as_plain_ram_mut()?;
        match self.out {
            RequantOut::U8 { zero_point } => self.each(
                acc,
                plain.as_slice_mut::<u8>()?,
                inner,
                |a, o, m, c| k::requant_row(a, 0, o, m, c, Grid::of::<u8>(zero_point)),
                |a, o, m, c| k::requant_cols(a, o, m, c, Grid::of::<u8>(zero_point)),
            ),
            RequantOut::I8 { zero_point } => self.each(
                acc,
                plain.as_slice_mut::<i8>()?,
                inner,
                |a, o, m, c| k::requant_row(a, 0, o, m, c, Grid::of::<i8>(zero_point)),
                |a, o, m, c| k::requant_cols(a, o, m, c, Grid::of::<i8>(zero_point)),
            ),
            RequantOut::F32 => self.each(
                acc,
                plain.as_slice_mut::<f32>()?,
                inner,
                |a, o, m, c| k::dequant_row(a, 0, o, m, c),
                k::dequant_cols,
            ),
            RequantOut::Grid {
                grid,
                dq_zero_point,
                dq_scale,
            } => self.each(
                acc,
                plain.as_slice_mut::<f32>()?,
                inner,
                |a, o, m, c| k::requant_to_grid_row(a, 0, o, m, c, grid, dq_zero_point, dq_scale),
                |a, o, m, c| k::requant_to_grid_cols(a, o, m, c, grid, dq_zero_point, dq_scale),
            ),
        }
    }

    /// Calls `row` once per (outer, channel) run of `inner` elements, or `cols` once
    /// per outer index when the channel axis is innermost. Large tensors with runs of
    /// several elements are split by runs over the executor's threads.
    fn each<T: Send>(
        &self,
        acc: &[i32],
        out: &mut [T],
        inner: usize,
        row: impl Fn(&[i32], &mut [T], f32, f32) + Sync,
        cols: impl Fn(&[i32], &mut [T], &[f32], &[f32]),
    ) -> TractResult<()> {
        let c = self.mult.len();
        if c == 0 {
            return Ok(());
        }
        if inner == 1 {
            for (a, o) in acc.chunks(c).zip(out.chunks_mut(c)) {
                cols(a, o, &self.mult, &self.offset);
            }
            return Ok(());
        }
        super::for_runs(out, inner, 32_768, |first, o: &mut [T], _: &mut ()| {
            let a = &acc[first * inner..first * inner + o.len()];
            for (i, (a, o)) in a.chunks(inner).zip(o.chunks_mut(inner)).enumerate() {
                let ch = (first + i) % c;
                row(a, o, self.mult[ch], self.offset[ch]);
            }
            Ok(())
        })
    }
}

impl Op for Requant {
    fn name(&self) -> StaticName {
        "Requant".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "axis: {}, {} channels, out: {:?}",
            self.axis,
            self.mult.len(),
            self.out
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Requant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.datum_type() == i32::datum_type(),
            "Requant expects i32, got {:?}",
            input.datum_type()
        );
        let mut out = unsafe { Tensor::uninitialized_dt(self.out.datum_type(), input.shape())? };
        let acc = input.try_as_plain_ram()?;
        self.apply(input.shape(), acc.as_slice::<i32>()?, &mut out)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Requant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == i32::datum_type());
        ensure!(self.axis < inputs[0].rank());
        Ok(tvec!(self.out.datum_type().fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape.volume()
        )))
    }

    as_op!();
}

/// QuantizeLinear (per tensor) followed by DequantizeLinear, on f32, in one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeQuant {
    /// Reciprocal of the QuantizeLinear scale.
    pub inv_scale: f32,
    pub grid: Grid,
    pub dq_zero_point: i32,
    pub dq_scale: f32,
}

impl Eq for FakeQuant {}

impl Op for FakeQuant {
    fn name(&self) -> StaticName {
        "FakeQuant".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1/scale: {} grid: {:?} dequantize: zp {} scale {}",
            self.inv_scale, self.grid, self.dq_zero_point, self.dq_scale
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for FakeQuant {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.datum_type() == f32::datum_type(),
            "FakeQuant expects f32, got {:?}",
            input.datum_type()
        );
        let mut out = unsafe { Tensor::uninitialized::<f32>(input.shape())? };
        k::fake_quant(
            input.try_as_plain_ram()?.as_slice::<f32>()?,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            self.inv_scale,
            self.grid,
            self.dq_zero_point,
            self.dq_scale,
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FakeQuant {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape.volume()
        )))
    }

    as_op!();
}

/// ONNX DequantizeLinear of a constant (a quantized weight or bias):
/// `(x − zero_point[c])·scale[c]` along `axis`, or per tensor when the scale and
/// zero point have one element. The int8 pass reads the integer tensor and its
/// scales from it; anything it does not rewrite is constant-folded by tract's
/// declutter (within tract's folding budget), unless `keep` says a later pass takes
/// the integers (the patch convolution keeps int8 weights int8).
#[derive(Debug, Clone, PartialEq)]
pub struct DequantizeConst {
    pub axis: usize,
    pub scale: Arc<Vec<f32>>,
    pub zero_point: Arc<Vec<i32>>,
    /// Never folded into an f32 constant.
    pub keep: bool,
}

impl Eq for DequantizeConst {}

impl DequantizeConst {
    /// The scale of every index along `axis` (`len` of them).
    pub fn scales(&self, len: usize) -> Option<Vec<f32>> {
        broadcast(&self.scale, len)
    }

    /// The zero point of every index along `axis`.
    pub fn zero_points(&self, len: usize) -> Option<Vec<i32>> {
        broadcast(&self.zero_point, len)
    }

    /// The f32 values of an i8, u8 or i32 tensor.
    pub fn dequantize(&self, x: &Tensor) -> TractResult<Tensor> {
        match x.datum_type() {
            DatumType::I8 => self.eval_t::<i8>(x),
            DatumType::U8 => self.eval_t::<u8>(x),
            DatumType::I32 => self.eval_t::<i32>(x),
            dt => bail!("DequantizeLinear: unsupported input type {dt:?}"),
        }
    }

    fn eval_t<T: Datum + Copy + Into<i64>>(&self, x: &Tensor) -> TractResult<Tensor> {
        let shape = x.shape();
        let per_axis = self.scale.len() > 1 || self.zero_point.len() > 1;
        let (c, inner) = if per_axis {
            ensure!(
                self.axis < shape.len(),
                "DequantizeLinear: axis {} out of range for shape {shape:?}",
                self.axis
            );
            (shape[self.axis], shape[self.axis + 1..].iter().product())
        } else {
            (1, x.len().max(1))
        };
        let scales = self.scales(c).with_context(|| {
            format!(
                "DequantizeLinear: {} scales for {c} channels",
                self.scale.len()
            )
        })?;
        let zps = self.zero_points(c).with_context(|| {
            format!(
                "DequantizeLinear: {} zero points for {c} channels",
                self.zero_point.len()
            )
        })?;
        let mut out = Tensor::zero::<f32>(shape)?;
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<T>()?;
        let mut plain = out.try_as_plain_ram_mut()?;
        let ys = plain.as_slice_mut::<f32>()?;
        if inner > 0 {
            for (ix, (xr, yr)) in xs.chunks(inner).zip(ys.chunks_mut(inner)).enumerate() {
                let ch = ix % c;
                let (s, z) = (scales[ch], zps[ch] as i64);
                for (x, y) in xr.iter().zip(yr) {
                    *y = ((*x).into() - z) as f32 * s;
                }
            }
        }
        Ok(out)
    }
}

fn broadcast<T: Copy>(v: &[T], len: usize) -> Option<Vec<T>> {
    match v.len() {
        1 => Some(vec![v[0]; len]),
        n if n == len => Some(v.to_vec()),
        _ => None,
    }
}

impl Op for DequantizeConst {
    fn name(&self) -> StaticName {
        "DequantizeConst".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "axis: {}, {} scales, {} zero points",
            self.axis,
            self.scale.len(),
            self.zero_point.len()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DequantizeConst {
    /// Declines (`None`) where the f32 value would exceed tract's constant-folding
    /// budget (tract's constant propagation would evaluate it on every round only to
    /// drop it), and where `keep` is set. Passes that want the value call [`DequantizeConst::dequantize`].
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        let bytes = inputs.first().map_or(0, |x| x.len() * size_of::<f32>());
        if self.keep || bytes as u64 > CONST_FOLD_MEM_BUDGET {
            return Ok(None);
        }
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        Ok(tvec!(self.dequantize(&x)?.into_tvalue()))
    }
}

impl TypedOp for DequantizeConst {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Per-tensor QuantizeLinear of f32 to u8 / i8 (`clamp(round(x/scale) + zp)`), a
/// vectorized replacement for tract's element-wise loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantize {
    /// Reciprocal of the QuantizeLinear scale.
    pub inv_scale: f32,
    pub grid: Grid,
    /// u8 or i8.
    pub dt: DatumType,
}

impl Eq for Quantize {}

impl Op for Quantize {
    fn name(&self) -> StaticName {
        "Quantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1/scale: {} grid: {:?} to {:?}",
            self.inv_scale, self.grid, self.dt
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Quantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.datum_type() == f32::datum_type(),
            "Quantize expects f32, got {:?}",
            input.datum_type()
        );
        let mut out = unsafe { Tensor::uninitialized_dt(self.dt, input.shape())? };
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let mut plain = out.try_as_plain_ram_mut()?;
        match self.dt {
            DatumType::U8 => quantize_u8(
                Isa::best(),
                x,
                plain.as_slice_mut::<u8>()?,
                self.inv_scale,
                self.grid,
            ),
            DatumType::I8 => quantize_i8(
                Isa::best(),
                x,
                plain.as_slice_mut::<i8>()?,
                self.inv_scale,
                self.grid,
            ),
            dt => bail!("Quantize: unsupported output type {dt:?}"),
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Quantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(self.dt.fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(
        &self,
        inputs: &[&TypedFact],
        outputs: &[&TypedFact],
    ) -> TractResult<AxesMapping> {
        AxesMapping::natural(inputs, outputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        _io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        Ok(Some(AxisChangeConsequence::new(model, node, None, change)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape.volume()
        )))
    }

    as_op!();
}
