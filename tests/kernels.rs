//! Which matrix-multiplication kernels tract-linalg built into this binary, which of them
//! the running CPU can use, and which ones PoolFormer-S12 actually runs — printed for the
//! CI logs (`cargo test --test kernels -- --nocapture`), asserted where a kernel must be
//! there.
//!
//! Why: tract-linalg's build script probes the cross assembler and silently leaves out the
//! kernels it cannot encode (the aarch64 SDOT int8 kernel, x86 VNNI and AMX), and picks
//! kernels at run time from what the CPU reports. A cross build for a Pi 5 can lack its int8
//! fast path, or a board can lose NEON to a misread /proc/cpuinfo, with every numeric test
//! still passing on the slower kernels. The CPU features asserted on come from the standard
//! library (`is_*_feature_detected!`, the kernel's HWCAP), independently of tract's probes.
//!
//! Under qemu-user the CPU is the one `-cpu` names: `cortex-a72` has no dot product (the
//! Pi 4), `cortex-a76` has it (the Pi 5). qemu 7.2 shows the host's /proc/cpuinfo, where
//! tract's armv7 NEON probe looks, so .ci/cross sets `TRACT_CPU_ARM32_NEON=true` there.

use poolformer_edge::models::export::export_onnx;
use poolformer_edge::models::synth::synthesize;
use poolformer_edge::models::ArchConfig;
use poolformer_edge::{Engine, Options};
use prost::Message;
use tract_core::ops::matmul::optimized::OptMatMul;
use tract_linalg::isa::{self, Arch};
use tract_linalg::MmmDispatch;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// This build's architecture as tract names it.
fn native_arch() -> Arch {
    *Arch::ALL
        .iter()
        .find(|a| a.is_native())
        .expect("tract has a kernel tree for this architecture")
}

/// Names of this architecture's kernels that this build compiled (runnable here or not).
fn built_kernels() -> Vec<String> {
    let arch = native_arch();
    let mut names: Vec<String> = tract_linalg::mmm_routines::declared()
        .map(|r| (r.make)())
        .filter(|k| k.arch() == Some(arch) && k.built())
        .map(|k| k.name().to_string())
        .collect();
    names.sort();
    names
}

/// Names of the kernels the running CPU can execute (built, and its instruction set present).
fn runnable_kernels() -> Vec<String> {
    MmmDispatch::native()
        .runnable()
        .iter()
        .map(|k| k.name().to_string())
        .collect()
}

/// The kernel tract prefers for a plain m×k×n product with accumulator `acc`.
fn preferred(acc: DatumType, m: usize, k: usize, n: usize) -> String {
    MmmDispatch::native()
        .preferred_kernel(acc, Some(m), Some(k), Some(n))
        .map(|k| k.name().to_string())
        .unwrap_or_else(|| "generic (no tier answered)".into())
}

/// CPU features as the standard library sees them, for the report.
fn std_features() -> Vec<&'static str> {
    let mut f = vec![];
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        if has!("neon") {
            f.push("neon");
        }
        if has!("dotprod") {
            f.push("dotprod");
        }
        if has!("fp16") {
            f.push("fp16");
        }
        if has!("i8mm") {
            f.push("i8mm");
        }
        if has!("sve2") {
            f.push("sve2");
        }
    }
    #[cfg(target_arch = "arm")]
    if arm_hwcap_neon() {
        f.push("neon");
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") {
            f.push("avx2");
        }
        if has!("fma") {
            f.push("fma");
        }
        if has!("avx512f") {
            f.push("avx512f");
        }
        if has!("avx512vnni") {
            f.push("avx512vnni");
        }
    }
    f
}

/// NEON as the Linux kernel reports it to this process (AT_HWCAP), which qemu-user sets from
/// `-cpu`; `is_arm_feature_detected!` is not stable yet.
#[cfg(target_arch = "arm")]
fn arm_hwcap_neon() -> bool {
    const AT_HWCAP: std::ffi::c_ulong = 16;
    const HWCAP_NEON: std::ffi::c_ulong = 1 << 12;
    extern "C" {
        fn getauxval(kind: std::ffi::c_ulong) -> std::ffi::c_ulong;
    }
    // SAFETY: getauxval is glibc's, takes an integer and only reads the auxiliary vector.
    unsafe { getauxval(AT_HWCAP) & HWCAP_NEON != 0 }
}

