//! onnxruntime's QOperator-format ops through this crate's ONNX loader
//! (`poolformer_edge::onnx::loader()`): the com.microsoft contrib ops registered in
//! src/onnx/ (QLinearAdd, QLinearMul, QLinearAveragePool, QLinearGlobalAveragePool,
//! QGemm) and tract's native quantized ops that onnxruntime's quantizer emits too
//! (QLinearConv per tensor and per channel, MatMulInteger).
//!
//! Each test builds a one-node ONNX graph in memory, runs it through tract
//! (`into_optimized`, as the engine does) and compares it with a reference written
//! here from the op's definition: dequantize in f64, apply the float op, quantize
//! with round-half-to-even and saturation.
//!
//! Tolerance: one quantization step. tract works in f32 and quantizes with
//! `x * (1/scale)`, the reference in f64 with `x / scale`; a value that lands on
//! (or within f32 rounding of) a .5 tie can round to either neighbour. onnxruntime's
//! integer kernels (one fused requantization multiplier) have the same freedom.

mod common;

use common::onnx::{attr_float, attr_int, attr_ints, value_info};
use poolformer_edge::onnx::loader;
use prost::Message;
use tract_onnx::pb::{
    tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, ValueInfoProto,
};
use tract_onnx::prelude::*;

// ---------------------------------------------------------------------------------
// Quantized types and deterministic data

#[derive(Clone, Copy, Debug, PartialEq)]
enum Q {
    U8,
    I8,
}

impl Q {
    fn range(self) -> (i32, i32) {
        match self {
            Q::U8 => (0, 255),
            Q::I8 => (-128, 127),
        }
    }

    fn onnx(self) -> DataType {
        match self {
            Q::U8 => DataType::Uint8,
            Q::I8 => DataType::Int8,
        }
    }

    fn datum_type(self) -> DatumType {
        match self {
            Q::U8 => u8::datum_type(),
            Q::I8 => i8::datum_type(),
        }
    }

    /// One byte per value, as ONNX `raw_data` stores u8 and i8.
    fn raw(self, values: &[i32]) -> Vec<u8> {
        values
            .iter()
            .map(|&v| {
                let (lo, hi) = self.range();
                assert!((lo..=hi).contains(&v), "{v} out of {self:?} range");
                v as u8
            })
            .collect()
    }

    fn tensor(self, shape: &[usize], values: &[i32]) -> Tensor {
        match self {
            Q::U8 => {
                let v: Vec<u8> = values.iter().map(|&x| x as u8).collect();
                Tensor::from_shape(shape, &v).unwrap()
            }
            Q::I8 => {
                let v: Vec<i8> = values.iter().map(|&x| x as i8).collect();
                Tensor::from_shape(shape, &v).unwrap()
            }
        }
    }

    /// Saturating round-half-to-even quantization of a real value.
    fn quantize(self, x: f64, scale: f32, zero_point: i32) -> i32 {
        let (lo, hi) = self.range();
        let q = (x / scale as f64).round_ties_even() + zero_point as f64;
        q.clamp(lo as f64, hi as f64) as i32
    }
}

fn dequantize(q: i32, scale: f32, zero_point: i32) -> f64 {
    (q - zero_point) as f64 * scale as f64
}

/// `n` values spread over `q`'s whole range, deterministic for a seed (SplitMix64).
fn values(q: Q, n: usize, seed: u64) -> Vec<i32> {
    let (lo, hi) = q.range();
    let span = (hi - lo + 1) as u64;
    (0..n as u64)
        .map(|i| {
            let mut z = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i.wrapping_mul(0xD1B5_4A32_D192_ED03));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (z % span) as i32
        })
        .collect()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

// ---------------------------------------------------------------------------------
// A one-node ONNX graph builder

#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
}

impl Graph {
    fn input(&mut self, name: &str, elem: DataType, shape: &[usize]) -> &mut Self {
        self.inputs.push(value_info(name, elem, Some(shape)));
        self
    }

    fn output(&mut self, name: &str, elem: DataType) -> &mut Self {
        self.outputs.push(value_info(name, elem, None));
        self
    }

    fn init(&mut self, name: &str, elem: DataType, dims: &[usize], raw: Vec<u8>) -> &mut Self {
        self.initializers.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: elem as i32,
            raw_data: raw,
            ..Default::default()
        });
        self
    }

    /// A scalar f32 initializer (scales).
    fn f32_scalar(&mut self, name: &str, value: f32) -> &mut Self {
        self.init(name, DataType::Float, &[], value.to_le_bytes().to_vec())
    }

    fn f32_vec(&mut self, name: &str, values: &[f32]) -> &mut Self {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, DataType::Float, &[values.len()], raw)
    }

    /// A u8 / i8 initializer; `dims` empty for a scalar (zero points).
    fn q_const(&mut self, name: &str, q: Q, dims: &[usize], values: &[i32]) -> &mut Self {
        assert_eq!(numel(dims), values.len());
        self.init(name, q.onnx(), dims, q.raw(values))
    }

    fn i32_const(&mut self, name: &str, dims: &[usize], values: &[i32]) -> &mut Self {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(name, DataType::Int32, dims, raw)
    }

    fn node(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        self.nodes.push(NodeProto {
            name: format!("{op_type}_under_test_{}", self.nodes.len()),
            op_type: op_type.to_string(),
            domain: domain.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute: attributes,
            ..Default::default()
        });
        self
    }

    fn encode(&self) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            opset_import: vec![
                OperatorSetIdProto {
                    domain: String::new(),
                    version: 17,
                },
                OperatorSetIdProto {
                    domain: "com.microsoft".to_string(),
                    version: 1,
                },
            ],
            producer_name: "poolformer-edge tests".to_string(),
            graph: Some(GraphProto {
                name: "qoperator".to_string(),
                node: self.nodes.clone(),
                initializer: self.initializers.clone(),
                input: self.inputs.clone(),
                output: self.outputs.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Loads with this crate's loader, optimizes like the engine (this crate's graph
    /// passes, e.g. the per-channel QLinearConv rewrite, then tract's) and runs once.
    fn run(&self, inputs: Vec<Tensor>) -> TractResult<Tensor> {
        Ok(self.run_with(inputs, true)?.0)
    }

    /// As [`Graph::run`], with or without this crate's passes; also returns what the
    /// passes reported.
    fn run_with(&self, inputs: Vec<Tensor>, fuse: bool) -> TractResult<(Tensor, String)> {
        let bytes = self.encode();
        let typed = loader().model_for_read(&mut &bytes[..])?.into_typed()?;
        let (optimized, report) = poolformer_edge::passes::optimize(typed, fuse)?;
        let model = optimized.into_runnable()?;
        let outputs = model.run(inputs.into_iter().map(|t| t.into_tvalue()).collect())?;
        Ok((outputs[0].clone().into_tensor(), report.rewrites.join("; ")))
    }
}

const MS: &str = "com.microsoft";

fn as_i32(t: &Tensor) -> Vec<i32> {
    t.cast_to::<i32>()
        .unwrap()
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<i32>()
        .unwrap()
        .to_vec()
}

fn as_f32(t: &Tensor) -> Vec<f32> {
    t.try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

/// Checks a quantized output against the reference: type, shape, ≤ 1 step apart.
fn assert_within_one_step(what: &str, got: &Tensor, q: Q, shape: &[usize], expected: &[i32]) {
    assert_eq!(got.datum_type(), q.datum_type(), "{what}: output type");
    assert_eq!(got.shape(), shape, "{what}: output shape");
    let got = as_i32(got);
    let mut off_by_one = 0;
    for (k, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= 1,
            "{what}: element {k}: tract {g}, reference {e}"
        );
        off_by_one += (g != e) as usize;
    }
    // With scales that do not put results on a grid of .5 ties, ties are rare: most
    // elements must agree exactly, or something is off by a step systematically (a
    // zero point or rounding mode bug).
    assert!(
        off_by_one * 10 <= expected.len().max(10),
        "{what}: {off_by_one} of {} elements differ by one step",
        expected.len()
    );
}

// ---------------------------------------------------------------------------------
// Broadcasting helpers for the element-wise reference

fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
    let (a, b) = (pad(a), pad(b));
    a.iter()
        .zip(&b)
        .map(|(&x, &y)| {
            assert!(x == y || x == 1 || y == 1, "shapes do not broadcast");
            x.max(y)
        })
        .collect()
}

