//! Quantization loops: i32 accumulators to u8 / i8 / f32 with a per-row affine map,
//! and the fused quantize → dequantize round trip on f32.
//!
//! Every loop is branch-free over plain slices so that the compiler vectorizes it
//! on any target (SSE2, AVX, NEON). Rounding is to nearest, ties to even, like
//! ONNX QuantizeLinear: values are first clamped to the representable range
//! (whose bounds are integers, so clamping before rounding gives the same result
//! as after), then rounded with the 1.5·2²³ trick, exact for |v| < 2²².

/// `round(v) + shift` for |v| < 2²² (already clamped) and a small integer `shift`, in
/// two operations: `v + 1.5·2²³` holds `1.5·2²³ + round(v)` exactly, and subtracting
/// `1.5·2²³ − shift` (exact too) leaves the exact sum, `+0.0` when it is zero, the
/// same bits as rounding first and adding `shift` after.
#[inline(always)]
pub(crate) fn round_shifted(v: f32, shift: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (v + MAGIC) - (MAGIC - shift)
}

/// Rounds `v` (|v| < 2²², already clamped) to nearest-even and returns
/// `round(v) + zp` modulo 2⁸ in the low byte: `v + 1.5·2²³` holds `2²² + round(v)`
/// in its mantissa, and 2²² is a multiple of 2⁸. Integer-only, so it vectorizes
/// where a saturating float → int conversion would not.
#[inline(always)]
pub(crate) fn round_to_low_byte(v: f32, zp: i32) -> u8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    ((v + MAGIC).to_bits() as i32).wrapping_add(zp) as u8
}

/// `v` clamped to `lo..=hi` with plain comparisons (they map to single SIMD
/// min / max instructions; a NaN becomes `lo`).
pub(crate) trait ClampTo {
    fn clamp_to(self, lo: f32, hi: f32) -> f32;
}

impl ClampTo for f32 {
    #[inline(always)]
    fn clamp_to(self, lo: f32, hi: f32) -> f32 {
        let v = if self > lo { self } else { lo };
        if v < hi {
            v
        } else {
            hi
        }
    }
}

/// An integer output type of a requantization.
pub trait QuantInt: Copy + Default + Send + Sync + 'static {
    const MIN: i32;
    const MAX: i32;
    /// The value whose two's-complement low byte is `b`.
    fn from_low_byte(b: u8) -> Self;
}

impl QuantInt for u8 {
    const MIN: i32 = 0;
    const MAX: i32 = 255;
    #[inline(always)]
    fn from_low_byte(b: u8) -> u8 {
        b
    }
}

impl QuantInt for i8 {
    const MIN: i32 = -128;
    const MAX: i32 = 127;
    #[inline(always)]
    fn from_low_byte(b: u8) -> i8 {
        b as i8
    }
}

/// Quantization grid of an output: `q = clamp(round(v) + zero_point, lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub zero_point: i32,
    pub lo: i32,
    pub hi: i32,
}

impl Grid {
    pub fn of<T: QuantInt>(zero_point: i32) -> Grid {
        Grid {
            zero_point,
            lo: T::MIN,
            hi: T::MAX,
        }
    }

    /// Clamp bounds on `v` (before adding the zero point), as f32.
    #[inline(always)]
    pub(crate) fn bounds(&self) -> (f32, f32) {
        (
            (self.lo - self.zero_point) as f32,
            (self.hi - self.zero_point) as f32,
        )
    }
}

/// `out[i] = clamp(round((acc[i] + add)·mult + offset) + zp)` for one row sharing
/// one multiplier and offset (the sum in i32, wrapping).
pub fn requant_row<T: QuantInt>(
    acc: &[i32],
    add: i32,
    out: &mut [T],
    mult: f32,
    offset: f32,
    grid: Grid,
) {
    let (lo, hi) = grid.bounds();
    let zp = grid.zero_point;
    for (o, &a) in out.iter_mut().zip(acc) {
        let v = (a.wrapping_add(add) as f32 * mult + offset).clamp_to(lo, hi);
        *o = T::from_low_byte(round_to_low_byte(v, zp));
    }
}

/// As [`requant_row`] with one multiplier and offset per element (the channel is
/// the innermost axis).
pub fn requant_cols<T: QuantInt>(
    acc: &[i32],
    out: &mut [T],
    mult: &[f32],
    offset: &[f32],
    grid: Grid,
) {
    let (lo, hi) = grid.bounds();
    let zp = grid.zero_point;
    for (((o, &a), &m), &c) in out.iter_mut().zip(acc).zip(mult).zip(offset) {
        let v = (a as f32 * m + c).clamp_to(lo, hi);
        *o = T::from_low_byte(round_to_low_byte(v, zp));
    }
}

