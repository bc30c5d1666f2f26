//! A float input quantized to 16 bits and multiplied by int8 weights through the u8 × i8
//! kernels of [`super::qgemm`], as two byte planes.
//!
//! For a convolution whose weights are int8 (a DequantizeLinear in the graph) and
//! whose input stays float — PoolFormer's downsampling convs, which read the residual
//! stream, too wide a range for 8 bits — the input is quantized per call on a grid of
//! `2·32767 + 1` levels, `q = round(x / s)` with `s = max|x| / 32767`, and split into
//! bytes, `q = 256·h + l` with `h` in −128..=127 (stored as `h + 128`) and `l` in
//! 0..=255. Two exact integer products then give
//!
//! ```text
//! Σ_k w·q = 256·(Σ_k w·(h + 128) − 128·Σ_k w) + Σ_k w·l
//! ```
//!
//! On CPUs whose int8 instruction multiplies four byte pairs per 32-bit lane (AVX-512
//! VNNI `vpdpbusd`, NEON `sdot`) the two products take about half the time of one f32
//! product. The only difference from the float convolution is the input's rounding,
//! at most `s/2 = max|x| / 65534` per value: each output moves by at most
//! `Σ_k |w| · s/2`, 2⁻¹⁶ of the largest input times the weights' L1 norm, far below
//! the int8 weights' own rounding.
//!
//! On AVX2 without VNNI the planes are instead read back as the i16 values
//! `q = 256·h + l` (the high bytes written as i8: `flip` 0 in [`split_bytes_c4`]) and
//! multiplied in one product, `vpmaddwd` on pairs of them
//! ([`super::qgemm::gemm_q16_planes`]), about twice the f32 FMA's products per
//! instruction. Its sums are i32, so the grid is
//! narrowed where the weights are heavy: `|q| ≤ i32::MAX / max_o Σ_k |w[o, k]|`
//! (PoolFormer-S12's last downsampling conv: ±15 619 instead of ±32 767, so 2⁻¹⁵ of the
//! largest input instead of 2⁻¹⁶).

use super::multiversion;
use super::quant::ClampTo;

/// Largest magnitude on the 16-bit grid (symmetric, so that `h` stays in i8).
pub const Q16_MAX: f32 = 32_767.0;

multiversion! {
    /// `max|x|`, or `None` when `x` holds a NaN or an infinity.
    pub fn max_abs(x: &[f32]) -> Option<f32> {
        // |v|'s bits order as |v| does, and every NaN or infinity has bits at or above
        // the infinity's: one integer max (which vectorizes) answers both.
        const INF: u32 = 0x7f80_0000;
        let m = x.iter().map(|v| v.to_bits() & 0x7fff_ffff).fold(0, u32::max);
        (m < INF).then(|| f32::from_bits(m))
    }
}

/// Bytes of `q`'s two planes for `x` (see [`split_bytes_c4`]) as `(hi ^ flip, lo)`:
/// the mantissa of `v + 1.5·2²³` holds `2²² + q`, and 2²² is a multiple of 2⁸, so its
/// bytes are q's (as in `quant::round_to_low_byte`).
#[inline(always)]
fn bytes(v: f32, inv_scale: f32, flip: u8) -> (u8, u8) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let bits = ((v * inv_scale).clamp_to(-Q16_MAX, Q16_MAX) + MAGIC).to_bits();
    ((bits >> 8) as u8 ^ flip, bits as u8)
}

