//! The on-disk cache of generated models (synthetic weights → ONNX), built once.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{export, synth, ArchConfig};

/// Where generated models are kept: `$PFE_CACHE_DIR`, else the user's cache
/// directory (`~/.cache/poolformer-edge` on Linux), else `./target/pfe-cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PFE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    directories::ProjectDirs::from("", "", "poolformer-edge")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("target/pfe-cache"))
}

/// Path of the fp32 ONNX model of `arch` with synthetic weights from `seed`,
/// generating it (synth → export) on first use.
pub fn synthetic_model(arch: &ArchConfig, seed: u64) -> Result<PathBuf> {
    synthetic_model_in(&cache_dir(), arch, seed)
}

pub fn synthetic_model_in(dir: &Path, arch: &ArchConfig, seed: u64) -> Result<PathBuf> {
    let path = dir.join(format!("{}-synthetic-seed{seed}.onnx", arch.name));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let weights = synth::synthesize(arch, seed)?;
    let bytes = export::export_onnx(arch, &weights)?;
    // Write then rename, so a concurrent or interrupted run never sees half a file.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("moving model into {}", path.display()))?;
    Ok(path)
}