/// Flat index into a tensor of `shape` (right-aligned, broadcast) for the
/// multi-index `index` of the output.
fn broadcast_index(shape: &[usize], index: &[usize]) -> usize {
    let offset = index.len() - shape.len();
    shape.iter().enumerate().fold(0, |flat, (axis, &dim)| {
        let i = if dim == 1 { 0 } else { index[axis + offset] };
        flat * dim + i
    })
}

fn multi_index(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for axis in (0..shape.len()).rev() {
        index[axis] = flat % shape[axis];
        flat /= shape[axis];
    }
    index
}

// ---------------------------------------------------------------------------------
// QLinearAdd / QLinearMul

/// Quantization of one tensor in a test: type, scale, zero point.
#[derive(Clone, Copy, Debug)]
struct QParam {
    q: Q,
    scale: f32,
    zero_point: i32,
}

fn qp(q: Q, scale: f32, zero_point: i32) -> QParam {
    QParam {
        q,
        scale,
        zero_point,
    }
}

#[derive(Clone, Copy)]
enum Binary {
    Add,
    Mul,
}

/// Runs one QLinearAdd/QLinearMul: A is a graph input; B a graph input or, with
/// `b_const`, an initializer.
fn check_binary(
    op: Binary,
    (a_shape, a): (&[usize], QParam),
    (b_shape, b): (&[usize], QParam),
    c: QParam,
    b_const: bool,
) {
    let op_type = match op {
        Binary::Add => "QLinearAdd",
        Binary::Mul => "QLinearMul",
    };
    let what = format!("{op_type} {a:?}{a_shape:?} {b:?}{b_shape:?} -> {c:?}, B const {b_const}");
    let a_values = values(a.q, numel(a_shape), 1);
    let b_values = values(b.q, numel(b_shape), 2);
    let mut g = Graph::default();
    g.input("A", a.q.onnx(), a_shape)
        .f32_scalar("As", a.scale)
        .q_const("Az", a.q, &[], &[a.zero_point])
        .f32_scalar("Bs", b.scale)
        .q_const("Bz", b.q, &[], &[b.zero_point])
        .f32_scalar("Cs", c.scale)
        .q_const("Cz", c.q, &[], &[c.zero_point])
        .node(
            op_type,
            MS,
            &["A", "As", "Az", "B", "Bs", "Bz", "Cs", "Cz"],
            "C",
            vec![],
        )
        .output("C", c.q.onnx());
    let mut inputs = vec![a.q.tensor(a_shape, &a_values)];
    if b_const {
        g.q_const("B", b.q, b_shape, &b_values);
    } else {
        g.input("B", b.q.onnx(), b_shape);
        inputs.push(b.q.tensor(b_shape, &b_values));
    }
    let got = g.run(inputs).unwrap_or_else(|e| panic!("{what}: {e:?}"));

    let out_shape = broadcast_shape(a_shape, b_shape);
    let expected: Vec<i32> = (0..numel(&out_shape))
        .map(|k| {
            let index = multi_index(k, &out_shape);
            let x = dequantize(
                a_values[broadcast_index(a_shape, &index)],
                a.scale,
                a.zero_point,
            );
            let y = dequantize(
                b_values[broadcast_index(b_shape, &index)],
                b.scale,
                b.zero_point,
            );
            let z = match op {
                Binary::Add => x + y,
                Binary::Mul => x * y,
            };
            c.q.quantize(z, c.scale, c.zero_point)
        })
        .collect();
    assert_within_one_step(&what, &got, c.q, &out_shape, &expected);
}

#[test]
fn qlinear_add_u8_and_i8_with_broadcasting() {
    let u = |s, z| qp(Q::U8, s, z);
    let i = |s, z| qp(Q::I8, s, z);
    let cases: &[(&[usize], &[usize])] = &[
        (&[1, 3, 4, 5], &[1, 3, 4, 5]),
        (&[1, 3, 4, 5], &[3, 1, 1]),
        (&[2, 3, 1, 5], &[1, 1, 4, 1]),
        (&[2, 4], &[]),
    ];
    for &(a_shape, b_shape) in cases {
        for b_const in [false, true] {
            check_binary(
                Binary::Add,
                (a_shape, u(0.05, 128)),
                (b_shape, u(0.02, 100)),
                u(0.06, 120),
                b_const,
            );
            check_binary(
                Binary::Add,
                (a_shape, i(0.03, -5)),
                (b_shape, i(0.01, 7)),
                i(0.045, 3),
                b_const,
            );
        }
    }
    // Output scale small enough to saturate both ends.
    check_binary(
        Binary::Add,
        (&[64], u(0.1, 128)),
        (&[64], u(0.1, 128)),
        u(0.05, 128),
        false,
    );
    check_binary(
        Binary::Add,
        (&[64], i(0.1, 0)),
        (&[64], i(0.1, 0)),
        i(0.05, 0),
        false,
    );
}

