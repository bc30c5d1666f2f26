//! tract operators this crate adds: thin wrappers that give the kernels in
//! [`crate::kernels`] a place in a tract graph, and split their work over tract's
//! thread pool.

pub mod conv;
pub mod eltwise;
pub mod konst;
pub mod metaformer;
pub mod qconv;
pub mod qmlp;
pub mod requant;
pub mod rows;

use rayon::prelude::*;
use tract_core::internal::TractResult;
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

/// Runs a whole model evaluation `f` with `executor` as tract's executor. With a
/// thread pool, `f` itself runs on one of the pool's threads: every parallel section
/// of every op then starts on a thread that is already running (the pool's other
/// threads join as they wake), where calling into the pool from outside would hand
/// each section over and wait for sleeping workers to wake, many times per run.
///
/// `f` need not be `Send`: the caller's thread blocks until `f` has returned on the
/// pool's thread, so whatever `f` touches is used by one thread at a time, and the
/// pool's latch orders the two threads' accesses.
pub(crate) fn on_executor<R>(executor: &Executor, f: impl FnOnce() -> R) -> R {
    match executor {
        Executor::MultiThread(pool) => {
            struct AssertSend<T>(T);
            // SAFETY: see above; the value moves to one thread and back, never shared.
            unsafe impl<T> Send for AssertSend<T> {}
            let job = AssertSend((executor.clone(), f));
            let AssertSend(r) = pool.install(move || {
                let job = job;
                let (executor, f) = job.0;
                AssertSend(tract_linalg::multithread::multithread_tract_scope(
                    executor, f,
                ))
            });
            r
        }
        _ => tract_linalg::multithread::multithread_tract_scope(executor.clone(), f),
    }
}

/// Calls `f(first, runs, scratch)` over `out` cut into runs of `inner` elements (one
/// channel plane each): `runs` holds whole runs starting with run `first`. With a
/// thread pool and at least `parallel_min` elements, groups of a few runs per thread
/// go to the pool's threads, each thread with its own `scratch`; otherwise one call
/// takes everything on the calling thread.
pub(crate) fn for_runs<T: Send, S: Default + Send>(
    out: &mut [T],
    inner: usize,
    parallel_min: usize,
    f: impl Fn(usize, &mut [T], &mut S) -> TractResult<()> + Sync,
) -> TractResult<()> {
    if inner == 0 || out.is_empty() {
        return Ok(());
    }
    let (executor, threads) = executor_threads();
    let n_runs = out.len() / inner;
    if threads > 1 && n_runs > 1 && out.len() >= parallel_min {
        let per = n_runs.div_ceil(threads * 4).max(1);
        in_pool(&executor, || {
            out.par_chunks_mut(per * inner)
                .enumerate()
                .try_for_each_init(S::default, |scratch, (g, runs)| f(g * per, runs, scratch))
        })
    } else {
        f(0, out, &mut S::default())
    }
}

/// Runs `f` inside the executor's pool when it has one, so rayon work spawned by `f`
/// lands on tract's threads.
pub(crate) fn in_pool<R: Send>(executor: &Executor, f: impl FnOnce() -> R + Send) -> R {
    match executor {
        Executor::MultiThread(pool) => pool.install(f),
        _ => f(),
    }
}
