//! Bad input gets a clear error from the engine, never a panic or a silent wrong answer.

use poolformer_edge::models::{export, synth, ArchConfig};
use poolformer_edge::{Engine, Options, RgbImage};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::Tensor;

fn tiny() -> ArchConfig {
    ArchConfig::custom("tiny", &[1, 1, 2, 1], &[8, 16, 24, 32], 10).unwrap()
}

fn tiny_model() -> pb::ModelProto {
    let arch = tiny();
    export::build_model(&arch, &synth::synthesize(&arch, 0).unwrap()).unwrap()
}

fn small() -> Options {
    Options {
        threads: 1,
        input_size: 64,
        ..Options::default()
    }
}

fn message(r: anyhow::Result<Engine>) -> String {
    format!("{:#}", r.expect_err("loading should fail"))
}

#[test]
fn missing_file() {
    let err = message(Engine::from_path("/nonexistent/model.onnx", small()));
    assert!(
        err.contains("/nonexistent/model.onnx") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn empty_and_truncated_models() {
    assert!(message(Engine::from_bytes(&[], small())).contains("empty"));
    let bytes = tiny_model().encode_to_vec();
    for cut in [1, 10, bytes.len() / 3, bytes.len() - 7] {
        let err = message(Engine::from_bytes(&bytes[..cut], small()));
        assert!(err.contains("loading model"), "cut at {cut}: {err}");
    }
    // Through a file too, as users meet it.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = message(Engine::from_path(&p, small()));
    assert!(err.contains("truncated.onnx"), "{err}");
}

#[test]
fn not_an_onnx_file() {
    let err = message(Engine::from_bytes(
        b"\x89PNG\r\n\x1a\n this is not a model",
        small(),
    ));
    assert!(err.contains("loading model"), "{err}");
}

#[test]
fn another_network_without_classifier_output() {
    // The same graph cut after the stem: its output is a feature map, not logits.
    let mut model = tiny_model();
    let graph = model.graph.as_mut().unwrap();
    let stem_out = graph.node[0].output[0].clone();
    graph.output = vec![pb::ValueInfoProto {
        name: stem_out,
        ..Default::default()
    }];
    let err = message(Engine::from_bytes(&model.encode_to_vec(), small()));
    assert!(err.contains("expected classifier logits"), "{err}");
}

#[test]
fn another_network_with_a_vector_input() {
    // y = x · W for x of shape 1×4: not an image model.
    let f32_info = |name: &str, dims: &[i64]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "linear".into(),
            node: vec![pb::NodeProto {
                op_type: "MatMul".into(),
                input: vec!["x".into(), "w".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "w".into(),
                dims: vec![4, 2],
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: vec![1.0; 8],
                ..Default::default()
            }],
            input: vec![f32_info("x", &[1, 4])],
            output: vec![f32_info("y", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = message(Engine::from_bytes(&model.encode_to_vec(), small()));
    assert!(err.contains("1×3×H×W"), "{err}");
}

#[test]
fn bad_options() {
    let bytes = tiny_model().encode_to_vec();
    let err = message(Engine::from_bytes(
        &bytes,
        Options {
            threads: 0,
            input_size: 64,
            ..Options::default()
        },
    ));
    assert!(err.contains("threads"), "{err}");
    let err = message(Engine::from_bytes(
        &bytes,
        Options {
            threads: 1,
            input_size: 0,
            ..Options::default()
        },
    ));
    assert!(err.contains("input_size 0 is outside"), "{err}");
}

#[test]
fn wrong_input_tensor_shape_and_type() {
    let engine = Engine::from_bytes(&tiny_model().encode_to_vec(), small()).unwrap();
    let err = engine
        .run(Tensor::zero::<f32>(&[1, 3, 32, 32]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 3, 64, 64]"), "{err}");
    let err = engine
        .run(Tensor::zero::<i32>(&[1, 3, 64, 64]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32"), "{err}");
}

#[test]
fn bad_frames() {
    let engine = Engine::from_bytes(&tiny_model().encode_to_vec(), small()).unwrap();
    assert!(RgbImage::new(&[], 0, 0, 0).is_err());
    assert!(
        RgbImage::new(&[0; 11], 2, 2, 6).is_err(),
        "short buffer accepted"
    );
    assert!(
        RgbImage::new(&[0; 12], 2, 2, 5).is_err(),
        "stride below 3×width accepted"
    );
    // A 1×1 frame is valid: it is upscaled like any other.
    let px = [10u8, 200, 30];
    let preds = engine
        .classify(&RgbImage::new(&px, 1, 1, 3).unwrap(), 3)
        .unwrap();
    assert_eq!(preds.len(), 3);
}
