//! Compute kernels: a portable version of each, plus SIMD versions picked at run
//! time from the CPU's features.
pub mod quant;
