//! The int8 pass (`src/passes/int8.rs`) on tiny QDQ graphs written here as ONNX.
//!
//! Each graph is `x → QuantizeLinear → DequantizeLinear → Conv(DequantizeLinear(W_q),
//! DequantizeLinear(b_q)) [→ QuantizeLinear → DequantizeLinear]`, the form
//! onnxruntime's `quantize_static` writes. Each is run three ways: with the pass
//! (`fuse: true`), with tract alone (`fuse: false`, fake quantization in f32) and
//! with a plain f64 reference in this file (quantize x, dequantize, float conv,
//! quantize y). The bound: a requantized output is within one output quantization
//! step of both; a float output within 1e-4 relative of the largest value.
//! Also checked: the rewrite happened (report, `Requant` nodes, `PfeQuantConv` or
//! integer `OptMatMul` kernels), and the requant loops against a scalar reference.

mod common;

use common::onnx::{attr_int, attr_ints};
use poolformer_edge::kernels::quant::{self as kq, Grid};
use poolformer_edge::{Engine, Options};
use prost::Message;
use tract_core::ops::einsum::EinSum;
use tract_onnx::pb::{
    tensor_proto::DataType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
    ValueInfoProto,
};
use tract_onnx::prelude::*;

// ---------- deterministic data ----------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

// ---------- the graph ----------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Act {
    U8,
    I8,
}

#[derive(Clone, Debug)]
struct ConvCase {
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    group: usize,
    per_channel: bool,
    act: Act,
    /// Trailing QuantizeLinear → DequantizeLinear on the conv output, of this type.
    out_q: Option<Act>,
    /// The weights' zero point (every channel's).
    w_zp: i8,
    seed: u64,
}

impl ConvCase {
    fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
}

/// Quantization parameters of a tensor: (scale, zero point).
#[derive(Clone, Copy, Debug)]
struct QParams {
    scale: f32,
    zp: i32,
    act: Act,
}

impl QParams {
    fn range(&self) -> (i32, i32) {
        match self.act {
            Act::U8 => (0, 255),
            Act::I8 => (-128, 127),
        }
    }
    /// QuantizeLinear as tract computes it: round-half-even(x · (1/scale)) + zp, clamped.
    fn quantize(&self, x: f64) -> i32 {
        let v = (x as f32 * self.scale.recip()).round_ties_even() as i32 + self.zp;
        let (lo, hi) = self.range();
        v.clamp(lo, hi)
    }
    fn dequantize(&self, q: i32) -> f64 {
        ((q - self.zp) as f32 * self.scale) as f64
    }
    /// Parameters covering [lo, hi].
    fn covering(lo: f64, hi: f64, act: Act) -> QParams {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = ((hi - lo) / 255.0).max(1e-6) as f32;
        let qmin = if act == Act::U8 { 0 } else { -128 };
        let zp = (qmin as f64 - lo / scale as f64).round() as i32;
        QParams {
            scale,
            zp: zp.clamp(qmin, qmin + 255),
            act,
        }
    }
}

struct Built {
    onnx: Vec<u8>,
    input: Vec<f32>,
    /// The f64 reference output.
    reference: Vec<f64>,
    /// The output quantization step, if the output is quantized.
    out_step: Option<f64>,
}

