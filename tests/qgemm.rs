//! The u8 × i8 → i32 matrix product of the int8 MLP (src/kernels/qgemm.rs).
//!
//! Every kernel this CPU runs (`QKernel::available`: portable, AVX2, AVX-512 VNNI on
//! x86; NEON and NEON dot product on aarch64, the latter only where the CPU has it)
//! against a plain i64 sum, bit for bit: odd depths (k4 padding holding garbage), token
//! counts around the register widths, row counts around the tiles, row sub-ranges,
//! `ldc > cols`, and extreme values over long depths (no saturation, no overflow).
//! Depth 320 over 196 tokens and depths ≥ 2048 over 33 span several of the AVX2
//! kernels' depth blocks, the last one partial (with an odd number of groups for
//! `avx2-maddubs-quads`).
//!
//! `avx2-maddubs` runs its own kernel only on weights whose channel pairs fit an i16
//! (`PackedI8::pairs_fit_i16`), `avx2-maddubs-quads` only on weights whose quads do
//! (`PackedI8::quads_fit_i16`), so every case also runs with weights in −64..=63 and
//! in −32..=31, and the extreme cases put pairs and quads exactly on the bound
//! (`Σ|w| = 128` times 255) and one step past it (where the kernel must fall back).

use poolformer_edge::kernels::qgemm::{
    gemm_q16_planes, gemm_u8i8, gemm_u8i8_with, k4_index, k4_len, PackedI8, QKernel,
};
use poolformer_edge::kernels::Isa;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A k4 buffer of `k × cols` activations: random bytes everywhere, the padding
/// channels included, and `a(k, n)` at the real positions when given.
struct Case {
    m: usize,
    k: usize,
    cols: usize,
    w: Vec<i8>,
    b: Vec<u8>,
}

impl Case {
    fn random(m: usize, k: usize, cols: usize, seed: u64) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = (0..m * k).map(|_| rng.gen::<i8>()).collect();
        let b = (0..k4_len(k, cols)).map(|_| rng.gen::<u8>()).collect();
        Case { m, k, cols, w, b }
    }

    /// Weights `fw(r, k)`, activations `fb(k, n)`; padding bytes random.
    fn with(
        m: usize,
        k: usize,
        cols: usize,
        fw: impl Fn(usize, usize) -> i8,
        fb: impl Fn(usize, usize) -> u8,
    ) -> Case {
        let mut c = Case::random(m, k, cols, (m * 1000 + k * 10 + cols) as u64);
        for r in 0..m {
            for kk in 0..k {
                c.w[r * k + kk] = fw(r, kk);
            }
        }
        for kk in 0..k {
            for n in 0..cols {
                c.b[k4_index(kk, n, cols)] = fb(kk, n);
            }
        }
        c
    }

    /// The same case with every weight shifted right by `bits`.
    fn narrowed(&self, bits: u32) -> (Case, PackedI8) {
        let w: Vec<i8> = self.w.iter().map(|&v| v >> bits).collect();
        let packed = PackedI8::new(self.m, self.k, &w).unwrap();
        let b = self.b.clone();
        (Case { w, b, ..*self }, packed)
    }

    /// The same case with every weight halved (−64..=63): every pair fits an i16.
    fn halved(&self) -> Case {
        let (case, packed) = self.narrowed(1);
        assert!(packed.pairs_fit_i16());
        case
    }

    /// The same case with every weight quartered (−32..=31): every quad fits an i16.
    fn quartered(&self) -> Case {
        let (case, packed) = self.narrowed(2);
        assert!(packed.quads_fit_i16());
        case
    }

    fn reference(&self, r: usize, n: usize) -> i32 {
        let s: i64 = (0..self.k)
            .map(|kk| self.w[r * self.k + kk] as i64 * self.b[k4_index(kk, n, self.cols)] as i64)
            .sum();
        i32::try_from(s).expect("reference fits i32")
    }

    /// Runs `kernel` on `rows` with row stride `ldc` and checks every output, and that
    /// the `ldc − cols` values after each row are untouched.
    fn check(&self, kernel: QKernel, rows: std::ops::Range<usize>, ldc: usize) {
        const SENTINEL: i32 = 0x5a5a_5a5a;
        let packed = PackedI8::new(self.m, self.k, &self.w).unwrap();
        let nrows = rows.len();
        let mut acc = vec![SENTINEL; nrows.max(1) * ldc];
        gemm_u8i8_with(
            kernel,
            &packed,
            rows.clone(),
            &self.b,
            self.cols,
            &mut acc,
            ldc,
        );
        for (i, r) in rows.enumerate() {
            for n in 0..ldc {
                let got = acc[i * ldc + n];
                let want = if n < self.cols {
                    self.reference(r, n)
                } else {
                    SENTINEL
                };
                assert_eq!(
                    got,
                    want,
                    "{}: m={} k={} cols={} ldc={ldc}, row {r}, token {n}",
                    kernel.name(),
                    self.m,
                    self.k,
                    self.cols
                );
            }
        }
        if nrows == 0 {
            assert!(
                acc.iter().all(|&v| v == SENTINEL),
                "{}: empty rows wrote",
                kernel.name()
            );
        }
    }
}

