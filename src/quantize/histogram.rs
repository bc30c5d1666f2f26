//! Activation statistics for calibration: exact min/max plus a histogram whose range
//! grows by doubling, so one pass over the calibration set suffices and no tensor has to
//! be kept.
//!
//! From a histogram, three ways to choose the clip range `[lo, hi]` of a tensor:
//! min-max, percentiles, and the range minimizing the expected squared quantization
//! error (clipping error outside, uniform rounding error Δ²/12 inside).

use anyhow::{ensure, Result};

/// Bins of every histogram. Divisible by 4, so that doubling the range merges bin pairs
/// exactly. After growth the values fill at least a quarter of the bins on their
/// larger side: ≥ 1024 bins between 0 and the largest magnitude.
pub const BINS: usize = 4096;

/// Counts of values in `BINS` equal bins over `[-range, range)`, plus the exact extremes.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bins: Vec<u64>,
    /// Half width of the covered interval; a power of two once a non-zero value was seen.
    range: f64,
    min: f32,
    max: f32,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            bins: vec![0; BINS],
            range: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
        }
    }

    /// Adds values; a NaN or infinity is an error (the range of such a tensor is undefined).
    pub fn add(&mut self, values: &[f32]) -> Result<()> {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if values.is_empty() {
            return Ok(());
        }
        ensure!(
            values.iter().all(|v| v.is_finite()),
            "tensor holds NaN or infinite values"
        );
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        let magnitude = (lo.abs().max(hi.abs())) as f64;
        if self.range == 0.0 {
            if magnitude > 0.0 {
                self.range = magnitude.log2().ceil().exp2();
                // ceil(log2) can land one power short by rounding.
                while self.range < magnitude {
                    self.range *= 2.0;
                }
            } else {
                self.range = f64::MIN_POSITIVE;
            }
        }
        while self.range < magnitude {
            self.double_range();
        }
        let width = self.bin_width();
        let last = BINS - 1;
        for &v in values {
            let i = ((v as f64 + self.range) / width) as usize;
            self.bins[i.min(last)] += 1;
        }
        self.count += values.len() as u64;
        Ok(())
    }

    /// Doubles the covered interval around 0: old bin `j` lands in new bin `(j + BINS/2)/2`.
    fn double_range(&mut self) {
        let mut merged = vec![0u64; BINS];
        for (j, &n) in self.bins.iter().enumerate() {
            merged[(j + BINS / 2) / 2] += n;
        }
        self.bins = merged;
        self.range *= 2.0;
    }

    fn bin_width(&self) -> f64 {
        2.0 * self.range / BINS as f64
    }

    fn bin_lower_edge(&self, i: usize) -> f64 {
        -self.range + i as f64 * self.bin_width()
    }

    fn bin_center(&self, i: usize) -> f64 {
        self.bin_lower_edge(i) + 0.5 * self.bin_width()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value seen (+∞ before any).
    pub fn min(&self) -> f32 {
        self.min
    }

    /// Largest value seen (−∞ before any).
    pub fn max(&self) -> f32 {
        self.max
    }

    /// The value below which a fraction `q` (0..=1) of the values lie, interpolated
    /// linearly inside its bin and kept within `[min, max]`.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0.0;
        let mut value = self.max as f64;
        for (i, &n) in self.bins.iter().enumerate() {
            let n = n as f64;
            if n > 0.0 && below + n >= target {
                let inside = (target - below) / n;
                value = self.bin_lower_edge(i) + inside * self.bin_width();
                break;
            }
            below += n;
        }
        value.clamp(self.min as f64, self.max as f64)
    }

    /// Clip range holding the central `percentile` % of the values: from the
    /// `(100 − p)`-th to the `p`-th percentile.
    pub fn percentile_range(&self, percentile: f64) -> (f64, f64) {
        let p = percentile / 100.0;
        (self.quantile(1.0 - p), self.quantile(p))
    }

    /// Symmetric clip threshold holding `percentile` % of the magnitudes.
    pub fn percentile_magnitude(&self, percentile: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = (percentile / 100.0).clamp(0.0, 1.0) * self.count as f64;
        // Magnitudes binned by folding the signed bins around 0.
        let half = BINS / 2;
        let mut below = 0.0;
        let width = self.bin_width();
        let max_mag = (self.min.abs().max(self.max.abs())) as f64;
        for k in 0..half {
            let n = (self.bins[half + k] + self.bins[half - 1 - k]) as f64;
            if n > 0.0 && below + n >= target {
                let inside = (target - below) / n;
                return ((k as f64 + inside) * width).min(max_mag);
            }
            below += n;
        }
        max_mag
    }

    /// The clip range `[lo, hi]` (with `lo ≤ 0 ≤ hi`) minimizing the expected squared
    /// error of quantizing this distribution to `levels − 1` equal steps: values outside
    /// are clipped (error `(x − clip)²`), values inside are rounded (error Δ²/12 on
    /// average, Δ = (hi − lo)/(levels − 1)). With `symmetric`, `lo = −hi`.
    ///
    /// Candidates are bin edges (at most 256 per side, evenly spaced between 0 and the
    /// extremes); each costs O(1) through prefix sums of n, Σx, Σx² over bin centers.
    pub fn mse_range(&self, levels: usize, symmetric: bool) -> (f64, f64) {
        if self.count == 0 {
            return (0.0, 0.0);
        }
        let sums = PrefixSums::new(self);
        let steps = (levels - 1) as f64;
        let (min, max) = (self.min.min(0.0) as f64, self.max.max(0.0) as f64);
        const CANDIDATES: usize = 256;
        let candidates = |extreme: f64| -> Vec<f64> {
            (1..=CANDIDATES)
                .map(|k| extreme * k as f64 / CANDIDATES as f64)
                .collect()
        };
        let mut best = (f64::INFINITY, min, max);
        if symmetric {
            let magnitude = (-min).max(max);
            for t in candidates(magnitude) {
                let err = sums.error(-t, t, 2.0 * t / steps);
                if err < best.0 {
                    best = (err, -t, t);
                }
            }
        } else {
            let los = if min < 0.0 {
                candidates(min)
            } else {
                vec![0.0]
            };
            let his = if max > 0.0 {
                candidates(max)
            } else {
                vec![0.0]
            };
            for &lo in &los {
                for &hi in &his {
                    let err = sums.error(lo, hi, (hi - lo) / steps);
                    if err < best.0 {
                        best = (err, lo, hi);
                    }
                }
            }
        }
        (best.1, best.2)
    }

    /// Signal-to-quantization-noise ratio (dB) this distribution would keep when
    /// quantized to `[lo, hi]` in `levels − 1` steps: mean square over the expected
    /// squared error of [`Histogram::mse_range`]'s model.
    pub fn expected_sqnr_db(&self, lo: f64, hi: f64, levels: usize) -> f64 {
        if self.count == 0 {
            return f64::INFINITY;
        }
        let sums = PrefixSums::new(self);
        let signal = sums.sxx[BINS];
        let noise = sums.error(lo, hi, (hi - lo) / (levels - 1) as f64);
        10.0 * (signal / noise).log10()
    }
}