fn tensor(name: &str, dims: &[usize], dt: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: dt as i32,
        raw_data: raw,
        ..Default::default()
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn zp_tensor(name: &str, dims: &[usize], act: Act, zps: &[i32]) -> TensorProto {
    match act {
        Act::U8 => tensor(
            name,
            dims,
            DataType::Uint8,
            zps.iter().map(|&z| z as u8).collect(),
        ),
        Act::I8 => tensor(
            name,
            dims,
            DataType::Int8,
            zps.iter().map(|&z| z as i8 as u8).collect(),
        ),
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: output.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    common::onnx::value_info(name, DataType::Float, Some(dims))
}

/// Q → DQ of `x` with `q` (scale and zero point initializers named after `x`).
fn qdq(nodes: &mut Vec<NodeProto>, inits: &mut Vec<TensorProto>, x: &str, q: QParams) -> String {
    inits.push(tensor(
        &format!("{x}_scale"),
        &[],
        DataType::Float,
        f32s(&[q.scale]),
    ));
    inits.push(zp_tensor(&format!("{x}_zp"), &[], q.act, &[q.zp]));
    let (s, z) = (format!("{x}_scale"), format!("{x}_zp"));
    nodes.push(node(
        "QuantizeLinear",
        &[x, &s, &z],
        &format!("{x}_q"),
        vec![],
    ));
    nodes.push(node(
        "DequantizeLinear",
        &[&format!("{x}_q"), &s, &z],
        &format!("{x}_dq"),
        vec![],
    ));
    format!("{x}_dq")
}

/// Quantized conv weights and bias, the conv node, and its f64 reference.
struct QConv {
    w_q: Vec<i8>,
    w_scale: Vec<f32>,
    b_q: Vec<i32>,
    w_zp: i8,
}

fn make_qconv(case: &ConvCase, rng: &mut Rng) -> QConv {
    let cg = case.c / case.group;
    let n = case.o * cg * case.k * case.k;
    let w_q = (0..n).map(|_| rng.int(-127, 127) as i8).collect();
    let w_scale: Vec<f32> = if case.per_channel {
        (0..case.o)
            .map(|_| rng.uniform(0.002, 0.02) as f32)
            .collect()
    } else {
        vec![rng.uniform(0.002, 0.02) as f32]
    };
    let b_q = (0..case.o).map(|_| rng.int(-3000, 3000) as i32).collect();
    QConv {
        w_q,
        w_scale,
        b_q,
        w_zp: case.w_zp,
    }
}

impl QConv {
    fn sw(&self, o: usize) -> f32 {
        self.w_scale[if self.w_scale.len() == 1 { 0 } else { o }]
    }

    /// Adds the weight / bias initializers with their DequantizeLinear and the Conv.
    fn wire(
        &self,
        nodes: &mut Vec<NodeProto>,
        inits: &mut Vec<TensorProto>,
        case: &ConvCase,
        name: &str,
        x: &str,
        sx: f32,
    ) -> String {
        let cg = case.c / case.group;
        let wdims = [case.o, cg, case.k, case.k];
        let sdims: Vec<usize> = if case.per_channel {
            vec![case.o]
        } else {
            vec![]
        };
        inits.push(tensor(
            &format!("{name}.w_q"),
            &wdims,
            DataType::Int8,
            self.w_q.iter().map(|&v| v as u8).collect(),
        ));
        inits.push(tensor(
            &format!("{name}.w_scale"),
            &sdims,
            DataType::Float,
            f32s(&self.w_scale),
        ));
        inits.push(tensor(
            &format!("{name}.w_zp"),
            &sdims,
            DataType::Int8,
            vec![self.w_zp as u8; self.w_scale.len()],
        ));
        let b_scale: Vec<f32> = (0..case.o).map(|o| sx * self.sw(o)).collect();
        inits.push(tensor(
            &format!("{name}.b_q"),
            &[case.o],
            DataType::Int32,
            self.b_q.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        inits.push(tensor(
            &format!("{name}.b_scale"),
            &[case.o],
            DataType::Float,
            f32s(&b_scale),
        ));
        inits.push(tensor(
            &format!("{name}.b_zp"),
            &[case.o],
            DataType::Int32,
            vec![0; 4 * case.o],
        ));
        let axis0 = vec![attr_int("axis", 0)];
        nodes.push(node(
            "DequantizeLinear",
            &[
                &format!("{name}.w_q"),
                &format!("{name}.w_scale"),
                &format!("{name}.w_zp"),
            ],
            &format!("{name}.w"),
            axis0.clone(),
        ));
        nodes.push(node(
            "DequantizeLinear",
            &[
                &format!("{name}.b_q"),
                &format!("{name}.b_scale"),
                &format!("{name}.b_zp"),
            ],
            &format!("{name}.b"),
            axis0,
        ));
        let p = case.pad as i64;
        let s = case.stride as i64;
        nodes.push(node(
            "Conv",
            &[x, &format!("{name}.w"), &format!("{name}.b")],
            name,
            vec![
                attr_ints("kernel_shape", &[case.k as i64, case.k as i64]),
                attr_ints("pads", &[p, p, p, p]),
                attr_ints("strides", &[s, s]),
                attr_int("group", case.group as i64),
            ],
        ));
        name.to_string()
    }

    /// Float conv in f64 of the dequantized input `x` ([C, H, W]).
    fn reference(&self, case: &ConvCase, sx: f32, x: &[f64]) -> Vec<f64> {
        let (oh, ow) = case.out_hw();
        let cg = case.c / case.group;
        let og = case.o / case.group;
        let mut y = vec![0.0; case.o * oh * ow];
        for o in 0..case.o {
            let g = o / og;
            let sw = self.sw(o) as f64;
            let bias = (self.b_q[o] as f32 * (sx * self.sw(o))) as f64;
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = bias;
                    for ci in 0..cg {
                        let c = g * cg + ci;
                        for ki in 0..case.k {
                            for kj in 0..case.k {
                                let yy = (i * case.stride + ki) as isize - case.pad as isize;
                                let xx = (j * case.stride + kj) as isize - case.pad as isize;
                                if yy < 0
                                    || xx < 0
                                    || yy >= case.h as isize
                                    || xx >= case.w as isize
                                {
                                    continue;
                                }
                                let xv = x[(c * case.h + yy as usize) * case.w + xx as usize];
                                let wq = self.w_q[((o * cg + ci) * case.k + ki) * case.k + kj];
                                let wv = (wq as i32 - self.w_zp as i32) as f64 * sw;
                                acc += xv * wv;
                            }
                        }
                    }
                    y[(o * oh + i) * ow + j] = acc;
                }
            }
        }
        y
    }
}

fn x_params(act: Act) -> QParams {
    match act {
        Act::U8 => QParams {
            scale: 4.5 / 255.0,
            zp: 120,
            act,
        },
        Act::I8 => QParams {
            scale: 4.5 / 255.0,
            zp: -8,
            act,
        },
    }
}

/// Builds `case` as a one-conv QDQ graph (input `x` [1, C, H, W], output `y`).
fn build_conv(case: &ConvCase) -> Built {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ case.seed);
    let xq = x_params(case.act);
    let input: Vec<f32> = (0..case.c * case.h * case.w)
        .map(|_| rng.uniform(-2.3, 2.3) as f32)
        .collect();
    let x_deq: Vec<f64> = input
        .iter()
        .map(|&v| xq.dequantize(xq.quantize(v as f64)))
        .collect();
    let conv = make_qconv(case, &mut rng);
    let y = conv.reference(case, xq.scale, &x_deq);

    let mut nodes = vec![];
    let mut inits = vec![];
    let x = qdq(&mut nodes, &mut inits, "x", xq);
    let mut out = conv.wire(&mut nodes, &mut inits, case, "conv", &x, xq.scale);
    let (reference, out_step) = if let Some(act) = case.out_q {
        let lo = y.iter().cloned().fold(f64::MAX, f64::min);
        let hi = y.iter().cloned().fold(f64::MIN, f64::max);
        // Slightly narrower than the data so that clamping is exercised too.
        let yq = QParams::covering(lo * 0.9, hi * 0.9, act);
        out = qdq(&mut nodes, &mut inits, &out, yq);
        (
            y.iter().map(|&v| yq.dequantize(yq.quantize(v))).collect(),
            Some(yq.scale as f64),
        )
    } else {
        (y, None)
    };
    nodes.push(node("Identity", &[&out], "y", vec![]));
    let (oh, ow) = case.out_hw();
    let onnx = model_bytes(
        nodes,
        inits,
        value_info("x", &[1, case.c, case.h, case.w]),
        value_info("y", &[1, case.o, oh, ow]),
    );
    Built {
        onnx,
        input,
        reference,
        out_step,
    }
}

fn model_bytes(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    input: ValueInfoProto,
    output: ValueInfoProto,
) -> Vec<u8> {
    common::onnx::model("qdq", nodes, inits, vec![input], vec![output])
}

// ---------- running ----------

struct Ran {
    output: Vec<f32>,
    report: Vec<String>,
    model: TypedModel,
}

/// The ONNX graph `onnx` typed with input `shape`, before any pass.
fn typed(onnx: &[u8], shape: &[usize]) -> TractResult<TypedModel> {
    poolformer_edge::onnx::loader()
        .model_for_read(&mut &onnx[..])?
        .with_input_fact(0, f32::fact(shape).into())?
        .into_typed()
}

fn run(onnx: &[u8], shape: &[usize], input: &[f32], fuse: bool) -> TractResult<Ran> {
    let (model, report) = poolformer_edge::passes::optimize(typed(onnx, shape)?, fuse)?;
    let plan = model.clone().into_runnable()?;
    let x = Tensor::from_shape(shape, input)?;
    let out = plan.run(tvec!(x.into_tvalue()))?;
    Ok(Ran {
        output: out[0]
            .to_plain_array_view::<f32>()?
            .iter()
            .copied()
            .collect(),
        report: report.rewrites,
        model,
    })
}

fn op_names(model: &TypedModel) -> Vec<String> {
    model
        .nodes()
        .iter()
        .map(|n| n.op().name().to_string())
        .collect()
}

/// Largest |a − b|.
fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
}