#[test]
fn qlinear_mul_u8_and_i8_with_broadcasting() {
    let u = |s, z| qp(Q::U8, s, z);
    let i = |s, z| qp(Q::I8, s, z);
    let cases: &[(&[usize], &[usize])] = &[
        (&[1, 3, 4, 5], &[1, 3, 4, 5]),
        (&[1, 3, 4, 5], &[3, 1, 1]),
        (&[4, 1], &[1, 6]),
        (&[2, 4], &[]),
    ];
    for &(a_shape, b_shape) in cases {
        for b_const in [false, true] {
            check_binary(
                Binary::Mul,
                (a_shape, u(0.04, 130)),
                (b_shape, u(0.03, 90)),
                u(0.5, 110),
                b_const,
            );
            check_binary(
                Binary::Mul,
                (a_shape, i(0.02, 4)),
                (b_shape, i(0.05, -3)),
                i(0.25, -2),
                b_const,
            );
        }
    }
}

#[test]
fn qlinear_mul_of_a_tensor_with_itself() {
    // onnxruntime squares with QLinearMul(x, x) in LayerNorm/GroupNorm variance.
    let shape = [1, 2, 3, 3];
    let a = qp(Q::U8, 0.03, 128);
    let c = qp(Q::U8, 0.02, 0);
    let a_values = values(Q::U8, numel(&shape), 3);
    let mut g = Graph::default();
    g.input("A", Q::U8.onnx(), &shape)
        .f32_scalar("As", a.scale)
        .q_const("Az", Q::U8, &[], &[a.zero_point])
        .f32_scalar("Cs", c.scale)
        .q_const("Cz", Q::U8, &[], &[c.zero_point])
        .node(
            "QLinearMul",
            MS,
            &["A", "As", "Az", "A", "As", "Az", "Cs", "Cz"],
            "C",
            vec![],
        )
        .output("C", Q::U8.onnx());
    let got = g.run(vec![Q::U8.tensor(&shape, &a_values)]).unwrap();
    let expected: Vec<i32> = a_values
        .iter()
        .map(|&v| {
            let x = dequantize(v, a.scale, a.zero_point);
            Q::U8.quantize(x * x, c.scale, c.zero_point)
        })
        .collect();
    assert_within_one_step("QLinearMul(x, x)", &got, Q::U8, &shape, &expected);
}

#[test]
fn qlinear_add_without_zero_points() {
    // Absent optional inputs (empty names) shift the wired inputs: A_zero_point and
    // C_zero_point missing means zero points 0 and an output of A's type.
    for q in [Q::U8, Q::I8] {
        let shape = [2, 3, 4];
        let a_values = values(q, 24, 4);
        let b_values = values(q, 24, 5);
        let mut g = Graph::default();
        g.input("A", q.onnx(), &shape)
            .input("B", q.onnx(), &shape)
            .f32_scalar("As", 0.021)
            .f32_scalar("Bs", 0.033)
            .q_const("Bz", q, &[], &[3])
            .f32_scalar("Cs", 0.04)
            .node(
                "QLinearAdd",
                MS,
                &["A", "As", "", "B", "Bs", "Bz", "Cs"],
                "C",
                vec![],
            )
            .output("C", q.onnx());
        let got = g
            .run(vec![
                q.tensor(&shape, &a_values),
                q.tensor(&shape, &b_values),
            ])
            .unwrap();
        let expected: Vec<i32> = a_values
            .iter()
            .zip(&b_values)
            .map(|(&x, &y)| q.quantize(dequantize(x, 0.021, 0) + dequantize(y, 0.033, 3), 0.04, 0))
            .collect();
        assert_within_one_step(
            &format!("QLinearAdd {q:?} no zero points"),
            &got,
            q,
            &shape,
            &expected,
        );
    }
}

// ---------------------------------------------------------------------------------
// QLinearAveragePool / QLinearGlobalAveragePool

#[derive(Clone, Debug)]
struct Pool {
    kernel: [usize; 2],
    strides: [usize; 2],
    /// top, left, bottom, right (ONNX order: begins then ends).
    pads: [usize; 4],
    count_include_pad: bool,
    ceil_mode: bool,
}

fn pool_output_len(
    input: usize,
    kernel: usize,
    stride: usize,
    begin: usize,
    end: usize,
    ceil: bool,
) -> usize {
    let span = input + begin + end - kernel;
    if ceil {
        let mut out = span.div_ceil(stride) + 1;
        // The last window must start inside the input or the begin padding.
        if (out - 1) * stride >= input + begin {
            out -= 1;
        }
        out
    } else {
        span / stride + 1
    }
}

/// Reference average pool on NCHW data, ONNX semantics: with count_include_pad the
/// divisor counts padded positions but not the ceil_mode overhang.
fn average_pool_reference(x: &[f64], shape: [usize; 4], p: &Pool) -> (Vec<f64>, [usize; 4]) {
    let [n, c, h, w] = shape;
    let oh = pool_output_len(
        h,
        p.kernel[0],
        p.strides[0],
        p.pads[0],
        p.pads[2],
        p.ceil_mode,
    );
    let ow = pool_output_len(
        w,
        p.kernel[1],
        p.strides[1],
        p.pads[1],
        p.pads[3],
        p.ceil_mode,
    );
    let mut out = Vec::with_capacity(n * c * oh * ow);
    for plane in 0..n * c {
        let x = &x[plane * h * w..][..h * w];
        for i in 0..oh {
            for j in 0..ow {
                let h0 = (i * p.strides[0]) as isize - p.pads[0] as isize;
                let w0 = (j * p.strides[1]) as isize - p.pads[1] as isize;
                let h1 = (h0 + p.kernel[0] as isize).min((h + p.pads[2]) as isize);
                let w1 = (w0 + p.kernel[1] as isize).min((w + p.pads[3]) as isize);
                let padded_count = (h1 - h0) * (w1 - w0);
                let (hs, he) = (h0.max(0), h1.min(h as isize));
                let (ws, we) = (w0.max(0), w1.min(w as isize));
                let mut sum = 0.0;
                for y in hs..he {
                    for xx in ws..we {
                        sum += x[y as usize * w + xx as usize];
                    }
                }
                let count = if p.count_include_pad {
                    padded_count
                } else {
                    (he - hs) * (we - ws)
                };
                out.push(sum / count as f64);
            }
        }
    }
    (out, [n, c, oh, ow])
}

