//! The element-wise chain pass (`src/passes/eltwise.rs`) on a PoolFormer block in the
//! form onnxruntime's QDQ quantizer gives it when every op is quantized: a decomposed
//! GroupNorm, the pooling mixer, a layer scale, residual additions, an erf GELU and a
//! 1×1 convs, with QuantizeLinear → DequantizeLinear after each op.
//!
//! Oracle: the same optimized graph without the pass. Every fused step is the same
//! f32 operation or the same kernel as the node it replaces, so outputs must be equal
//! bit for bit, on one thread and on several (the fused op splits channels over the
//! threads). Also checked: which nodes were fused (a `Requant` head, the 3×3 average
//! pooling as a head, a `Quantize` tail, computed per-tensor operands, tensor operands
//! on either side of a `Sub`, a requantized value kept for a GELU's product), that a
//! tensor used twice ends a chain, and that tract alone (`fuse: false`) agrees
//! within a few quantization steps of the output on all but a few outputs.

mod common;

use common::onnx::{attr_int, attr_ints, value_info};
use poolformer_edge::ops::eltwise::{Arith, ElementwiseChain, Head, Operand, Step, Tail};
use poolformer_edge::ops::qconv::QuantConvChain;
use poolformer_edge::passes;
use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// An ONNX graph under construction: nodes, initializers, a counter for names.
#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    n: usize,
}

impl Graph {
    fn name(&mut self, what: &str) -> String {
        self.n += 1;
        format!("{what}_{}", self.n)
    }

