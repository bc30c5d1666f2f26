//! The PoolFormer family as data: architecture configs, timm-named weights,
//! deterministic synthetic weights and the safetensors → ONNX exporter.

pub mod cache;
pub mod config;
pub mod export;
pub mod labels;
pub mod synth;
pub mod weights;

pub use config::ArchConfig;
pub use weights::Weights;
