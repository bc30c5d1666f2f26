//! Latency statistics and process memory, shared by `pfe bench`, `pfe demo` and the benches.

use std::time::Duration;

use serde::Serialize;

/// Summary of repeated latency measurements, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyStats {
    pub iters: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    /// Statistics of `samples` (must not be empty). Percentiles use the nearest-rank method.
    pub fn from_samples(samples: &[Duration]) -> LatencyStats {
        assert!(!samples.is_empty(), "no latency samples");
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        let rank = |p: f64| ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        LatencyStats {
            iters: n,
            min_ms: ms[0],
            median_ms: median,
            p90_ms: rank(0.9),
            max_ms: ms[n - 1],
        }
    }
}

/// CPU time this process has used, all its threads together (`CLOCK_PROCESS_CPUTIME_ID`),
/// where the platform has that clock.
///
/// Around one inference on one thread this is the inference's time less whatever the
/// operating system or a hypervisor gave to other work meanwhile, which the wall clock
/// counts (slowdowns from other jobs' use of shared caches, memory bandwidth or clock
/// speed stay in it); with several threads it sums their time, waiting included, so
/// it is a cost rather than a latency.
pub fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_known_samples() {
        let s: Vec<Duration> = [5u64, 1, 3, 2, 4, 6, 7, 8, 9, 10]
            .iter()
            .map(|&m| Duration::from_millis(m))
            .collect();
        let st = LatencyStats::from_samples(&s);
        assert_eq!(st.iters, 10);
        assert_eq!(st.min_ms, 1.0);
        assert_eq!(st.max_ms, 10.0);
        assert_eq!(st.median_ms, 5.5);
        assert_eq!(st.p90_ms, 9.0);
        let one = LatencyStats::from_samples(&[Duration::from_millis(3)]);
        assert_eq!((one.median_ms, one.p90_ms), (3.0, 3.0));
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        let rss = peak_rss_mb().expect("VmHWM on Linux");
        assert!(rss > 1.0, "{rss}");
    }
}