fn nchw_to_nhwc(x: &[i32], [n, c, h, w]: [usize; 4]) -> Vec<i32> {
    let mut out = vec![0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    out[((b * h + i) * w + j) * c + ch] = x[((b * c + ch) * h + i) * w + j];
                }
            }
        }
    }
    out
}

fn check_average_pool(q: Q, shape: [usize; 4], p: &Pool, channels_last: bool) {
    let what = format!("QLinearAveragePool {q:?} {shape:?} {p:?} channels_last {channels_last}");
    let (xs, xz, ys, yz) = match q {
        Q::U8 => (0.05, 120, 0.04, 125),
        Q::I8 => (0.03, -6, 0.025, 2),
    };
    let x_values = values(q, numel(&shape), 6);
    let x_real: Vec<f64> = x_values.iter().map(|&v| dequantize(v, xs, xz)).collect();
    let (pooled, out_shape) = average_pool_reference(&x_real, shape, p);
    let mut expected: Vec<i32> = pooled.iter().map(|&v| q.quantize(v, ys, yz)).collect();
    let (input_shape, input_values, out_shape) = if channels_last {
        let [n, c, h, w] = shape;
        let [_, _, oh, ow] = out_shape;
        expected = nchw_to_nhwc(&expected, out_shape);
        (
            vec![n, h, w, c],
            nchw_to_nhwc(&x_values, shape),
            vec![n, oh, ow, c],
        )
    } else {
        (shape.to_vec(), x_values, out_shape.to_vec())
    };
    let mut g = Graph::default();
    g.input("X", q.onnx(), &input_shape)
        .f32_scalar("xs", xs)
        .q_const("xz", q, &[], &[xz])
        .f32_scalar("ys", ys)
        .q_const("yz", q, &[], &[yz])
        .node(
            "QLinearAveragePool",
            MS,
            &["X", "xs", "xz", "ys", "yz"],
            "Y",
            vec![
                attr_ints("kernel_shape", &p.kernel.map(|v| v as i64)),
                attr_ints("strides", &p.strides.map(|v| v as i64)),
                attr_ints("pads", &p.pads.map(|v| v as i64)),
                attr_int("count_include_pad", p.count_include_pad as i64),
                attr_int("ceil_mode", p.ceil_mode as i64),
                attr_int("channels_last", channels_last as i64),
            ],
        )
        .output("Y", q.onnx());
    let got = g
        .run(vec![q.tensor(&input_shape, &input_values)])
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert_within_one_step(&what, &got, q, &out_shape, &expected);
}

#[test]
fn qlinear_average_pool_pads_strides_and_count_include_pad() {
    let pools = [
        // PoolFormer's token mixer: 3×3, stride 1, pad 1.
        Pool {
            kernel: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            count_include_pad: false,
            ceil_mode: false,
        },
        Pool {
            kernel: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            count_include_pad: true,
            ceil_mode: false,
        },
        Pool {
            kernel: [2, 2],
            strides: [2, 2],
            pads: [0, 0, 0, 0],
            count_include_pad: false,
            ceil_mode: false,
        },
        Pool {
            kernel: [3, 2],
            strides: [2, 1],
            pads: [1, 0, 0, 1],
            count_include_pad: true,
            ceil_mode: false,
        },
        Pool {
            kernel: [3, 3],
            strides: [2, 2],
            pads: [1, 1, 0, 0],
            count_include_pad: false,
            ceil_mode: true,
        },
    ];
    for p in &pools {
        for q in [Q::U8, Q::I8] {
            check_average_pool(q, [1, 3, 5, 6], p, false);
        }
    }
    check_average_pool(Q::U8, [2, 4, 5, 5], &pools[0], true);
    check_average_pool(Q::I8, [1, 3, 6, 5], &pools[3], true);
}

#[test]
fn qlinear_global_average_pool_nchw_and_nhwc() {
    for (q, channels_last) in [(Q::U8, false), (Q::I8, false), (Q::U8, true), (Q::I8, true)] {
        let (n, c, h, w) = (2, 3, 4, 5);
        let (xs, xz, ys, yz) = match q {
            Q::U8 => (0.05, 128, 0.01, 130),
            Q::I8 => (0.04, 3, 0.008, -1),
        };
        let x_values = values(q, n * c * h * w, 7);
        let expected: Vec<i32> = (0..n * c)
            .map(|plane| {
                let sum: f64 = x_values[plane * h * w..][..h * w]
                    .iter()
                    .map(|&v| dequantize(v, xs, xz))
                    .sum();
                q.quantize(sum / (h * w) as f64, ys, yz)
            })
            .collect();
        let (input_shape, input_values, out_shape) = if channels_last {
            (
                vec![n, h, w, c],
                nchw_to_nhwc(&x_values, [n, c, h, w]),
                vec![n, 1, 1, c],
            )
        } else {
            (vec![n, c, h, w], x_values, vec![n, c, 1, 1])
        };
        let mut g = Graph::default();
        g.input("X", q.onnx(), &input_shape)
            .f32_scalar("xs", xs)
            .q_const("xz", q, &[], &[xz])
            .f32_scalar("ys", ys)
            .q_const("yz", q, &[], &[yz])
            .node(
                "QLinearGlobalAveragePool",
                MS,
                &["X", "xs", "xz", "ys", "yz"],
                "Y",
                vec![attr_int("channels_last", channels_last as i64)],
            )
            .output("Y", q.onnx());
        let got = g.run(vec![q.tensor(&input_shape, &input_values)]).unwrap();
        // (n, c) order is the same in NCHW and NHWC outputs since the spatial dims are 1.
        let what = format!("QLinearGlobalAveragePool {q:?} channels_last {channels_last}");
        assert_within_one_step(&what, &got, q, &out_shape, &expected);
    }
}

// ---------------------------------------------------------------------------------
// QGemm

struct GemmCase {
    a: QParam,
    b: Q,
    b_scales: Vec<f32>,
    b_zero_points: Vec<i32>,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    bias: bool,
    y: Option<QParam>,
}

