//! The quantizer (`pfe quantize`) and the accuracy report (`pfe compare`) end to end,
//! on a tiny PoolFormer with synthetic weights at a 64×64 input.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use indicatif::ProgressBar;
use poolformer_edge::compare::Accumulator;
use poolformer_edge::models::{export, synth, ArchConfig};
use poolformer_edge::quantize::{
    self, calibrate, qdq, smooth, ActivationQuant, ActivationType, InputSet, Method,
    QuantizeOptions,
};
use poolformer_edge::{Engine, Options};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb::{self, tensor_proto::DataType, ModelProto};
use tract_onnx::prelude::*;

const SIZE: usize = 64;

fn tiny() -> ArchConfig {
    ArchConfig::custom("tiny", &[1, 1, 2, 1], &[8, 16, 24, 32], 10).unwrap()
}

fn tiny_model() -> ModelProto {
    let arch = tiny();
    export::build_model(&arch, &synth::synthesize(&arch, 3).unwrap()).unwrap()
}

fn options(method: Method) -> QuantizeOptions {
    QuantizeOptions {
        method,
        input_size: SIZE,
        ..QuantizeOptions::default()
    }
}

fn quantized_tiny(options: &QuantizeOptions) -> (ModelProto, ModelProto) {
    let model = tiny_model();
    let inputs = InputSet::synthetic(8, 0).unwrap();
    let (q, _) = quantize::quantize(&model, &inputs, options, &ProgressBar::hidden()).unwrap();
    (model, q)
}

fn init<'a>(m: &'a ModelProto, name: &str) -> &'a pb::TensorProto {
    let g = m.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

