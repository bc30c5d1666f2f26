//! The ONNX front end: tract's loader plus the operators it lacks.
//!
//! Every model the engine reads goes through [`loader`], so an operator registered
//! here is understood everywhere (engine, `pfe info`, the C ABI).
//!
//! Registered here: onnxruntime's QOperator contrib ops (domain `com.microsoft`)
//! that its quantizer emits for PoolFormer and tract 0.23.9 lacks: `QLinearAdd`,
//! `QLinearMul`, `QLinearAveragePool`, `QLinearGlobalAveragePool` and `QGemm`.
//! (`QLinearConv`, `QLinearMatMul`, `ConvInteger` and `MatMulInteger` are tract's own.)
//! tract looks operators up by type only, not by domain.

pub mod load;
mod qdq;

pub(crate) use qdq::tract_builder;
mod qgemm;
mod qlinear;
mod qlinear_pool;

use tract_onnx::Onnx;

/// tract's ONNX loader with this crate's extra operators registered.
pub fn loader() -> Onnx {
    let mut onnx = tract_onnx::onnx();
    let register = &mut onnx.op_register;
    register.insert("QLinearAdd", qlinear::qlinear_add);
    register.insert("QLinearMul", qlinear::qlinear_mul);
    register.insert("QLinearAveragePool", qlinear_pool::qlinear_average_pool);
    register.insert(
        "QLinearGlobalAveragePool",
        qlinear_pool::qlinear_global_average_pool,
    );
    register.insert("QGemm", qgemm::qgemm);
    // QuantizeLinear, DequantizeLinear, QLinearConv and QLinearMatMul with their
    // constant parameters checked; DequantizeLinear of integer weights stays integer
    // for the int8 pass.
    qdq::register(&mut onnx);
    onnx
}