/// `out[i] = (acc[i] + add)·mult + offset` (the sum in i32, wrapping).
#[inline]
pub fn dequant_row(acc: &[i32], add: i32, out: &mut [f32], mult: f32, offset: f32) {
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = a.wrapping_add(add) as f32 * mult + offset;
    }
}

/// [`dequant_row`] with each value then combined with `t[i]`: `out[i] = f(value, t[i])`
/// (the step after the head folded into its loop).
#[inline(always)]
pub fn dequant_row_with(
    acc: &[i32],
    add: i32,
    t: &[f32],
    out: &mut [f32],
    mult: f32,
    offset: f32,
    f: impl Fn(f32, f32) -> f32,
) {
    for ((o, &a), &t) in out.iter_mut().zip(acc).zip(t) {
        *o = f(a.wrapping_add(add) as f32 * mult + offset, t);
    }
}

/// As [`dequant_row`] with one multiplier and offset per element.
pub fn dequant_cols(acc: &[i32], out: &mut [f32], mult: &[f32], offset: &[f32]) {
    for (((o, &a), &m), &c) in out.iter_mut().zip(acc).zip(mult).zip(offset) {
        *o = a as f32 * m + c;
    }
}

/// `v` (on the scale of the grid's steps, before its zero point) clamped to `lo..=hi`,
/// rounded, and dequantized: `(round(v) + zp − dzp)·dscale` with `shift = zp − dzp`.
#[inline(always)]
fn on_grid(v: f32, lo: f32, hi: f32, shift: f32, dq_scale: f32) -> f32 {
    round_shifted(v.clamp_to(lo, hi), shift) * dq_scale
}

/// Requantizes onto `grid` and dequantizes with `(q − dq_zero_point)·dq_scale`
/// in one pass: `out[i] = (clamp(round((acc[i] + add)·mult + offset) + zp) − dzp)·dscale`.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn requant_to_grid_row(
    acc: &[i32],
    add: i32,
    out: &mut [f32],
    mult: f32,
    offset: f32,
    grid: Grid,
    dq_zero_point: i32,
    dq_scale: f32,
) {
    let (lo, hi) = grid.bounds();
    let shift = (grid.zero_point - dq_zero_point) as f32;
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = on_grid(
            a.wrapping_add(add) as f32 * mult + offset,
            lo,
            hi,
            shift,
            dq_scale,
        );
    }
}

/// [`requant_to_grid_row`] with each value then combined with `t[i]`:
/// `out[i] = f(value, t[i])`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn requant_to_grid_row_with(
    acc: &[i32],
    add: i32,
    t: &[f32],
    out: &mut [f32],
    mult: f32,
    offset: f32,
    grid: Grid,
    dq_zero_point: i32,
    dq_scale: f32,
    f: impl Fn(f32, f32) -> f32,
) {
    let (lo, hi) = grid.bounds();
    let shift = (grid.zero_point - dq_zero_point) as f32;
    for ((o, &a), &t) in out.iter_mut().zip(acc).zip(t) {
        let v = on_grid(
            a.wrapping_add(add) as f32 * mult + offset,
            lo,
            hi,
            shift,
            dq_scale,
        );
        *o = f(v, t);
    }
}

/// As [`requant_to_grid_row`] with one multiplier and offset per element.
#[allow(clippy::too_many_arguments)]
pub fn requant_to_grid_cols(
    acc: &[i32],
    out: &mut [f32],
    mult: &[f32],
    offset: &[f32],
    grid: Grid,
    dq_zero_point: i32,
    dq_scale: f32,
) {
    let (lo, hi) = grid.bounds();
    let shift = (grid.zero_point - dq_zero_point) as f32;
    for (((o, &a), &m), &c) in out.iter_mut().zip(acc).zip(mult).zip(offset) {
        *o = on_grid(a as f32 * m + c, lo, hi, shift, dq_scale);
    }
}

