//! Architecture configs of the PoolFormer family, read from `models/poolformer.json`.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

const FAMILY_JSON: &str = include_str!("../../models/poolformer.json");

/// One PoolFormer architecture: blocks per stage and channels per stage.
///
/// Fixed across the family (timm's `poolformer_*`): 7×7 stride-4 pad-2 stem conv,
/// 3×3 stride-2 pad-1 downsampling convs, GroupNorm(1 group, eps 1e-5), 3×3 average
/// pool mixer (count_include_pad = false), MLP ratio 4 with exact GELU, head = global
/// average pool → LayerNorm(eps 1e-6) → linear.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ArchConfig {
    pub name: String,
    pub layers: Vec<usize>,
    pub dims: Vec<usize>,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    #[serde(default = "default_num_classes")]
    pub num_classes: usize,
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
}

fn default_mlp_ratio() -> usize {
    4
}
fn default_num_classes() -> usize {
    1000
}
fn default_in_chans() -> usize {
    3
}

#[derive(Deserialize)]
struct Family {
    archs: Vec<ArchConfig>,
}

impl ArchConfig {
    pub const GROUPNORM_EPS: f32 = 1e-5;
    pub const HEAD_LAYERNORM_EPS: f32 = 1e-6;
    pub const POOL_SIZE: usize = 3;

    /// All architectures of the family, in the order of the paper's table.
    pub fn family() -> Vec<ArchConfig> {
        let family: Family =
            serde_json::from_str(FAMILY_JSON).expect("models/poolformer.json is valid");
        family.archs
    }

