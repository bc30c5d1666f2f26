//! The MetaFormer pass and its fused kernels.
//!
//! Kernels: every instruction-set build this CPU runs (portable, AVX2, AVX-512)
//! against a plain f64 implementation of the same formula, on odd sizes and tails.
//! Graphs: the fused engine against the unfused one (tract alone) on the same model
//! and input; tests/reference.rs checks the fused engine against the f64 reference
//! forward pass as well, since fusion is on by default.
//!
//! Tolerances. Kernels: the f32 results carry relative rounding errors of order
//! K·2⁻²⁴ for K-term sums (K ≤ 64 here), so 1e-5 relative (1e-4 for the MLP, whose
//! folded weights reassociate the norm's affine into the matrix products) is tight yet
//! clear of rounding. The packed matrix products (`kernels::sgemm`) are checked against
//! max(1e-5, K·6e-8)·(1 + Σ|terms|): a K-term f32 dot product is off by at most about
//! K·2⁻²⁴·Σ|terms| whatever the summation order, FMA contraction or split of the
//! reduction (K·6e-8 ≥ K·2⁻²⁴), and the erf approximation adds at most 2e-6·|a|/2 to
//! gelu(a) (see the erf test), so the bound holds without depending on cancellation,
//! yet a wrong index, tail, stretch or epilogue term is off by far more. Graphs: 1e-4 absolute on logits of order 1, the bound the
//! reference test argues for (the fused ops reorder sums but stay in f32).

mod common;

use poolformer_edge::kernels::mlp::{
    run_block, run_block_packed, sequential, MlpWeights, PackedMlp, Scratch,
};
use poolformer_edge::kernels::sgemm::{self, Epilogue, PackedCols, PackedWeights, PackedWeightsI8};
use poolformer_edge::kernels::{mixer, norm, Isa};
use poolformer_edge::models::export::export_onnx;
use poolformer_edge::models::synth::synthesize;
use poolformer_edge::models::ArchConfig;
use poolformer_edge::{Engine, Options};
use tract_core::ndarray::Array4;

fn noise(n: usize, seed: u64) -> Vec<f32> {
    common::test_image(1, 1, n, seed)
}

fn avg3x3_ref(x: &[f32], h: usize, w: usize, i: usize, j: usize) -> f64 {
    let (mut s, mut n) = (0f64, 0f64);
    for di in -1i64..=1 {
        for dj in -1i64..=1 {
            let (a, b) = (i as i64 + di, j as i64 + dj);
            if a >= 0 && b >= 0 && (a as usize) < h && (b as usize) < w {
                s += x[a as usize * w + b as usize] as f64;
                n += 1.0;
            }
        }
    }
    s / n
}

