//! `bench::process_cpu_time`, in a process of its own: the clock counts every thread
//! of the process, so other tests running beside it would add their time.

use std::time::{Duration, Instant};

use poolformer_edge::bench::process_cpu_time;

#[test]
fn process_cpu_time_counts_work_and_not_sleep() {
    let t0 = process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID on Unix");
    std::thread::sleep(Duration::from_millis(60));
    let slept = process_cpu_time().unwrap() - t0;
    // Sleeping uses (almost) no CPU: well under the 60 ms of wall time.
    assert!(
        slept < Duration::from_millis(30),
        "{slept:?} of CPU time while sleeping"
    );
    // Spinning for 40 ms of wall time uses at least a good part of it (the thread may
    // be descheduled for a while on a loaded machine).
    let c0 = process_cpu_time().unwrap();
    spin(Duration::from_millis(40));
    let spun = process_cpu_time().unwrap() - c0;
    assert!(
        spun >= Duration::from_millis(10),
        "{spun:?} of CPU time while spinning"
    );
    // Work on two threads at once adds up: 2 × 40 ms of spinning.
    let c1 = process_cpu_time().unwrap();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| spin(Duration::from_millis(40)));
        }
    });
    let both = process_cpu_time().unwrap() - c1;
    assert!(
        both >= Duration::from_millis(20),
        "{both:?} of CPU time for two spinning threads"
    );
}

/// Keeps this thread busy for `wall` of wall time.
fn spin(wall: Duration) {
    let start = Instant::now();
    let mut x = 1u64;
    while start.elapsed() < wall {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