/// Running sums over bins, for O(1) clipping errors of any range.
struct PrefixSums {
    centers: Vec<f64>,
    /// `n[i]`, `sx[i]`, `sxx[i]`: sums over bins `0..i`.
    n: Vec<f64>,
    sx: Vec<f64>,
    sxx: Vec<f64>,
    width: f64,
    range: f64,
}

impl PrefixSums {
    fn new(h: &Histogram) -> PrefixSums {
        let mut n = vec![0.0; BINS + 1];
        let mut sx = vec![0.0; BINS + 1];
        let mut sxx = vec![0.0; BINS + 1];
        let centers: Vec<f64> = (0..BINS).map(|i| h.bin_center(i)).collect();
        for i in 0..BINS {
            let c = h.bins[i] as f64;
            let x = centers[i];
            n[i + 1] = n[i] + c;
            sx[i + 1] = sx[i] + c * x;
            sxx[i + 1] = sxx[i] + c * x * x;
        }
        PrefixSums {
            centers,
            n,
            sx,
            sxx,
            width: h.bin_width(),
            range: h.range,
        }
    }

    /// First bin whose center is ≥ `x`.
    fn first_center_at_or_above(&self, x: f64) -> usize {
        let i = ((x + self.range) / self.width - 0.5).ceil();
        let i = i.clamp(0.0, BINS as f64) as usize;
        debug_assert!(i == BINS || self.centers[i] >= x - 1e-9 * self.width);
        i
    }