    /// Looks an architecture up by timm's name (`poolformer_s12`, …).
    ///
    /// ```
    /// use poolformer_edge::models::ArchConfig;
    /// let s12 = ArchConfig::by_name("poolformer_s12").unwrap();
    /// assert_eq!((s12.layers.as_slice(), s12.dims.as_slice()), (&[2, 2, 6, 2][..], &[64, 128, 320, 512][..]));
    /// assert!(ArchConfig::by_name("poolformer_s13").is_err());
    /// ```
    pub fn by_name(name: &str) -> Result<ArchConfig> {
        let family = Self::family();
        match family.iter().find(|a| a.name == name) {
            Some(a) => Ok(a.clone()),
            None => bail!(
                "unknown architecture {name:?}; known: {}",
                family
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// A custom (usually scaled-down) configuration, for tests and experiments.
    pub fn custom(
        name: &str,
        layers: &[usize],
        dims: &[usize],
        num_classes: usize,
    ) -> Result<ArchConfig> {
        let cfg = ArchConfig {
            name: name.to_string(),
            layers: layers.to_vec(),
            dims: dims.to_vec(),
            mlp_ratio: 4,
            num_classes,
            in_chans: 3,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.layers.is_empty(), "{}: no stages", self.name);
        ensure!(
            self.layers.len() == self.dims.len(),
            "{}: {} stage depths but {} stage widths",
            self.name,
            self.layers.len(),
            self.dims.len()
        );
        ensure!(
            self.dims.iter().all(|&d| d > 0) && self.num_classes > 0 && self.mlp_ratio > 0,
            "{}: zero width",
            self.name
        );
        Ok(())
    }

    /// Whether stage `i` starts with a 3×3 stride-2 downsampling conv: timm's
    /// `MetaFormerStage` has one where the width changes, and only there.
    pub fn has_downsample(&self, i: usize) -> bool {
        i > 0 && self.dims[i] != self.dims[i - 1]
    }

    /// Width of the final feature vector (input of the head).
    pub fn num_features(&self) -> usize {
        *self.dims.last().unwrap()
    }

    /// Total number of blocks.
    pub fn depth(&self) -> usize {
        self.layers.iter().sum()
    }

    /// Every timm state-dict key of this architecture with its shape, in a stable order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![];
        let d0 = self.dims[0];
        out.push(("stem.conv.weight".into(), vec![d0, self.in_chans, 7, 7]));
        out.push(("stem.conv.bias".into(), vec![d0]));
        for (i, (&n, &d)) in self.layers.iter().zip(&self.dims).enumerate() {
            if self.has_downsample(i) {
                let prev = self.dims[i - 1];
                out.push((
                    format!("stages.{i}.downsample.conv.weight"),
                    vec![d, prev, 3, 3],
                ));
                out.push((format!("stages.{i}.downsample.conv.bias"), vec![d]));
            }
            let hidden = d * self.mlp_ratio;
            for j in 0..n {
                let p = format!("stages.{i}.blocks.{j}");
                out.push((format!("{p}.norm1.weight"), vec![d]));
                out.push((format!("{p}.norm1.bias"), vec![d]));
                out.push((format!("{p}.layer_scale1.scale"), vec![d]));
                out.push((format!("{p}.norm2.weight"), vec![d]));
                out.push((format!("{p}.norm2.bias"), vec![d]));
                out.push((format!("{p}.mlp.fc1.weight"), vec![hidden, d, 1, 1]));
                out.push((format!("{p}.mlp.fc1.bias"), vec![hidden]));
                out.push((format!("{p}.mlp.fc2.weight"), vec![d, hidden, 1, 1]));
                out.push((format!("{p}.mlp.fc2.bias"), vec![d]));
                out.push((format!("{p}.layer_scale2.scale"), vec![d]));
            }
        }
        let f = self.num_features();
        out.push(("head.norm.weight".into(), vec![f]));
        out.push(("head.norm.bias".into(), vec![f]));
        out.push(("head.fc.weight".into(), vec![self.num_classes, f]));
        out.push(("head.fc.bias".into(), vec![self.num_classes]));
        out
    }

    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Multiply-accumulates of one forward pass at a square input of side `size`
    /// (convolutions and the linear head; norms, pooling and GELU are not MACs).
    pub fn macs(&self, size: usize) -> u64 {
        let mut h = (size + 2 * 2 - 7) / 4 + 1;
        let mut macs = (h * h * self.dims[0] * self.in_chans * 49) as u64;
        for (i, (&n, &d)) in self.layers.iter().zip(&self.dims).enumerate() {
            if self.has_downsample(i) {
                h = (h + 2 - 3) / 2 + 1;
                macs += (h * h * d * self.dims[i - 1] * 9) as u64;
            }
            macs += (n * h * h * 2 * d * d * self.mlp_ratio) as u64;
        }
        macs + (self.num_features() * self.num_classes) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s12_matches_the_paper() {
        let s12 = ArchConfig::by_name("poolformer_s12").unwrap();
        assert_eq!(s12.layers, [2, 2, 6, 2]);
        assert_eq!(s12.dims, [64, 128, 320, 512]);
        // Paper: 12M parameters, 1.8 GMACs at 224.
        let params = s12.parameter_count() as f64 / 1e6;
        assert!((11.8..12.0).contains(&params), "{params}M parameters");
        let gmacs = s12.macs(224) as f64 / 1e9;
        assert!((1.75..1.85).contains(&gmacs), "{gmacs} GMACs");
    }

    #[test]
    fn family_parameter_counts_match_the_paper() {
        for arch in ArchConfig::family() {
            let raw: serde_json::Value = serde_json::from_str(FAMILY_JSON).unwrap();
            let entry = raw["archs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["name"] == arch.name.as_str())
                .unwrap();
            let paper = entry["params_m"].as_f64().unwrap();
            let ours = arch.parameter_count() as f64 / 1e6;
            assert!(
                (ours - paper).abs() / paper < 0.02,
                "{}: {ours}M vs paper {paper}M",
                arch.name
            );
        }
    }

    #[test]
    fn unknown_arch_is_an_error() {
        let err = ArchConfig::by_name("resnet50").unwrap_err().to_string();
        assert!(err.contains("poolformer_s12"), "{err}");
    }
}
