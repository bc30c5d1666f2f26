//! Deterministic natural-looking synthetic images: smooth gradients, shapes,
//! textures and noise at several scales (not white noise), for demos,
//! calibration and tests where no photo is at hand.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An RGB8 image of `width`×`height`, identical for identical arguments on every platform.
pub fn natural_image(width: u32, height: u32, seed: u64) -> image::RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (w, h) = (width as f32, height as f32);
    // Background: a two-colour linear gradient in a random direction.
    let c0: [f32; 3] = std::array::from_fn(|_| rng.gen_range(0.0..255.0));
    let c1: [f32; 3] = std::array::from_fn(|_| rng.gen_range(0.0..255.0));
    let angle: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    // A texture: an oriented sinusoid.
    let tex_freq: f32 = rng.gen_range(0.02..0.3);
    let tex_angle: f32 = rng.gen_range(0.0..std::f32::consts::PI);
    let tex_amp: f32 = rng.gen_range(0.0..40.0);
    // Shapes: filled discs and rectangles with their own colours.
    struct Shape {
        disc: bool,
        cx: f32,
        cy: f32,
        rx: f32,
        ry: f32,
        color: [f32; 3],
    }
    let shapes: Vec<Shape> = (0..rng.gen_range(2..7))
        .map(|_| Shape {
            disc: rng.gen_bool(0.5),
            cx: rng.gen_range(0.0..w),
            cy: rng.gen_range(0.0..h),
            rx: rng.gen_range(0.05..0.3) * w,
            ry: rng.gen_range(0.05..0.3) * h,
            color: std::array::from_fn(|_| rng.gen_range(0.0..255.0)),
        })
        .collect();
    // Noise at several scales: value noise on coarse grids, bilinearly interpolated.
    let octaves: Vec<(usize, Vec<f32>, f32)> = [8usize, 32, 128]
        .iter()
        .map(|&cell| {
            let gw = width as usize / cell + 2;
            let gh = height as usize / cell + 2;
            let grid = (0..gw * gh).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            (cell, grid, 12.0 * (cell as f32 / 8.0).sqrt())
        })
        .collect();
    let fine_noise: f32 = rng.gen_range(0.0..8.0);

    image::RgbImage::from_fn(width, height, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let t = ((xf * dx + yf * dy) / (w.abs() + h.abs()) + 0.5).clamp(0.0, 1.0);
        let mut px: [f32; 3] = std::array::from_fn(|c| c0[c] * (1.0 - t) + c1[c] * t);
        for s in &shapes {
            let (u, v) = ((xf - s.cx) / s.rx, (yf - s.cy) / s.ry);
            let inside = if s.disc {
                u * u + v * v <= 1.0
            } else {
                u.abs() <= 1.0 && v.abs() <= 1.0
            };
            if inside {
                px = s.color;
            }
        }
        let phase = (xf * tex_angle.cos() + yf * tex_angle.sin()) * tex_freq;
        let mut delta = tex_amp * phase.sin();
        for (cell, grid, amp) in &octaves {
            let gw = width as usize / cell + 2;
            let (gx, gy) = (xf / *cell as f32, yf / *cell as f32);
            let (ix, iy) = (gx as usize, gy as usize);
            let (fx, fy) = (gx - ix as f32, gy - iy as f32);
            let at = |i: usize, j: usize| grid[j * gw + i];
            let v = at(ix, iy) * (1.0 - fx) * (1.0 - fy)
                + at(ix + 1, iy) * fx * (1.0 - fy)
                + at(ix, iy + 1) * (1.0 - fx) * fy
                + at(ix + 1, iy + 1) * fx * fy;
            delta += amp * v;
        }
        // Per-pixel hash noise keeps the image from being perfectly smooth.
        let hash = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ (seed as u32))
            .wrapping_mul(2_654_435_761);
        delta += fine_noise * ((hash >> 16) as f32 / 32768.0 - 1.0);
        image::Rgb(px.map(|c| (c + delta).round().clamp(0.0, 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = natural_image(64, 48, 1);
        assert_eq!(a, natural_image(64, 48, 1));
        assert_ne!(a, natural_image(64, 48, 2));
        assert_eq!(a.dimensions(), (64, 48));
    }

    #[test]
    fn looks_natural_not_white_noise() {
        // Neighbouring pixels are strongly correlated in natural images; in white noise they are not.
        let img = natural_image(128, 128, 7);
        let px = |x: u32, y: u32| img.get_pixel(x, y).0[0] as f64;
        let (mut num, mut den_a, mut den_b, mut ma, mut mb, mut n) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        for y in 0..128 {
            for x in 0..127 {
                ma += px(x, y);
                mb += px(x + 1, y);
                n += 1.0;
            }
        }
        ma /= n;
        mb /= n;
        for y in 0..128 {
            for x in 0..127 {
                let (a, b) = (px(x, y) - ma, px(x + 1, y) - mb);
                num += a * b;
                den_a += a * a;
                den_b += b * b;
            }
        }
        let corr = num / (den_a * den_b).sqrt();
        assert!(corr > 0.8, "neighbour correlation {corr}");
        let std = (den_a / n).sqrt();
        assert!(std > 5.0, "image is nearly flat: std {std}");
    }
}