/// QuantizeLinear followed by DequantizeLinear on f32, in one pass:
/// `out[i] = (clamp(round(x[i]·inv_scale) + zp) − dq_zero_point)·dq_scale`.
/// `inv_scale` is the reciprocal of QuantizeLinear's scale (tract multiplies by it).
pub fn fake_quant(
    x: &[f32],
    out: &mut [f32],
    inv_scale: f32,
    grid: Grid,
    dq_zero_point: i32,
    dq_scale: f32,
) {
    let q = FakeQuantOne::new(inv_scale, grid, dq_zero_point, dq_scale);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = q.apply(v);
    }
}

/// [`fake_quant`] in place.
#[inline]
pub fn fake_quant_in_place(
    xs: &mut [f32],
    inv_scale: f32,
    grid: Grid,
    dq_zero_point: i32,
    dq_scale: f32,
) {
    let q = FakeQuantOne::new(inv_scale, grid, dq_zero_point, dq_scale);
    for x in xs.iter_mut() {
        *x = q.apply(*x);
    }
}

/// One quantize → dequantize round trip, its constants computed once.
#[derive(Clone, Copy)]
pub struct FakeQuantOne {
    inv_scale: f32,
    lo: f32,
    hi: f32,
    shift: f32,
    dq_scale: f32,
}

impl FakeQuantOne {
    #[inline(always)]
    pub fn new(inv_scale: f32, grid: Grid, dq_zero_point: i32, dq_scale: f32) -> FakeQuantOne {
        let (lo, hi) = grid.bounds();
        let shift = (grid.zero_point - dq_zero_point) as f32;
        FakeQuantOne {
            inv_scale,
            lo,
            hi,
            shift,
            dq_scale,
        }
    }

    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        on_grid(
            v * self.inv_scale,
            self.lo,
            self.hi,
            self.shift,
            self.dq_scale,
        )
    }
}

/// QuantizeLinear on f32: `out[i] = clamp(round(x[i]·inv_scale) + zp)`.
#[inline(always)]
pub fn quantize<T: QuantInt>(x: &[f32], out: &mut [T], inv_scale: f32, grid: Grid) {
    let (lo, hi) = grid.bounds();
    let zp = grid.zero_point;
    for (o, &v) in out.iter_mut().zip(x) {
        let v = (v * inv_scale).clamp_to(lo, hi);
        *o = T::from_low_byte(round_to_low_byte(v, zp));
    }
}

super::multiversion! {
    /// [`quantize`] to u8, built for each instruction set.
    pub fn quantize_u8(x: &[f32], out: &mut [u8], inv_scale: f32, grid: Grid) {
        quantize(x, out, inv_scale, grid)
    }
}

super::multiversion! {
    /// [`quantize`] to i8, built for each instruction set.
    pub fn quantize_i8(x: &[f32], out: &mut [i8], inv_scale: f32, grid: Grid) {
        quantize(x, out, inv_scale, grid)
    }
}

/// A 256-entry table indexed by bytes: `out[i] = table[idx[i]]`.
pub trait ByteTable: Copy + Default + Send + Sync + 'static {
    fn lookup(isa: super::Isa, idx: &[u8], table: &[Self; 256], out: &mut [Self]);
}

impl ByteTable for f32 {
    fn lookup(_: super::Isa, idx: &[u8], table: &[f32; 256], out: &mut [f32]) {
        for (o, &i) in out.iter_mut().zip(idx) {
            *o = table[i as usize];
        }
    }
}

impl ByteTable for u8 {
    fn lookup(isa: super::Isa, idx: &[u8], table: &[u8; 256], out: &mut [u8]) {
        let n = idx.len().min(out.len());
        // SAFETY: `n` bytes of `idx` and of `out`, two distinct slices.
        unsafe { lookup_bytes(isa, idx.as_ptr(), out.as_mut_ptr(), n, table) }
    }
}

/// `buf[i] = table[buf[i]]`: [`ByteTable::lookup`] in place.
pub fn lookup_in_place(isa: super::Isa, buf: &mut [u8], table: &[u8; 256]) {
    let p = buf.as_mut_ptr();
    // SAFETY: `buf.len()` bytes at `p`, read and written in place.
    unsafe { lookup_bytes(isa, p, p, buf.len(), table) }
}