fn check_qgemm(case: &GemmCase) {
    let (m, k, n) = (3, 5, 4);
    let what = format!(
        "QGemm A {:?} B {:?} scales {:?} transA {} transB {} alpha {} bias {} y {:?}",
        case.a, case.b, case.b_scales, case.trans_a, case.trans_b, case.alpha, case.bias, case.y
    );
    let a_shape = if case.trans_a { [k, m] } else { [m, k] };
    let b_shape = if case.trans_b { [n, k] } else { [k, n] };
    let a_values = values(case.a.q, m * k, 8);
    let b_values = values(case.b, k * n, 9);
    let bias: Vec<i32> = (0..n as i32).map(|j| 700 * j - 900).collect();
    let a_at = |i: usize, l: usize| a_values[if case.trans_a { l * m + i } else { i * k + l }];
    let b_at = |l: usize, j: usize| b_values[if case.trans_b { j * k + l } else { l * n + j }];
    let per_col = |v: &[f32], j: usize| if v.len() == 1 { v[0] } else { v[j] };
    let expected_real: Vec<f64> = (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            let b_scale = per_col(&case.b_scales, j);
            let b_zp = if case.b_zero_points.len() == 1 {
                case.b_zero_points[0]
            } else {
                case.b_zero_points[j]
            };
            let mut acc: f64 = (0..k)
                .map(|l| {
                    dequantize(a_at(i, l), case.a.scale, case.a.zero_point)
                        * dequantize(b_at(l, j), b_scale, b_zp)
                })
                .sum();
            if case.bias {
                acc += bias[j] as f64 * case.a.scale as f64 * b_scale as f64;
            }
            acc * case.alpha as f64
        })
        .collect();

    let mut g = Graph::default();
    g.input("A", case.a.q.onnx(), &a_shape)
        .f32_scalar("as", case.a.scale)
        .q_const("az", case.a.q, &[], &[case.a.zero_point])
        .q_const("B", case.b, &b_shape, &b_values)
        .i32_const("C", &[n], &bias);
    if case.b_scales.len() == 1 {
        g.f32_scalar("bs", case.b_scales[0]);
    } else {
        g.f32_vec("bs", &case.b_scales);
    }
    let zp_dims: &[usize] = if case.b_zero_points.len() == 1 {
        &[]
    } else {
        &[n]
    };
    g.q_const("bz", case.b, zp_dims, &case.b_zero_points);
    let c = if case.bias { "C" } else { "" };
    let mut inputs = vec!["A", "as", "az", "B", "bs", "bz", c];
    if let Some(y) = case.y {
        g.f32_scalar("ys", y.scale)
            .q_const("yz", y.q, &[], &[y.zero_point]);
        inputs.extend(["ys", "yz"]);
    }
    let attrs = vec![
        attr_float("alpha", case.alpha),
        attr_int("transA", case.trans_a as i64),
        attr_int("transB", case.trans_b as i64),
    ];
    g.node("QGemm", MS, &inputs, "Y", attrs);
    g.output("Y", case.y.map(|y| y.q.onnx()).unwrap_or(DataType::Float));
    let got = g
        .run(vec![case.a.q.tensor(&a_shape, &a_values)])
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    match case.y {
        Some(y) => {
            let expected: Vec<i32> = expected_real
                .iter()
                .map(|&v| y.q.quantize(v, y.scale, y.zero_point))
                .collect();
            assert_within_one_step(&what, &got, y.q, &[m, n], &expected);
        }
        None => {
            assert_eq!(got.datum_type(), f32::datum_type(), "{what}");
            assert_eq!(got.shape(), &[m, n], "{what}");
            for (g, e) in as_f32(&got).iter().zip(&expected_real) {
                assert!(
                    (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{what}: tract {g}, reference {e}"
                );
            }
        }
    }
}

#[test]
fn qgemm_per_tensor_per_column_transposes_alpha_and_float_output() {
    // The head of onnxruntime's PoolFormer graph: u8, transB, bias, quantized output.
    check_qgemm(&GemmCase {
        a: qp(Q::U8, 0.02, 110),
        b: Q::U8,
        b_scales: vec![0.01],
        b_zero_points: vec![128],
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        bias: true,
        y: Some(qp(Q::U8, 0.15, 120)),
    });
    // i8 weights quantized per output column, transA, alpha, f32 output.
    check_qgemm(&GemmCase {
        a: qp(Q::I8, 0.03, -4),
        b: Q::I8,
        b_scales: vec![0.01, 0.02, 0.005, 0.04],
        b_zero_points: vec![0, 0, 0, 0],
        trans_a: true,
        trans_b: false,
        alpha: 0.5,
        bias: true,
        y: None,
    });
    // u8 activations, i8 weights, per-column zero points, no bias, i8 output.
    check_qgemm(&GemmCase {
        a: qp(Q::U8, 0.02, 128),
        b: Q::I8,
        b_scales: vec![0.01, 0.02, 0.005, 0.04],
        b_zero_points: vec![1, -2, 0, 3],
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        bias: false,
        y: Some(qp(Q::I8, 0.1, 0)),
    });
}

// ---------------------------------------------------------------------------------
// tract's native quantized ops as onnxruntime's quantizer uses them

/// QLinearConv, 3×3 (or 1×1), pad `pad`, stride `stride`, with per-tensor or
/// per-channel weights.
fn check_qlinear_conv(
    x: QParam,
    w: Q,
    w_scales: &[f32],
    w_zero_points: &[i32],
    kernel: usize,
    stride: usize,
    pad: usize,
) -> String {
    let (c_in, c_out, h, wd) = (3, 4, 6, 5);
    let y = qp(Q::U8, 0.08, 100);
    let what = format!("QLinearConv x {x:?} w {w:?} scales {w_scales:?} zps {w_zero_points:?} k{kernel} s{stride} p{pad}");
    let x_values = values(x.q, c_in * h * wd, 10);
    let w_values = values(w, c_out * c_in * kernel * kernel, 11);
    let bias: Vec<i32> = (0..c_out as i32).map(|o| 300 * o - 500).collect();
    let per = |v: &[f32], o: usize| if v.len() == 1 { v[0] } else { v[o] };
    let per_zp = |o: usize| {
        if w_zero_points.len() == 1 {
            w_zero_points[0]
        } else {
            w_zero_points[o]
        }
    };
    let oh = (h + 2 * pad - kernel) / stride + 1;
    let ow = (wd + 2 * pad - kernel) / stride + 1;
    let mut expected = Vec::new();
    for o in 0..c_out {
        let ws = per(w_scales, o);
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = bias[o] as f64 * x.scale as f64 * ws as f64;
                for c in 0..c_in {
                    for ki in 0..kernel {
                        for kj in 0..kernel {
                            let yy = (i * stride + ki) as isize - pad as isize;
                            let xx = (j * stride + kj) as isize - pad as isize;
                            if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
                                continue;
                            }
                            let xv = x_values[(c * h + yy as usize) * wd + xx as usize];
                            let wv = w_values[((o * c_in + c) * kernel + ki) * kernel + kj];
                            acc += dequantize(xv, x.scale, x.zero_point)
                                * dequantize(wv, ws, per_zp(o));
                        }
                    }
                }
                expected.push(y.q.quantize(acc, y.scale, y.zero_point));
            }
        }
    }
    let mut g = Graph::default();
    g.input("x", x.q.onnx(), &[1, c_in, h, wd])
        .f32_scalar("xs", x.scale)
        .q_const("xz", x.q, &[], &[x.zero_point])
        .q_const("w", w, &[c_out, c_in, kernel, kernel], &w_values)
        .f32_scalar("ys", y.scale)
        .q_const("yz", y.q, &[], &[y.zero_point])
        .i32_const("b", &[c_out], &bias);
    if w_scales.len() == 1 {
        g.f32_scalar("ws", w_scales[0]);
    } else {
        g.f32_vec("ws", w_scales);
    }
    let zp_dims: &[usize] = if w_zero_points.len() == 1 {
        &[]
    } else {
        &[c_out]
    };
    g.q_const("wz", w, zp_dims, w_zero_points);
    g.node(
        "QLinearConv",
        "",
        &["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
        "y",
        vec![
            attr_ints("kernel_shape", &[kernel as i64, kernel as i64]),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("pads", &[pad as i64; 4]),
        ],
    )
    .output("y", y.q.onnx());
    let (got, report) = g
        .run_with(vec![x.q.tensor(&[1, c_in, h, wd], &x_values)], true)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert_within_one_step(&what, &got, y.q, &[1, c_out, oh, ow], &expected);
    report
}