#[test]
fn mixer_plane_matches_definition_on_every_isa() {
    for isa in Isa::available() {
        for &(h, w) in &[
            (1, 1),
            (1, 5),
            (4, 1),
            (2, 2),
            (3, 7),
            (7, 7),
            (13, 17),
            (5, 33),
            (1, 9),
            (9, 1),
            (2, 1),
            (56, 56),
        ] {
            let x = noise(h * w, (h * 100 + w) as u64);
            let k = 0.37f32;
            let mut out = vec![0f32; h * w];
            let taps = mixer::PoolTaps::new(h, w);
            // Scratch filled with garbage: the kernel must not read what it did not write.
            let mut sums = vec![f32::NAN; taps.scratch_len()];
            mixer::mix_plane(isa, &x, &mut out, &taps, k, &mut sums);
            for i in 0..h {
                for j in 0..w {
                    let xv = x[i * w + j] as f64;
                    let want = xv + k as f64 * (avg3x3_ref(&x, h, w, i, j) - xv);
                    let got = out[i * w + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{isa:?} {h}×{w} at ({i},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn norm_statistics_match_two_pass_f64_on_every_isa() {
    for isa in Isa::available() {
        for &(n, offset) in &[
            (1usize, 0.0f32),
            (17, 0.5),
            (4096, -3.0),
            (5003, 1000.0),
            (200_704, 2.0),
        ] {
            let x: Vec<f32> = noise(n, n as u64).iter().map(|v| v + offset).collect();
            let eps = 1e-5;
            let (mean, rstd) = norm::mean_rstd(isa, &x, eps);
            let m = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
            let r = 1.0 / (var + eps as f64).sqrt();
            assert!(
                (mean as f64 - m).abs() <= 1e-5 * m.abs().max(1.0),
                "{isa:?} n={n}: mean {mean} vs {m}"
            );
            assert!(
                ((rstd as f64 - r) / r).abs() <= 1e-4,
                "{isa:?} n={n} offset {offset}: rstd {rstd} vs {r}"
            );
        }
    }
}

fn gelu(v: f64) -> f64 {
    // erf by its Maclaurin series (|v/√2| ≤ 3 here, 80 terms converge to f64 precision).
    let z = v / std::f64::consts::SQRT_2;
    let (mut term, mut sum) = (z, z);
    for k in 1..80 {
        term *= -z * z / k as f64;
        sum += term / (2 * k + 1) as f64;
    }
    0.5 * v * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * sum)
}

#[test]
fn channel_mlp_block_matches_definition_on_every_isa() {
    let (c, hidden, hw) = (5usize, 19usize, 23usize);
    let w = MlpWeights {
        channels: c,
        hidden,
        w1: noise(hidden * c, 1).iter().map(|v| v * 0.4).collect(),
        c1: noise(hidden, 2).iter().map(|v| v * 0.1).collect(),
        w2: noise(c * hidden, 3).iter().map(|v| v * 0.3).collect(),
        b2: noise(c, 4),
    };
    let x: Vec<f32> = noise(c * hw, 5).iter().map(|v| v + 0.7).collect();
    let (mean, rstd) = (0.6f32, 1.3f32);
    let mut want = vec![0f64; c * hw];
    for t in 0..hw {
        let hid: Vec<f64> = (0..hidden)
            .map(|o| {
                let dot: f64 = (0..c)
                    .map(|i| w.w1[o * c + i] as f64 * (x[i * hw + t] - mean) as f64)
                    .sum();
                gelu(rstd as f64 * dot + w.c1[o] as f64)
            })
            .collect();
        for ch in 0..c {
            let dot: f64 = (0..hidden)
                .map(|j| w.w2[ch * hidden + j] as f64 * hid[j])
                .sum();
            want[ch * hw + t] = x[ch * hw + t] as f64 + w.b2[ch] as f64 + dot;
        }
    }
    for isa in Isa::available() {
        // Blocks of 7 columns: the last one is a 2-column tail.
        let mut out = vec![f32::NAN; c * hw];
        let mut scratch = Scratch::default();
        for j0 in (0..hw).step_by(7) {
            let cols = (j0, (j0 + 7).min(hw));
            unsafe {
                run_block(
                    isa,
                    &w,
                    x.as_ptr(),
                    out.as_mut_ptr(),
                    hw,
                    cols,
                    (mean, rstd),
                    &mut scratch,
                    gemm::Parallelism::None,
                )
                .unwrap();
            }
        }
        for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                "{isa:?} at {i}: {g} vs {e}"
            );
        }
    }
    // The packed kernels, every build, whole blocks and blocks split by rows.
    let w = std::sync::Arc::new(w.clone());
    for isa in Isa::available() {
        let packed = PackedMlp::new(isa, w.clone());
        for (block, parts) in [(7, 1), (23, 1), (7, 2), (23, 3), (5, 9)] {
            let mut out = vec![f32::NAN; c * hw];
            let mut scratch = Scratch::default();
            for j0 in (0..hw).step_by(block) {
                let cols = (j0, (j0 + block).min(hw));
                unsafe {
                    run_block_packed(
                        &packed,
                        x.as_ptr(),
                        out.as_mut_ptr(),
                        hw,
                        cols,
                        (mean, rstd),
                        &mut scratch,
                        parts,
                        &sequential,
                    );
                }
            }
            for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "packed {isa:?} blocks of {block}, {parts} parts, at {i}: {g} vs {e}"
                );
            }
        }
    }
}

/// (rows M, depth K, tokens N): tails of the 6- and 8-row panels and of 8/16-token vectors,
/// N below one vector, K = 1, panels of one, two and three vectors, reductions longer
/// than one stretch (256 on AVX-512, 512 on AVX2) with uneven stretches, PoolFormer-like.
const SGEMM_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 1, 5),
    (8, 4, 16),
    (9, 7, 17),
    (13, 5, 33),
    (7, 3, 48),
    (17, 64, 49),
    (19, 130, 3),
    (5, 17, 100),
    (24, 9, 47),
    (16, 32, 64),
    (9, 300, 20),
    (17, 521, 5),
    (11, 1100, 19),
    // Four full panels and a narrow one of four tokens, over three stretches of the
    // reduction (PoolFormer's 14×14 stage).
    (10, 520, 196),
];

/// `(Σ w·(x − shift), Σ |w·(x − shift)|)` in f64 for output `(i, j)`.
fn sgemm_tol(k: usize) -> f64 {
    1e-5f64.max(k as f64 * 6e-8)
}

fn dot_ref(
    w: &[f32],
    x: &[f32],
    ldx: usize,
    k: usize,
    shift: f32,
    i: usize,
    j: usize,
) -> (f64, f64) {
    (0..k)
        .map(|kk| w[i * k + kk] as f64 * (x[kk * ldx + j] as f64 - shift as f64))
        .fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()))
}

