//! ImageNet-1k class labels (`models/imagenet_classes.txt`, one per line, in class-index order).

use std::sync::OnceLock;

const IMAGENET_TXT: &str = include_str!("../../models/imagenet_classes.txt");

/// The 1000 ImageNet-1k labels, index = class index.
pub fn imagenet() -> &'static [&'static str] {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    LABELS.get_or_init(|| {
        IMAGENET_TXT
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// Label of class `index` for a classifier with `num_classes` outputs: ImageNet's
/// names for 1000-class models, `class_{index}` otherwise.
pub fn label(index: usize, num_classes: usize) -> String {
    let labels = imagenet();
    if num_classes == labels.len() {
        if let Some(l) = labels.get(index) {
            return l.to_string();
        }
    }
    format!("class_{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_has_1000_known_labels() {
        let l = imagenet();
        assert_eq!(l.len(), 1000);
        assert_eq!(l[0], "tench");
        assert_eq!(l[207], "golden retriever");
        assert_eq!(l[999], "toilet tissue");
    }

    #[test]
    fn other_class_counts_get_generic_names() {
        assert_eq!(label(3, 10), "class_3");
        assert_eq!(label(0, 1000), "tench");
    }
}
