//! Logits → probabilities → ranked, labelled predictions.

use serde::Serialize;

/// One ranked class of a classification.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub class_index: usize,
    pub label: String,
    pub probability: f32,
    pub logit: f32,
}

/// Numerically stable softmax (max subtracted, sum accumulated in f64).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
///
/// ```
/// use poolformer_edge::postprocess::top_k_indices;
/// assert_eq!(top_k_indices(&[0.1, 0.9, 0.5, 0.9], 3), vec![1, 3, 2]);
/// ```
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The `k` most probable classes of `logits`, labelled by `label_of`.
pub fn top_k(logits: &[f32], k: usize, label_of: impl Fn(usize) -> String) -> Vec<Prediction> {
    let probs = softmax(logits);
    top_k_indices(logits, k)
        .into_iter()
        .map(|i| Prediction {
            class_index: i,
            label: label_of(i),
            probability: probs[i],
            logit: logits[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_known_values() {
        let p = softmax(&[0.0, (2.0f32).ln(), (5.0f32).ln()]);
        for (got, want) in p.iter().zip([0.125, 0.25, 0.625]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Large logits do not overflow.
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, vec![0.5, 0.5]);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k_indices(&[0.1, 0.9, 0.5, 0.9, -1.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k_indices(&[1.0, 2.0], 5), vec![1, 0]);
        let preds = top_k(&[0.0, 3.0, 1.0], 2, |i| format!("c{i}"));
        assert_eq!(preds[0].class_index, 1);
        assert_eq!(preds[0].label, "c1");
        assert_eq!(preds[1].class_index, 2);
        assert!(preds[0].probability > preds[1].probability);
    }
}
