//! Running statistics in bounded memory: per-stage latency windows, an inference-latency
//! histogram, a frame-rate meter.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Milliseconds spent in each stage of one frame.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct StageTimes {
    /// Getting the frame from the source (waiting for the device included).
    pub capture: f64,
    /// Waiting in the newest-frame slot for the inference thread.
    pub wait: f64,
    /// Pixel format → RGB8.
    pub convert: f64,
    /// Resize, crop, normalize.
    pub preprocess: f64,
    /// The network.
    pub infer: f64,
    /// The overlay.
    pub draw: f64,
    /// Framebuffer, HTTP, snapshots.
    pub output: f64,
    /// Capture start to output end.
    pub total: f64,
}

pub const STAGE_NAMES: [&str; 8] = [
    "capture",
    "wait",
    "convert",
    "preprocess",
    "infer",
    "draw",
    "output",
    "total",
];

impl StageTimes {
    pub fn values(&self) -> [f64; 8] {
        [
            self.capture,
            self.wait,
            self.convert,
            self.preprocess,
            self.infer,
            self.draw,
            self.output,
            self.total,
        ]
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Samples kept per stage for the median and p90.
const WINDOW: usize = 512;

/// Count, mean and max over all samples; median and p90 over the last [`WINDOW`].
#[derive(Debug, Clone)]
pub struct Window {
    recent: Vec<f64>,
    next: usize,
    pub count: u64,
    sum: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            recent: Vec::with_capacity(WINDOW),
            next: 0,
            count: 0,
            sum: 0.0,
            max: 0.0,
        }
    }
}

impl Window {
    pub fn add(&mut self, v: f64) {
        if self.recent.len() < WINDOW {
            self.recent.push(v);
        } else {
            self.recent[self.next] = v;
        }
        self.next = (self.next + 1) % WINDOW;
        self.count += 1;
        self.sum += v;
        self.max = self.max.max(v);
    }

    pub fn summary(&self) -> Summary {
        if self.count == 0 {
            return Summary::default();
        }
        let mut sorted = self.recent.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Summary {
            count: self.count,
            mean: self.sum / self.count as f64,
            median: at(0.5),
            p90: at(0.9),
            max: self.max,
        }
    }
}

/// Upper bounds (ms) of the inference-latency histogram's bins; one more bin above.
pub const HISTOGRAM_BOUNDS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

#[derive(Debug, Clone, Default, Serialize)]
pub struct Histogram {
    pub bounds_ms: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            bounds_ms: HISTOGRAM_BOUNDS_MS.to_vec(),
            counts: vec![0; HISTOGRAM_BOUNDS_MS.len() + 1],
        }
    }

    pub fn add(&mut self, v: f64) {
        let bin = self
            .bounds_ms
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds_ms.len());
        self.counts[bin] += 1;
    }

    /// Bin labels: "≤1", "≤2", …, ">5000".
    pub fn labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.bounds_ms.iter().map(|b| format!("≤{b}")).collect();
        labels.push(format!(
            ">{}",
            self.bounds_ms.last().copied().unwrap_or(0.0)
        ));
        labels
    }
}

/// Frames per second over the last two seconds (at most 64 frames).
#[derive(Debug, Default)]
pub struct FpsMeter {
    times: VecDeque<Instant>,
}

impl FpsMeter {
    pub fn tick(&mut self, now: Instant) {
        if self.times.len() == 64 {
            self.times.pop_front();
        }
        self.times.push_back(now);
        while self.times.len() > 2 && now - self.times[0] > Duration::from_secs(2) {
            self.times.pop_front();
        }
    }

    pub fn fps(&self) -> f64 {
        match (self.times.front(), self.times.back()) {
            (Some(a), Some(b)) if self.times.len() >= 2 && b > a => {
                (self.times.len() - 1) as f64 / (*b - *a).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Everything the pipeline measures.
#[derive(Debug)]
pub struct Stats {
    pub started: Instant,
    pub inferred: u64,
    /// Frames that could not be converted (damaged MJPEG, …).
    pub bad: u64,
    pub stages: [Window; 8],
    pub infer_histogram: Histogram,
    pub fps: FpsMeter,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            inferred: 0,
            bad: 0,
            stages: Default::default(),
            infer_histogram: Histogram::new(),
            fps: FpsMeter::default(),
        }
    }

    pub fn record(&mut self, times: &StageTimes) {
        for (w, v) in self.stages.iter_mut().zip(times.values()) {
            w.add(v);
        }
        self.infer_histogram.add(times.infer);
    }

    pub fn stage_summaries(&self) -> Vec<(&'static str, Summary)> {
        STAGE_NAMES
            .iter()
            .zip(&self.stages)
            .map(|(n, w)| (*n, w.summary()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keeps_recent_samples_and_overall_extremes() {
        let mut w = Window::default();
        for i in 0..2000 {
            w.add(i as f64);
        }
        let s = w.summary();
        assert_eq!(s.count, 2000);
        assert_eq!(s.max, 1999.0);
        assert!((s.mean - 999.5).abs() < 1e-9);
        // Median and p90 of the last 512 samples (1488..=1999).
        assert!((s.median - 1743.5).abs() <= 1.0, "{}", s.median);
        assert!((s.p90 - 1948.0).abs() <= 1.0, "{}", s.p90);
        assert_eq!(w.recent.capacity(), WINDOW);
    }

    #[test]
    fn histogram_bins() {
        let mut h = Histogram::new();
        for v in [0.5, 1.0, 1.5, 37.0, 9000.0] {
            h.add(v);
        }
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[5], 1);
        assert_eq!(*h.counts.last().unwrap(), 1);
        assert_eq!(h.labels().len(), h.counts.len());
    }

    #[test]
    fn fps_meter() {
        let mut m = FpsMeter::default();
        let t0 = Instant::now();
        for i in 0..11 {
            m.tick(t0 + Duration::from_millis(100 * i));
        }
        assert!((m.fps() - 10.0).abs() < 1e-6, "{}", m.fps());
    }
}