fn f32s(t: &pb::TensorProto) -> Vec<f32> {
    assert_eq!(t.data_type, DataType::Float as i32, "{}", t.name);
    t.raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn engine(m: &ModelProto) -> Engine {
    let options = Options {
        threads: 1,
        input_size: SIZE,
        ..Options::default()
    };
    Engine::from_bytes(&m.encode_to_vec(), options).expect("loading into the engine")
}

/// The tiny model has 14 convs: stem, 3 downsamplings, fc1 and fc2 of 5 blocks.
const TINY_CONVS: usize = 14;

/// The downsampling convs read the residual stream, whose activations stay float.
const TINY_DOWNSAMPLINGS: usize = 3;

/// The written graph is standard QDQ: one Q/DQ pair per conv input except the
/// residual stream entering the downsampling convs, one per-channel DequantizeLinear
/// (axis 0, int8 zero points 0) per conv weight, int8 weights equal to round(W/s) with
/// s = max|W_row|/127 computed here from the fp32 initializer, and no float conv
/// weight left.
#[test]
fn written_graph_is_standard_qdq() {
    // Without smoothing, so the int8 weights can be checked against the fp32 ones.
    let (fp32, q) = quantized_tiny(&QuantizeOptions {
        smooth_alpha: None,
        bias_correction: false,
        ..options(Method::MinMax)
    });
    assert!(q
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() && o.version >= 13));
    let g = q.graph.as_ref().unwrap();
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    let activations = TINY_CONVS - TINY_DOWNSAMPLINGS;
    assert_eq!(count("Conv"), TINY_CONVS);
    assert_eq!(count("QuantizeLinear"), activations);
    assert_eq!(count("DequantizeLinear"), activations + TINY_CONVS);
    assert_eq!(count("Gemm"), 1);

    let producer: HashMap<&str, &pb::NodeProto> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut checked_values = 0;
    for conv in g.node.iter().filter(|n| n.op_type == "Conv") {
        // Activation: DQ ← Q ← the original value; the residual stream as it is.
        if conv.name.contains("downsample") {
            assert_eq!(
                producer[conv.input[0].as_str()].op_type,
                "Add",
                "{}",
                conv.name
            );
        } else {
            let dq = producer[conv.input[0].as_str()];
            assert_eq!(dq.op_type, "DequantizeLinear", "{}", conv.name);
            let qn = producer[dq.input[0].as_str()];
            assert_eq!(qn.op_type, "QuantizeLinear", "{}", conv.name);
            assert_eq!(init(&q, &qn.input[1]).dims, Vec::<i64>::new(), "per-tensor");
        }
        // Weight: DQ(axis 0) of an int8 initializer.
        let wdq = producer[conv.input[1].as_str()];
        assert_eq!(wdq.op_type, "DequantizeLinear");
        let axis = wdq.attribute.iter().find(|a| a.name == "axis").unwrap();
        assert_eq!(axis.i, 0, "{}", conv.name);
        let data = init(&q, &wdq.input[0]);
        assert_eq!(data.data_type, DataType::Int8 as i32);
        let scales = f32s(init(&q, &wdq.input[1]));
        let zp = init(&q, &wdq.input[2]);
        assert_eq!(zp.data_type, DataType::Int8 as i32);
        assert!(zp.raw_data.iter().all(|&b| b == 0));

        let weight_name = format!("{}.weight", conv.name);
        let w = f32s(init(&fp32, &weight_name));
        let rows = data.dims[0] as usize;
        assert_eq!(scales.len(), rows);
        let per_row = w.len() / rows;
        // Convs with a quantized input run on the integer kernels: their scale bounds
        // sums for x86's `vpmaddubsw`. For a 1×1 conv (a row holds its input
        // channels, here a multiple of 8), the quads {0, 1, 4, 5} and {2, 3, 6, 7} of
        // each octet, to 126 steps (|q| sums ≤ 128 after rounding); for the k×k stem,
        // consecutive pairs to 127 steps (|q₀| + |q₁| ≤ 128). The others' scale bounds
        // the values.
        let paired = !conv.name.contains("downsample");
        let quads = paired && per_row == data.dims[1] as usize;
        if quads {
            assert_eq!(per_row % 8, 0, "{weight_name}");
        }
        let abs_sum = |v: &[f32], idx: [usize; 4]| -> f32 { idx.iter().map(|&i| v[i].abs()).sum() };
        for r in 0..rows {
            let row = &w[r * per_row..(r + 1) * per_row];
            let s = if quads {
                let max = row.chunks(8).fold(0f32, |m, o| {
                    m.max(abs_sum(o, [0, 1, 4, 5]))
                        .max(abs_sum(o, [2, 3, 6, 7]))
                });
                max / 126.0
            } else if paired {
                let max = row
                    .chunks(2)
                    .fold(0f32, |m, p| m.max(p.iter().map(|v| v.abs()).sum()));
                max / 127.0
            } else {
                row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0
            };
            assert_eq!(scales[r], s, "{weight_name} row {r} scale");
            let q = &data.raw_data[r * per_row..(r + 1) * per_row];
            for (k, &v) in row.iter().enumerate() {
                let expected = (v / s).round() as i8;
                assert_eq!(q[k] as i8, expected);
                checked_values += 1;
            }
            let a = |b: u8| (b as i8 as i32).abs();
            if quads {
                for o in q.chunks(8) {
                    let sums = [
                        a(o[0]) + a(o[1]) + a(o[4]) + a(o[5]),
                        a(o[2]) + a(o[3]) + a(o[6]) + a(o[7]),
                    ];
                    assert!(
                        sums[0].max(sums[1]) <= 128,
                        "{weight_name} row {r}: octet {o:?}"
                    );
                }
            } else if paired {
                for p in q.chunks(2) {
                    let sum: i32 = p.iter().map(|&b| a(b)).sum();
                    assert!(sum <= 128, "{weight_name} row {r}: pair {p:?}");
                }
            }
        }
        assert!(
            g.initializer.iter().all(|t| t.name != weight_name),
            "float {weight_name} left in the graph"
        );
    }
    assert!(checked_values > 10_000, "{checked_values}");
}

/// SQNR in dB of `b` against `a`, computed here from its definition.
fn sqnr(a: &[f32], b: &[f32]) -> f64 {
    let signal: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    let noise: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    10.0 * (signal / noise).log10()
}