#[test]
fn sgemm_gelu_matches_definition_on_every_isa() {
    for &(m, k, n) in SGEMM_SHAPES {
        let ldx = n + 3;
        let w: Vec<f32> = noise(m * k, (m * k) as u64)
            .iter()
            .map(|v| v * 0.3)
            .collect();
        let x = noise(k * ldx, (k * n) as u64 + 1);
        let bias: Vec<f32> = noise(m, 7).iter().map(|v| v * 0.2).collect();
        let (shift, scale) = (0.6f32, 2.0 / (k as f32).sqrt());
        for isa in Isa::available() {
            let packed_w = PackedWeights::pack(isa, &w, m, k);
            let mut px = PackedCols::default();
            px.pack(isa, &x, ldx, k, n, shift);
            assert_eq!(px.unpack().len(), k * n);
            let mut hidden = PackedCols::default();
            hidden.set_layout_like(&px, m);
            let epi = Epilogue::Gelu {
                scale,
                bias: &bias,
                dst: hidden.as_mut_ptr(),
            };
            unsafe { sgemm::gemm(isa, &packed_w, 0..packed_w.panels(), &px, &epi) };
            let got = hidden.unpack();
            for i in 0..m {
                for j in 0..n {
                    let (dot, abs) = dot_ref(&w, &x, ldx, k, shift, i, j);
                    let a = scale as f64 * dot + bias[i] as f64;
                    let want = common::reference::gelu(a);
                    let g = got[i * n + j] as f64;
                    let tol = sgemm_tol(k) * (1.0 + scale as f64 * abs + bias[i].abs() as f64);
                    assert!(
                        (g - want).abs() <= tol,
                        "{isa:?} {m}×{k}×{n} at ({i},{j}): {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn sgemm_residual_matches_definition_on_every_isa() {
    for &(m, k, n) in SGEMM_SHAPES {
        let (ldx, ldo) = (n + 3, n + 2);
        let w: Vec<f32> = noise(m * k, (m * k) as u64 + 2)
            .iter()
            .map(|v| v * 0.3)
            .collect();
        let b = noise(k * ldx, (k * n) as u64 + 3);
        let res = noise(m * ldx, (m * n) as u64 + 4);
        let bias = noise(m, 8);
        for isa in Isa::available() {
            let packed_w = PackedWeights::pack(isa, &w, m, k);
            let mut pb = PackedCols::default();
            pb.pack(isa, &b, ldx, k, n, 0.0);
            // Outside the n columns of each row the output must stay untouched.
            let mut out = vec![f32::NAN; m * ldo];
            let epi = Epilogue::Residual {
                bias: &bias,
                x: res.as_ptr(),
                ldx,
                out: out.as_mut_ptr(),
                ldo,
            };
            // In two row ranges, as the threads split them.
            let half = packed_w.panels() / 2;
            unsafe {
                sgemm::gemm(isa, &packed_w, 0..half, &pb, &epi);
                sgemm::gemm(isa, &packed_w, half..packed_w.panels(), &pb, &epi);
            }
            for i in 0..m {
                for j in 0..ldo {
                    let g = out[i * ldo + j] as f64;
                    if j >= n {
                        assert!(g.is_nan(), "{isa:?} {m}×{k}×{n}: wrote ({i},{j})");
                        continue;
                    }
                    let (dot, abs) = dot_ref(&w, &b, ldx, k, 0.0, i, j);
                    let (r, bi) = (res[i * ldx + j] as f64, bias[i] as f64);
                    let want = dot + r + bi;
                    let tol = sgemm_tol(k) * (1.0 + abs + r.abs() + bi.abs());
                    assert!(
                        (g - want).abs() <= tol,
                        "{isa:?} {m}×{k}×{n} at ({i},{j}): {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn sgemm_packing_round_trips() {
    for isa in Isa::available() {
        for &(k, n) in &[(1usize, 1usize), (3, 7), (2, 16), (5, 49), (4, 196)] {
            let ldx = n + 1;
            let x = noise(k * ldx, n as u64);
            let mut p = PackedCols::default();
            p.pack(isa, &x, ldx, k, n, 0.25);
            let want: Vec<f32> = (0..k)
                .flat_map(|kk| x[kk * ldx..kk * ldx + n].iter().map(|v| v - 0.25))
                .collect();
            assert_eq!(p.unpack(), want, "{isa:?} {k}×{n}");
        }
    }
}

fn logits(
    onnx: &[u8],
    size: usize,
    threads: usize,
    fuse: bool,
    input: &[f32],
) -> (Vec<f32>, Vec<String>) {
    let engine = Engine::from_bytes(
        onnx,
        Options {
            threads,
            input_size: size,
            fuse,
        },
    )
    .unwrap();
    let x = Array4::from_shape_vec((1, 3, size, size), input.to_vec()).unwrap();
    let mut rewrites = engine.passes().rewrites.clone();
    // Which form of the channel MLP the plan runs, as one more line.
    let packed = engine.model().nodes().iter().filter(|n| {
        n.op_as::<poolformer_edge::ops::metaformer::PackedChannelMlp>()
            .is_some()
    });
    rewrites.push(format!("packed channel MLP ×{}", packed.count()));
    (engine.run_array(x).unwrap(), rewrites)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fused_engine_matches_unfused_and_fuses_every_block() {
    let arch = ArchConfig::custom("tiny", &[1, 2, 1, 1], &[8, 16, 24, 40], 10).unwrap();
    let weights = synthesize(&arch, 11).unwrap();
    let onnx = export_onnx(&arch, &weights).unwrap();
    let input = common::test_image(3, 64, 64, 3);
    let (plain, none) = logits(&onnx, 64, 1, false, &input);
    assert_eq!(none, ["packed channel MLP ×0"]);
    for threads in [1, 2, 3] {
        let (fused, rewrites) = logits(&onnx, 64, threads, true, &input);
        let d = max_diff(&plain, &fused);
        assert!(
            d <= 1e-4,
            "{threads} threads: fused vs unfused max diff {d}"
        );
        let blocks = 5;
        assert!(
            rewrites
                .iter()
                .any(|r| r.starts_with("token mixer") && r.ends_with(&format!("×{blocks}"))),
            "{rewrites:?}"
        );
        if poolformer_edge::passes::metaformer::FUSES_MLP {
            assert!(
                rewrites
                    .iter()
                    .any(|r| r.starts_with("channel MLP") && r.ends_with(&format!("×{blocks}"))),
                "{rewrites:?}"
            );
            // Code generation packs every one where the packed kernels are the faster path.
            let packed = if PackedMlp::preferred(Isa::best()) {
                blocks
            } else {
                0
            };
            let line = format!("packed channel MLP ×{packed}");
            assert!(rewrites.contains(&line), "{rewrites:?}");
        }
    }
}

/// A normalization that is not GroupNorm stays unfused: the token-mixer norm of stage
/// 1's second block gets its variance doubled before the ε (so it normalizes to 1/√2 of
/// GroupNorm), next to a first block whose norms are the exporter's.
#[test]
fn a_norm_that_is_not_group_norm_stays_unfused() {
    use prost::Message;
    use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};
    let arch = ArchConfig::custom("tiny", &[1, 2, 1, 1], &[8, 16, 24, 40], 10).unwrap();
    let weights = synthesize(&arch, 11).unwrap();
    let mut model = ModelProto::decode(&export_onnx(&arch, &weights).unwrap()[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let name = "stages.1.blocks.1.norm1.variance_eps";
    let at = graph.node.iter().position(|n| n.name == name).unwrap();
    let (konst, scaled) = (format!("{name}.k"), format!("{name}.scaled"));
    graph.initializer.push(TensorProto {
        name: konst.clone(),
        data_type: DataType::Float as i32,
        float_data: vec![2.0],
        ..Default::default()
    });
    let variance = std::mem::replace(&mut graph.node[at].input[0], scaled.clone());
    let mul = NodeProto {
        name: format!("{name}.scale"),
        op_type: "Mul".into(),
        input: vec![variance, konst],
        output: vec![scaled],
        ..Default::default()
    };
    graph.node.insert(at, mul);
    let onnx = model.encode_to_vec();
    let input = common::test_image(3, 64, 64, 5);
    let (plain, _) = logits(&onnx, 64, 1, false, &input);
    let (fused, rewrites) = logits(&onnx, 64, 1, true, &input);
    let d = max_diff(&plain, &fused);
    assert!(d <= 1e-4, "fused vs unfused max diff {d}");
    // Five blocks, four mixers fused; every MLP norm is untouched, so all five MLPs.
    assert!(
        rewrites
            .iter()
            .any(|r| r.starts_with("token mixer") && r.ends_with("×4")),
        "{rewrites:?}"
    );
    if poolformer_edge::passes::metaformer::FUSES_MLP {
        assert!(
            rewrites
                .iter()
                .any(|r| r.starts_with("channel MLP") && r.ends_with("×5")),
            "{rewrites:?}"
        );
    }
}

#[test]
fn mlp_blocks_cover_every_column_once() {
    use poolformer_edge::kernels::mlp::column_blocks;
    for &(hidden, hw) in &[
        (32usize, 1usize),
        (256, 3136),
        (512, 784),
        (1280, 196),
        (2048, 49),
        (40, 7),
    ] {
        let w = MlpWeights {
            channels: 1,
            hidden,
            w1: vec![],
            c1: vec![],
            w2: vec![],
            b2: vec![],
        };
        for threads in 1..=5 {
            // The fp32 MLP's blocks (aligned to the AVX2 kernels' 16-token panels), and
            // the int8 MLP's: about as many, boundaries aligned to 16 tokens except the
            // end.
            let fp32 = w.blocks(hw, threads, 16);
            let int8 = column_blocks(hw, (65_536 / hidden).max(64), threads, 16);
            assert!(fp32.iter().all(|b| b.1 % 16 == 0 || b.1 == hw), "{fp32:?}");
            for blocks in [fp32, int8.clone()] {
                assert_eq!(blocks.first().map(|b| b.0), Some(0));
                assert_eq!(blocks.last().map(|b| b.1), Some(hw));
                assert!(blocks.windows(2).all(|p| p[0].1 == p[1].0), "{blocks:?}");
                assert!(blocks.iter().all(|(a, b)| a < b), "{blocks:?}");
            }
            assert!(int8.iter().all(|b| b.1 % 16 == 0 || b.1 == hw), "{int8:?}");
            let unaligned = column_blocks(hw, (65_536 / hidden).max(64), threads, 1);
            assert_eq!(int8.len(), unaligned.len(), "{int8:?}");
        }
    }
}

/// A `rows × k` int8 matrix of `noise·amp` (saturating) with a scale and zero point per
/// row, and its dequantized values `(q − zero)·scale` as DequantizeLinear computes them.
fn int8_rows(
    rows: usize,
    k: usize,
    seed: u64,
    amp: f32,
    scale: impl Fn(usize) -> f32,
    zero: impl Fn(usize) -> i32,
) -> (Vec<i8>, Vec<f32>, Vec<i32>, Vec<f32>) {
    let q: Vec<i8> = noise(rows * k, seed)
        .iter()
        .map(|v| (v * amp) as i8)
        .collect();
    let scale: Vec<f32> = (0..rows).map(scale).collect();
    let zero: Vec<i32> = (0..rows).map(zero).collect();
    let w = q
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as i32 - zero[i / k]) as f32 * scale[i / k])
        .collect();
    (q, scale, zero, w)
}

/// int8 weights with a scale and zero point per row, packed, dequantized a few panels
/// at a time and multiplied with the `Bias` epilogue (the patch convolution's path):
/// against the f64 product of the dequantized weights, whose f32 values are exact
/// (an integer below 2⁸ times the scale, rounded once, as DequantizeLinear does).
#[test]
fn sgemm_bias_on_int8_weights_matches_definition_on_every_isa() {
    // One more shape where `gemm_i8` dequantizes several chunks of panels per stretch
    // of the reduction, and several stretches.
    for &(m, k, n) in SGEMM_SHAPES.iter().chain(&[(300, 1100, 9)]) {
        let ldo = n + 2;
        let (q, scale, zero, w) = int8_rows(
            m,
            k,
            (m * k) as u64 + 5,
            127.0,
            |r| 0.01 + 0.003 * (r % 7) as f32,
            |r| (r % 5) as i32 - 2,
        );
        let b = noise(k * n, (k * n) as u64 + 6);
        let bias = noise(m, 9);
        for isa in Isa::available() {
            let packed = PackedWeightsI8::pack(isa, &q, &scale, &zero, m, k);
            let mr = sgemm::panel_rows(isa);
            let mut pb = PackedCols::default();
            pb.pack(isa, &b, n, k, n, 0.0);
            // Two ranges of panels, as the op's threads take them: through `gemm_i8`,
            // and dequantized whole into a scratch for `gemm`.
            let half = packed.panels() / 2;
            let mut scratch = PackedWeights::default();
            for whole in [false, true] {
                let mut out = vec![f32::NAN; m * ldo];
                for panels in [0..half, half..packed.panels()] {
                    let epi = Epilogue::Bias {
                        bias: &bias,
                        out: out.as_mut_ptr(),
                        ldo,
                    };
                    if !whole {
                        unsafe { sgemm::gemm_i8(isa, &packed, panels, &pb, &epi, &mut scratch) };
                        continue;
                    }
                    packed.dequantize(panels.clone(), &mut scratch);
                    let row0 = (panels.start * mr).min(m);
                    assert_eq!(scratch.rows(), (panels.end * mr).min(m) - row0);
                    let epi = Epilogue::Bias {
                        bias: &bias[row0..],
                        out: unsafe { out.as_mut_ptr().add(row0 * ldo) },
                        ldo,
                    };
                    unsafe { sgemm::gemm(isa, &scratch, 0..scratch.panels(), &pb, &epi) };
                }
                for i in 0..m {
                    for j in 0..ldo {
                        let g = out[i * ldo + j] as f64;
                        if j >= n {
                            assert!(g.is_nan(), "{isa:?} {m}×{k}×{n}: wrote ({i},{j})");
                            continue;
                        }
                        let (dot, abs) = dot_ref(&w, &b, n, k, 0.0, i, j);
                        let want = dot + bias[i] as f64;
                        let tol = sgemm_tol(k) * (1.0 + abs + (bias[i] as f64).abs());
                        assert!(
                            (g - want).abs() <= tol,
                            "{isa:?} {m}×{k}×{n} at ({i},{j}), whole {whole}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// A square `k×k` conv of `ci` channels on an `n×n` image, stride `s`, padding `p`:
/// its geometry and the f64 reference output of weights `w` (`[co, ci·k·k]`), bias `b`.
fn square_conv(
    (ci, n, co, k, s, p): (usize, usize, usize, usize, usize, usize),
    x: &[f32],
    w: &[f32],
    b: &[f32],
) -> (poolformer_edge::kernels::im2col::ConvGeometry, Vec<f64>) {
    let out = (n + 2 * p - k) / s + 1;
    let kernel = common::reference::ConvKernel {
        out_channels: co,
        in_channels: ci,
        size: k,
        weight: w.iter().map(|&v| v as f64).collect(),
        bias: b.iter().map(|&v| v as f64).collect(),
    };
    let want = common::reference::conv2d(
        &common::reference::Tensor::from_f32(ci, n, n, x),
        &kernel,
        s,
        p,
    );
    let geometry = poolformer_edge::kernels::im2col::ConvGeometry {
        in_channels: ci,
        in_h: n,
        in_w: n,
        kernel: (k, k),
        stride: (s, s),
        pad: (p, p),
        out_h: out,
        out_w: out,
    };
    (geometry, want.data)
}

/// Runs `op` as a one-node tract model on `x` with `threads` threads.
fn run_patch_conv(
    op: poolformer_edge::ops::conv::PatchConv,
    x: &[f32],
    threads: usize,
) -> Vec<f32> {
    use tract_onnx::prelude::*;
    let (g, co) = (op.geometry, op.out_channels);
    let shape = [1, g.in_channels, g.in_h, g.in_w];
    let model = common::one_op_model(op, f32::fact(shape));
    let input = Tensor::from_shape(&shape, x).unwrap();
    let got = common::run_model(&model, &input, threads);
    let got = got.to_plain_array_view::<f32>().unwrap();
    assert_eq!(got.shape(), &[1, co, g.out_h, g.out_w]);
    got.iter().copied().collect()
}

#[test]
fn patch_conv_matches_reference_conv() {
    use poolformer_edge::ops::conv::{ConvWeights, PatchConv};
    use std::sync::Arc;
    // (in channels, side, out channels, kernel, stride, pad): PoolFormer's stem and
    // downsampling shapes, shrunk, plus odd sides where the last window is partial, one
    // where a 7×7 window overhangs both sides of a 4-pixel row, and a wider one. The
    // packed op splits small weights by output pixels and large ones (above 512 KiB as
    // f32, the last shape) by weight panels.
    for &shape in &[
        (3usize, 29usize, 5usize, 7usize, 4usize, 2usize),
        (4, 9, 6, 3, 2, 1),
        (5, 8, 3, 3, 2, 1),
        (2, 5, 2, 3, 1, 0),
        (3, 61, 13, 7, 4, 2),
        (40, 9, 7, 3, 2, 1),
        (2, 4, 3, 7, 1, 3),
        (6, 9, 70, 3, 2, 1),
        (64, 9, 300, 3, 2, 1),
    ] {
        let (ci, n, co, k, s, p) = shape;
        let x = common::test_image(ci, n, n, (ci * n) as u64);
        // int8 weights with a scale and zero point per output channel; the f32 weights
        // are their dequantized values, so both forms of the op have one reference.
        let (q, scale, zero, w) = int8_rows(
            co,
            ci * k * k,
            7,
            250.0,
            |o| 0.002 + 0.001 * (o % 5) as f32,
            |o| (o % 3) as i32 - 1,
        );
        let b = noise(co, 8);
        let (geometry, want) = square_conv(shape, &x, &w, &b);
        let variants = [
            ConvWeights::F32(Arc::new(w.clone())),
            ConvWeights::I8 {
                q: Arc::new(q),
                scale: Arc::new(scale),
                zero: Arc::new(zero),
            },
        ];
        // Both forms again, packed for the `sgemm` kernels where the engine packs them
        // (the build `Isa::best()` names, which `PFE_ISA` can narrow).
        let isa = Isa::best();
        let packed: Vec<ConvWeights> = if sgemm::preferred(isa) {
            variants.iter().map(|w| w.packed(isa, co)).collect()
        } else {
            vec![]
        };
        for weights in variants.into_iter().chain(packed) {
            let int8 = weights.is_int8();
            for threads in [1, 3] {
                let op = PatchConv {
                    geometry,
                    out_channels: co,
                    weights: weights.clone(),
                    bias: Arc::new(b.clone()),
                };
                let got = run_patch_conv(op, &x, threads);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-5 * e.abs().max(1.0),
                        "int8 {int8}, {threads} threads, k{k} s{s} p{p}: {g} vs {e}"
                    );
                }
            }
        }
    }
}

/// The 16-bit-input path of int8 convs ([`ConvWeights::Split16`]), both as two u8 × i8
/// products and as one fused i16 product, against the f64 convolution of the
/// dequantized weights. Its one approximation is the input's rounding to the grid of
/// step `s = max|x| / G` (`G = input_grid()`: 32767, or less for the fused product,
/// whose i32 sums must hold `G·max_k Σ|q|`): each output moves by at most
/// `Σ_k |w_k| · s/2`, the bound checked (plus 1e-5 relative for f32 sums). Every CPU
/// runs both forms (the integer kernels are exact everywhere); the engine picks one
/// where `split16_pays` or `fused16_pays`. A NaN in the input falls back to the float
/// path, which carries it.
#[test]
fn patch_conv_split16_matches_reference_conv() {
    use poolformer_edge::ops::conv::{ConvWeights, PatchConv};
    use std::sync::Arc;
    let mut narrowed = false;
    // (in channels, side, out channels, kernel, stride, pad): channel counts that fill
    // the last group of 4 and ones that do not, partial last windows, 7×7/4 and 3×3/2,
    // a 7×7 window overhanging both sides of a 4-pixel row.
    for &shape in &[
        (3usize, 29usize, 5usize, 7usize, 4usize, 2usize),
        (4, 9, 6, 3, 2, 1),
        (5, 8, 3, 3, 2, 1),
        (2, 5, 2, 3, 1, 0),
        (2, 4, 3, 7, 1, 3),
        (40, 9, 37, 3, 2, 1),
        (64, 15, 70, 3, 2, 1),
        // Deep enough (2700 weights of ~90 per row) that the fused grid narrows.
        (300, 6, 9, 3, 2, 1),
    ] {
        let (ci, n, co, k, s, p) = shape;
        let mut x = common::test_image(ci, n, n, (ci * n) as u64 + 3);
        // One large value, so that the grid is coarse for the others.
        x[ci * n * n / 2] = 9.0;
        let (q, scale, zero, w) = int8_rows(
            co,
            ci * k * k,
            11,
            250.0,
            |o| 0.002 + 0.001 * (o % 5) as f32,
            |_| 0,
        );
        let b = noise(co, 8);
        let (geometry, want) = square_conv(shape, &x, &w, &b);
        let int8 = ConvWeights::I8 {
            q: Arc::new(q),
            scale: Arc::new(scale),
            zero: Arc::new(zero),
        };
        let op = |weights: &ConvWeights| PatchConv {
            geometry,
            out_channels: co,
            weights: weights.clone(),
            bias: Arc::new(b.clone()),
        };
        let clean_x1 = x[1];
        for fused in [false, true] {
            let weights = int8.split16(&geometry, co, fused).unwrap();
            assert!(matches!(weights, ConvWeights::Split16 { .. }));
            let grid = weights.input_grid().unwrap();
            let l1_max = int8_l1_max(&int8, co);
            if fused {
                assert_eq!(grid, ((i32::MAX as i64 / l1_max) as f32).min(32767.0));
                narrowed |= grid < 32767.0;
            } else {
                assert_eq!(grid, 32767.0);
            }
            let half_step = 9.0 / (2.0 * grid as f64);
            let kk = ci * k * k;
            for threads in [1, 3] {
                let got = run_patch_conv(op(&weights), &x, threads);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    let row = &w[(i / geometry.out_pixels()) * kk..][..kk];
                    let l1: f64 = row.iter().map(|v| v.abs() as f64).sum();
                    let tol = l1 * half_step * 1.001 + 1e-5 * e.abs().max(1.0);
                    assert!(
                    (*g as f64 - e).abs() <= tol,
                    "fused {fused}, {threads} threads, {ci}→{co} k{k} s{s} p{p} at {i}: {g} vs {e} (bound {tol})"
                );
                }
            }
            // Magnitudes so small that the grid's step would underflow: the float path
            // (without a bias, which would hide the products).
            let tiny: Vec<f32> = x.iter().map(|v| v * 1e-36).collect();
            let unbiased = |weights: &ConvWeights| PatchConv {
                bias: Arc::new(vec![0.0; co]),
                ..op(weights)
            };
            let plain = run_patch_conv(unbiased(&int8), &tiny, 1);
            let got = run_patch_conv(unbiased(&weights), &tiny, 1);
            assert!(plain.iter().any(|&v| v != 0.0));
            assert_eq!(got, plain, "tiny input");
            // A NaN in the input: the float path's result, NaN wherever the tap reads it.
            x[1] = f32::NAN;
            let plain = run_patch_conv(op(&int8), &x, 1);
            for threads in [1, 3] {
                let got = run_patch_conv(op(&weights), &x, threads);
                assert!(got.iter().any(|v| v.is_nan()));
                for (g, e) in got.iter().zip(&plain) {
                    assert!(
                        g.is_nan() == e.is_nan()
                            && (g.is_nan() || (g - e).abs() <= 1e-5 * e.abs().max(1.0)),
                        "NaN input, fused {fused}, {threads} threads: {g} vs {e}"
                    );
                }
            }
            x[1] = clean_x1;
        }
    }
    assert!(narrowed, "no case narrows the fused grid");
}

/// `max_o Σ_k |q[o, k]|` of int8 conv weights.
fn int8_l1_max(w: &poolformer_edge::ops::conv::ConvWeights, rows: usize) -> i64 {
    let poolformer_edge::ops::conv::ConvWeights::I8 { q, .. } = w else {
        panic!("int8 weights expected");
    };
    q.chunks_exact(q.len() / rows)
        .map(|r| r.iter().map(|&v| (v as i64).abs()).sum())
        .max()
        .unwrap()
}

#[test]
fn erf_approximation_is_within_its_bound() {
    // Abramowitz & Stegun 7.1.28: |error| ≤ 3e-7 in exact arithmetic. In f32 the
    // rounding of p (2⁻²⁴ relative) is raised to the 16th power, so 1/p¹⁶ ≤ 1 carries
    // up to ~16·2⁻²⁴ ≈ 1e-6 more; 2e-6 bounds both (tract's own erf is the same formula).
    for i in -4000..=4000 {
        let x = i as f32 / 1000.0;
        let z = x as f64;
        // Maclaurin series; at |x| ≤ 4 its largest term is ~1e7, so f64 keeps ~1e-9.
        let (mut term, mut sum) = (z, z);
        for k in 1..200 {
            term *= -z * z / k as f64;
            sum += term / (2 * k + 1) as f64;
        }
        let want = 2.0 / std::f64::consts::PI.sqrt() * sum;
        let got = poolformer_edge::kernels::mlp::erf(x) as f64;
        assert!((got - want).abs() <= 2e-6, "erf({x}) = {got}, want {want}");
    }
}

#[test]
fn norm_statistics_in_parts_match_one_pass() {
    let x: Vec<f32> = noise(100_003, 9).iter().map(|v| v * 2.0 + 5.0).collect();
    for isa in Isa::available() {
        let (m, r) = norm::mean_rstd(isa, &x, 1e-5);
        for parts in [1, 2, 3, 7, 16] {
            let (mp, rp) = norm::mean_rstd_in_parts(isa, &x, 1e-5, parts, |slices, f| {
                assert_eq!(slices.iter().map(|s| s.len()).sum::<usize>(), x.len());
                slices.iter().map(|s| f(s)).collect()
            });
            // Same shift, same f32 blocks except at the cuts: agreement to f64 summation order.
            assert!(
                (mp - m).abs() <= 1e-5 * m.abs() && (rp - r).abs() <= 1e-5 * r,
                "{isa:?} {parts}: {mp} {rp} vs {m} {r}"
            );
        }
    }
}

/// Which form `ConvWeights::prepared` gives int8 conv weights with a float input, at
/// each level this CPU runs: one fused 16-bit product on AVX2 without VNNI, two byte
/// products with VNNI (or `sdot`), packed f32 panels otherwise on x86; the 3-channel
/// stem never takes the 16-bit input. And the fused form over more than 256 output
/// pixels (the two-plane kernel's blocks of 16 groups), against the f64 convolution,
/// within the grid's bound.
#[test]
fn prepared_int8_conv_weights_per_isa() {
    use poolformer_edge::kernels::qgemm::QKernel;
    use poolformer_edge::ops::conv::{fused16_pays, split16_pays, ConvWeights, PatchConv};
    use std::sync::Arc;
    let shape = (16usize, 33usize, 8usize, 3usize, 2usize, 1usize);
    let (ci, n, co, k, _, _) = shape;
    let (q, scale, zero, w) = int8_rows(
        co,
        ci * k * k,
        5,
        250.0,
        |o| 0.003 + 0.001 * o as f32,
        |_| 0,
    );
    let b = noise(co, 6);
    let x = common::test_image(ci, n, n, 17);
    let (geometry, want) = square_conv(shape, &x, &w, &b);
    assert!(geometry.out_pixels() > 256);
    let int8 = ConvWeights::I8 {
        q: Arc::new(q),
        scale: Arc::new(scale),
        zero: Arc::new(zero),
    };
    // The form's name, for messages.
    let form = |w: &Option<ConvWeights>| match w {
        None => "unchanged",
        Some(ConvWeights::Split16 { fused: true, .. }) => "fused 16-bit",
        Some(ConvWeights::Split16 { .. }) => "two-plane 16-bit",
        Some(ConvWeights::PackedI8(_)) => "packed int8",
        Some(_) => "other",
    };
    for isa in Isa::available() {
        let prepared = int8.prepared(isa, &geometry, co).unwrap();
        let kernel = QKernel::for_isa(isa);
        if isa == Isa::Avx2 {
            // `PFE_ISA=avx2`, or an AVX2-only CPU: the fused product.
            assert!(
                matches!(prepared, Some(ConvWeights::Split16 { fused: true, .. })),
                "AVX2: {}",
                form(&prepared)
            );
        }
        match &prepared {
            Some(ConvWeights::Split16 { fused, .. }) => {
                assert!(split16_pays(isa) || fused16_pays(isa), "{isa:?}");
                assert_eq!(*fused, kernel == QKernel::Avx2, "{isa:?}");
            }
            other => {
                assert!(
                    !split16_pays(isa) && !fused16_pays(isa),
                    "{isa:?}: {}",
                    form(other)
                );
            }
        }
        let stem = poolformer_edge::kernels::im2col::ConvGeometry {
            in_channels: 3,
            ..geometry
        };
        let stem_weights = ConvWeights::I8 {
            q: Arc::new(vec![1; co * 3 * k * k]),
            scale: Arc::new(vec![0.01; co]),
            zero: Arc::new(vec![0; co]),
        };
        let stem_prepared = stem_weights.prepared(isa, &stem, co).unwrap();
        assert!(
            !matches!(stem_prepared, Some(ConvWeights::Split16 { .. })),
            "{isa:?}: a 3-channel conv took the {} input",
            form(&stem_prepared)
        );
    }
    let fused = int8.split16(&geometry, co, true).unwrap();
    let grid = fused.input_grid().unwrap() as f64;
    let op = PatchConv {
        geometry,
        out_channels: co,
        weights: fused,
        bias: Arc::new(b.clone()),
    };
    let max = x.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let kk = ci * k * k;
    for threads in [1, 2] {
        let got = run_patch_conv(op.clone(), &x, threads);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            let row = &w[(i / geometry.out_pixels()) * kk..][..kk];
            let l1: f64 = row.iter().map(|v| v.abs() as f64).sum();
            let tol = l1 * max / (2.0 * grid) * 1.001 + 1e-5 * e.abs().max(1.0);
            assert!(
                (*g as f64 - e).abs() <= tol,
                "{threads} threads at {i}: {g} vs {e}"
            );
        }
    }
}
