//! tract operators this crate adds: thin wrappers that give the kernels in
//! [`crate::kernels`] a place in a tract graph, and split their work over tract's
//! thread pool.

pub mod conv;
pub mod metaformer;
pub mod qconv;
pub mod qmlp;
pub mod requant;

use tract_linalg::multithread::{current_tract_executor, Executor};

/// Threads of the executor the current run was started with (1 when single-threaded).
pub(crate) fn executor_threads() -> (Executor, usize) {
    let executor = current_tract_executor();
    let n = match &executor {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    };
    (executor, n)
}

/// Runs `f` inside the executor's pool when it has one, so rayon work spawned by `f`
/// lands on tract's threads.
pub(crate) fn in_pool<R: Send>(executor: &Executor, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        Executor::MultiThread(pool) => pool.install(f),
        _ => f(),
    }
}