/// The QDQ model loads and runs in the engine, and its logits stay close to fp32 on
/// held-out synthetic images (seeds distinct from the calibration ones).
///
/// Bound: 8-bit uniform quantization of one full-range tensor gives ~6·8 − 1.25 ≈ 47 dB;
/// 11 quantized activations and 14 quantized weights in sequence, activations using
/// only part of their range, lose a few dB of that. Measured on this model and these
/// images with the default options (residual stream in float, smoothing α = 0.5, bias
/// correction): 42.4 dB (min-max), 42.3 dB (percentile 99.99), 42.4 dB (MSE). 35 dB leaves 7 dB for other CPUs' summation
/// orders; a missing zero point or a weight scale off by a channel shows as
/// single-digit SQNR.
#[test]
fn quantized_logits_are_close_to_fp32() {
    for method in [
        Method::MinMax,
        Method::Percentile { percentile: 99.99 },
        Method::Mse,
    ] {
        let (fp32, q) = quantized_tiny(&options(method));
        let (ea, eb) = (engine(&fp32), engine(&q));
        let (mut a, mut b) = (vec![], vec![]);
        for x in InputSet::synthetic(8, 500).unwrap().tensors(SIZE) {
            let x = x.unwrap();
            a.extend(ea.run_array(x.clone()).unwrap());
            b.extend(eb.run_array(x).unwrap());
        }
        let db = sqnr(&a, &b);
        eprintln!("{method:?}: {db:.1} dB");
        assert!(db >= 35.0, "{method:?}: SQNR {db:.1} dB");
    }
}

/// The calibration's min/max equal a direct recomputation: the same tensors taken as
/// graph outputs of the ONNX model itself (edited here, not through the calibrator's
/// outlet selection), run by plain tract without optimization.
#[test]
fn calibration_ranges_match_a_direct_recomputation() {
    let model = tiny_model();
    let names: Vec<String> = [
        "input",
        "stages.0.blocks.0.norm2",
        "stages.0.blocks.0.mlp.act",
        "stages.2.blocks.1.residual2",
    ]
    .map(String::from)
    .to_vec();
    let inputs = InputSet::synthetic(3, 7).unwrap();
    let stats = calibrate::collect(
        &model.encode_to_vec(),
        &names,
        &inputs,
        SIZE,
        1,
        &ProgressBar::hidden(),
    )
    .unwrap();

    let mut oracle = model.clone();
    let graph = oracle.graph.as_mut().unwrap();
    graph.output = names
        .iter()
        .map(|n| pb::ValueInfoProto {
            name: n.clone(),
            ..Default::default()
        })
        .collect();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &oracle.encode_to_vec()[..])
        .unwrap()
        .with_input_fact(0, f32::fact([1, 3, SIZE, SIZE]).into())
        .unwrap()
        .into_typed()
        .unwrap()
        .into_runnable()
        .unwrap();
    let mut expected: BTreeMap<&str, (f32, f32)> = BTreeMap::new();
    for x in inputs.tensors(SIZE) {
        let out = plan.run(tvec!(x.unwrap().into_tensor().into())).unwrap();
        for (name, t) in names.iter().zip(out.iter()) {
            let e = expected
                .entry(name.as_str())
                .or_insert((f32::INFINITY, f32::NEG_INFINITY));
            for &v in t.to_plain_array_view::<f32>().unwrap().iter() {
                e.0 = e.0.min(v);
                e.1 = e.1.max(v);
            }
        }
    }
    // Optimized and unoptimized tract may sum in different orders: equal to a few ulps.
    for (name, &(lo, hi)) in &expected {
        let h = &stats[*name];
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        assert!(
            close(h.min(), lo) && close(h.max(), hi),
            "{name}: calibrated [{}, {}], direct [{lo}, {hi}]",
            h.min(),
            h.max()
        );
        assert_eq!(h.count() as usize, 3 * value_len(&model, name));
    }
}