#[test]
fn qlinear_conv_per_tensor_and_per_channel() {
    let x = qp(Q::U8, 0.03, 120);
    let scales = [0.004, 0.01, 0.002, 0.007];
    // Where the conv runs on this crate's u8×i8 kernels (and so is checked there).
    let crate_kernels = |report: String| {
        let on = report.contains("int8 convolution on u8×i8 kernels");
        assert_eq!(
            on,
            poolformer_edge::passes::metaformer::FUSES_MLP,
            "{report}"
        );
    };
    // Per tensor, u8 weights (onnxruntime's default "all ops" variant).
    crate_kernels(check_qlinear_conv(x, Q::U8, &[0.005], &[128], 3, 1, 1));
    crate_kernels(check_qlinear_conv(x, Q::U8, &[0.005], &[128], 3, 2, 1));
    // One weight zero point that W − zp does not fit i8 for: the per-token correction
    // from the patches' column sums.
    crate_kernels(check_qlinear_conv(x, Q::U8, &[0.005], &[77], 3, 2, 1));
    crate_kernels(check_qlinear_conv(x, Q::U8, &[0.005], &[200], 1, 1, 0));
    crate_kernels(check_qlinear_conv(
        qp(Q::I8, 0.03, -3),
        Q::I8,
        &[0.005],
        &[9],
        3,
        1,
        1,
    ));
    // Per channel: i8 symmetric weights (zero points 0), as quantize_static per_channel.
    crate_kernels(check_qlinear_conv(
        x,
        Q::I8,
        &scales,
        &[0, 0, 0, 0],
        3,
        1,
        1,
    ));
    crate_kernels(check_qlinear_conv(
        x,
        Q::I8,
        &scales,
        &[0, 0, 0, 0],
        1,
        1,
        0,
    ));
    // Per channel with distinct zero points (tract's integer conv).
    check_qlinear_conv(x, Q::U8, &scales, &[120, 128, 131, 125], 3, 1, 1);
    check_qlinear_conv(qp(Q::I8, 0.03, -3), Q::I8, &scales, &[2, -1, 0, 4], 3, 2, 1);
}

#[test]
fn matmul_integer_matches_exact_integer_product() {
    let (m, k, n) = (3, 7, 5);
    for (a_q, b_q) in [(Q::U8, Q::U8), (Q::U8, Q::I8), (Q::I8, Q::I8)] {
        let a_values = values(a_q, m * k, 12);
        let b_values = values(b_q, k * n, 13);
        let (az, bz) = (
            match a_q {
                Q::U8 => 128,
                Q::I8 => -3,
            },
            match b_q {
                Q::U8 => 120,
                Q::I8 => 2,
            },
        );
        let mut g = Graph::default();
        g.input("A", a_q.onnx(), &[m, k])
            .q_const("B", b_q, &[k, n], &b_values)
            .q_const("az", a_q, &[], &[az])
            .q_const("bz", b_q, &[], &[bz])
            .node("MatMulInteger", "", &["A", "B", "az", "bz"], "Y", vec![])
            .output("Y", DataType::Int32);
        let got = g.run(vec![a_q.tensor(&[m, k], &a_values)]).unwrap();
        let expected: Vec<i32> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k)
                    .map(|l| (a_values[i * k + l] - az) * (b_values[l * n + j] - bz))
                    .sum()
            })
            .collect();
        assert_eq!(got.datum_type(), i32::datum_type());
        assert_eq!(as_i32(&got), expected, "MatMulInteger {a_q:?} x {b_q:?}");
    }
}

// ---------------------------------------------------------------------------------
// Bad input: errors that name the node, never panics

/// Loads and optimizes; the error chain as one string, or None when it loaded.
fn load_error(g: &Graph) -> Option<String> {
    let bytes = g.encode();
    let result = std::panic::catch_unwind(|| {
        loader()
            .model_for_read(&mut &bytes[..])
            .and_then(|m| m.into_optimized())
            .map(|_| ())
    })
    .expect("loading panicked");
    result.err().map(|e| format!("{e:?}"))
}

fn add_graph(scale_as_input: bool) -> Graph {
    let mut g = Graph::default();
    g.input("A", DataType::Uint8, &[1, 4])
        .input("B", DataType::Uint8, &[1, 4])
        .q_const("Az", Q::U8, &[], &[128])
        .f32_scalar("Bs", 0.1)
        .q_const("Bz", Q::U8, &[], &[128])
        .f32_scalar("Cs", 0.2)
        .q_const("Cz", Q::U8, &[], &[128])
        .node(
            "QLinearAdd",
            MS,
            &["A", "As", "Az", "B", "Bs", "Bz", "Cs", "Cz"],
            "C",
            vec![],
        )
        .output("C", DataType::Uint8);
    if scale_as_input {
        g.input("As", DataType::Float, &[]);
    } else {
        g.f32_scalar("As", 0.1);
    }
    g
}