fn kernels() -> Vec<QKernel> {
    let ks = QKernel::available();
    eprintln!(
        "qgemm kernels: {:?}",
        ks.iter().map(|k| k.name()).collect::<Vec<_>>()
    );
    ks
}

#[test]
fn odd_sizes_every_kernel() {
    let kernels = kernels();
    for (i, &m) in [1, 3, 7, 8, 9, 17, 33].iter().enumerate() {
        for (j, &k) in [1, 3, 4, 5, 64, 67, 320].iter().enumerate() {
            for (l, &cols) in [1, 5, 15, 16, 17, 31, 33, 49, 196, 257].iter().enumerate() {
                let case = Case::random(m, k, cols, (i * 100 + j * 10 + l) as u64);
                for case in [&case, &case.halved(), &case.quartered()] {
                    for &kernel in &kernels {
                        case.check(kernel, 0..m, cols);
                    }
                }
            }
        }
    }
}

#[test]
fn row_ranges_and_ldc() {
    let kernels = kernels();
    for &(m, k, cols) in &[(33, 67, 17), (33, 67, 49), (20, 8, 5), (17, 320, 196)] {
        let case = Case::random(m, k, cols, 7);
        for case in [&case, &case.halved(), &case.quartered()] {
            for rows in [0..m, 5..6, 3..20.min(m), 9..m, m - 1..m, 7..7, 1..m - 1] {
                for ldc in [cols, cols + 3, cols + 16] {
                    for &kernel in &kernels {
                        case.check(kernel, rows.clone(), ldc);
                    }
                }
            }
        }
    }
}

#[test]
fn extreme_values_long_depth() {
    let kernels = kernels();
    for &k in &[2048, 2051, 4096] {
        for &(m, cols) in &[(9, 33), (8, 16), (3, 5)] {
            let cases = [
                Case::with(m, k, cols, |_, _| -128, |_, _| 255),
                Case::with(m, k, cols, |_, _| 127, |_, _| 255),
                // Each pair of channels at the extremes of opposite signs, then same.
                Case::with(
                    m,
                    k,
                    cols,
                    |r, kk| if (r + kk) % 2 == 0 { -128 } else { 127 },
                    |_, _| 255,
                ),
                Case::with(
                    m,
                    k,
                    cols,
                    |_, kk| if kk % 4 < 2 { -128 } else { 127 },
                    |_, n| 255 - (n % 2) as u8,
                ),
                Case::with(m, k, cols, |_, _| -128, |_, _| 0),
            ];
            // Pairs on the i16 bound (255·128 = 32 640) in both signs, for
            // `avx2-maddubs`: (−128, 0), (0, −128), (64, 64), (−64, −64), (127, 1),
            // (−1, −127), cycling over rows and pairs.
            let on_bound = |r: usize, kk: usize| {
                const PAIRS: [(i8, i8); 6] = [
                    (-128, 0),
                    (0, -128),
                    (64, 64),
                    (-64, -64),
                    (127, 1),
                    (-1, -127),
                ];
                let (a, b) = PAIRS[(r + kk / 2) % PAIRS.len()];
                if kk.is_multiple_of(2) {
                    a
                } else {
                    b
                }
            };
            let bound = Case::with(m, k, cols, on_bound, |_, _| 255);
            let packed = PackedI8::new(m, k, &bound.w).unwrap();
            assert!(packed.pairs_fit_i16());
            // One step past the bound: (127, 2) pairs; the kernel must not take them.
            let past = Case::with(m, k, cols, |_, kk| [127, 2][kk % 2], |_, _| 255);
            let packed = PackedI8::new(m, k, &past.w).unwrap();
            assert!(!packed.pairs_fit_i16());
            let quads = Case::with(m, k, cols, quads_on_bound, |_, _| 255);
            let packed = PackedI8::new(m, k, &quads.w).unwrap();
            assert!(packed.quads_fit_i16());
            // One step past: the quad {0, 1, 4, 5} at 129, its pairs within theirs.
            let quads_past = Case::with(
                m,
                k,
                cols,
                |_, kk| [64, 1, 0, 0, 64, 0, 0, 0][kk % 8],
                |_, _| 255,
            );
            let packed = PackedI8::new(m, k, &quads_past.w).unwrap();
            assert!(packed.pairs_fit_i16() && !packed.quads_fit_i16());
            for case in cases.iter().chain([&bound, &past, &quads, &quads_past]) {
                for &kernel in &kernels {
                    case.check(kernel, 0..m, cols);
                }
            }
        }
    }
    // All 255 × −128: −32640·k, the extreme a saturating i16 pair sum would get wrong.
    let case = Case::with(1, 2048, 17, |_, _| -128, |_, _| 255);
    assert_eq!(case.reference(0, 0), -255 * 128 * 2048);
}