/// Elements of one value of the tiny model at 64×64 (channels × spatial).
fn value_len(_model: &ModelProto, name: &str) -> usize {
    match name {
        "input" => 3 * SIZE * SIZE,
        // Stage 0 runs at 64/4 = 16: 8 channels (norm2), 32 hidden (act).
        "stages.0.blocks.0.norm2" => 8 * 16 * 16,
        "stages.0.blocks.0.mlp.act" => 32 * 16 * 16,
        // Stage 2 at 4×4, 24 channels.
        "stages.2.blocks.1.residual2" => 24 * 4 * 4,
        _ => unreachable!(),
    }
}

/// Percentile and MSE ranges sit inside the min-max range, and the activation
/// parameters represent 0 exactly and cover the clip range to within one step.
#[test]
fn clip_ranges_and_parameters() {
    let model = tiny_model();
    let targets = qdq::find_targets(&model, false, true).unwrap();
    let stats = quantize::calibration_stats(
        &model,
        &targets,
        &InputSet::synthetic(4, 0).unwrap(),
        &options(Method::MinMax),
        &ProgressBar::hidden(),
    )
    .unwrap();
    for (name, h) in &stats {
        let (min, max) = (h.min() as f64, h.max() as f64);
        for method in [Method::Percentile { percentile: 99.9 }, Method::Mse] {
            let (lo, hi) = method.range(h, ActivationType::Uint8);
            assert!(
                min <= lo && lo <= hi && hi <= max,
                "{name} {method:?}: [{lo}, {hi}] outside [{min}, {max}]"
            );
        }
        for dtype in [
            ActivationType::Uint8,
            ActivationType::Int8,
            ActivationType::Int8Symmetric,
        ] {
            let q = ActivationQuant::from_range(min, max, dtype);
            let (lo, hi) = q.range();
            let step = q.scale as f64;
            assert!(
                lo as f64 <= min.min(0.0) + step && hi as f64 >= max - step,
                "{name} {dtype:?}"
            );
        }
    }
    let q = ActivationQuant::from_range(-1.0, 3.0, ActivationType::Uint8);
    assert_eq!((q.scale, q.zero_point), (4.0 / 255.0, 64));
    let q = ActivationQuant::from_range(-1.0, 3.0, ActivationType::Int8);
    assert_eq!((q.scale, q.zero_point), (4.0 / 255.0, -64));
    let q = ActivationQuant::from_range(-1.0, 3.0, ActivationType::Int8Symmetric);
    assert_eq!((q.scale, q.zero_point), (3.0 / 127.0, 0));
    // Entirely positive: widened to include 0.
    let q = ActivationQuant::from_range(0.5, 2.55, ActivationType::Uint8);
    assert_eq!((q.scale, q.zero_point), (0.01, 0));
}

/// The head's Gemm is quantized on request (transB = 1: axis 0), left alone otherwise;
/// residual-stream inputs (exactly the downsampling convs' here) are quantized on request.
#[test]
fn head_and_residual_quantization_are_optional() {
    let model = tiny_model();
    let without = qdq::find_targets(&model, false, false).unwrap();
    assert!(without.iter().all(|t| t.op_type == "Conv"));
    let float_inputs: Vec<&str> = without
        .iter()
        .filter(|t| !t.quantize_activation)
        .map(|t| t.node.as_str())
        .collect();
    assert_eq!(
        float_inputs,
        [
            "stages.1.downsample.conv",
            "stages.2.downsample.conv",
            "stages.3.downsample.conv"
        ]
    );
    let all = qdq::find_targets(&model, false, true).unwrap();
    assert!(all.iter().all(|t| t.quantize_activation));
    let with = qdq::find_targets(&model, true, false).unwrap();
    let head: Vec<_> = with.iter().filter(|t| t.op_type == "Gemm").collect();
    assert_eq!(head.len(), 1);
    assert_eq!(
        (head[0].weight.as_str(), head[0].axis),
        ("head.fc.weight", 0)
    );
}