fn pool_graph(attributes: Vec<AttributeProto>) -> Graph {
    let mut g = Graph::default();
    g.input("X", DataType::Uint8, &[1, 2, 4, 4])
        .f32_scalar("xs", 0.1)
        .q_const("xz", Q::U8, &[], &[128])
        .f32_scalar("ys", 0.1)
        .q_const("yz", Q::U8, &[], &[128])
        .node(
            "QLinearAveragePool",
            MS,
            &["X", "xs", "xz", "ys", "yz"],
            "Y",
            attributes,
        )
        .output("Y", DataType::Uint8);
    g
}

#[test]
fn bad_qoperator_nodes_give_errors_not_panics() {
    assert_eq!(
        load_error(&add_graph(false)),
        None,
        "the well-formed QLinearAdd must load"
    );

    let err = load_error(&add_graph(true)).expect("a non-constant scale must be rejected");
    assert!(
        err.contains("QLinearAdd") && err.contains("must be a constant"),
        "{err}"
    );

    let mut zero_scale = add_graph(false);
    zero_scale.initializers.retain(|t| t.name != "Cs");
    zero_scale.f32_scalar("Cs", 0.0);
    let err = load_error(&zero_scale).expect("a zero output scale must be rejected");
    assert!(err.contains("C scale must be finite and positive"), "{err}");

    let mut missing_b = add_graph(false);
    missing_b.nodes[0].input[3] = String::new();
    let err = load_error(&missing_b).expect("a missing B must be rejected");
    assert!(err.contains("required input #3"), "{err}");

    let good = || {
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("pads", &[1, 1, 1, 1]),
        ]
    };
    assert_eq!(
        load_error(&pool_graph(good())),
        None,
        "the well-formed pool must load"
    );
    for (attribute, expected) in [
        (attr_int("channels_last", 2), "channels_last = 2"),
        (attr_int("count_include_pad", 3), "count_include_pad = 3"),
        (attr_int("ceil_mode", -1), "ceil_mode = -1"),
        (attr_ints("strides", &[1, 1, 1]), "strides"),
    ] {
        let mut attributes = good();
        attributes.push(attribute);
        let err =
            load_error(&pool_graph(attributes)).unwrap_or_else(|| panic!("{expected}: loaded"));
        assert!(
            err.contains("QLinearAveragePool_under_test") && err.contains(expected),
            "{err}"
        );
    }
    let mut rank2 = Graph::default();
    rank2
        .input("X", DataType::Uint8, &[2, 3])
        .f32_scalar("xs", 0.1)
        .q_const("xz", Q::U8, &[], &[128])
        .f32_scalar("ys", 0.1)
        .q_const("yz", Q::U8, &[], &[128])
        .node(
            "QLinearGlobalAveragePool",
            MS,
            &["X", "xs", "xz", "ys", "yz"],
            "Y",
            vec![attr_int("channels_last", 1)],
        )
        .output("Y", DataType::Uint8);
    let err = load_error(&rank2).expect("a rank-2 input must be rejected");
    assert!(err.contains("at least 3 expected"), "{err}");

    let err =
        load_error(&pool_graph(vec![])).expect("a pool without kernel_shape must be rejected");
    assert!(err.contains("kernel_shape is required"), "{err}");

    // tract's QLinearConv, its parameters checked as it is read (`src/onnx/qdq.rs`):
    // a per-channel weight scale of 0, an i32 output zero point, a u8 zero point for
    // i8 weights.
    let conv = |w_scales: &[f32], yz_i32: bool, wz: Q, wz_len: usize| {
        let m = w_scales.len();
        let w: Vec<i32> = (0..2 * m).map(|i| (i % 7) as i32 - 3).collect();
        let mut g = Graph::default();
        g.input("x", DataType::Uint8, &[1, 2, 4, 4])
            .f32_scalar("xs", 0.1)
            .q_const("xz", Q::U8, &[], &[128])
            .q_const("w", Q::I8, &[m, 2, 1, 1], &w)
            .f32_vec("ws", w_scales)
            .q_const("wz", wz, &[wz_len], &vec![0; wz_len])
            .f32_scalar("ys", 0.2);
        if yz_i32 {
            g.i32_const("yz", &[], &[128]);
        } else {
            g.q_const("yz", Q::U8, &[], &[128]);
        }
        g.node(
            "QLinearConv",
            "",
            &["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
            "y",
            vec![],
        )
        .output("y", DataType::Uint8);
        g
    };
    // Per-channel weight scales with one weight zero point, as the operator allows.
    for wz_len in [3, 1] {
        assert_eq!(
            load_error(&conv(&[0.1, 0.2, 0.3], false, Q::I8, wz_len)),
            None
        );
    }
    // 1024 per-channel scales (4 KiB) are external data when the file is read from a
    // path (`onnx::load`); a zero among them is found there too.
    let mut wide = vec![0.01f32; 1024];
    wide[1000] = 0.0;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), conv(&wide, false, Q::I8, 1024).encode()).unwrap();
    let err = poolformer_edge::onnx::load::model_for_path(&loader(), file.path())
        .map(|_| ())
        .expect_err("a zero scale in external data must be rejected");
    assert!(
        format!("{err:#}").contains("scale \"ws\" must be finite and positive, element 1000 is 0"),
        "{err:#}"
    );
    for (g, expected) in [
        (
            conv(&[0.1, 0.2, 0.0], false, Q::I8, 3),
            "scale \"ws\" must be finite and positive, element 2 is 0",
        ),
        (
            conv(&[0.1, 0.2, 0.3], true, Q::I8, 3),
            "zero point \"yz\" is INT32, expected UINT8, INT8",
        ),
        (
            conv(&[0.1, 0.2, 0.3], false, Q::U8, 3),
            "input \"w\" is INT8 but its zero point \"wz\" is UINT8",
        ),
        (
            conv(&[0.1, 0.2, 0.3], false, Q::I8, 2),
            "3 scales and 2 zero points",
        ),
    ] {
        let err = load_error(&g).unwrap_or_else(|| panic!("{expected}: loaded"));
        assert!(
            err.contains("QLinearConv") && err.contains(expected),
            "{err}"
        );
    }
}

