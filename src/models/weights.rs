//! A timm state dict: named f32 tensors, read from and written to safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};

use super::ArchConfig;

/// One named tensor: shape and row-major f32 data.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Param {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Param> {
        ensure!(
            shape.iter().product::<usize>() == data.len(),
            "shape {shape:?} holds {} values, got {}",
            shape.iter().product::<usize>(),
            data.len()
        );
        Ok(Param { shape, data })
    }
}

/// A state dict with timm's key names (`stem.conv.weight`, `stages.1.blocks.0.mlp.fc1.bias`, …).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    pub params: BTreeMap<String, Param>,
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&Param> {
        self.params
            .get(name)
            .with_context(|| format!("weights have no tensor {name:?}"))
    }

    pub fn insert(&mut self, name: impl Into<String>, param: Param) {
        self.params.insert(name.into(), param);
    }

    /// Reads a safetensors file. f32, f16 and bf16 tensors are read (as f32).
    pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Weights> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).with_context(|| format!("reading weights {}", path.display()))?;
        Self::from_safetensors_bytes(&bytes)
            .with_context(|| format!("reading weights {}", path.display()))
    }

    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Weights> {
        let st = SafeTensors::deserialize(bytes).context("not a valid safetensors file")?;
        let mut weights = Weights::default();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F16 => raw
                    .chunks_exact(2)
                    .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
                Dtype::BF16 => raw
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                other => bail!("tensor {name:?} has dtype {other:?}; expected F32, F16 or BF16"),
            };
            let param = Param::new(view.shape().to_vec(), data)
                .with_context(|| format!("tensor {name:?}"))?;
            weights.insert(name, param);
        }
        Ok(weights)
    }

    /// Writes all tensors as f32 safetensors.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let raws: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .params
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    p.shape.clone(),
                    p.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views = raws
            .iter()
            .map(|(k, shape, raw)| {
                Ok((
                    k.as_str(),
                    safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), raw)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, &None)?)
    }

    /// Checks that every tensor `arch` needs is present with the right shape.
    ///
    /// timm stores layer scales as `[C]`; some conversions keep the original
    /// repository's `[C, 1, 1]`: both are accepted. Extra keys are ignored.
    pub fn validate(&self, arch: &ArchConfig) -> Result<()> {
        for (name, shape) in arch.parameter_shapes() {
            let Some(p) = self.params.get(&name) else {
                bail!(
                    "weights for {} lack tensor {name:?} (shape {shape:?})",
                    arch.name
                );
            };
            let squeezed: Vec<usize> = p.shape.iter().copied().filter(|&d| d != 1).collect();
            let want: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
            let ok = p.shape == shape || (name.contains("layer_scale") && squeezed == want);
            ensure!(
                ok,
                "tensor {name:?} has shape {:?}, {} expects {shape:?}",
                p.shape,
                arch.name
            );
        }
        Ok(())
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: renormalize.
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_decoding_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn safetensors_round_trip() {
        let mut w = Weights::default();
        w.insert(
            "a",
            Param::new(vec![2, 3], (0..6).map(|v| v as f32 * 0.5).collect()).unwrap(),
        );
        w.insert("b.c", Param::new(vec![1], vec![-1.25]).unwrap());
        let back = Weights::from_safetensors_bytes(&w.to_safetensors_bytes().unwrap()).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = Weights::from_safetensors_bytes(b"not safetensors at all").unwrap_err();
        assert!(format!("{err:#}").contains("safetensors"), "{err:#}");
    }
}
