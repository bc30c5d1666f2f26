//! End-to-end tests of the `pfe` binary: synth → export → info / run / classify / bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use poolformer_edge::npy;

fn pfe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfe"))
        .args(args)
        .output()
        .expect("running pfe")
}

fn ok(args: &[&str]) -> String {
    let out = pfe(args);
    assert!(
        out.status.success(),
        "pfe {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = pfe(args);
    assert!(!out.status.success(), "pfe {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "pfe {args:?} panicked: {stderr}"
    );
    stderr
}

/// Synthetic S12 weights and their ONNX export, made through the CLI once per test.
fn s12(dir: &Path) -> (PathBuf, PathBuf) {
    let w = dir.join("w.safetensors");
    let m = dir.join("s12.onnx");
    ok(&[
        "synth",
        "--arch",
        "poolformer_s12",
        "--seed",
        "3",
        "-o",
        w.to_str().unwrap(),
    ]);
    ok(&[
        "export",
        "--arch",
        "poolformer_s12",
        "--weights",
        w.to_str().unwrap(),
        "-o",
        m.to_str().unwrap(),
    ]);
    (w, m)
}

#[test]
fn synth_export_info_run_classify_bench() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = s12(dir.path());
    let m = model.to_str().unwrap();

    let info: serde_json::Value = serde_json::from_str(&ok(&["info", m, "--json"])).unwrap();
    assert_eq!(info["quantization"], "fp32");
    let params = info["parameters"].as_u64().unwrap();
    assert!(
        (11_800_000..12_000_000).contains(&params),
        "{params} parameters"
    );
    let macs = info["macs"].as_u64().unwrap() as f64 / 1e9;
    assert!((1.75..1.9).contains(&macs), "{macs} GMACs");
    assert_eq!(info["ops"]["AveragePool"], 12);

    // Raw tensor in, raw logits out; the same input through the library gives the same logits.
    let x: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let xin = dir.path().join("x.npy");
    let yout = dir.path().join("y.npy");
    npy::write_f32(&xin, &[1, 3, 224, 224], &x).unwrap();
    ok(&[
        "run",
        m,
        "--input",
        xin.to_str().unwrap(),
        "--output",
        yout.to_str().unwrap(),
    ]);
    let (shape, y) = npy::read_f32(&yout).unwrap();
    assert_eq!(shape, vec![1, 1000]);
    let engine = poolformer_edge::Engine::from_path(&model, Default::default()).unwrap();
    let direct = engine
        .run_array(tract_core::ndarray::Array4::from_shape_vec((1, 3, 224, 224), x).unwrap())
        .unwrap();
    assert_eq!(y, direct);

    // Classify an image file: JSON with 3 ranked predictions whose probabilities decrease.
    let img = dir.path().join("img.png");
    poolformer_edge::testimage::natural_image(320, 240, 5)
        .save(&img)
        .unwrap();
    let line = ok(&["classify", m, img.to_str().unwrap(), "--top", "3", "--json"]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    let p: Vec<f64> = preds
        .iter()
        .map(|p| p["probability"].as_f64().unwrap())
        .collect();
    assert!(p[0] >= p[1] && p[1] >= p[2] && p[0] <= 1.0, "{p:?}");
    assert!(preds[0]["label"].as_str().unwrap().len() > 1);

    // `run --image` writes the same logits as classify ranks.
    ok(&[
        "run",
        m,
        "--image",
        img.to_str().unwrap(),
        "--output",
        yout.to_str().unwrap(),
    ]);
    let (_, logits) = npy::read_f32(&yout).unwrap();
    let best = poolformer_edge::postprocess::top_k_indices(&logits, 1)[0];
    assert_eq!(best as u64, preds[0]["class_index"].as_u64().unwrap());

    let bench: serde_json::Value = serde_json::from_str(&ok(&[
        "bench", m, "--iters", "3", "--warmup", "1", "--json",
    ]))
    .unwrap();
    for key in [
        "load_ms",
        "median_ms",
        "p90_ms",
        "min_ms",
        "max_ms",
        "peak_rss_mb",
        "cpu_median_ms",
        "cpu_min_ms",
        "threads",
        "iters",
    ] {
        assert!(bench.get(key).is_some(), "bench JSON lacks {key}: {bench}");
    }
    assert_eq!(bench["iters"], 3);
    let (min, med, max) = (
        bench["min_ms"].as_f64().unwrap(),
        bench["median_ms"].as_f64().unwrap(),
        bench["max_ms"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= med && med <= max, "{bench}");
    // On one thread a run's process CPU time is positive, and cannot much exceed its
    // wall time (the clocks are read a few instructions apart: 1 ms of slack).
    let (cpu_min, cpu_med) = (
        bench["cpu_min_ms"].as_f64().unwrap(),
        bench["cpu_median_ms"].as_f64().unwrap(),
    );
    assert!(cpu_min > 0.0 && cpu_min <= cpu_med, "{bench}");
    assert!(cpu_min <= max + 1.0, "{bench}");
}

#[test]
fn every_command_has_help() {
    for cmd in [
        "run", "classify", "bench", "info", "export", "synth", "demo",
    ] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Usage: pfe"), "{cmd} --help: {out}");
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.onnx");
    let err = fails(&["info", missing.to_str().unwrap()]);
    assert!(err.contains("nope.onnx"), "{err}");
    let err = fails(&["bench", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    let err = fails(&[
        "synth",
        "--arch",
        "resnet50",
        "-o",
        dir.path().join("w").to_str().unwrap(),
    ]);
    assert!(err.contains("unknown architecture"), "{err}");
    let err = fails(&["bench", "x.onnx", "--threads", "0"]);
    assert!(err.contains("thread"), "{err}");
    // Weights of another architecture: a clear message naming a missing tensor.
    let w = dir.path().join("s12.safetensors");
    ok(&[
        "synth",
        "--arch",
        "poolformer_s12",
        "-o",
        w.to_str().unwrap(),
    ]);
    let err = fails(&[
        "export",
        "--arch",
        "poolformer_m36",
        "--weights",
        w.to_str().unwrap(),
        "-o",
        dir.path().join("m.onnx").to_str().unwrap(),
    ]);
    assert!(err.contains("shape") || err.contains("lack"), "{err}");
}