    /// Expected squared error of quantizing to `[lo, hi]` with step `step`.
    fn error(&self, lo: f64, hi: f64, step: f64) -> f64 {
        let a = self.first_center_at_or_above(lo);
        let b = self.first_center_at_or_above(hi);
        // Σ (x − c)² over bins [i, j) = Σx² − 2cΣx + c²n.
        let clipped = |i: usize, j: usize, c: f64| {
            let (n, sx, sxx) = (
                self.n[j] - self.n[i],
                self.sx[j] - self.sx[i],
                self.sxx[j] - self.sxx[i],
            );
            (sxx - 2.0 * c * sx + c * c * n).max(0.0)
        };
        let below = clipped(0, a, lo);
        // Bins whose center equals hi exactly count as inside.
        let b = if b < BINS && self.centers[b] <= hi {
            b + 1
        } else {
            b
        };
        let above = clipped(b, BINS, hi);
        let inside = self.n[b] - self.n[a.min(b)];
        below + above + inside * step * step / 12.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Standard normal samples (Box–Muller).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn min_max_are_exact_and_growth_keeps_counts() {
        let mut h = Histogram::new();
        h.add(&[0.25, -0.5]).unwrap();
        h.add(&[3.0, -100.0, 7.5]).unwrap();
        assert_eq!((h.min(), h.max(), h.count()), (-100.0, 7.5, 5));
        assert_eq!(h.bins.iter().sum::<u64>(), 5);
        assert_eq!(h.range, 128.0);
        assert!(h.add(&[f32::NAN]).is_err());
    }

    /// Doubling merges bins exactly: adding in one batch or in growing batches gives
    /// the same histogram when the final range is the same.
    #[test]
    fn growth_merges_bins_exactly() {
        let values = normal(10_000, 3);
        let mut once = Histogram::new();
        once.add(&values).unwrap();
        let scaled: Vec<f32> = values.iter().map(|v| v * 0.01).collect();
        let mut grown = Histogram::new();
        grown.add(&scaled[..100]).unwrap();
        grown.add(&values).unwrap();
        // `grown` saw extra small values; remove them from the comparison by re-adding
        // them to `once` in the same bins.
        once.add(&scaled[..100]).unwrap();
        assert_eq!(once.range, grown.range);
        assert_eq!(once.bins, grown.bins);
    }

    /// Uniform on [0, 10): the p-th percentile is 10·p/100, the histogram's resolution
    /// (range ±16, bin width 32/4096 ≈ 0.008; linear interpolation inside a bin is exact
    /// for uniform data up to sampling) keeps the error under 0.005.
    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let values: Vec<f32> = (0..100_000).map(|i| i as f32 * 1e-4).collect();
        let mut h = Histogram::new();
        h.add(&values).unwrap();
        for p in [50.0, 90.0, 99.0] {
            let q = h.quantile(p / 100.0);
            assert!((q - p / 10.0).abs() < 0.005, "p{p}: {q}");
        }
        let (lo, hi) = h.percentile_range(99.0);
        assert!(
            (lo - 0.1).abs() < 0.005 && (hi - 9.9).abs() < 0.005,
            "{lo} {hi}"
        );
        assert_eq!(h.percentile_range(100.0), (0.0, h.max() as f64));
    }

    /// Standard normal: the 99.9 % central interval is ±3.29, the 99 % magnitude
    /// threshold 2.576 (sampling error with 10⁶ samples is ~0.01 at these tails).
    #[test]
    fn percentiles_of_a_normal_distribution() {
        let mut h = Histogram::new();
        h.add(&normal(1_000_000, 1)).unwrap();
        let (lo, hi) = h.percentile_range(99.95);
        assert!(
            (lo + 3.29).abs() < 0.05 && (hi - 3.29).abs() < 0.05,
            "{lo} {hi}"
        );
        let t = h.percentile_magnitude(99.0);
        assert!((t - 2.576).abs() < 0.03, "{t}");
    }

    /// Uniform data: clipping only loses, so the MSE range is the full range (up to one
    /// candidate step, 1/256 of it).
    #[test]
    fn mse_keeps_the_full_range_of_a_uniform_distribution() {
        let values: Vec<f32> = (0..100_000).map(|i| -5.0 + i as f32 * 1e-4).collect();
        let mut h = Histogram::new();
        h.add(&values).unwrap();
        let (lo, hi) = h.mse_range(256, false);
        assert!(
            (lo + 5.0).abs() < 0.05 && (hi - 5.0).abs() < 0.05,
            "{lo} {hi}"
        );
    }

    /// Standard normal at 8 bits, symmetric: the MSE-optimal clip of a Gaussian with
    /// 255 levels is ≈ 4σ (the classic optimum for uniform quantizers of a Gaussian:
    /// 3.9–4.1σ at 8 bits), far inside the sample max (~5σ).
    #[test]
    fn mse_clips_gaussian_tails() {
        let mut h = Histogram::new();
        h.add(&normal(1_000_000, 2)).unwrap();
        let (lo, hi) = h.mse_range(256, true);
        assert_eq!(lo, -hi);
        assert!((3.5..4.5).contains(&hi), "{hi}");
        // A far outlier moves the optimum out only as far as its own clipping error
        // justifies: the chosen range beats both ±4σ and the full range.
        h.add(&[60.0]).unwrap();
        let (lo, hi) = h.mse_range(256, true);
        let sums = PrefixSums::new(&h);
        let err = |t: f64| sums.error(-t, t, 2.0 * t / 254.0);
        assert!(err(hi) <= err(4.0) && err(hi) <= err(60.0), "{lo} {hi}");
    }

    /// The O(1) prefix-sum error equals a direct sum over bins.
    #[test]
    fn prefix_sum_error_matches_a_direct_sum() {
        let mut h = Histogram::new();
        h.add(&normal(50_000, 4)).unwrap();
        let sums = PrefixSums::new(&h);
        for (lo, hi) in [(-1.0, 2.0), (-3.3, 0.7), (-0.01, 4.0)] {
            let step = (hi - lo) / 255.0;
            let mut direct = 0.0;
            for i in 0..BINS {
                let (c, n) = (h.bin_center(i), h.bins[i] as f64);
                direct += n * if c < lo {
                    (c - lo) * (c - lo)
                } else if c > hi {
                    (c - hi) * (c - hi)
                } else {
                    step * step / 12.0
                };
            }
            let fast = sums.error(lo, hi, step);
            assert!(
                (fast - direct).abs() <= 1e-9 * direct.max(1.0),
                "{fast} vs {direct}"
            );
        }
    }
}
