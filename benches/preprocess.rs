//! Preprocessing of a 640×480 RGB8 camera frame into the 1×3×224×224 network input.

use criterion::{criterion_group, criterion_main, Criterion};
use poolformer_edge::preprocess::{PreprocessConfig, Preprocessor};
use poolformer_edge::{testimage, RgbImage};

fn frame_640x480(c: &mut Criterion) {
    let frame = testimage::natural_image(640, 480, 3);
    let image = RgbImage::from_image(&frame);
    let mut pre = Preprocessor::new(PreprocessConfig::timm());
    c.bench_function("preprocess/640x480_rgb8", |b| {
        b.iter(|| pre.preprocess(&image).unwrap())
    });
}

criterion_group!(benches, frame_640x480);
criterion_main!(benches);
