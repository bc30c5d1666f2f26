//! PNG snapshots of the annotated frame every N inferred frames:
//! `DIR/frame-000000.png`, `DIR/frame-000100.png`, …

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

use crate::pipeline::{Output, Sink};

pub struct Snapshots {
    dir: PathBuf,
    every: u64,
}

impl Snapshots {
    /// Creates `dir` if needed; `every` ≥ 1.
    pub fn new(dir: &Path, every: u64) -> Result<Snapshots> {
        ensure!(every >= 1, "--snapshot-every must be at least 1");
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the snapshot directory {}", dir.display()))?;
        Ok(Snapshots {
            dir: dir.to_path_buf(),
            every,
        })
    }

    pub fn path_of(&self, frame: u64) -> PathBuf {
        self.dir.join(format!("frame-{frame:06}.png"))
    }
}

/// Writes `rgb` (packed RGB8) as a PNG, through a temporary file so that a reader never
/// sees half an image.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    PngEncoder::new_with_quality(
        BufWriter::new(file),
        CompressionType::Fast,
        FilterType::Adaptive,
    )
    .write_image(rgb, width as u32, height as u32, ExtendedColorType::Rgb8)
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving the snapshot to {}", path.display()))
}

impl Sink for Snapshots {
    fn name(&self) -> &'static str {
        "snapshot"
    }

    fn consume(&mut self, out: &Output) -> Result<()> {
        let n = out.record.frame;
        if n.is_multiple_of(self.every) {
            write_png(&self.path_of(n), out.rgb, out.width, out.height)?;
        }
        Ok(())
    }
}