/// Smoothing finds exactly the fc1 convs (fed by norm2's affine) and is exact in
/// float: the smoothed fp32 model gives the original logits to 1e-4 (f32 rounding of
/// γ/s, β/s and W·s, relative ~1e-7 each, on logits of order 1; see tests/reference.rs
/// for the same budget), while the scales it applied are far from 1.
#[test]
fn smoothing_targets_fc1_and_is_exact_in_float() {
    let model = tiny_model();
    let targets = qdq::find_targets(&model, false, false).unwrap();
    let smoothable = smooth::find_smoothable(&model, &targets).unwrap();
    let nodes: Vec<&str> = smoothable.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(nodes.len(), 5, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.ends_with("mlp.fc1")), "{nodes:?}");
    let names: Vec<String> = smoothable.iter().map(|s| s.activation.clone()).collect();
    let stats = calibrate::collect_channel_stats(
        &model.encode_to_vec(),
        &names,
        &InputSet::synthetic(3, 0).unwrap(),
        SIZE,
        1,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let mut smoothed = model.clone();
    let scales = smooth::smooth(&mut smoothed, &smoothable, &stats, 0.5).unwrap();
    let spread = scales
        .values()
        .flatten()
        .fold(1f32, |m, &s| m.max(s).max(1.0 / s));
    assert!(spread > 2.0, "scales all near 1: {spread}");
    let (ea, eb) = (engine(&model), engine(&smoothed));
    for x in InputSet::synthetic(4, 500).unwrap().tensors(SIZE) {
        let x = x.unwrap();
        let (a, b) = (ea.run_array(x.clone()).unwrap(), eb.run_array(x).unwrap());
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() <= 1e-4, "{u} vs {v}");
        }
    }
}

/// Paired scales. For a weight that is not a 1×1 conv's (here `[C, K]`): per channel
/// `max(|w₀| + |w₁|)/127` over pairs of consecutive values (an odd row's last value
/// alone), and every pair's `|q₀| + |q₁| ≤ 128` even where both halves of the largest
/// pair round up (1.0/s = 63.5 → 64). For a 1×1 conv (`[O, C, 1, 1]`): per channel
/// `max Σ|w|/126` over the quads {0, 1, 4, 5} and {2, 3, 6, 7} of each octet, a last
/// part of 4 channels or fewer bounded as pairs, and every quad's `Σ|q| ≤ 128` even
/// where all four round up (31.5 → 32).
#[test]
fn paired_quantization_bounds_pair_sums() {
    let q = qdq::quantize_per_channel(&[1.0f32, 1.0, 0.5, -1.5], &[1, 4], 0, true);
    assert_eq!(q.scales, [2.0 / 127.0]);
    assert_eq!(q.data, [64, 64, 32, -95]);
    let q = qdq::quantize_per_channel(&[0.1f32, 0.2, 0.9, -0.4, 0.4, 0.0], &[2, 3], 0, true);
    assert_eq!(q.scales, [0.9 / 127.0, 0.8 / 127.0]);
    assert_eq!(q.data[2], 127);
    assert_eq!(&q.data[3..], [-64, 64, 0]);
    // Quads: {0, 1, 4, 5} sums to 126/64, {2, 3, 6, 7} to a quarter of that → scale
    // 1/64, and 31.5/64 → 31.5 → 32 (exact in f32).
    let v = 31.5 / 64.0;
    let w = [v, v, v / 2.0, 0.0, -v, v, -v / 2.0, 0.0];
    let q = qdq::quantize_per_channel(&w, &[1, 8, 1, 1], 0, true);
    assert_eq!(q.scales, [1.0 / 64.0]);
    assert_eq!(q.data, [32, 32, 16, 0, -32, 32, -16, 0]);
    // Twelve channels: an octet, then a last group of 4 bounded as pairs, whose pair
    // (3.0, 0.0) sets the scale: 3/127 > 2/126.
    let w = [
        0.5f32, 0.5, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0,
    ];
    let q = qdq::quantize_per_channel(&w, &[1, 12, 1, 1], 0, true);
    assert_eq!(q.scales, [3.0 / 127.0]);
    // A 3×3 kernel is bounded in pairs, not quads.
    let q = qdq::quantize_per_channel(&[1.0f32; 18], &[1, 2, 3, 3], 0, true);
    assert_eq!(q.scales, [2.0 / 127.0]);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let w: Vec<f32> = (0..64 * 96)
        .map(|_| rng.gen_range(-1.0f32..1.0).powi(3))
        .collect();
    let q = qdq::quantize_per_channel(&w, &[64, 96, 1, 1], 0, true);
    let a = |v: i8| (v as i32).abs();
    for (row, s) in q.data.chunks(96).zip(&q.scales) {
        assert!(row.chunks(8).all(|o| {
            a(o[0]) + a(o[1]) + a(o[4]) + a(o[5]) <= 128
                && a(o[2]) + a(o[3]) + a(o[6]) + a(o[7]) <= 128
        }));
        // Some quad holds 126 steps before rounding, so some value is at least 31.5.
        assert!(row.iter().any(|&v| v.abs() >= 32), "{row:?}, scale {s}");
    }
}

