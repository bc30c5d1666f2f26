//! Network inputs for calibration and comparison: image files preprocessed exactly as
//! inference does, or deterministic synthetic images.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use tract_core::ndarray::Array4;

use crate::preprocess::{load_image, PreprocessConfig, Preprocessor, RgbImage};
use crate::testimage::natural_image;

/// File extensions read from an image directory.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "ppm", "pnm"];

/// Side lengths of synthetic images: camera-like landscape frames of a few sizes, so the
/// resize in preprocessing sees different scale factors.
const SYNTHETIC_SIZES: &[(u32, u32)] = &[(320, 240), (256, 256), (400, 300), (240, 320)];

/// Where inputs come from.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSet {
    /// Image files, in this order.
    Images(Vec<PathBuf>),
    /// `count` synthetic images from seeds `seed, seed + 1, …`.
    Synthetic { count: usize, seed: u64 },
}

impl InputSet {
    /// The images of `dir` (non-recursive, sorted by name); an error if there are none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<InputSet> {
        let dir = dir.as_ref();
        ensure!(
            dir.is_dir(),
            "image directory {} does not exist",
            dir.display()
        );
        let mut files = vec![];
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| e.to_ascii_lowercase());
            if path.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                files.push(path);
            }
        }
        ensure!(
            !files.is_empty(),
            "no images in {} (looked for {})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
        files.sort();
        Ok(InputSet::Images(files))
    }

    /// Synthetic natural-looking images; `count` must be at least 1.
    pub fn synthetic(count: usize, seed: u64) -> Result<InputSet> {
        ensure!(
            count >= 1,
            "the number of synthetic images must be at least 1"
        );
        Ok(InputSet::Synthetic { count, seed })
    }

    pub fn len(&self) -> usize {
        match self {
            InputSet::Images(files) => files.len(),
            InputSet::Synthetic { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A short description for reports (`64 synthetic images (seed 0)`, `12 images in DIR`).
    pub fn describe(&self) -> String {
        match self {
            InputSet::Images(files) => {
                let dir = files
                    .first()
                    .and_then(|f| f.parent())
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                format!("{} images in {dir}", files.len())
            }
            InputSet::Synthetic { count, seed } => {
                format!(
                    "{count} synthetic images (seeds {seed}..{})",
                    seed + *count as u64
                )
            }
        }
    }

    /// Iterates over the preprocessed `[1, 3, size, size]` network inputs.
    pub fn tensors(&self, input_size: usize) -> Tensors<'_> {
        Tensors {
            set: self,
            next: 0,
            preprocessor: Preprocessor::new(PreprocessConfig::for_input_size(input_size)),
        }
    }
}

/// Iterator over the preprocessed inputs of an [`InputSet`].
pub struct Tensors<'a> {
    set: &'a InputSet,
    next: usize,
    preprocessor: Preprocessor,
}

impl Iterator for Tensors<'_> {
    type Item = Result<Array4<f32>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.set.len() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(match self.set {
            InputSet::Images(files) => load_image(&files[i])
                .and_then(|img| self.preprocessor.preprocess(&RgbImage::from_image(&img)))
                .with_context(|| format!("preparing {}", files[i].display())),
            InputSet::Synthetic { seed, .. } => {
                let seed = seed + i as u64;
                let (w, h) = SYNTHETIC_SIZES[(seed % SYNTHETIC_SIZES.len() as u64) as usize];
                let img = natural_image(w, h, seed);
                self.preprocessor
                    .preprocess(&RgbImage::from_image(&img))
                    .with_context(|| format!("preparing synthetic image {seed}"))
            }
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.set.len() - self.next;
        (left, Some(left))
    }
}
