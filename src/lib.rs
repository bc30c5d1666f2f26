//! poolformer-edge: an edge inference runtime for PoolFormer (MetaFormer) image
//! classifiers, built on tract.
//!
//! Data flows one way: front ends (the `pfe` CLI, the C ABI in [`capi`], the
//! `pfe-camera` loop) → [`Engine`] → this crate's graph passes and kernels → tract.
//! Model construction (configs, synthetic weights, the safetensors → ONNX exporter)
//! lives in [`models`].

pub mod bench;
pub mod capi;
pub mod compare;
pub mod engine;
pub mod inspect;
pub mod kernels;
pub mod models;
pub mod npy;
pub mod onnx;
pub mod ops;
pub mod passes;
pub mod pixfmt;
pub mod postprocess;
pub mod preprocess;
pub mod quantize;
pub mod testimage;

pub use engine::{Engine, NodeProfile, Options};
pub use postprocess::Prediction;
pub use preprocess::{PreprocessConfig, Preprocessor, RgbImage};
