//! Reading ONNX files with `onnx::load::model_for_path`, which hands large initializers
//! to tract as external data pointing back into the file: the constants tract ends up
//! with are the file's, checked by running `y = x + big + small` against the sums
//! computed here, beside tract's own reader; tensors already stored in an external file
//! (tract's reader, found beside the path given, a symlink's too); a model reached
//! through a symlink from another directory; truncated and corrupt files (an error, no
//! panic).

mod common;

use common::onnx::{model, value_info};
use poolformer_edge::onnx::load::{externalize, model_for_path};
use poolformer_edge::onnx::loader;
use prost::Message;
use std::path::Path;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{ModelProto, NodeProto, StringStringEntryProto, TensorProto};
use tract_onnx::prelude::*;

/// Values in `big` (above the inline limit of 4096 bytes) and `small`.
const N: usize = 3000;

fn big() -> Vec<f32> {
    (0..N).map(|i| (i as f32 * 0.37).sin() * 100.0).collect()
}

fn small() -> Vec<f32> {
    vec![0.5, -1.25, 3.0]
}

fn raw(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn init(name: &str, dims: &[i64], raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data,
        ..Default::default()
    }
}

fn add(a: &str, b: &str, out: &str) -> NodeProto {
    NodeProto {
        op_type: "Add".into(),
        input: vec![a.into(), b.into()],
        output: vec![out.into()],
        ..Default::default()
    }
}

/// `y[3, N/3] = x + big + small[:, None]` with `big` as given.
fn model_with(big_init: TensorProto) -> Vec<u8> {
    let mut small = init("small", &[3, 1], raw(&small()));
    small.doc_string = "stays inline".into();
    model(
        "load",
        vec![add("x", "big", "t"), add("t", "small", "y")],
        vec![big_init, small],
        vec![value_info("x", DataType::Float, Some(&[3, N / 3]))],
        vec![value_info("y", DataType::Float, Some(&[3, N / 3]))],
    )
}

fn run(model: InferenceModel) -> Vec<f32> {
    let x: Vec<f32> = (0..N).map(|i| i as f32 * 0.001).collect();
    let plan = model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .unwrap();
    let input = Tensor::from_shape(&[3, N / 3], &x).unwrap();
    let out = plan.run(tvec!(input.into_tvalue())).unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn expected() -> Vec<f32> {
    let (b, s) = (big(), small());
    (0..N)
        .map(|i| i as f32 * 0.001 + b[i] + s[i / (N / 3)])
        .collect()
}

#[test]
fn inline_initializers_load_as_tract_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let bytes = model_with(init("big", &[3, (N / 3) as i64], raw(&big())));
    std::fs::write(&path, &bytes).unwrap();

    let ours = run(model_for_path(&loader(), &path).unwrap());
    let tracts = run(loader().model_for_path(&path).unwrap());
    assert_eq!(ours, expected());
    assert_eq!(ours, tracts);

    // The framing tract decodes: `big` refers to its own bytes in the file, `small`
    // (12 bytes) and everything else are as written.
    let framing = externalize(&bytes, "m.onnx")
        .unwrap()
        .expect("no tensor stored outside");
    let framing = ModelProto::decode(&*framing).unwrap();
    let original = ModelProto::decode(&*bytes).unwrap();
    let graph = framing.graph.as_ref().unwrap();
    let b = &graph.initializer[0];
    assert!(b.raw_data.is_empty());
    assert_eq!(b.data_location, Some(1));
    let entry = |k: &str| {
        b.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
            .unwrap()
    };
    let (offset, length): (usize, usize) = (
        entry("offset").parse().unwrap(),
        entry("length").parse().unwrap(),
    );
    assert_eq!(entry("location"), "m.onnx");
    assert_eq!(&bytes[offset..offset + length], &raw(&big())[..]);
    let mut restored = framing.clone();
    let t = &mut restored.graph.as_mut().unwrap().initializer[0];
    t.raw_data = bytes[offset..offset + length].to_vec();
    t.external_data.clear();
    t.data_location = None;
    assert_eq!(restored, original);
}

/// `big` stored in `m.onnx.data` beside the model.
fn external_big() -> TensorProto {
    let mut b = init("big", &[3, (N / 3) as i64], vec![]);
    b.data_location = Some(1);
    b.external_data = [
        ("location", "m.onnx.data".to_string()),
        ("offset", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| StringStringEntryProto {
        key: k.into(),
        value: v,
    })
    .collect();
    b
}

#[test]
fn external_data_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.onnx.data"), raw(&big())).unwrap();
    let path = dir.path().join("m.onnx");
    let bytes = model_with(external_big());
    std::fs::write(&path, &bytes).unwrap();
    assert!(externalize(&bytes, "m.onnx").unwrap().is_none());
    assert_eq!(run(model_for_path(&loader(), &path).unwrap()), expected());
}

#[cfg(unix)]
#[test]
fn external_data_beside_a_symlink_loads() {
    // As with tract's reader, a model's external files are found in the directory
    // of the path given, here a symlink's.
    let store = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let target = store.path().join("m.onnx");
    std::fs::write(&target, model_with(external_big())).unwrap();
    std::fs::write(models.path().join("m.onnx.data"), raw(&big())).unwrap();
    let link = models.path().join("m.onnx");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(run(model_for_path(&loader(), &link).unwrap()), expected());
}

#[cfg(unix)]
#[test]
fn a_symlink_from_another_directory_loads() {
    let models = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = models.path().join("m.onnx");
    std::fs::write(
        &target,
        model_with(init("big", &[3, (N / 3) as i64], raw(&big()))),
    )
    .unwrap();
    let link = elsewhere.path().join("link.onnx");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(run(model_for_path(&loader(), &link).unwrap()), expected());
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = model_with(init("big", &[3, (N / 3) as i64], raw(&big())));
    let check = |name: &str, data: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        let err = model_for_path(&loader(), &path).unwrap_err();
        format!("{err:#}")
    };
    // Cut inside the big initializer's bytes, and inside the graph's framing.
    for cut in [bytes.len() / 2, bytes.len() - 5, 3] {
        let err = check("cut.onnx", &bytes[..cut]);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
    // A wire type protobuf does not have (7).
    let err = check("bad.onnx", &[0x3f, 0x00]);
    assert!(err.contains("wire type"), "{err}");
    let err = model_for_path(&loader(), Path::new("/nonexistent/m.onnx")).unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/m.onnx"),
        "{err:#}"
    );
}