/// Runs `case` fused, unfused and against the reference; asserts the bound and
/// that the pass produced an integer conv.
fn check_conv(case: ConvCase) {
    let built = build_conv(&case);
    let shape = [1, case.c, case.h, case.w];
    let fused = run(&built.onnx, &shape, &built.input, true).unwrap();
    let unfused = run(&built.onnx, &shape, &built.input, false).unwrap();
    let unfused64: Vec<f64> = unfused.output.iter().map(|&v| v as f64).collect();
    let (d_ref, d_unfused) = (
        max_diff(&fused.output, &built.reference),
        max_diff(&fused.output, &unfused64),
    );
    let bound = match built.out_step {
        // One output quantization step (plus f32 noise on the dequantized value).
        Some(step) => step * 1.001,
        None => 1e-4 * built.reference.iter().fold(0.0f64, |m, v| m.max(v.abs())),
    };
    assert!(
        d_ref <= bound && d_unfused <= bound,
        "{case:?}: fused vs reference {d_ref}, vs unfused {d_unfused}, bound {bound}"
    );
    // Most values agree exactly when requantized (the bound is for rounding ties).
    if let Some(step) = built.out_step {
        let off = fused
            .output
            .iter()
            .zip(&built.reference)
            .filter(|(&a, &b)| (a as f64 - b).abs() > step * 0.5)
            .count();
        assert!(
            off * 100 <= fused.output.len(),
            "{case:?}: {off} of {} values one step off",
            fused.output.len()
        );
    }
    assert!(
        fused
            .report
            .iter()
            .any(|r| r.starts_with("int8 conv/matmul ×1 ")),
        "{case:?}: report {:?}",
        fused.report
    );
    let ops = op_names(&fused.model);
    assert!(ops.iter().any(|o| o == "Requant"), "{case:?}: ops {ops:?}");
    assert!(
        !ops.iter()
            .any(|o| o == "DequantizeLinearF32" || o == "QuantizeLinearU8"),
        "{case:?}: ops {ops:?}"
    );
    // Dense convs run on this crate's u8×i8 kernels where the MLP fusion runs;
    // grouped ones stay on tract's integer matmul.
    if case.group == 1 && poolformer_edge::passes::metaformer::FUSES_MLP {
        assert!(
            ops.iter().any(|o| o == "PfeQuantConv"),
            "{case:?}: ops {ops:?}"
        );
    }
    for n in fused.model.nodes() {
        if n.op().name() == "OptMatMul" {
            let info = n.op().info().unwrap().join(" ");
            assert!(info.contains("i32"), "{case:?}: float matmul left: {info}");
        }
    }
    assert!(unfused.report.is_empty());
}

fn case(k: usize, stride: usize, pad: usize) -> ConvCase {
    ConvCase {
        c: 16,
        o: 24,
        h: 9,
        w: 11,
        k,
        stride,
        pad,
        group: 1,
        per_channel: true,
        act: Act::U8,
        out_q: Some(Act::U8),
        w_zp: 0,
        seed: 1,
    }
}

// ---------- conv cases ----------

#[test]
fn pointwise_per_channel_u8() {
    check_conv(case(1, 1, 0));
}

#[test]
fn pointwise_per_tensor_s8_to_float() {
    check_conv(ConvCase {
        per_channel: false,
        act: Act::I8,
        out_q: None,
        seed: 2,
        ..case(1, 1, 0)
    });
}

#[test]
fn pointwise_per_channel_s8_to_s8() {
    check_conv(ConvCase {
        act: Act::I8,
        out_q: Some(Act::I8),
        seed: 3,
        ..case(1, 1, 0)
    });
}

#[test]
fn pointwise_per_channel_u8_to_float() {
    check_conv(ConvCase {
        out_q: None,
        seed: 4,
        ..case(1, 1, 0)
    });
}

#[test]
fn k3_padded_strided_per_channel() {
    check_conv(ConvCase {
        seed: 5,
        ..case(3, 2, 1)
    });
}

#[test]
fn k3_padded_per_tensor_s8() {
    check_conv(ConvCase {
        per_channel: false,
        act: Act::I8,
        seed: 6,
        ..case(3, 1, 1)
    });
}

#[test]
fn k3_strided_weight_zero_point_odd_channels() {
    // A weight zero point: each token's correction sums its patch column, padding
    // taps and the channels that round 5 up to 8 included.
    check_conv(ConvCase {
        c: 5,
        per_channel: false,
        act: Act::I8,
        w_zp: 3,
        seed: 12,
        ..case(3, 2, 1)
    });
}

#[test]
fn k7_stride4_like_the_stem() {
    check_conv(ConvCase {
        c: 3,
        o: 16,
        h: 19,
        w: 23,
        seed: 7,
        ..case(7, 4, 2)
    });
}

#[test]
fn k7_window_wider_than_the_input() {
    // Every window overhangs both sides of the 4×5 input: padding on the left and
    // the right of the same patch row.
    check_conv(ConvCase {
        c: 5,
        o: 8,
        h: 4,
        w: 5,
        seed: 10,
        ..case(7, 1, 3)
    });
}

#[test]
fn depthwise_and_grouped() {
    check_conv(ConvCase {
        c: 16,
        o: 16,
        group: 16,
        seed: 8,
        ..case(3, 1, 1)
    });
    check_conv(ConvCase {
        c: 16,
        o: 24,
        group: 4,
        out_q: None,
        seed: 9,
        ..case(3, 1, 1)
    });
}

#[test]
fn grouped_pointwise() {
    check_conv(ConvCase {
        group: 4,
        seed: 12,
        ..case(1, 1, 0)
    });
}

/// The int8 pass wires a dense 1×1 conv as the integer `EinSum` tract's declutter
/// would make of it, its weights already `[O, I]` (no axis ops left for the
/// declutter to fold on the weights); convs with a window stay convs.
#[test]
fn pointwise_int_conv_is_wired_as_an_einsum() {
    for (case, einsum) in [
        (case(1, 1, 0), true),
        (
            ConvCase {
                act: Act::I8,
                out_q: None,
                ..case(1, 1, 0)
            },
            true,
        ),
        (case(3, 1, 1), false),
    ] {
        let built = build_conv(&case);
        let mut model = typed(&built.onnx, &[1, case.c, case.h, case.w]).unwrap();
        let mut report = poolformer_edge::passes::PassReport::default();
        poolformer_edge::passes::int8::rewrite(&mut model, &mut report).unwrap();
        model.compact().unwrap();
        let int_products: Vec<_> = model
            .nodes()
            .iter()
            .filter(|n| n.inputs.len() == 9)
            .collect();
        assert_eq!(int_products.len(), 1, "{case:?}: {:?}", op_names(&model));
        let node = int_products[0];
        let weights = model.outlet_fact(node.inputs[1]).unwrap();
        if einsum {
            let op = node.op_as::<EinSum>().expect("an EinSum");
            assert_eq!(op.q_params, Some(i32::datum_type()));
            assert_eq!(
                op.axes.to_string().split_whitespace().next(),
                Some("NIHW,OI,,,,,,,->NOHW")
            );
            assert_eq!(weights.shape.as_concrete(), Some(&[case.o, case.c][..]));
            assert!(weights.konst.is_some());
            assert!(!op_names(&model).iter().any(|o| o == "Conv"));
        } else {
            assert_eq!(node.op().name(), "Conv", "{case:?}");
            assert_eq!(weights.rank(), 4);
        }
    }
}