/// Weights whose octets' quads {0, 1, 4, 5} and {2, 3, 6, 7} are on the bound
/// (Σ|w| = 128) in both signs, for `avx2-maddubs-quads`, cycling over rows and octets.
fn quads_on_bound(r: usize, kk: usize) -> i8 {
    const OCTETS: [[i8; 8]; 5] = [
        [-32, -32, 32, 32, -32, -32, 32, 32],
        [127, 1, -128, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, -128, 0, 0, 127],
        [64, 0, 0, -64, 64, 0, 0, -64],
        [-1, -1, -1, -1, -125, -1, -1, -125],
    ];
    OCTETS[(r + kk / 8) % OCTETS.len()][kk % 8]
}

/// Quads on the bound over depths of several blocks, with token counts whose block
/// size in groups would be odd if the kernel did not round it to even (179, 49 and 196
/// tokens: 23, 85 and 21 groups of 16 KiB): a block that started inside an octet would
/// pair the wrong groups and overflow. Activations 255, then random; row sub-ranges
/// and `ldc > cols`.
#[test]
fn quads_on_the_bound_across_depth_blocks() {
    let kernels = kernels();
    for &(m, k, cols) in &[(7, 1126, 179), (5, 2700, 49), (9, 520, 196), (4, 1124, 179)] {
        let full = Case::with(m, k, cols, quads_on_bound, |_, _| 255);
        let mut random = Case::random(m, k, cols, (m * k + cols) as u64);
        random.w = full.w.clone();
        for case in [&full, &random] {
            let packed = PackedI8::new(m, k, &case.w).unwrap();
            assert!(packed.quads_fit_i16());
            for &kernel in &kernels {
                case.check(kernel, 0..m, cols);
                case.check(kernel, 1..m - 1, cols + 5);
            }
        }
    }
}

#[test]
fn isa_dispatch() {
    let case = Case::random(17, 67, 49, 3);
    let packed = PackedI8::new(case.m, case.k, &case.w).unwrap();
    for isa in Isa::available() {
        let kernel = QKernel::for_isa(isa);
        assert!(kernel.is_supported());
        eprintln!("{} → {}", isa.name(), kernel.name());
        if isa == Isa::Avx2 {
            assert_eq!(
                kernel,
                QKernel::Avx2,
                "Isa::Avx2 runs the plain AVX2 kernel"
            );
        }
        // Weights whose pairs fit an i16 get `vpmaddubsw` at the AVX2 levels; others
        // (random bytes: some pairs exceed the bound) keep the level's kernel.
        assert!(!packed.pairs_fit_i16());
        assert_eq!(QKernel::for_weights(isa, &packed), kernel);
        let fitting = PackedI8::new(case.m, case.k, &case.halved().w).unwrap();
        assert!(!fitting.quads_fit_i16());
        let with_fitting = QKernel::for_weights(isa, &fitting);
        let quads = PackedI8::new(case.m, case.k, &case.quartered().w).unwrap();
        let with_quads = QKernel::for_weights(isa, &quads);
        if kernel == QKernel::Avx2 {
            assert_eq!(with_fitting, QKernel::Avx2Maddubs);
            assert_eq!(with_quads, QKernel::Avx2MaddubsQuads);
        } else {
            assert_eq!(with_fitting, kernel);
            assert_eq!(with_quads, kernel);
        }
        let mut acc = vec![0; case.m * case.cols];
        gemm_u8i8(
            isa,
            &packed,
            0..case.m,
            &case.b,
            case.cols,
            &mut acc,
            case.cols,
        );
        for r in 0..case.m {
            for n in 0..case.cols {
                assert_eq!(
                    acc[r * case.cols + n],
                    case.reference(r, n),
                    "{}",
                    isa.name()
                );
            }
        }
    }
}

