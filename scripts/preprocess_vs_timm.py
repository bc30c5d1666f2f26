#!/usr/bin/env python3
"""Run timm's eval transform on image files; write the input tensors as .npy.

The transform is timm's own, for the model's pretrained_cfg
(resolve_data_config + create_transform; for poolformer_s12: Resize(248, bicubic),
CenterCrop(224), ToTensor, Normalize). Each IMAGE becomes OUT_DIR/<stem>.timm.npy,
float32, shape [1, 3, 224, 224]. Compare with the Rust preprocessing, e.g.

    pfe run model.onnx --image photo.png --save-input /tmp/pp/photo.npy
    python3 scripts/preprocess_vs_timm.py photo.png --out-dir /tmp/pp --rust-dir /tmp/pp

or, without a model, with the Rust test that dumps every image of a folder:

    PFE_PREPROCESS_DIR=/tmp/pp cargo test --release --lib \
        preprocess::tests::dump_preprocessed_images -- --ignored
    python3 scripts/preprocess_vs_timm.py /tmp/pp/*.png --out-dir /tmp/pp --rust-dir /tmp/pp

With --rust-dir the script reads <stem>.npy there and prints the max |difference| in
normalized units and in u8 levels (|Δ| · std · 255, the resize being the only
lossy step). Images are opened as timm's datasets do: Image.open(p).convert("RGB").
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out-dir", required=True, help="where to write <stem>.timm.npy")
    parser.add_argument("--model", default="poolformer_s12", help="timm model name")
    parser.add_argument("--rust-dir", help="folder with the Rust tensors <stem>.npy to compare")
    parser.add_argument(
        "--max-levels",
        type=float,
        default=None,
        help="with --rust-dir: exit 1 when some image differs by more u8 levels",
    )
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False)
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    print(f"{args.model}: {config}", file=sys.stderr)
    print(transform, file=sys.stderr)
    std = np.asarray(config["std"], dtype=np.float64).reshape(1, 3, 1, 1)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    worst = 0.0
    for name in args.images:
        path = Path(name)
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        x = transform(rgb).unsqueeze(0).numpy().astype(np.float32)
        np.save(out_dir / f"{path.stem}.timm.npy", x)
        line = f"{path.name}: {rgb.width}x{rgb.height} -> {list(x.shape)}"
        if args.rust_dir:
            rust_path = Path(args.rust_dir) / f"{path.stem}.npy"
            if not rust_path.exists():
                sys.exit(f"{rust_path}: missing (write it with pfe run --save-input)")
            r = np.load(rust_path)
            if r.shape != x.shape:
                sys.exit(f"{rust_path}: shape {r.shape}, timm gives {x.shape}")
            diff = np.abs(r.astype(np.float64) - x.astype(np.float64))
            levels = diff * std * 255.0
            worst = max(worst, float(levels.max()))
            line += (
                f"  max|d| {diff.max():.6f} normalized = {levels.max():.3f} u8 levels;"
                f" {int((levels > 0.5).sum())} of {x.size} values off by >= 1 level"
            )
        print(line)
    if args.rust_dir and args.max_levels is not None and worst > args.max_levels:
        sys.exit(f"max difference {worst:.3f} u8 levels > {args.max_levels}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