/// The quantizer's quads and the kernels' check of them are two codes of one layout:
/// 1×1 conv weights from `quantize_per_channel` must pass `PackedI8::quads_fit_i16`
/// (so that x86's two-group `vpmaddubsw` kernel runs them) for any input channel count,
/// including counts whose last octet is partial (13, 21: padded with zero weights by
/// the packing) or whose last group of 4 stands alone (12, 20). Heavy-tailed weights,
/// so that the bound binds.
#[test]
fn quantized_quads_pass_the_kernels_check() {
    use poolformer_edge::kernels::qgemm::PackedI8;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for c in [4, 8, 12, 13, 20, 21, 64, 320] {
        let rows = 48;
        let w: Vec<f32> = (0..rows * c)
            .map(|_| rng.gen_range(-1.0f32..1.0).powi(5))
            .collect();
        let q = qdq::quantize_per_channel(&w, &[rows, c, 1, 1], 0, true);
        let packed = PackedI8::new(rows, c, &q.data).unwrap();
        assert!(packed.quads_fit_i16(), "{c} channels");
        // Bounding pairs only (a k×k layout, same values) leaves some quads over.
        if c >= 64 {
            let p = qdq::quantize_per_channel(&w, &[rows, 1, c, 1], 0, true);
            let packed = PackedI8::new(rows, c, &p.data).unwrap();
            assert!(
                packed.pairs_fit_i16() && !packed.quads_fit_i16(),
                "{c} channels"
            );
        }
    }
}

#[test]
fn per_channel_quantization_along_axis_1() {
    let w = [0.5f32, -2.0, 0.25, 1.0, -0.127, 0.0];
    let q = qdq::quantize_per_channel(&w, &[3, 2], 1, false);
    assert_eq!(q.scales, [0.5 / 127.0, 2.0 / 127.0]);
    assert_eq!(q.data, [127, -127, 64, 64, -32, 0]);
    // An all-zero channel gets scale 1 and zeros.
    let q = qdq::quantize_per_channel(&[0.0, 0.0, 1.0, -1.0], &[2, 2], 0, false);
    assert_eq!(
        (q.scales.as_slice(), q.data.as_slice()),
        (&[1.0, 1.0 / 127.0][..], &[0, 0, 127, -127][..])
    );
}

