//! `.npy` tensors in and out (f32, C order), for comparisons with other runtimes.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use npyz::WriterBuilder;

/// Reads an f32 `.npy` file: (shape, data in C order).
pub fn read_f32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    ensure!(
        npy.order() == npyz::Order::C,
        "{}: Fortran-order arrays are not supported",
        path.display()
    );
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = npy
        .into_vec::<f32>()
        .with_context(|| format!("{}: expected float32 data", path.display()))?;
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "{}: truncated data",
        path.display()
    );
    Ok((shape, data))
}

/// Writes an f32 `.npy` file.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    ensure!(
        shape.iter().product::<usize>() == data.len(),
        "shape {shape:?} does not match data"
    );
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape64)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_shape_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<f32> = (0..24).map(|v| v as f32 - 3.5).collect();
        write_f32(&p, &[2, 3, 4], &data).unwrap();
        let (shape, back) = read_f32(&p).unwrap();
        assert_eq!(shape, vec![2, 3, 4]);
        assert_eq!(back, data);
        // The header is numpy's: magic, version 1.0.
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[..8], b"\x93NUMPY\x01\x00");
    }

    #[test]
    fn not_npy_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.npy");
        std::fs::write(&p, b"hello").unwrap();
        assert!(read_f32(&p).is_err());
        assert!(read_f32(dir.path().join("missing.npy")).is_err());
    }
}
