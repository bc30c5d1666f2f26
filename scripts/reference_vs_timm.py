#!/usr/bin/env python3
"""Run timm's poolformer on a safetensors state dict and an input .npy; write the logits.

Validates the project's f64 reference forward pass (tests/common/reference.rs)
against timm itself. Produce the inputs with

    PFE_DUMP_DIR=/tmp/pfe cargo test --release --test reference dump_s12_reference_for_timm

then

    python3 scripts/reference_vs_timm.py /tmp/pfe/s12_seed0.safetensors /tmp/pfe/input.npy \
        /tmp/pfe/timm_logits.npy --compare /tmp/pfe/reference_logits.npy --double

With --double timm runs in float64, so a remaining difference is semantic, not
rounding; without it, timm runs in float32 as it does in deployment.
"""

import argparse
import sys

import numpy as np
import timm
import torch
from safetensors.torch import load_file


def load_state_dict(model, path):
    state = load_file(path)
    expected = model.state_dict()
    fixed = {}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            sys.exit(f"{path}: tensor {name!r} is not a parameter of the timm model")
        # timm's Scale stores [C] and views it as [C, 1, 1] in forward; some exports
        # keep the original repository's [C, 1, 1]. Same values, so reshape.
        if tensor.shape != want.shape and tensor.numel() == want.numel():
            tensor = tensor.reshape(want.shape)
        fixed[name] = tensor
    missing = sorted(set(expected) - set(fixed))
    if missing:
        sys.exit(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(fixed, strict=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="safetensors state dict with timm key names")
    parser.add_argument("input", help="input .npy, shape [1, 3, H, W]")
    parser.add_argument("output", help="where to write the logits .npy")
    parser.add_argument("--model", default="poolformer_s12", help="timm model name")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--double", action="store_true", help="run in float64")
    parser.add_argument("--compare", help="reference logits .npy to compare against")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    load_state_dict(model, args.weights)
    dtype = torch.float64 if args.double else torch.float32
    model = model.to(dtype)

    x = torch.from_numpy(np.load(args.input)).to(dtype)
    with torch.no_grad():
        logits = model(x).numpy()
    np.save(args.output, logits)
    print(f"timm {timm.__version__} / torch {torch.__version__}: {args.model} in {dtype}, "
          f"input {tuple(x.shape)} -> logits {logits.shape}, wrote {args.output}")

    if args.compare:
        ref = np.load(args.compare).astype(np.float64)
        diff = np.abs(logits.astype(np.float64) - ref)
        worst = int(diff.argmax())
        print(f"max |timm - reference| = {diff.max():.3e} at logit {worst} "
              f"(timm {logits.flat[worst]:.9f}, reference {ref.flat[worst]:.9f}); "
              f"mean {diff.mean():.3e}; max |logit| {np.abs(ref).max():.3f}; "
              f"top-1 timm {logits.argmax()} reference {ref.argmax()}")
        if diff.max() > args.tolerance:
            sys.exit(f"FAIL: difference above {args.tolerance:g}")
        print(f"OK: within {args.tolerance:g}")


if __name__ == "__main__":
    main()