/// `dst[i] = table[src[i]]` for `i < n`: AVX-512 VBMI, AVX2 or NEON where the CPU has
/// them, plain indexing elsewhere.
///
/// # Safety
/// `src` is readable and `dst` writable for `n` bytes, and the two are either the same
/// pointer or do not overlap (each vector of indices is read before its results are
/// written).
unsafe fn lookup_bytes(isa: super::Isa, src: *const u8, dst: *mut u8, n: usize, table: &[u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::Isa;
        if isa == Isa::Avx512 && x86::has_vbmi() {
            // SAFETY: AVX-512 F/BW and VBMI are present (checked); buffers as ours.
            return unsafe { x86::lookup_vbmi(src, dst, n, table) };
        }
        if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.is_supported() {
            // SAFETY: AVX2 is present (both levels include it); buffers as ours.
            return unsafe { x86::lookup_avx2(src, dst, n, table) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = isa;
        // SAFETY: NEON is part of aarch64; buffers as ours.
        return unsafe { neon::lookup(src, dst, n, table) };
    }
    #[allow(unreachable_code)]
    {
        let _ = isa;
        for i in 0..n {
            // SAFETY: i < n.
            unsafe { *dst.add(i) = table[*src.add(i) as usize] };
        }
    }
}

impl ByteTable for i8 {
    fn lookup(isa: super::Isa, idx: &[u8], table: &[i8; 256], out: &mut [i8]) {
        let table: &[u8; 256] = &table.map(|v| v as u8);
        // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern
        // is valid for both.
        let out = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len()) };
        u8::lookup(isa, idx, table, out)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512 VBMI (`vpermi2b`): Ice Lake, Zen 4 and later.
    pub fn has_vbmi() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    }

    /// 64 lookups per step: two 128-entry byte permutes (index bits 0–6), the
    /// index's bit 7 picking between them.
    ///
    /// # Safety
    /// AVX-512 F/BW and VBMI; buffers as for [`super::lookup_bytes`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub unsafe fn lookup_vbmi(src: *const u8, dst: *mut u8, n: usize, table: &[u8; 256]) {
        unsafe {
            let t = |k: usize| _mm512_loadu_si512(table.as_ptr().add(64 * k) as *const _);
            let (t0, t1, t2, t3) = (t(0), t(1), t(2), t(3));
            let look = |x: __m512i| {
                let lo = _mm512_permutex2var_epi8(t0, x, t1);
                let hi = _mm512_permutex2var_epi8(t2, x, t3);
                _mm512_mask_blend_epi8(_mm512_movepi8_mask(x), lo, hi)
            };
            let mut i = 0;
            while i + 64 <= n {
                let x = _mm512_loadu_si512(src.add(i) as *const _);
                _mm512_storeu_si512(dst.add(i) as *mut _, look(x));
                i += 64;
            }
            if i < n {
                let m: __mmask64 = (1u64 << (n - i)) - 1;
                let x = _mm512_maskz_loadu_epi8(m, src.add(i) as *const i8);
                _mm512_mask_storeu_epi8(dst.add(i) as *mut i8, m, look(x));
            }
        }
    }

    /// 32 lookups per step with `vpshufb`, which looks up 16-entry tables and gives 0
    /// for an index with bit 7 set. Each half of the table (indices 0–127 and, on
    /// `x ^ 0x80`, 128–255) is a chain of eight lookups of `x − 16i` in
    /// `U_i = T_i ^ T_{i−1}` (`T_i` the table's i-th 16 entries, `U_0 = T_0`): for an
    /// index in band `j`, `x − 16i` has bit 7 clear exactly for `i ≤ j`, so the chain
    /// XORs `U_0 … U_j` at `x mod 16`, which is `T_j[x mod 16]`. Bit 7 of `x` picks the
    /// half (`vpblendvb`).
    ///
    /// # Safety
    /// AVX2; buffers as for [`super::lookup_bytes`].
    #[target_feature(enable = "avx2")]
    pub unsafe fn lookup_avx2(src: *const u8, dst: *mut u8, n: usize, table: &[u8; 256]) {
        let mut u = [_mm256_setzero_si256(); 16];
        let mut prev = _mm_setzero_si128();
        for (i, u) in u.iter_mut().enumerate() {
            // SAFETY: entries 16i..16i + 16 of the table.
            let t = unsafe { _mm_loadu_si128(table.as_ptr().add(16 * i) as *const __m128i) };
            let v = if i % 8 == 0 {
                t
            } else {
                _mm_xor_si128(t, prev)
            };
            *u = _mm256_broadcastsi128_si256(v);
            prev = t;
        }
        let step = _mm256_set1_epi8(16);
        let look = |x: __m256i| {
            let half = |base: usize, mut a: __m256i| {
                let mut r = _mm256_shuffle_epi8(u[base], a);
                for ui in &u[base + 1..base + 8] {
                    a = _mm256_sub_epi8(a, step);
                    r = _mm256_xor_si256(r, _mm256_shuffle_epi8(*ui, a));
                }
                r
            };
            let lo = half(0, x);
            let hi = half(8, _mm256_xor_si256(x, _mm256_set1_epi8(i8::MIN)));
            _mm256_blendv_epi8(lo, hi, x)
        };
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: bytes i..i + 32 < n of both buffers.
            unsafe {
                let x = _mm256_loadu_si256(src.add(i) as *const __m256i);
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, look(x));
            }
            i += 32;
        }
        if i < n {
            let mut buf = [0u8; 32];
            // SAFETY: the last n − i < 32 bytes of both buffers, and a local array.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(i), buf.as_mut_ptr(), n - i);
                let x = _mm256_loadu_si256(buf.as_ptr() as *const __m256i);
                _mm256_storeu_si256(buf.as_mut_ptr() as *mut __m256i, look(x));
                std::ptr::copy_nonoverlapping(buf.as_ptr(), dst.add(i), n - i);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// 16 lookups per step: `tbl` on the four 64-entry quarters of the table, at
    /// `x`, `x − 64`, `x − 128` and `x − 192`; an index past a quarter (the wrapped
    /// ones included) gives 0 there, so OR-ing the four leaves the one hit.
    ///
    /// # Safety
    /// Buffers as for [`super::lookup_bytes`].
    pub unsafe fn lookup(src: *const u8, dst: *mut u8, n: usize, table: &[u8; 256]) {
        unsafe {
            let q = |k: usize| vld1q_u8(table.as_ptr().add(16 * k));
            let t = [
                uint8x16x4_t(q(0), q(1), q(2), q(3)),
                uint8x16x4_t(q(4), q(5), q(6), q(7)),
                uint8x16x4_t(q(8), q(9), q(10), q(11)),
                uint8x16x4_t(q(12), q(13), q(14), q(15)),
            ];
            let c64 = vdupq_n_u8(64);
            let look = |x: uint8x16_t| {
                let x1 = vsubq_u8(x, c64);
                let x2 = vsubq_u8(x1, c64);
                let x3 = vsubq_u8(x2, c64);
                vorrq_u8(
                    vorrq_u8(vqtbl4q_u8(t[0], x), vqtbl4q_u8(t[1], x1)),
                    vorrq_u8(vqtbl4q_u8(t[2], x2), vqtbl4q_u8(t[3], x3)),
                )
            };
            let mut i = 0;
            while i + 16 <= n {
                vst1q_u8(dst.add(i), look(vld1q_u8(src.add(i))));
                i += 16;
            }
            for i in i..n {
                *dst.add(i) = table[*src.add(i) as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index, tails of every length 0..=130: the same as indexing.
    #[test]
    fn byte_lookup_matches_indexing() {
        use super::super::Isa;
        let table: [u8; 256] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
        let itable: [i8; 256] = table.map(|v| v as i8);
        let idx: Vec<u8> = (0..1000u32).map(|i| (i * 97 % 256) as u8).collect();
        for isa in Isa::available() {
            for len in (0..=130).chain([256, 1000]) {
                let idx = &idx[..len];
                let mut out = vec![0u8; len];
                u8::lookup(isa, idx, &table, &mut out);
                let want: Vec<u8> = idx.iter().map(|&i| table[i as usize]).collect();
                assert_eq!(out, want, "{isa:?}, {len} values");
                let mut out = vec![0i8; len];
                i8::lookup(isa, idx, &itable, &mut out);
                assert!(out.iter().zip(&want).all(|(&a, &b)| a as u8 == b));
                let mut buf = idx.to_vec();
                lookup_in_place(isa, &mut buf, &table);
                assert_eq!(buf, want, "{isa:?}, {len} values in place");
            }
        }
    }

    #[test]
    fn round_shifted_is_round_then_add() {
        for shift in -256..=256 {
            let shift = shift as f32;
            for i in -2_000..=2_000 {
                // Steps of 1/8 hit every tie and both signed zeros.
                for v in [i as f32 / 8.0, -(i as f32 / 8.0), i as f32 * 0.37] {
                    let want = v.round_ties_even() + shift;
                    let got = round_shifted(v, shift);
                    assert_eq!(got.to_bits(), want.to_bits(), "v {v} shift {shift}");
                }
            }
        }
    }
}