/// onnxruntime's Conv-only QOperator form of a PoolFormer channel-MLP half (the layer
/// scale folded into fc2, GELU spelled out as the dynamo exporter writes it):
///
/// ```text
/// n = GroupNorm₁(x)·γ + β → QuantizeLinear → QLinearConv fc1 (per-channel i8, i32 bias)
///   → DequantizeLinear → gelu → QuantizeLinear → QLinearConv fc2 → DequantizeLinear → + x
/// ```
///
/// With the passes it becomes one `PfeQuantChannelMlp`; without them tract runs it op by
/// op. Six channels (not a multiple of the kernel's 4-channel groups), 7×7 tokens. The
/// two may differ where a value lies within f32 rounding of a quantization boundary:
/// one step of a u8 activation (Q₁, fc1's output, Q₂) moves an fc2 output by at most
/// `Σ|w₂|·(one step)` — here a few steps of fc2's output grid. Bound: every output
/// within 4 steps of fc2's output grid, and at most 2% of them off by more than one
/// (measured: all equal; a one-step error in fc1's requantization breaks the bound).
#[test]
fn qoperator_channel_mlp_is_fused_and_agrees() {
    let (c, h, side) = (6usize, 24usize, 7usize);
    let hw = side * side;
    let mut g = Graph::default();
    let rng = |n: usize, seed: u64| values(Q::I8, n, seed);
    let w1 = rng(h * c, 31);
    let w2 = rng(c * h, 32);
    let b1: Vec<i32> = (0..h as i32).map(|i| 40 * i - 400).collect();
    let b2: Vec<i32> = (0..c as i32).map(|i| 90 * i - 200).collect();
    let ws1: Vec<f32> = (0..h).map(|i| 0.004 + 0.0002 * i as f32).collect();
    let ws2: Vec<f32> = (0..c).map(|i| 0.003 + 0.0003 * i as f32).collect();
    let gamma: Vec<f32> = (0..c).map(|i| 0.8 + 0.1 * i as f32).collect();
    let beta: Vec<f32> = (0..c).map(|i| 0.05 * i as f32 - 0.1).collect();
    let y_scale = 0.004f32;
    let chan = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    g.input("x", DataType::Float, &[1, c, side, side])
        .init(
            "axes",
            DataType::Int64,
            &[3],
            [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .f32_scalar("eps", 1e-5)
        .init("gamma", DataType::Float, &[c, 1, 1], chan(&gamma))
        .init("beta", DataType::Float, &[c, 1, 1], chan(&beta))
        .f32_scalar("s1", 0.03)
        .q_const("z1", Q::U8, &[], &[128])
        .q_const("w1", Q::I8, &[h, c, 1, 1], &w1)
        .f32_vec("ws1", &ws1)
        .q_const("wz1", Q::I8, &[h], &vec![0; h])
        .f32_scalar("sh", 0.02)
        .q_const("zh", Q::U8, &[], &[120])
        .i32_const("b1", &[h], &b1)
        .f32_scalar("inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2)
        .f32_scalar("one", 1.0)
        .f32_scalar("half", 0.5)
        .f32_scalar("s2", 0.015)
        .q_const("z2", Q::U8, &[], &[30])
        .q_const("w2", Q::I8, &[c, h, 1, 1], &w2)
        .f32_vec("ws2", &ws2)
        .q_const("wz2", Q::I8, &[c], &vec![0; c])
        .f32_scalar("sy", y_scale)
        .q_const("zy", Q::U8, &[], &[131])
        .i32_const("b2", &[c], &b2);
    g.node(
        "ReduceMean",
        "",
        &["x"],
        "mean",
        vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)],
    )
    .node("Sub", "", &["x", "mean"], "centered", vec![])
    .node("Mul", "", &["centered", "centered"], "sq", vec![])
    .node(
        "ReduceMean",
        "",
        &["sq"],
        "var",
        vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)],
    )
    .node("Add", "", &["var", "eps"], "var_eps", vec![])
    .node("Sqrt", "", &["var_eps"], "std", vec![])
    .node("Div", "", &["centered", "std"], "normalized", vec![])
    .node("Mul", "", &["normalized", "gamma"], "scaled", vec![])
    .node("Add", "", &["scaled", "beta"], "n", vec![])
    .node("QuantizeLinear", "", &["n", "s1", "z1"], "n_q", vec![])
    .node(
        "QLinearConv",
        "",
        &["n_q", "s1", "z1", "w1", "ws1", "wz1", "sh", "zh", "b1"],
        "h_q",
        vec![],
    )
    .node("DequantizeLinear", "", &["h_q", "sh", "zh"], "hid", vec![])
    .node("Mul", "", &["hid", "inv_sqrt2"], "hid_scaled", vec![])
    .node("Erf", "", &["hid_scaled"], "erf", vec![])
    .node("Add", "", &["erf", "one"], "erf1", vec![])
    .node("Mul", "", &["erf1", "half"], "erf_half", vec![])
    .node("Mul", "", &["hid", "erf_half"], "gelu", vec![])
    .node("QuantizeLinear", "", &["gelu", "s2", "z2"], "g_q", vec![])
    .node(
        "QLinearConv",
        "",
        &["g_q", "s2", "z2", "w2", "ws2", "wz2", "sy", "zy", "b2"],
        "y_q",
        vec![],
    )
    .node(
        "DequantizeLinear",
        "",
        &["y_q", "sy", "zy"],
        "branch",
        vec![],
    )
    .node("Add", "", &["x", "branch"], "y", vec![])
    .output("y", DataType::Float);
    let x: Vec<f32> = (0..c * hw)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 2.0 + (i / hw) as f32 * 0.1)
        .collect();
    let input = || vec![Tensor::from_shape(&[1, c, side, side], &x).unwrap()];
    let (fused, report) = g.run_with(input(), true).unwrap();
    let (plain, _) = g.run_with(input(), false).unwrap();
    if poolformer_edge::passes::metaformer::FUSES_MLP {
        assert!(report.contains("int8 channel MLP"), "not fused: {report}");
    }
    let (fused, plain) = (as_f32(&fused), as_f32(&plain));
    let steps: Vec<f64> = fused
        .iter()
        .zip(&plain)
        .map(|(a, b)| ((a - b) as f64 / y_scale as f64).abs())
        .collect();
    let worst = steps.iter().cloned().fold(0.0, f64::max);
    let off = steps.iter().filter(|&&s| s > 1.01).count();
    assert!(worst <= 4.01, "fused vs unfused: {worst} steps");
    assert!(
        off * 50 <= steps.len(),
        "{off} of {} outputs off by more than a step",
        steps.len()
    );
    // The branch is not trivially zero: the MLP moved x by many steps.
    let moved = fused
        .iter()
        .zip(&x)
        .filter(|(a, b)| ((*a - *b) / y_scale).abs() > 3.0)
        .count();
    assert!(moved * 2 > x.len(), "the MLP branch barely changes x");
}