#[test]
fn odd_sizes_and_single_channel() {
    // (Weights of fewer than 16 values are folded to f32 by tract's wire_node before
    // the pass runs, and stay float.)
    check_conv(ConvCase {
        c: 4,
        o: 5,
        h: 1,
        w: 1,
        seed: 10,
        ..case(1, 1, 0)
    });
    check_conv(ConvCase {
        c: 5,
        o: 7,
        h: 13,
        w: 2,
        seed: 11,
        ..case(1, 1, 0)
    });
}

/// conv1 → Q → conv2 (conv2 reads conv1's requantized u8 output directly) → Q → DQ.
#[test]
fn chained_convs_stay_integer_in_between() {
    let c1 = case(1, 1, 0);
    let c2 = ConvCase {
        c: 24,
        o: 8,
        seed: 12,
        ..case(3, 1, 1)
    };
    let mut rng = Rng(77);
    let xq = x_params(Act::U8);
    let input: Vec<f32> = (0..c1.c * c1.h * c1.w)
        .map(|_| rng.uniform(-2.3, 2.3) as f32)
        .collect();
    let conv1 = make_qconv(&c1, &mut rng);
    let x_deq: Vec<f64> = input
        .iter()
        .map(|&v| xq.dequantize(xq.quantize(v as f64)))
        .collect();
    let y1 = conv1.reference(&c1, xq.scale, &x_deq);
    let range = |y: &[f64]| {
        (
            y.iter().cloned().fold(f64::MAX, f64::min),
            y.iter().cloned().fold(f64::MIN, f64::max),
        )
    };
    let (lo, hi) = range(&y1);
    let q1 = QParams::covering(lo, hi, Act::U8);
    let y1_deq: Vec<f64> = y1.iter().map(|&v| q1.dequantize(q1.quantize(v))).collect();
    let conv2 = make_qconv(&c2, &mut rng);
    let y2 = conv2.reference(&c2, q1.scale, &y1_deq);
    let (lo, hi) = range(&y2);
    let q2 = QParams::covering(lo, hi, Act::U8);
    let reference: Vec<f64> = y2.iter().map(|&v| q2.dequantize(q2.quantize(v))).collect();

    let mut nodes = vec![];
    let mut inits = vec![];
    let x = qdq(&mut nodes, &mut inits, "x", xq);
    let a = conv1.wire(&mut nodes, &mut inits, &c1, "conv1", &x, xq.scale);
    let a = qdq(&mut nodes, &mut inits, &a, q1);
    let b = conv2.wire(&mut nodes, &mut inits, &c2, "conv2", &a, q1.scale);
    let b = qdq(&mut nodes, &mut inits, &b, q2);
    nodes.push(node("Identity", &[&b], "y", vec![]));
    let onnx = model_bytes(
        nodes,
        inits,
        value_info("x", &[1, c1.c, c1.h, c1.w]),
        value_info("y", &[1, c2.o, c2.h, c2.w]),
    );
    let shape = [1, c1.c, c1.h, c1.w];
    let fused = run(&onnx, &shape, &input, true).unwrap();
    let unfused = run(&onnx, &shape, &input, false).unwrap();
    assert_eq!(fused.report[0], "int8 conv/matmul ×2 (2 to int8, 0 to f32)");
    assert_eq!(fused.report[1], "int8 requantize+dequantize ×1");
    // conv1's one-step differences (rounding ties) can move conv2's output by a
    // few steps where they line up; the bound is two steps.
    let bound = 2.0 * q2.scale as f64 * 1.001;
    let unfused64: Vec<f64> = unfused.output.iter().map(|&v| v as f64).collect();
    let (d_ref, d_unfused) = (
        max_diff(&fused.output, &reference),
        max_diff(&fused.output, &unfused64),
    );
    assert!(
        d_ref <= bound && d_unfused <= bound,
        "vs reference {d_ref}, vs unfused {d_unfused}, bound {bound}"
    );
    let requants: Vec<String> = fused
        .model
        .nodes()
        .iter()
        .filter(|n| n.op().name() == "Requant")
        .map(|n| n.op().info().unwrap().join(" "))
        .collect();
    assert!(
        requants.iter().any(|i| i.contains("U8")),
        "conv1 should requantize to u8: {requants:?}"
    );
}

/// Float weights (no DequantizeLinear on them): not an int8 conv; left as it was.
#[test]
fn float_weights_are_left_alone() {
    let c = case(1, 1, 0);
    let mut nodes = vec![];
    let mut inits = vec![];
    let x = qdq(&mut nodes, &mut inits, "x", x_params(Act::U8));
    inits.push(tensor(
        "w",
        &[c.o, c.c, 1, 1],
        DataType::Float,
        f32s(&vec![0.01; c.o * c.c]),
    ));
    nodes.push(node("Conv", &[&x, "w"], "y", vec![]));
    let onnx = model_bytes(
        nodes,
        inits,
        value_info("x", &[1, c.c, c.h, c.w]),
        value_info("y", &[1, c.o, c.h, c.w]),
    );
    let shape = [1, c.c, c.h, c.w];
    let input: Vec<f32> = (0..c.c * c.h * c.w)
        .map(|i| (i % 17) as f32 * 0.1)
        .collect();
    let fused = run(&onnx, &shape, &input, true).unwrap();
    let unfused = run(&onnx, &shape, &input, false).unwrap();
    assert!(
        !fused.report.iter().any(|r| r.starts_with("int8 conv")),
        "{:?}",
        fused.report
    );
    assert_eq!(fused.output, unfused.output);
}

