//! The threads a rank computes on.
//!
//! A parallel loop (rayon's, as every CPU kernel here runs) started on a thread outside any
//! rayon pool is queued to the global pool, and the thread sleeps until the pool's workers have
//! run it: a worker and then the thread are woken through the kernel for every loop. A training
//! step of a small model runs thousands of loops, and the wake-ups (futex and sched_yield system
//! calls) were a quarter of pretraining `tiny` on two cores. Started on a pool's own worker, the
//! same loop goes on that worker's queue, the worker takes part in it and only the other workers
//! are woken: 100 steps and an evaluation of `tiny` went from 17.5 s to 13.5 s. So a rank (and
//! the `whale` command) runs as the job of a pool of its own, as a process of its own would;
//! results do not depend on it (every kernel gives the same bits for any thread count).
//!
//! The threads a rank starts for itself (the data-parallel reducer, which only communicates, and
//! DualPipe's overlapped forward) are plain threads: their loops go to rayon's global pool. The
//! forward cannot share its rank's pool: on a pool of one worker it would run nested inside the
//! backward it overlaps, which may wait for it.

use crate::{Error, Result};

/// Stack of every thread a model's forward and backward run on: the workers of
/// [`in_own_pool`] and a pipeline rank's overlapped forward.
pub const COMPUTE_STACK: usize = 16 << 20;

/// A rayon pool of `threads` workers (0: rayon's default, `RAYON_NUM_THREADS` or one per core)
/// with [`COMPUTE_STACK`]-byte stacks, its threads named `{name} worker {i}`. Run a job on it with
/// `install` (which [`in_own_pool`] does once).
pub fn compute_pool(threads: usize, name: &str) -> Result<rayon::ThreadPool> {
    let prefix = name.to_string();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(COMPUTE_STACK)
        .thread_name(move |i| format!("{prefix} worker {i}"))
        .build()
        .map_err(|e| Error::Train(format!("{name}: starting its compute threads: {e}")))
}

/// Runs `f` as the first job of a new [`compute_pool`] of `threads` workers and returns its
/// result (a panic in `f` is raised here). The calling thread waits; the parallel loops inside
/// `f` run on the pool.
pub fn in_own_pool<R: Send>(threads: usize, name: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(compute_pool(threads, name)?.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_runs_on_a_worker_of_a_pool_of_the_given_size() {
        let (worker, threads) =
            in_own_pool(3, "test", || (rayon::current_thread_index(), rayon::current_num_threads()))
                .expect("a pool of three");
        assert_eq!((worker.is_some(), threads), (true, 3));
        let name = in_own_pool(1, "rank 7", || std::thread::current().name().map(str::to_string)).unwrap();
        assert_eq!(name.as_deref(), Some("rank 7 worker 0"));
    }

    #[test]
    fn a_panic_in_the_job_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| in_own_pool(2, "test", || panic!("inside")));
        assert!(caught.is_err());
    }
}