/// A tract knob that edits CPU detection is set: runtime assertions would test the knob.
fn detection_overridden() -> Option<String> {
    ["TRACT_CPU_ISA", "TRACT_DOTPROD_DISABLE"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
}

fn assert_has(set: &[String], name: &str, what: &str) {
    assert!(
        set.iter().any(|k| k == name),
        "{name} is missing from the {what} kernels: {set:?}"
    );
}

#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
fn assert_lacks(set: &[String], name: &str, what: &str) {
    assert!(
        !set.iter().any(|k| k == name),
        "{name} must not be among the {what} kernels: {set:?}"
    );
}

/// Shapes of PoolFormer-S12 at 224: an MLP 1×1 conv of stage 1 (m = hidden channels,
/// k = channels, n = 56×56 pixels) and the classifier head (a GEMV).
const STAGE1_FC1: (usize, usize, usize) = (256, 64, 3136);
const HEAD: (usize, usize, usize) = (1000, 512, 1);

#[test]
fn kernels_this_cpu_can_use() {
    let built = built_kernels();
    let runnable = runnable_kernels();
    let (m, k, n) = STAGE1_FC1;
    let f32_pick = preferred(DatumType::F32, m, k, n);
    let i32_pick = preferred(DatumType::I32, m, k, n);
    println!("target:          {}", std::env::consts::ARCH);
    println!("cpu (std):       {}", std_features().join(","));
    println!("cpu (tract):     {:?}", isa::native());
    println!("built:           {}", built.join(" "));
    println!("runnable:        {}", runnable.join(" "));
    println!("f32 {m}x{k}x{n}: {f32_pick}");
    println!("i8  {m}x{k}x{n}: {i32_pick}");
    let (hm, hk, hn) = HEAD;
    println!(
        "f32 {hm}x{hk}x{hn}:   {}",
        preferred(DatumType::F32, hm, hk, hn)
    );
    if let Some(knob) = detection_overridden() {
        println!("{knob}: CPU detection edited, runtime assertions skipped");
    }
    let detected = detection_overridden().is_none();

    #[cfg(target_arch = "aarch64")]
    {
        // Every aarch64 build must carry the NEON f32 kernels and the SDOT int8 kernel: the
        // same binary serves a Pi 4 and a Pi 5, and a missing SDOT kernel means the assembler
        // was too old (binutils < 2.30), whatever CPU this test runs on.
        for name in ["arm64simd_mmm_f32_8x8_gen", "arm64simd_mmm_f32_16x4_gen"] {
            assert_has(&built, name, "built");
            assert_has(&runnable, name, "runnable");
        }
        assert_has(&built, "arm64simd_mmm_i32_8x8", "built");
        assert_has(&built, "arm64simd_mmm_i32_8x8_dot", "built");
        // arm64simd, or SVE on a core that has it; never the portable kernels.
        assert!(
            !f32_pick.starts_with("generic"),
            "f32 matmul falls back to {f32_pick}"
        );
        let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
        if detected && dotprod {
            // The Pi 5's int8 path.
            assert_has(&runnable, "arm64simd_mmm_i32_8x8_dot", "runnable");
            assert!(
                isa::native().has(isa::Isa::Aarch64DotProd),
                "the CPU has dotprod, tract's probe missed it: {:?}",
                isa::native()
            );
        }
        if detected && !dotprod {
            // The Pi 4's: SDOT would be an illegal instruction here.
            assert_lacks(&runnable, "arm64simd_mmm_i32_8x8_dot", "runnable");
            assert_eq!(
                i32_pick, "arm64simd_mmm_i32_8x8",
                "int8 matmul on a CPU without dotprod"
            );
        }
        if detected && dotprod && !std::arch::is_aarch64_feature_detected!("sve2") {
            assert_eq!(
                i32_pick, "arm64simd_mmm_i32_8x8_dot",
                "int8 matmul on a dotprod CPU"
            );
        }
    }

    #[cfg(target_arch = "arm")]
    {
        for name in [
            "armv7neon_mmm_f32_8x4_generic",
            "armv7neon_mmm_f32_8x6_generic",
        ] {
            assert_has(&built, name, "built");
        }
        assert_has(&built, "armv7neon_mmm_i32_8x4", "built");
        if detected && arm_hwcap_neon() {
            // tract reads NEON from /proc/cpuinfo; a board (or emulator) where that disagrees
            // with the kernel's HWCAP would run the plain VFP kernels.
            for name in [
                "armv7neon_mmm_f32_8x4_generic",
                "armv7neon_mmm_f32_8x6_generic",
                "armv7neon_mmm_i32_8x4",
            ] {
                assert_has(&runnable, name, "runnable");
            }
            assert!(
                f32_pick.starts_with("armv7neon"),
                "f32 matmul falls back to {f32_pick}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if detected && has!("avx2") && has!("fma") {
            for name in ["fma_mmm_f32_16x6", "fma_mmm_f32_8x8", "fma_mmm_f32_64x1"] {
                assert_has(&runnable, name, "runnable");
            }
            assert_has(&runnable, "avx2_mmm_i32_8x8", "runnable");
        }
        if detected && has!("avx512f") {
            assert_has(&runnable, "avx512_mmm_f32_16x12", "runnable");
        }
        if detected && has!("avx512f") && has!("avx512vnni") {
            // Left out by an assembler older than binutils 2.30.
            assert_has(&runnable, "avx512vnni_mmm_i32_8x8", "runnable");
        }
    }
}

/// The kernels tract chose for each matrix product of PoolFormer-S12 at 224×224 (convolutions
/// included: they lower to im2col + matmul), as `kernel ×count`.
#[test]
fn kernels_poolformer_s12_runs() {
    let arch = ArchConfig::by_name("poolformer_s12").unwrap();
    let onnx = export_onnx(&arch, &synthesize(&arch, 0).unwrap()).unwrap();
    let engine = Engine::from_bytes(&onnx, Options::default()).expect("loading S12");
    let picks = matmul_kernels(engine.model());
    println!("poolformer_s12 f32 matmuls: {}", summarize(&picks));
    assert!(!picks.is_empty(), "no optimized matmul in S12");
    // A generic (portable Rust) kernel would mean this CPU's kernels were not usable.
    for (node, kernels) in &picks {
        assert!(
            kernels.iter().all(|k| !k.starts_with("generic")),
            "{node} runs the portable kernel {kernels:?}"
        );
    }
}

/// An int8 product (ONNX MatMulInteger, i8 × i8 → i32) through the kernel tract picks on this
/// CPU — SDOT on a dotprod aarch64, SMLAL without — checked exactly against integer arithmetic.
#[test]
fn kernels_int8_matmul_is_exact() {
    let (m, k, n) = (24, 72, 40);
    let a: Vec<i8> = (0..m * k).map(|i| ((i * 37 + 11) % 255) as i8).collect();
    let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 + 7) % 255) as i8).collect();
    let model = mat_mul_integer(m, k, n, &b);
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &model.encode_to_vec()[..])
        .unwrap()
        .into_optimized()
        .unwrap();
    let picks = matmul_kernels(&plan);
    println!("int8 {m}x{k}x{n} MatMulInteger: {}", summarize(&picks));
    let plan = plan.into_runnable().unwrap();
    let input = Tensor::from_shape(&[m, k], &a).unwrap();
    let out = plan.run(tvec!(input.into_tvalue())).unwrap();
    let got = out[0].to_plain_array_view::<i32>().unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: i32 = (0..k)
                .map(|l| a[i * k + l] as i32 * b[l * n + j] as i32)
                .sum();
            assert_eq!(got[[i, j]], want, "C[{i},{j}] with {}", summarize(&picks));
        }
    }
}