/// A float activation into a 3×3 stride-2 conv whose weights are DequantizeLinear of
/// int8 with a scale and zero point per output channel (as the downsampling convs of
/// the project's own quantized models): the conv stays in float, as a patch conv that
/// keeps the int8 values, dequantized while it runs, whether or not their f32 value
/// is within tract's 4 MiB constant-folding budget (24×16×3×3 here is, 320×384×3×3 at
/// 4.4 MB is not); no DequantizeConst is left. On armv7 there is no patch conv and
/// tract's conv runs: weights within the budget are folded to f32 by its declutter,
/// larger ones dequantized on every run. Either way the output is the f64 reference
/// conv of the dequantized weights: f32 sums of up to 3456 terms, checked to 1e-5 of the
/// largest output (their rounding is about √3456·6e-8 ≈ 4e-6 of it).
#[test]
fn int8_weights_of_a_float_strided_conv_stay_int8() {
    use poolformer_edge::ops::conv::PatchConv;
    for (c, o, over_budget) in [(384, 320, true), (16, 24, false)] {
        let (n, k) = (9, 3);
        let mut rng = Rng(7);
        let wq: Vec<i8> = (0..o * c * k * k)
            .map(|_| rng.int(-127, 127) as i8)
            .collect();
        let scales: Vec<f32> = (0..o).map(|i| 0.001 * (1 + i % 7) as f32).collect();
        let zeros: Vec<i32> = (0..o).map(|i| (i % 5) as i32 - 2).collect();
        let inits = vec![
            tensor(
                "w_q",
                &[o, c, k, k],
                DataType::Int8,
                wq.iter().map(|&v| v as u8).collect(),
            ),
            tensor("w_s", &[o], DataType::Float, f32s(&scales)),
            zp_tensor("w_z", &[o], Act::I8, &zeros),
        ];
        let nodes = vec![
            node(
                "DequantizeLinear",
                &["w_q", "w_s", "w_z"],
                "w",
                vec![attr_int("axis", 0)],
            ),
            node(
                "Conv",
                &["x", "w"],
                "y",
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            ),
        ];
        let out = (n + 2 - k) / 2 + 1;
        let onnx = model_bytes(
            nodes,
            inits,
            value_info("x", &[1, c, n, n]),
            value_info("y", &[1, o, out, out]),
        );
        let shape = [1, c, n, n];
        let input: Vec<f32> = (0..c * n * n)
            .map(|_| rng.uniform(-3.0, 3.0) as f32)
            .collect();
        let kernel = common::reference::ConvKernel {
            out_channels: o,
            in_channels: c,
            size: k,
            weight: wq
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let r = i / (c * k * k);
                    (q as i32 - zeros[r]) as f32 as f64 * scales[r] as f64
                })
                .collect(),
            bias: vec![0.0; o],
        };
        let reference = common::reference::conv2d(
            &common::reference::Tensor::from_f32(c, n, n, &input),
            &kernel,
            2,
            1,
        )
        .data;
        let tolerance = 1e-5 * reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let fused = run(&onnx, &shape, &input, true).unwrap();
        let ops = op_names(&fused.model);
        let convs: Vec<&PatchConv> = fused
            .model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<PatchConv>())
            .collect();
        if poolformer_edge::passes::conv::ENABLED {
            assert!(!ops.iter().any(|n| n == "DequantizeConst"), "{ops:?}");
            assert_eq!(convs.len(), 1, "{ops:?}");
            assert!(convs[0].weights.is_int8(), "{c}×{o}");
        } else {
            // Without the patch conv (armv7), tract's conv runs; weights over the
            // budget are dequantized on every run, as tract's own DequantizeLinear.
            assert!(convs.is_empty(), "{ops:?}");
            assert_eq!(
                ops.iter().any(|n| n == "DequantizeConst"),
                over_budget,
                "{ops:?}"
            );
        }
        assert!(max_diff(&fused.output, &reference) <= tolerance);
        let unfused = run(&onnx, &shape, &input, false).unwrap();
        assert!(max_diff(&unfused.output, &reference) <= tolerance);
    }
}

/// A per-channel weight scale whose length matches no axis is an error, not a panic.
#[test]
fn bad_per_channel_scale_is_an_error() {
    let c = ConvCase {
        c: 3,
        h: 32,
        w: 32,
        ..case(1, 1, 0)
    };
    let mut built = build_conv(&c);
    let mut model = ModelProto::decode(&built.onnx[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    for t in graph.initializer.iter_mut() {
        if t.name == "conv.w_scale" || t.name == "conv.w_zp" {
            t.dims = vec![5];
            let size = if t.name == "conv.w_scale" { 4 } else { 1 };
            t.raw_data.truncate(5 * size);
        }
    }
    built.onnx = model.encode_to_vec();
    let r = Engine::from_bytes(
        &built.onnx,
        Options {
            input_size: 32,
            ..Options::default()
        },
    );
    let err = format!("{:#}", r.unwrap_err());
    assert!(err.contains("scale") || err.contains("channel"), "{err}");
}

/// Bad quantization parameters are errors that name the node and the value, not a
/// network of zeros (zero scale), NaN outputs or a type error from inside a pass. The
/// activation's QuantizeLinear → DequantizeLinear pair is `x_q`/`x_dq` with
/// initializers `x_scale`, `x_zp`; the weights' DequantizeLinear reads `conv.w_q`,
/// `conv.w_scale`, `conv.w_zp`.
#[test]
fn bad_quantization_parameters_are_errors() {
    let c = ConvCase {
        c: 3,
        h: 32,
        w: 32,
        ..case(1, 1, 0)
    };
    let built = build_conv(&c);
    let (oh, ow) = c.out_hw();
    let load = |edit: &dyn Fn(&mut GraphProto)| -> Result<Engine, String> {
        let mut model = ModelProto::decode(&built.onnx[..]).unwrap();
        let graph = model.graph.as_mut().unwrap();
        // A classifier's output, as the engine expects.
        graph.node.last_mut().unwrap().output = vec!["y_map".into()];
        graph
            .node
            .push(node("Flatten", &["y_map"], "y", vec![attr_int("axis", 1)]));
        graph.output = vec![value_info("y", &[1, c.o * oh * ow])];
        edit(graph);
        let options = Options {
            input_size: 32,
            ..Options::default()
        };
        Engine::from_bytes(&model.encode_to_vec(), options).map_err(|e| format!("{e:#}"))
    };
    let floats = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let set = |name: &'static str, dt: DataType, dims: Vec<i64>, raw: Vec<u8>| {
        move |g: &mut GraphProto| {
            let t = g.initializer.iter_mut().find(|t| t.name == name).unwrap();
            t.data_type = dt as i32;
            t.dims = dims.clone();
            t.raw_data = raw.clone();
            t.float_data.clear();
            t.int32_data.clear();
        }
    };
    // The graph as built loads.
    if let Err(e) = load(&|_| ()) {
        panic!("{e}");
    }
    let model = ModelProto::decode(&built.onnx[..]).unwrap();
    let w_scale = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name == "conv.w_scale")
        .unwrap()
        .clone();
    let n = w_scale.raw_data.len() / 4;
    let w_scales = |bad: f32| {
        let mut v = vec![0.01f32; n];
        v[n - 1] = bad;
        floats(&v)
    };
    let last_zero = format!(
        "DequantizeLinear \"conv.w\": scale \"conv.w_scale\" must be finite and \
         positive, element {} is 0",
        n - 1
    );
    type Edit = Box<dyn Fn(&mut GraphProto)>;
    let cases: Vec<(Edit, &str)> =
        vec![
        (
            Box::new(set("x_scale", DataType::Float, vec![], floats(&[0.0]))),
            "QuantizeLinear \"x_q\": scale \"x_scale\" must be finite and positive, element 0 is 0",
        ),
        (
            Box::new(set("x_scale", DataType::Float, vec![], floats(&[f32::NAN]))),
            "scale \"x_scale\" must be finite and positive, element 0 is NaN",
        ),
        (
            Box::new(set("conv.w_scale", DataType::Float, w_scale.dims.clone(), w_scales(0.0))),
            &last_zero,
        ),
        (
            Box::new(set("conv.w_scale", DataType::Float, w_scale.dims.clone(), w_scales(-0.01))),
            "is -0.01",
        ),
        (
            Box::new(set("x_zp", DataType::Float, vec![], floats(&[128.0]))),
            "zero point \"x_zp\" is FLOAT, expected UINT8, INT8, UINT16, INT16",
        ),
        (
            Box::new(set("x_zp", DataType::Int32, vec![], 128i32.to_le_bytes().to_vec())),
            "zero point \"x_zp\" is INT32",
        ),
        (
            Box::new(set("x_zp", DataType::Uint8, vec![2], vec![128, 128])),
            "1 scales and 2 zero points",
        ),
        (
            Box::new(set("conv.w_zp", DataType::Uint8, w_scale.dims.clone(), vec![0; n])),
            "input \"conv.w_q\" is INT8 but its zero point \"conv.w_zp\" is UINT8",
        ),
        (
            Box::new(|g: &mut GraphProto| {
                let q = g.node.iter_mut().find(|n| n.op_type == "QuantizeLinear").unwrap();
                q.input.truncate(1);
            }),
            "QuantizeLinear \"x_q\": no scale input",
        ),
    ];
    for (edit, want) in &cases {
        match load(&**edit) {
            Ok(_) => panic!("loaded; expected an error with {want:?}"),
            Err(e) => assert!(e.contains(want), "{e}\nexpected: {want}"),
        }
    }
}