/// `Σ_k w[r, k]·(256·hi + lo)` with `hi` as i8, in i64, for [`gemm_q16_planes`].
fn planes_reference(
    w: &[i8],
    k: usize,
    hi: &[u8],
    lo: &[u8],
    cols: usize,
    r: usize,
    n: usize,
) -> i64 {
    (0..k)
        .map(|kk| {
            let at = k4_index(kk, n, cols);
            w[r * k + kk] as i64 * (256 * (hi[at] as i8 as i64) + lo[at] as i64)
        })
        .sum()
}

/// The 16-bit product on two byte planes, at every ISA level this CPU runs (AVX2's
/// `vpmaddwd` kernel, plain Rust elsewhere), against an i64 sum: random values over
/// odd shapes and row ranges (each output then well inside an i32; full-range high
/// bytes where the depth allows), depths of 256 and more whose last tokens run as dot
/// products, with and without a remainder past 16 channels (2700, 1152), and extremes
/// sized to the i32 limit that `max_row_l1` states, in both signs. Padding channels
/// hold random bytes (the padded weights are zero).
#[test]
fn q16_planes_every_level() {
    const SENTINEL: i32 = 0x5a5a_5a5a;
    let run = |w: &[i8],
               m: usize,
               k: usize,
               hi: &[u8],
               lo: &[u8],
               cols: usize,
               rows: std::ops::Range<usize>,
               ldc: usize| {
        let packed = PackedI8::new(m, k, w).unwrap();
        for isa in Isa::available() {
            let mut acc = vec![SENTINEL; rows.len().max(1) * ldc];
            gemm_q16_planes(isa, &packed, rows.clone(), hi, lo, cols, &mut acc, ldc);
            for (i, r) in rows.clone().enumerate() {
                for n in 0..ldc {
                    let want = if n < cols {
                        i32::try_from(planes_reference(w, k, hi, lo, cols, r, n))
                            .expect("the case fits an i32")
                    } else {
                        SENTINEL
                    };
                    assert_eq!(
                        acc[i * ldc + n],
                        want,
                        "{}: m={m} k={k} cols={cols} ldc={ldc}, row {r}, token {n}",
                        isa.name()
                    );
                }
            }
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    for &m in &[1, 3, 4, 9, 17] {
        for &k in &[4, 7, 64, 1152, 2700, 2880] {
            for &cols in &[1, 7, 8, 13, 49, 196] {
                let w: Vec<i8> = (0..m * k).map(|_| rng.gen()).collect();
                let len = k4_len(k, cols);
                let hi: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let lo: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                // Full-range highs up to 64 channels (|Σ| ≤ 64·128·32768 = 2^28);
                // deeper, random i8 × 16-bit products stay within ±2^31 only with
                // smaller highs: |hi| ≤ 16 keeps |q| ≤ 4096, |Σ| ≤ 2880·128·4096.
                let hi: Vec<u8> = if k <= 64 {
                    hi
                } else {
                    hi.iter().map(|&h| ((h as i8) >> 3) as u8).collect()
                };
                run(&w, m, k, &hi, &lo, cols, 0..m, cols);
                if m > 2 {
                    run(&w, m, k, &hi, &lo, cols, 1..m - 1, cols + 5);
                }
            }
        }
    }
    // Extremes: all weights −128 or 127, inputs at ±q where q·max_row_l1 ≤ i32::MAX.
    for &(m, k, cols) in &[(5, 2880, 49), (4, 1152, 13)] {
        for &w0 in &[-128i8, 127] {
            let w = vec![w0; m * k];
            let l1 = PackedI8::new(m, k, &w).unwrap().max_row_l1();
            assert_eq!(l1, (w0 as i64).abs() * k as i64);
            let q = i32::MAX as i64 / l1;
            for q in [q, -q] {
                let (h, l) = ((q >> 8) as i8 as u8, (q & 255) as u8);
                let hi = vec![h; k4_len(k, cols)];
                let lo = vec![l; k4_len(k, cols)];
                assert!(planes_reference(&w, k, &hi, &lo, cols, 0, 0).abs() > (1 << 30));
                run(&w, m, k, &hi, &lo, cols, 0..m, cols);
            }
        }
    }
}