/// (node name, kernels) of every optimized matmul in `model`.
fn matmul_kernels(model: &TypedModel) -> Vec<(String, Vec<String>)> {
    model
        .nodes()
        .iter()
        .filter_map(|node| {
            let op = node.op_as::<OptMatMul>()?;
            let names = op.mmm.iter().map(|k| k.name().to_string()).collect();
            Some((node.name.clone(), names))
        })
        .collect()
}

/// `kernel ×count` over all nodes, most used first.
fn summarize(picks: &[(String, Vec<String>)]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, kernels) in picks {
        for k in kernels {
            *counts.entry(k).or_default() += 1;
        }
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    counts
        .iter()
        .map(|(k, c)| format!("{k} ×{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// y = MatMulInteger(x, w) with x: m×k i8 input, w: k×n i8 weights, y: m×n i32.
fn mat_mul_integer(m: usize, k: usize, n: usize, w: &[i8]) -> pb::ModelProto {
    use pb::tensor_proto::DataType;
    let info = |name: &str, dt: DataType, dims: [usize; 2]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: dt as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                                d as i64,
                            )),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "int8".into(),
            node: vec![pb::NodeProto {
                op_type: "MatMulInteger".into(),
                input: vec!["x".into(), "w".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "w".into(),
                dims: vec![k as i64, n as i64],
                data_type: DataType::Int8 as i32,
                raw_data: w.iter().map(|&v| v as u8).collect(),
                ..Default::default()
            }],
            input: vec![info("x", DataType::Int8, [m, k])],
            output: vec![info("y", DataType::Int32, [m, n])],
            ..Default::default()
        }),
        ..Default::default()
    }
}