/// `compare`'s math on vectors whose SQNR and agreements are known by hand.
#[test]
fn comparison_math_on_known_vectors() {
    let mut acc = Accumulator::new();
    // Σa² = 1+4+9+16+25+36 = 91, Σ(a−b)² = 6·0.01 = 0.06 → 10·log10(91/0.06) = 31.809 dB.
    let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.1f32, 1.9, 3.1, 3.9, 5.1, 5.9];
    acc.add(&a, &b).unwrap();
    let c = acc.finish();
    assert!(
        (c.sqnr_db - 10.0 * (91.0f64 / 0.06).log10()).abs() < 1e-3,
        "{}",
        c.sqnr_db
    );
    assert!((c.max_abs_diff - 0.1).abs() < 1e-6);
    assert_eq!((c.top1_agreement, c.top5_agreement), (1.0, 1.0));

    // B's top-1 is A's 2nd: top-1 miss, top-5 hit. Then A's 6th: miss both.
    acc.add(&a, &[0.0, 0.0, 0.0, 0.0, 9.0, 0.0]).unwrap();
    acc.add(&a, &[9.0, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
    let c = acc.finish();
    assert_eq!(c.inputs, 3);
    assert!((c.top1_agreement - 1.0 / 3.0).abs() < 1e-12);
    assert!((c.top5_agreement - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(c.max_abs_diff, 9.0 - 1.0);

    let mut same = Accumulator::new();
    same.add(&a, &a).unwrap();
    assert_eq!(same.finish().sqnr_db, f64::INFINITY);
    assert!(Accumulator::new().add(&a, &a[..3]).is_err());
    assert!(Accumulator::new().add(&a, &[f32::NAN; 6]).is_err());
}

fn pfe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pfe"))
        .args(args)
        .output()
        .expect("running pfe")
}

fn write_tiny(dir: &Path) -> String {
    let p = dir.join("tiny.onnx");
    std::fs::write(&p, tiny_model().encode_to_vec()).unwrap();
    p.to_string_lossy().into_owned()
}

/// `pfe quantize` then `pfe compare --json` through the binary, with a calibration
/// directory of PNGs.
#[test]
fn cli_quantize_then_compare() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    for seed in 0..3 {
        poolformer_edge::testimage::natural_image(96, 80, seed)
            .save(calib.join(format!("{seed}.png")))
            .unwrap();
    }
    let out = dir.path().join("tiny.int8.onnx");
    let out_s = out.to_string_lossy().into_owned();
    let q = pfe(&[
        "quantize",
        &model,
        "-o",
        &out_s,
        "--calib",
        calib.to_str().unwrap(),
        "--size",
        "64",
    ]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let stdout = String::from_utf8_lossy(&q.stdout);
    assert!(
        stdout.contains("14 ops quantized (11 QuantizeLinear"),
        "{stdout}"
    );
    let c = pfe(&[
        "compare",
        &model,
        &out_s,
        "--synthetic",
        "3",
        "--size",
        "64",
        "--json",
    ]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let v: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
    assert_eq!(v["inputs"], 3);
    assert!(v["sqnr_db"].as_f64().unwrap() > 15.0, "{v}");
}

/// Bad input: a clear error naming the problem, never a panic.
#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let out = dir.path().join("o.onnx");
    let out = out.to_str().unwrap();
    let fails = |args: &[&str], needle: &str| {
        let r = pfe(args);
        let stderr = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(!r.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    fails(
        &[
            "quantize",
            "/nonexistent/m.onnx",
            "-o",
            out,
            "--synthetic",
            "2",
        ],
        "/nonexistent/m.onnx does not exist",
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    fails(
        &[
            "quantize",
            &model,
            "-o",
            out,
            "--calib",
            empty.to_str().unwrap(),
        ],
        "no images in",
    );
    fails(
        &["quantize", &model, "-o", out, "--calib", "/nonexistent/dir"],
        "/nonexistent/dir does not exist",
    );
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("broken.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    fails(
        &[
            "quantize",
            &model,
            "-o",
            out,
            "--calib",
            bad.to_str().unwrap(),
            "--size",
            "64",
        ],
        "broken.png",
    );
    fails(
        &["quantize", &model, "-o", out, "--synthetic", "0"],
        "at least 1",
    );
    fails(
        &[
            "quantize",
            &model,
            "-o",
            out,
            "--synthetic",
            "2",
            "--method",
            "percentile",
            "--percentile",
            "120",
        ],
        "percentile 120",
    );
    let not_onnx = dir.path().join("x.onnx");
    std::fs::write(&not_onnx, b"hello").unwrap();
    fails(
        &[
            "quantize",
            not_onnx.to_str().unwrap(),
            "-o",
            out,
            "--synthetic",
            "2",
        ],
        "not an ONNX model",
    );
    fails(
        &[
            "compare",
            &model,
            "/nonexistent/b.onnx",
            "--synthetic",
            "2",
            "--size",
            "64",
        ],
        "/nonexistent/b.onnx does not exist",
    );
}
