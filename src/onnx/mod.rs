//! The ONNX front end: tract's loader plus the operators it lacks.
//!
//! Every model the engine reads goes through [`loader`], so an operator registered
//! here is understood everywhere (engine, `pfe info`, the C ABI).

use tract_onnx::Onnx;

/// tract's ONNX loader with this crate's extra operators registered.
pub fn loader() -> Onnx {
    let mut onnx = tract_onnx::onnx();
    crate::passes::int8::register(&mut onnx);
    onnx
}