/// Through the engine, as a classifier (Flatten to [1, N]), with 1, 2 and 3 threads.
#[test]
fn engine_threads_agree() {
    let c = ConvCase {
        c: 3,
        o: 8,
        h: 32,
        w: 32,
        seed: 13,
        ..case(3, 2, 1)
    };
    let built = build_conv(&c);
    let mut model = ModelProto::decode(&built.onnx[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let (oh, ow) = c.out_hw();
    graph.node.last_mut().unwrap().output = vec!["y_map".into()];
    graph
        .node
        .push(node("Flatten", &["y_map"], "y", vec![attr_int("axis", 1)]));
    graph.output = vec![value_info("y", &[1, c.o * oh * ow])];
    let onnx = model.encode_to_vec();
    let x = Tensor::from_shape(&[1, 3, 32, 32], &built.input).unwrap();
    let mut outputs = vec![];
    for (threads, fuse) in [(1, true), (2, true), (3, true), (1, false)] {
        let engine = Engine::from_bytes(
            &onnx,
            Options {
                threads,
                input_size: 32,
                fuse,
            },
        )
        .unwrap();
        if fuse {
            assert!(
                engine
                    .passes()
                    .rewrites
                    .iter()
                    .any(|r| r.starts_with("int8 conv")),
                "{:?}",
                engine.passes()
            );
            // The integer conv runs on the crate's kernels, its rows and patch
            // groups split unevenly over 2 and 3 threads.
            let on_qgemm = engine
                .passes()
                .rewrites
                .iter()
                .any(|r| r.starts_with("int8 convolution on u8×i8 kernels"));
            assert_eq!(
                on_qgemm,
                poolformer_edge::passes::metaformer::FUSES_MLP,
                "{:?}",
                engine.passes()
            );
        }
        let y = engine.run(x.clone()).unwrap();
        outputs.push(y.to_plain_array_view::<f32>().unwrap().to_owned());
    }
    assert_eq!(outputs[0], outputs[1], "1 vs 2 threads");
    assert_eq!(outputs[0], outputs[2], "1 vs 3 threads");
    let step = built.out_step.unwrap() * 1.001;
    let d = outputs[0]
        .iter()
        .zip(outputs[3].iter())
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    assert!(d <= step, "fused vs unfused {d} > {step}");
}

// ---------- Gemm and MatMul ----------

/// `x [rows, K]` (Gemm, transB = 1, W `[N, K]`) or `x [1, rows, K]` (MatMul, W
/// `[K, N]`; `[1, K]` for one row), per-channel along N or per-tensor, bias (Gemm
/// only), optional trailing Q → DQ. Checked like the convs. One row (a classifier
/// head) runs on the crate's u8×i8 kernels.
fn check_fc(gemm: bool, per_channel: bool, act: Act, out_q: Option<Act>, seed: u64) {
    check_fc_rows(3, gemm, per_channel, act, out_q, seed)
}

fn check_fc_rows(
    rows: usize,
    gemm: bool,
    per_channel: bool,
    act: Act,
    out_q: Option<Act>,
    seed: u64,
) {
    let (k, n) = (40usize, 24usize);
    let mut rng = Rng(0xDEAD_BEEF ^ seed);
    let xq = x_params(act);
    let input: Vec<f32> = (0..rows * k)
        .map(|_| rng.uniform(-2.3, 2.3) as f32)
        .collect();
    let w_q: Vec<i8> = (0..n * k).map(|_| rng.int(-127, 127) as i8).collect();
    let w_scale: Vec<f32> = (0..if per_channel { n } else { 1 })
        .map(|_| rng.uniform(0.002, 0.02) as f32)
        .collect();
    let sw = |j: usize| w_scale[if per_channel { j } else { 0 }];
    let b_q: Vec<i32> = (0..n).map(|_| rng.int(-3000, 3000) as i32).collect();
    // W_q is stored [N, K] for Gemm and [K, N] for MatMul; w(j, i) is element (n=j, k=i).
    let w = |j: usize, i: usize| if gemm { w_q[j * k + i] } else { w_q[i * n + j] };
    let mut y = vec![0f64; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut acc = if gemm {
                (b_q[j] as f32 * (xq.scale * sw(j))) as f64
            } else {
                0.0
            };
            for i in 0..k {
                let xv = xq.dequantize(xq.quantize(input[r * k + i] as f64));
                acc += xv * w(j, i) as f64 * sw(j) as f64;
            }
            y[r * n + j] = acc;
        }
    }
    let mut nodes = vec![];
    let mut inits = vec![];
    let x = qdq(&mut nodes, &mut inits, "x", xq);
    let wdims = if gemm { [n, k] } else { [k, n] };
    let sdims: Vec<usize> = if per_channel { vec![n] } else { vec![] };
    let w_values = if gemm {
        w_q.clone()
    } else {
        (0..k * n).map(|ix| w(ix % n, ix / n)).collect()
    };
    inits.push(tensor(
        "w_q",
        &wdims,
        DataType::Int8,
        w_values.iter().map(|&v| v as u8).collect(),
    ));
    inits.push(tensor("w_scale", &sdims, DataType::Float, f32s(&w_scale)));
    inits.push(tensor(
        "w_zp",
        &sdims,
        DataType::Int8,
        vec![0; w_scale.len()],
    ));
    let axis = vec![attr_int("axis", if gemm { 0 } else { 1 })];
    nodes.push(node(
        "DequantizeLinear",
        &["w_q", "w_scale", "w_zp"],
        "w",
        axis.clone(),
    ));
    if gemm {
        let b_scale: Vec<f32> = (0..n).map(|j| xq.scale * sw(j)).collect();
        inits.push(tensor(
            "b_q",
            &[n],
            DataType::Int32,
            b_q.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        inits.push(tensor("b_scale", &[n], DataType::Float, f32s(&b_scale)));
        inits.push(tensor("b_zp", &[n], DataType::Int32, vec![0; 4 * n]));
        nodes.push(node(
            "DequantizeLinear",
            &["b_q", "b_scale", "b_zp"],
            "b",
            vec![attr_int("axis", 0)],
        ));
        nodes.push(node(
            "Gemm",
            &[&x, "w", "b"],
            "fc",
            vec![attr_int("transB", 1)],
        ));
    } else {
        nodes.push(node("MatMul", &[&x, "w"], "fc", vec![]));
    }
    let mut out = "fc".to_string();
    let (reference, bound) = if let Some(act) = out_q {
        let lo = y.iter().cloned().fold(f64::MAX, f64::min);
        let hi = y.iter().cloned().fold(f64::MIN, f64::max);
        let yq = QParams::covering(lo * 0.9, hi * 0.9, act);
        out = qdq(&mut nodes, &mut inits, &out, yq);
        (
            y.iter().map(|&v| yq.dequantize(yq.quantize(v))).collect(),
            yq.scale as f64 * 1.001,
        )
    } else {
        let m = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        (y, 1e-4 * m)
    };
    nodes.push(node("Identity", &[&out], "y", vec![]));
    let (in_shape, out_shape) = if gemm || rows == 1 {
        (vec![rows, k], vec![rows, n])
    } else {
        (vec![1, rows, k], vec![1, rows, n])
    };
    let onnx = model_bytes(
        nodes,
        inits,
        value_info("x", &in_shape),
        value_info("y", &out_shape),
    );
    let fused = run(&onnx, &in_shape, &input, true).unwrap();
    let unfused = run(&onnx, &in_shape, &input, false).unwrap();
    let unfused64: Vec<f64> = unfused.output.iter().map(|&v| v as f64).collect();
    let (d_ref, d_unfused) = (
        max_diff(&fused.output, &reference),
        max_diff(&fused.output, &unfused64),
    );
    let what = format!("gemm {gemm} per_channel {per_channel} {act:?} → {out_q:?}");
    assert!(
        d_ref <= bound && d_unfused <= bound,
        "{what}: fused vs reference {d_ref}, vs unfused {d_unfused}, bound {bound}"
    );
    assert!(
        fused
            .report
            .iter()
            .any(|r| r.starts_with("int8 conv/matmul ×1 ")),
        "{what}: {:?}",
        fused.report
    );
    let ops = op_names(&fused.model);
    assert!(ops.iter().any(|o| o == "Requant"), "{what}: {ops:?}");
    if rows == 1 && poolformer_edge::passes::metaformer::FUSES_MLP {
        assert!(ops.iter().any(|o| o == "PfeQuantConv"), "{what}: {ops:?}");
    }
    for node in fused.model.nodes() {
        if node.op().name() == "OptMatMul" {
            let info = node.op().info().unwrap().join(" ");
            assert!(info.contains("i32"), "{what}: float matmul left: {info}");
        }
    }
}

#[test]
fn gemm_per_channel_u8_with_bias() {
    check_fc(true, true, Act::U8, Some(Act::U8), 1);
    check_fc(true, true, Act::U8, None, 2);
}

#[test]
fn gemm_per_tensor_s8() {
    check_fc(true, false, Act::I8, Some(Act::I8), 3);
}

#[test]
fn one_row_heads() {
    check_fc_rows(1, true, true, Act::U8, None, 7);
    check_fc_rows(1, true, false, Act::I8, Some(Act::I8), 8);
    check_fc_rows(1, false, true, Act::U8, Some(Act::U8), 9);
    check_fc_rows(1, false, false, Act::I8, None, 10);
}

#[test]
fn matmul_per_channel_and_per_tensor() {
    check_fc(false, true, Act::U8, Some(Act::U8), 4);
    check_fc(false, false, Act::I8, None, 5);
    check_fc(false, true, Act::I8, Some(Act::U8), 6);
}

// ---------- dropping the float round trips ----------

/// conv → Q → DQ → Relu → Q → DQ → output, with `rewrite_with(keep_float_qdq:
/// false)`: the conv feeds Relu in f32 and the round trip before Relu is gone; the
/// final Q → DQ (a graph output) stays. Bound: one step of each removed grid.
#[test]
fn dropping_float_round_trips() {
    let c = ConvCase {
        out_q: None,
        seed: 21,
        ..case(1, 1, 0)
    };
    let mut rng = Rng(99);
    let xq = x_params(Act::U8);
    let input: Vec<f32> = (0..c.c * c.h * c.w)
        .map(|_| rng.uniform(-2.3, 2.3) as f32)
        .collect();
    let conv = make_qconv(&c, &mut rng);
    let x_deq: Vec<f64> = input
        .iter()
        .map(|&v| xq.dequantize(xq.quantize(v as f64)))
        .collect();
    let y = conv.reference(&c, xq.scale, &x_deq);
    let lo = y.iter().cloned().fold(f64::MAX, f64::min);
    let hi = y.iter().cloned().fold(f64::MIN, f64::max);
    let q1 = QParams::covering(lo, hi, Act::U8);
    let q2 = QParams::covering(0.0, hi, Act::U8);
    let reference: Vec<f64> = y
        .iter()
        .map(|&v| q2.dequantize(q2.quantize(v.max(0.0))))
        .collect();
    let mut nodes = vec![];
    let mut inits = vec![];
    let x = qdq(&mut nodes, &mut inits, "x", xq);
    let a = conv.wire(&mut nodes, &mut inits, &c, "conv", &x, xq.scale);
    let a = qdq(&mut nodes, &mut inits, &a, q1);
    nodes.push(node("Relu", &[&a], "relu", vec![]));
    let out = qdq(&mut nodes, &mut inits, "relu", q2);
    let onnx = model_bytes(
        nodes,
        inits,
        value_info("x", &[1, c.c, c.h, c.w]),
        value_info(&out, &[1, c.o, c.h, c.w]),
    );
    let shape = [1, c.c, c.h, c.w];
    let typed = poolformer_edge::onnx::loader()
        .model_for_read(&mut &onnx[..])
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_typed()
        .unwrap();
    for keep in [true, false] {
        let mut model = typed.clone();
        let mut report = poolformer_edge::passes::PassReport::default();
        poolformer_edge::passes::int8::rewrite_with(&mut model, &mut report, keep).unwrap();
        let model = model.into_optimized().unwrap();
        let plan = model.clone().into_runnable().unwrap();
        let out = plan
            .run(tvec!(Tensor::from_shape(&shape, &input)
                .unwrap()
                .into_tvalue()))
            .unwrap();
        let out: Vec<f32> = out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let ops = op_names(&model);
        let bound = if keep {
            q2.scale as f64 * 1.001
        } else {
            (q1.scale + q2.scale) as f64 * 1.001
        };
        let d = max_diff(&out, &reference);
        assert!(d <= bound, "keep {keep}: {d} > {bound}");
        if keep {
            assert!(
                report
                    .rewrites
                    .contains(&"int8 requantize+dequantize ×1".to_string()),
                "{report:?}"
            );
        } else {
            assert!(
                report
                    .rewrites
                    .contains(&"int8 conv output read in f32 ×1".to_string()),
                "{report:?}"
            );
            // Only the graph output's round trip is left.
            assert_eq!(
                ops.iter().filter(|o| *o == "FakeQuant").count(),
                1,
                "{ops:?}"
            );
        }
    }
}

// ---------- the loops ----------

/// Scalar reference: clamp(round-half-even(v) + zp).
fn ref_q(v: f32, grid: Grid) -> i32 {
    (v.round_ties_even() as i32 + grid.zero_point).clamp(grid.lo, grid.hi)
}

#[test]
fn requant_loops_match_scalar_reference() {
    let mut rng = Rng(5);
    for len in [0usize, 1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 65, 1001] {
        let acc: Vec<i32> = (0..len)
            .map(|i| match i % 5 {
                // Exact ties: acc · 0.5 lands on .5.
                0 => rng.int(-601, 601) as i32 | 1,
                1 => i32::MAX - rng.int(0, 9) as i32,
                2 => i32::MIN + rng.int(0, 9) as i32,
                _ => rng.int(-100_000, 100_000) as i32,
            })
            .collect();
        let mult: Vec<f32> = (0..len)
            .map(|i| {
                if i % 5 == 0 {
                    0.5
                } else {
                    rng.uniform(-0.01, 0.01) as f32
                }
            })
            .collect();
        let offset: Vec<f32> = (0..len)
            .map(|i| {
                if i % 5 == 0 {
                    0.0
                } else {
                    rng.uniform(-9.0, 9.0) as f32
                }
            })
            .collect();
        for grid in [Grid::of::<u8>(0), Grid::of::<u8>(131), Grid::of::<i8>(-5)] {
            let (m, c) = (0.5f32, 0.0f32);
            // Added to every accumulator in i32 before the conversion (wrapping).
            let add = 1_000_003i32;
            let acc_add: Vec<i32> = acc.iter().map(|a| a.wrapping_add(add)).collect();
            let mut u = vec![0u8; len];
            let mut s = vec![0i8; len];
            let mut f = vec![0f32; len];
            if grid.lo == 0 {
                kq::requant_row(&acc, add, &mut u, m, c, grid);
                for i in 0..len {
                    assert_eq!(
                        u[i] as i32,
                        ref_q(acc_add[i] as f32 * m + c, grid),
                        "row {len} {i}"
                    );
                }
                kq::requant_cols(&acc, &mut u, &mult, &offset, grid);
                for i in 0..len {
                    let want = ref_q(acc[i] as f32 * mult[i] + offset[i], grid);
                    assert_eq!(u[i] as i32, want, "cols {len} {i}");
                }
            } else {
                kq::requant_row(&acc, add, &mut s, m, c, grid);
                for i in 0..len {
                    assert_eq!(
                        s[i] as i32,
                        ref_q(acc_add[i] as f32 * m + c, grid),
                        "row {len} {i}"
                    );
                }
                kq::requant_cols(&acc, &mut s, &mult, &offset, grid);
                for i in 0..len {
                    let want = ref_q(acc[i] as f32 * mult[i] + offset[i], grid);
                    assert_eq!(s[i] as i32, want, "cols {len} {i}");
                }
            }
            let (dzp, ds) = (grid.zero_point + 3, 0.25f32);
            kq::requant_to_grid_row(&acc, add, &mut f, m, c, grid, dzp, ds);
            for i in 0..len {
                let want = (ref_q(acc_add[i] as f32 * m + c, grid) - dzp) as f32 * ds;
                assert_eq!(f[i], want, "grid row {len} {i}");
            }
            kq::requant_to_grid_cols(&acc, &mut f, &mult, &offset, grid, dzp, ds);
            for i in 0..len {
                let q = ref_q(acc[i] as f32 * mult[i] + offset[i], grid);
                assert_eq!(f[i], (q - dzp) as f32 * ds, "grid cols {len} {i}");
            }
            kq::dequant_cols(&acc, &mut f, &mult, &offset);
            for i in 0..len {
                assert_eq!(f[i], acc[i] as f32 * mult[i] + offset[i]);
            }
            kq::dequant_row(&acc, add, &mut f, m, c);
            for i in 0..len {
                assert_eq!(f[i], acc_add[i] as f32 * m + c, "dequant row {len} {i}");
            }
            let x: Vec<f32> = acc.iter().map(|&a| a as f32 * 1e-3).collect();
            kq::fake_quant(&x, &mut f, 7.0, grid, dzp, ds);
            for i in 0..len {
                let want = (ref_q(x[i] * 7.0, grid) - dzp) as f32 * ds;
                assert_eq!(f[i], want, "fake {len} {i}");
            }
            if grid.lo == 0 {
                kq::quantize(&x, &mut u, 7.0, grid);
                for i in 0..len {
                    assert_eq!(u[i] as i32, ref_q(x[i] * 7.0, grid), "quantize {len} {i}");
                }
            }
        }
    }
    // NaN does not panic and lands inside the grid.
    let mut u = [0u8; 3];
    kq::quantize(&[f32::NAN, 1e30, -1e30], &mut u, 1.0, Grid::of::<u8>(10));
    assert_eq!(&u[1..], &[255, 0]);
}
