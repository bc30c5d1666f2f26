//! tract operators this crate adds: thin wrappers that give the kernels in
//! [`crate::kernels`] a place in a tract graph.
pub mod requant;