    fn init(&mut self, dims: &[usize], dt: DataType, raw: Vec<u8>) -> String {
        let name = self.name("init");
        self.inits.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dt as i32,
            raw_data: raw,
            ..Default::default()
        });
        name
    }

    fn floats(&mut self, dims: &[usize], v: &[f32]) -> String {
        self.init(
            dims,
            DataType::Float,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.name(&op.to_lowercase());
        self.nodes.push(NodeProto {
            name: out.clone(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// QuantizeLinear → DequantizeLinear with a u8 grid of step `scale`, zero point `zp`.
    fn qdq(&mut self, x: &str, scale: f32, zp: u8) -> String {
        let s = self.floats(&[], &[scale]);
        let z = self.init(&[], DataType::Uint8, vec![zp]);
        let q = self.op("QuantizeLinear", &[x, &s, &z], vec![]);
        self.op("DequantizeLinear", &[&q, &s, &z], vec![])
    }

    fn bytes(self, shape: &[usize], output: &str) -> Vec<u8> {
        common::onnx::model(
            "qdq block",
            self.nodes,
            self.inits,
            vec![value_info("x", DataType::Float, Some(shape))],
            vec![value_info(output, DataType::Float, None)],
        )
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// One all-ops-quantized PoolFormer block on `[1, c, h, w]`; the output is its last
/// dequantized tensor.
fn block(c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut g = Graph::default();
    let pc = [1, c, 1, 1];
    let x = g.qdq("x", 0.02, 128);
    // GroupNorm(1 group), decomposed as the exporters write it.
    let mean = g.op(
        "ReduceMean",
        &[&x],
        vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)],
    );
    let centered = g.op("Sub", &[&x, &mean], vec![]);
    let centered = g.qdq(&centered, 0.02, 128);
    let squared = g.op("Mul", &[&centered, &centered], vec![]);
    let squared = g.qdq(&squared, 0.004, 0);
    let var = g.op(
        "ReduceMean",
        &[&squared],
        vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)],
    );
    let eps = g.floats(&[], &[1e-5]);
    let var = g.op("Add", &[&var, &eps], vec![]);
    let std = g.op("Sqrt", &[&var], vec![]);
    let normalized = g.op("Div", &[&centered, &std], vec![]);
    let normalized = g.qdq(&normalized, 0.03, 128);
    let gamma: Vec<f32> = values(c, 1).iter().map(|v| 1.0 + 0.3 * v).collect();
    let gamma = g.floats(&pc, &gamma);
    let scaled = g.op("Mul", &[&normalized, &gamma], vec![]);
    let scaled = g.qdq(&scaled, 0.03, 128);
    let beta: Vec<f32> = values(c, 2).iter().map(|v| 0.2 * v).collect();
    let beta = g.floats(&pc, &beta);
    let n1 = g.op("Add", &[&scaled, &beta], vec![]);
    let n1 = g.qdq(&n1, 0.03, 128);
    // Token mixer: AvgPool3x3(n) − n, layer scale, residual.
    let pool = g.op(
        "AveragePool",
        &[&n1],
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_ints("strides", &[1, 1]),
            attr_int("count_include_pad", 0),
        ],
    );
    let pool = g.qdq(&pool, 0.02, 128);
    let mixed = g.op("Sub", &[&pool, &n1], vec![]);
    let mixed = g.qdq(&mixed, 0.02, 128);
    // The layer scale negated and subtracted: the chain's value on the right of a Sub.
    let ls: Vec<f32> = values(c, 3).iter().map(|v| -0.5 - 0.4 * v).collect();
    let ls = g.floats(&pc, &ls);
    let mixed = g.op("Mul", &[&mixed, &ls], vec![]);
    let mixed = g.qdq(&mixed, 0.01, 128);
    let r1 = g.op("Sub", &[&x, &mixed], vec![]);
    let r1 = g.qdq(&r1, 0.025, 128);
    // GELU (erf form), quantized for a 1×1 conv.
    let sqrt2 = g.floats(&[], &[std::f32::consts::SQRT_2]);
    let a = g.op("Div", &[&r1, &sqrt2], vec![]);
    let e = g.op("Erf", &[&a], vec![]);
    let e = g.qdq(&e, 1.0 / 127.0, 128);
    let one = g.floats(&[], &[1.0]);
    let e1 = g.op("Add", &[&e, &one], vec![]);
    let e1 = g.qdq(&e1, 2.0 / 255.0, 0);
    let xm = g.op("Mul", &[&r1, &e1], vec![]);
    let xm = g.qdq(&xm, 0.05, 64);
    let half = g.floats(&[], &[0.5]);
    let gelu = g.op("Mul", &[&xm, &half], vec![]);
    let gelu = g.qdq(&gelu, 0.025, 64);
    // 1×1 conv with per-tensor i8 weights, then the residual again.
    let wq: Vec<u8> = values(c * c, 4)
        .iter()
        .map(|v| (v * 100.0).round() as i8 as u8)
        .collect();
    let wq = g.init(&[c, c, 1, 1], DataType::Int8, wq);
    let ws = g.floats(&[], &[0.004]);
    let wz = g.init(&[], DataType::Int8, vec![0]);
    let wdq = g.op("DequantizeLinear", &[&wq, &ws, &wz], vec![]);
    let conv = g.op(
        "Conv",
        &[&gelu, &wdq],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    let conv = g.qdq(&conv, 0.03, 128);
    let out = g.op("Add", &[&r1, &conv], vec![]);
    let out = g.qdq(&out, 0.04, 128);
    // A second conv, per-channel weights, whose output is read twice: its requantization stays a node of its
    // own (split over threads by channel runs).
    let ws2: Vec<f32> = values(c, 5).iter().map(|v| 0.004 * (1.5 + v)).collect();
    let ws2 = g.floats(&[c], &ws2);
    let wz2 = g.init(&[c], DataType::Int8, vec![0; c]);
    let wdq2 = g.op(
        "DequantizeLinear",
        &[&wq, &ws2, &wz2],
        vec![attr_int("axis", 0)],
    );
    let conv2 = g.op(
        "Conv",
        &[&out, &wdq2],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    let conv2 = g.qdq(&conv2, 0.03, 128);
    let side = g.op("Mul", &[&conv2, &half], vec![]);
    let out = g.op("Add", &[&out, &conv2], vec![]);
    let out = g.op("Add", &[&out, &side], vec![]);
    let out = g.qdq(&out, 0.05, 128);
    // A third conv feeding an erf GELU that reads it twice: its requantization heads
    // the GELU's chain, which keeps the head value for the product.
    let conv3 = g.op(
        "Conv",
        &[&out, &wdq2],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    let conv3 = g.qdq(&conv3, 0.03, 128);
    let a = g.op("Div", &[&conv3, &sqrt2], vec![]);
    let e = g.op("Erf", &[&a], vec![]);
    let e = g.qdq(&e, 1.0 / 127.0, 128);
    let e1 = g.op("Add", &[&e, &one], vec![]);
    let e1 = g.qdq(&e1, 2.0 / 255.0, 0);
    let xm = g.op("Mul", &[&conv3, &e1], vec![]);
    let out = g.qdq(&xm, 0.05, 128);
    g.bytes(&[1, c, h, w], &out)
}

fn typed(onnx: &[u8], shape: &[usize]) -> TypedModel {
    poolformer_edge::onnx::loader()
        .model_for_read(&mut &onnx[..])
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_typed()
        .unwrap()
}

fn run(model: &TypedModel, input: &Tensor, threads: usize) -> Vec<f32> {
    common::run_model(model, input, threads)
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// How many of `a`'s values differ from `b`'s in any bit.
fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// The model's chains, on their own or run by an int8 conv.
fn chains(model: &TypedModel) -> Vec<&ElementwiseChain> {
    model
        .nodes()
        .iter()
        .filter_map(|n| {
            n.op_as::<ElementwiseChain>()
                .or_else(|| n.op_as::<QuantConvChain>().map(|c| &c.chain))
        })
        .collect()
}

/// The block's chains against the unfused graph, bit for bit; with `against_tract`,
/// also the bound against tract's own float path.
fn check_block(c: usize, h: usize, w: usize, seed: u64, against_tract: bool) {
    let shape = [1, c, h, w];
    let onnx = block(c, h, w);
    let x: Vec<f32> = values(c * h * w, seed).iter().map(|v| 2.0 * v).collect();
    let x = Tensor::from_shape(&shape, &x).unwrap();

    let (unfused, _) = passes::optimize_graph(typed(&onnx, &shape), true).unwrap();
    let mut fused = unfused.clone();
    let mut report = passes::PassReport::default();
    passes::eltwise::rewrite(&mut fused, &mut report).unwrap();
    let found = chains(&fused);
    assert!(
        found.len() >= 5,
        "{c}×{h}×{w}: {} chains, report {:?}",
        found.len(),
        report.rewrites
    );
    assert!(report.rewrites[0].starts_with("element-wise chains"));
    assert!(
        found.iter().any(|ch| matches!(ch.head, Head::Requant(_))),
        "no chain starts at the conv's requantization"
    );
    assert!(
        found.iter().any(|ch| matches!(ch.head, Head::AvgPool3x3)),
        "no chain starts at the pooling"
    );
    assert!(
        found.iter().any(|ch| matches!(ch.tail, Tail::Quantize(_))),
        "no chain ends in the conv input's quantization"
    );
    assert!(found
        .iter()
        .flat_map(|ch| &ch.steps)
        .any(|s| matches!(s, Step::Erf)));
    assert!(
        found
            .iter()
            .flat_map(|ch| &ch.steps)
            .any(|s| matches!(s, Step::Scalar(_, Operand::Input(_)))),
        "the GroupNorm's mean and 1/std are computed operands"
    );
    assert!(
        found
            .iter()
            .flat_map(|ch| &ch.steps)
            .any(|s| matches!(s, Step::Tensor(Arith::SubFrom, _))),
        "the residual subtracts the chain's value from x"
    );
    assert!(fused.nodes().len() < unfused.nodes().len());
    assert!(
        found
            .iter()
            .any(|ch| ch.tail == Tail::Sum && ch.steps.first() == Some(&Step::Square)),
        "the variance's chain squares and sums"
    );
    assert!(
        found.iter().any(|ch| matches!(ch.head, Head::Requant(_))
            && ch
                .steps
                .iter()
                .any(|s| matches!(s, Step::TensorHead(Arith::Mul)))),
        "the GELU's chain keeps its requantized input for the product"
    );
    assert!(
        fused.nodes().iter().any(|n| n.op.name() == "Requant"),
        "the second conv's requantization stays a node"
    );

    // The chains a conv's requantization heads, run a block of the conv's output rows
    // at a time right after its product.
    let mut with_convs = fused.clone();
    let mut report = passes::PassReport::default();
    passes::qconv::fuse_chains(&mut with_convs, &mut report).unwrap();
    let conv_chains = with_convs
        .nodes()
        .iter()
        .filter(|n| n.op_is::<QuantConvChain>())
        .count();
    if passes::metaformer::FUSES_MLP {
        // The first conv (its chain adds the residual) and the third (its GELU); the
        // second's requantization is read twice.
        assert_eq!(conv_chains, 2, "{:?}", report.rewrites);
    }

    let want = run(&unfused, &x, 1);
    for threads in [1, 3] {
        for (model, what) in [(&fused, "chains"), (&with_convs, "convs with chains")] {
            let got = run(model, &x, threads);
            assert_eq!(got.len(), want.len());
            let differ = differing_bits(&got, &want);
            assert_eq!(
                differ, 0,
                "{c}×{h}×{w}, {what}, {threads} threads: {differ} outputs differ from the unfused graph"
            );
        }
    }

    if !against_tract {
        return;
    }
    // tract alone (fake quantization in its own f32 ops): where its rounding lands a
    // tensor one step away from the integer path's, the stacked quantized convs and the
    // GELU after them can carry that to a few output steps. Bound: at most 0.5 % of the
    // outputs more than one step (0.05) away, none more than 8 (measured: 39 of 38 400
    // and 6 steps at 16×48×50).
    let (alone, _) = passes::optimize(typed(&onnx, &shape), false).unwrap();
    let tract = run(&alone, &x, 1);
    let steps: Vec<f32> = want
        .iter()
        .zip(&tract)
        .map(|(a, b)| (a - b).abs() / 0.05)
        .collect();
    let worst = steps.iter().copied().fold(0f32, f32::max);
    let over = steps.iter().filter(|&&d| d > 1.01).count();
    assert!(
        worst <= 8.01 && over * 200 <= steps.len(),
        "{c}×{h}×{w}: fused vs tract alone: worst {worst} output steps, {over} of {} over one",
        steps.len()
    );
}

#[test]
fn qdq_block_is_bit_exact() {
    // 2400 elements per plane: two slices, the second partial; 38 400 in all, above
    // the threshold where the op splits channels over threads.
    check_block(16, 48, 50, 1, true);
}

#[test]
fn qdq_block_small_odd_planes() {
    // 7 channels of 13×15 (1365 elements, just above the pass's 1024): one slice per
    // plane, below the threshold for threads, so it runs on the calling thread.
    check_block(7, 13, 15, 2, true);
}

#[test]
fn qdq_block_many_conv_row_blocks() {
    // 4096 tokens: the int8 convs take 16 output rows at a time, so on one thread their
    // chains run on three blocks of rows (16, 16, 8), on three threads on one block of
    // 13–14 rows per share. Not against
    // tract's float path: 40-channel sums carry its rounding further (12 steps here)
    // than the bound stated for the smaller blocks.
    check_block(40, 64, 64, 4, false);
}

#[test]
fn qdq_block_table_groups() {
    // 45 channels of 14×14 (the S12's 14×14 stage): the GELU table takes 20 planes at
    // a time (20 + 20 + 5), on one thread and split over three. Not against tract's
    // float path, for the reason the 40-channel case gives.
    check_block(45, 14, 14, 6, false);
}

#[test]
fn qdq_block_planes_past_a_table_group() {
    // 72×72 = 5184 values per plane, more than a table group: the lookup goes plane
    // by plane, in slices.
    check_block(4, 72, 72, 5, true);
}

#[test]
fn qdq_block_two_rows() {
    // Two rows: every pooled value is on an edge (no interior row).
    check_block(4, 2, 600, 3, true);
}

/// AveragePool then a per-channel scale, no quantization: the pooled bits reach the
/// output unrounded. Inputs spread over six decades, so that adding the taps in another
/// order would change low bits.
#[test]
fn pooling_bits_match_tract() {
    // Large planes pooled by rows; small ones several at a time, stacked.
    for (c, h, w) in [(5, 37, 41), (40, 7, 7), (9, 14, 14)] {
        check_pooling_bits(c, h, w);
    }
}

fn check_pooling_bits(c: usize, h: usize, w: usize) {
    let shape = [1, c, h, w];
    let mut g = Graph::default();
    let pool = g.op(
        "AveragePool",
        &["x"],
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_int("count_include_pad", 0),
        ],
    );
    let k: Vec<f32> = values(c, 9).iter().map(|v| 1.5 + v).collect();
    let k = g.floats(&[1, c, 1, 1], &k);
    let out = g.op("Mul", &[&pool, &k], vec![]);
    let onnx = g.bytes(&shape, &out);
    let mags = values(c * h * w, 10);
    let x: Vec<f32> = values(c * h * w, 11)
        .iter()
        .zip(&mags)
        .map(|(v, m)| v * 10f32.powf(3.0 * m))
        .collect();
    let x = Tensor::from_shape(&shape, &x).unwrap();
    let (unfused, _) = passes::optimize_graph(typed(&onnx, &shape), true).unwrap();
    let mut fused = unfused.clone();
    passes::eltwise::rewrite(&mut fused, &mut passes::PassReport::default()).unwrap();
    assert!(chains(&fused)
        .iter()
        .any(|ch| matches!(ch.head, Head::AvgPool3x3)));
    let want = run(&unfused, &x, 1);
    let got = run(&fused, &x, 1);
    let differ = differing_bits(&got, &want);
    assert_eq!(
        differ,
        0,
        "{c}×{h}×{w}: {differ} of {} pooled values differ",
        got.len()
    );
}

/// A GroupNorm's variance as the quantized graphs compute it, the graph's output:
/// `mean((q(q(x) − mean(q(x))))²)` with a round trip after each op. The mean's sum
/// becomes a chain of no steps and the square's chain ends in the variance's (both
/// `Tail::Sum`), whose additions must come in the order tract's
/// `Reduce<Sum>` makes them: the output is one f32 summed from thousands of values
/// that are not dyadic, so another order would change its low bits. Planes of 49 (25
/// of them in one slice; 100 in slices of 41, 41 and 18) and of 2400 values, totals not
/// a multiple of 8, and a rank-3 tensor.
///
/// With `per_channel`, the centred values are scaled per channel before the square, so
/// the summing chain reads a per-channel operand and runs plane by plane (or by groups
/// of whole planes) instead of across planes.
#[test]
fn summing_chain_bits_match_tract() {
    for per_channel in [false, true] {
        for (shape, seed) in [
            (vec![1, 25, 7, 7], 21),
            (vec![1, 16, 48, 50], 22),
            (vec![1, 3, 1000, 3], 23),
            (vec![1, 6, 333], 24),
            (vec![1, 100, 7, 7], 25),
        ] {
            check_summing_chain(&shape, seed, per_channel);
        }
    }
}

fn check_summing_chain(shape: &[usize], seed: u64, per_channel: bool) {
    let axes: Vec<i64> = (1..shape.len() as i64).collect();
    let mut g = Graph::default();
    let x = g.qdq("x", 0.02, 128);
    let mean = g.op(
        "ReduceMean",
        &[&x],
        vec![attr_ints("axes", &axes), attr_int("keepdims", 1)],
    );
    let centered = g.op("Sub", &[&x, &mean], vec![]);
    let mut centered = g.qdq(&centered, 0.02, 128);
    if per_channel {
        let c = shape[1];
        let mut dims = vec![1; shape.len()];
        dims[1] = c;
        let k: Vec<f32> = values(c, seed + 100)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect();
        let k = g.floats(&dims, &k);
        let scaled = g.op("Mul", &[&centered, &k], vec![]);
        centered = g.qdq(&scaled, 0.02, 128);
    }
    let squared = g.op("Mul", &[&centered, &centered], vec![]);
    let squared = g.qdq(&squared, 0.004, 0);
    let var = g.op(
        "ReduceMean",
        &[&squared],
        vec![attr_ints("axes", &axes), attr_int("keepdims", 1)],
    );
    let onnx = g.bytes(shape, &var);
    let n: usize = shape.iter().product();
    let x: Vec<f32> = values(n, seed).iter().map(|v| 1.5 * v + 0.3).collect();
    let x = Tensor::from_shape(shape, &x).unwrap();
    let (unfused, _) = passes::optimize_graph(typed(&onnx, shape), true).unwrap();
    let mut fused = unfused.clone();
    passes::eltwise::rewrite(&mut fused, &mut passes::PassReport::default()).unwrap();
    let summing: Vec<_> = chains(&fused)
        .into_iter()
        .filter(|ch| ch.tail == Tail::Sum)
        .collect();
    // The mean's sum on its own (no steps), and the square's chain with its sum.
    assert_eq!(summing.len(), 2, "{shape:?}: two sums");
    assert!(summing.iter().any(|ch| ch.steps.is_empty()));
    assert!(summing.iter().any(|ch| ch.steps.contains(&Step::Square)));
    let want = run(&unfused, &x, 1);
    for threads in [1, 3] {
        let got = run(&fused, &x, threads);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].to_bits(),
            want[0].to_bits(),
            "{shape:?}, per channel {per_channel}, {threads} threads: variance {} against tract's {}",
            got[0],
            want[0]
        );
    }
}

/// A sum over the last axis of a rank-2 tensor takes another path in tract (its own
/// SIMD kernel, in another order): the pass leaves it, and the bits stay tract's.
#[test]
fn other_sums_stay_tract_s() {
    let shape = [1, 3000];
    let mut g = Graph::default();
    let x = g.qdq("x", 0.02, 128);
    let squared = g.op("Mul", &[&x, &x], vec![]);
    let squared = g.qdq(&squared, 0.004, 0);
    let sum = g.op(
        "ReduceMean",
        &[&squared],
        vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
    );
    let onnx = g.bytes(&shape, &sum);
    let x: Vec<f32> = values(3000, 31).iter().map(|v| 1.5 * v).collect();
    let x = Tensor::from_shape(&shape, &x).unwrap();
    let (unfused, _) = passes::optimize_graph(typed(&onnx, &shape), true).unwrap();
    let mut fused = unfused.clone();
    passes::eltwise::rewrite(&mut fused, &mut passes::PassReport::default()).unwrap();
    assert!(
        chains(&fused).iter().all(|ch| ch.tail != Tail::Sum),
        "a rank-2 sum is not a summing chain"
    );
    assert!(fused.nodes().iter().any(|n| n.op.name() == "Reduce<Sum>"));
    assert_eq!(
        run(&fused, &x, 1)[0].to_bits(),
        run(&unfused, &x, 1)[0].to_bits()
    );
}

#[test]
fn report_names_the_fused_nodes() {
    let shape = [1, 8, 20, 20];
    let onnx = block(8, 20, 20);
    let (fused, report) = passes::optimize(typed(&onnx, &shape), true).unwrap();
    let line = report
        .rewrites
        .iter()
        .find(|l| l.starts_with("element-wise chains"))
        .expect("the pass reports its chains");
    let fused_nodes: usize = chains(&fused).iter().map(|c| c.fused.len()).sum();
    assert!(line.contains(&format!("({fused_nodes} nodes)")), "{line}");
    for ch in chains(&fused) {
        let info = tract_core::ops::Op::info(ch).unwrap().join(" ");
        assert!(
            info.contains("FakeQuant")
                || info.contains("Requant")
                || info == "1 step in one pass: Reduce<Sum>",
            "{info}"
        );
    }
}

/// A GELU chain after a quantized conv, as the S12's are: a requantized head on an 8-bit
/// grid, per-tensor operands, the head's value read again. Built once with one-value
/// operands (its output a function of the head's level: the table path) and once with
/// the same value repeated per channel (the element path); both must agree bit for bit,
/// for every tail, on one thread and on three.
#[test]
fn level_table_matches_the_element_path() {
    use poolformer_edge::kernels::quant::Grid;
    use poolformer_edge::ops::requant::{FakeQuant, Quantize, Requant, RequantOut};
    use std::sync::Arc;

    let (c, h, w) = (6, 17, 23);
    let shape = [1, c, h, w];
    // Accumulators spread so that some requantize below and above the grid.
    let acc: Vec<i32> = values(c * h * w, 9)
        .iter()
        .map(|v| (v * 9000.0) as i32)
        .collect();
    let acc = Tensor::from_shape(&shape, &acc).unwrap();
    let fq = |scale: f32, zp: i32| {
        Step::FakeQuant(FakeQuant {
            inv_scale: scale.recip(),
            grid: Grid::of::<u8>(zp),
            dq_zero_point: zp,
            dq_scale: scale,
        })
    };
    let chain = |per_channel: bool, tail: Tail| {
        let k = |v: f32| Operand::Const(Arc::new(vec![v; if per_channel { c } else { 1 }]));
        ElementwiseChain {
            head: Head::Requant(Requant {
                axis: 1,
                mult: Arc::new((0..c).map(|i| 0.011 + 0.003 * i as f32).collect()),
                offset: Arc::new((0..c).map(|i| 120.0 + i as f32).collect()),
                out: RequantOut::Grid {
                    grid: Grid::of::<u8>(128),
                    dq_zero_point: 128,
                    dq_scale: 0.03,
                },
            }),
            steps: vec![
                Step::Scalar(Arith::Mul, k(std::f32::consts::FRAC_1_SQRT_2)),
                Step::Erf,
                fq(1.0 / 127.0, 128),
                Step::Scalar(Arith::Add, k(1.0)),
                fq(2.0 / 255.0, 0),
                Step::TensorHead(Arith::Mul),
                fq(0.05, 64),
                Step::Scalar(Arith::Mul, k(0.5)),
            ],
            tail,
            fused: vec![],
        }
    };
    let eval = |op: ElementwiseChain, threads: usize| -> Tensor {
        common::run_model(&common::one_op_model(op, i32::fact(shape)), &acc, threads)
    };

    let tails = [
        Tail::F32,
        Tail::Quantize(Quantize {
            inv_scale: 1.0 / 0.025,
            grid: Grid::of::<u8>(64),
            dt: u8::datum_type(),
        }),
        Tail::Quantize(Quantize {
            inv_scale: 1.0 / 0.02,
            grid: Grid::of::<i8>(-3),
            dt: i8::datum_type(),
        }),
    ];
    for tail in tails {
        for threads in [1, 3] {
            let table = eval(chain(false, tail.clone()), threads);
            let element = eval(chain(true, tail.clone()), threads);
            assert_eq!(table.datum_type(), element.datum_type());
            let floats = |t: &Tensor| -> Vec<f32> {
                let t = t.cast_to::<f32>().unwrap();
                t.to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect()
            };
            let (a, b) = (&floats(&table), &floats(&element));
            assert_eq!(differing_bits(a, b), 0, "{tail:?}, {threads} threads");
            // Not a degenerate output: the grid's levels are all reached.
            let distinct: std::collections::BTreeSet<u32> = a.iter().map(|v| v.to_bits()).collect();
            assert!(
                distinct.len() > 40,
                "{tail:?}: {} distinct values",
                distinct.len()
            );
        }
    }
}

/// A requantizing head followed by a step with a tensor operand (a residual addition
/// after a conv) runs as one loop with it and the round trip after it. Oracle: the same
/// chain with a `× 1` first, which keeps it on the step-by-step path (`x · 1 = x` for
/// every finite `x` and both zeros). Every operation, both requantized outputs, with and
/// without the round trip, planes smaller and larger than a slice, 1 and 3 threads.
#[test]
fn requant_head_with_a_tensor_step_matches_the_step_path() {
    use poolformer_edge::kernels::quant::Grid;
    use poolformer_edge::ops::requant::{FakeQuant, Requant, RequantOut};
    use std::sync::Arc;

    for (c, h, w) in [(6, 17, 23), (3, 40, 40)] {
        let shape = [1, c, h, w];
        let acc: Vec<i32> = values(c * h * w, 41)
            .iter()
            .map(|v| (v * 9000.0) as i32)
            .collect();
        let acc = Tensor::from_shape(&shape, &acc).unwrap();
        let residual: Vec<f32> = values(c * h * w, 42).iter().map(|v| 3.0 * v).collect();
        let residual = Tensor::from_shape(&shape, &residual).unwrap();
        let outs = [
            RequantOut::F32,
            RequantOut::Grid {
                grid: Grid::of::<u8>(128),
                dq_zero_point: 128,
                dq_scale: 0.03,
            },
        ];
        for op in [Arith::Add, Arith::Sub, Arith::SubFrom, Arith::Mul] {
            for out in &outs {
                for round_trip in [false, true] {
                    let chain = |through_one: bool| {
                        let mut steps = vec![];
                        if through_one {
                            steps.push(Step::Scalar(
                                Arith::Mul,
                                Operand::Const(Arc::new(vec![1.0])),
                            ));
                        }
                        steps.push(Step::Tensor(op, 1));
                        if round_trip {
                            steps.push(Step::FakeQuant(FakeQuant {
                                inv_scale: 1.0 / 0.04,
                                grid: Grid::of::<u8>(128),
                                dq_zero_point: 128,
                                dq_scale: 0.04,
                            }));
                        }
                        steps.push(Step::Scalar(
                            Arith::Mul,
                            Operand::Const(Arc::new(vec![0.5])),
                        ));
                        ElementwiseChain {
                            head: Head::Requant(Requant {
                                axis: 1,
                                mult: Arc::new((0..c).map(|i| 0.011 + 0.003 * i as f32).collect()),
                                offset: Arc::new((0..c).map(|i| 1.0 + i as f32).collect()),
                                out: *out,
                            }),
                            steps,
                            tail: Tail::F32,
                            fused: vec![],
                        }
                    };
                    let eval = |op: ElementwiseChain, threads: usize| -> Vec<f32> {
                        let mut model = TypedModel::default();
                        let x = model.add_source("x", i32::fact(shape)).unwrap();
                        let t = model.add_const("residual", residual.clone()).unwrap();
                        let y = model.wire_node("op", op, &[x, t]).unwrap();
                        model.select_output_outlets(&y).unwrap();
                        common::run_model(&model, &acc, threads)
                            .to_plain_array_view::<f32>()
                            .unwrap()
                            .iter()
                            .copied()
                            .collect()
                    };
                    for threads in [1, 3] {
                        let fused = eval(chain(false), threads);
                        let steps = eval(chain(true), threads);
                        let differ = differing_bits(&fused, &steps);
                        assert_eq!(
                            differ, 0,
                            "{c}×{h}×{w}, {op:?}, {out:?}, round trip {round_trip}, {threads} threads"
                        );
                    }
                }
            }
        }
    }
}