multiversion! {
    /// `q = round(clamp(x·inv_scale, ±32767))`, ties to even, as the bytes
    /// `hi = (q >> 8) ^ flip` and `lo = q & 255`, in the **c4 layout**: `x` holds
    /// `channels` planes of `pixels` values; channel `c` of pixel `n` goes to byte
    /// `((c/4)·pixels + n)·4 + c%4`, so that the 4 channels of a group are one word.
    /// Channels past `channels`, up to a multiple of 4, get the bytes of 0.
    #[allow(clippy::too_many_arguments)]
    pub fn split_bytes_c4(
        x: &[f32],
        channels: usize,
        pixels: usize,
        inv_scale: f32,
        flip: u8,
        hi: &mut [u8],
        lo: &mut [u8],
    ) {
        let groups = channels.div_ceil(4);
        assert!(x.len() >= channels * pixels && hi.len() >= groups * 4 * pixels);
        assert!(lo.len() >= groups * 4 * pixels);
        for g in 0..groups {
            let rows: [&[f32]; 4] = std::array::from_fn(|j| {
                let c = (4 * g + j).min(channels - 1);
                &x[c * pixels..(c + 1) * pixels]
            });
            let live = channels - 4 * g;
            let hi = &mut hi[4 * g * pixels..4 * (g + 1) * pixels];
            let lo = &mut lo[4 * g * pixels..4 * (g + 1) * pixels];
            for (n, (h, l)) in hi.chunks_exact_mut(4).zip(lo.chunks_exact_mut(4)).enumerate() {
                // Each pixel's four bytes as one little-endian word (shifts and ors in
                // vector lanes rather than byte shuffles).
                let (mut wh, mut wl) = (0u32, 0u32);
                for (j, row) in rows.iter().enumerate() {
                    let (bh, bl) = if j < live { bytes(row[n], inv_scale, flip) } else { (flip, 0) };
                    wh |= (bh as u32) << (8 * j);
                    wl |= (bl as u32) << (8 * j);
                }
                h.copy_from_slice(&wh.to_le_bytes());
                l.copy_from_slice(&wl.to_le_bytes());
            }
        }
    }
}

multiversion! {
    /// One output row from the two products: `out = (256·(hi + corr) + lo)·mult + bias`,
    /// where `corr = −128·Σ_k w` of the row and `mult` is the input's scale times the
    /// row's weight scale.
    pub fn combine_row(hi: &[i32], lo: &[i32], out: &mut [f32], corr: i32, mult: f32, bias: f32) {
        let mult_hi = 256.0 * mult;
        for ((o, &h), &l) in out.iter_mut().zip(hi).zip(lo) {
            *o = h.wrapping_add(corr) as f32 * mult_hi + (l as f32 * mult + bias);
        }
    }
}

multiversion! {
    /// One output row from the fused product: `out = acc·mult + bias`.
    pub fn scale_row(acc: &[i32], out: &mut [f32], mult: f32, bias: f32) {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = a as f32 * mult + bias;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;

    #[test]
    fn bytes_recompose_the_rounded_value() {
        // 7 channels (one partial group) of values across and beyond the 16-bit grid.
        let (channels, pixels) = (7usize, 11_431usize);
        let x: Vec<f32> = (0..channels * pixels)
            .map(|i| (i as f32 - 40_000.0) * 0.8 + 0.25)
            .collect();
        let len = channels.div_ceil(4) * 4 * pixels;
        for isa in Isa::available() {
            let (mut hi, mut lo) = (vec![0u8; len], vec![0u8; len]);
            split_bytes_c4(isa, &x, channels, pixels, 1.0, 0x80, &mut hi, &mut lo);
            for c in 0..channels.div_ceil(4) * 4 {
                for n in 0..pixels {
                    let at = ((c / 4) * pixels + n) * 4 + c % 4;
                    let want = if c < channels {
                        let v = x[c * pixels + n];
                        v.clamp(-Q16_MAX, Q16_MAX).round_ties_even() as i32
                    } else {
                        0
                    };
                    let got = 256 * (hi[at] as i32 - 128) + lo[at] as i32;
                    assert_eq!(got, want, "{isa:?}: channel {c}, pixel {n}");
                }
            }
        }
    }

    #[test]
    fn max_abs_finds_the_largest_and_rejects_non_finite() {
        for isa in Isa::available() {
            let mut x: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            x[613] = -77.5;
            assert_eq!(max_abs(isa, &x), Some(77.5), "{isa:?}");
            assert_eq!(max_abs(isa, &[]), Some(0.0), "{isa:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                x[999] = bad;
                assert_eq!(max_abs(isa, &x), None, "{isa:?}: {bad}");
            }
        }
    }
}
