#!/usr/bin/env python3
"""Cross-checks an exported PoolFormer ONNX file with onnx's checker and onnxruntime.

Runs the model on a seeded random 1x3xSIZExSIZE input (or on --input-npy), prints the
output shape and top classes, and with --compare-npy compares the logits against
another runtime's (e.g. tract's) output for the same input.

    python3 scripts/check_export_ort.py model.onnx
    python3 scripts/check_export_ort.py model.onnx --save-input in.npy --save-output ort.npy
    python3 scripts/check_export_ort.py model.onnx --input-npy in.npy --compare-npy tract.npy

Exit status: 0 when the checker passes, the logits are finite and (if asked) within
--atol of the reference; 1 otherwise.
"""

import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file to check")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--input-npy", help="use this NCHW float32 input instead of a random one")
    p.add_argument("--compare-npy", help="reference logits to compare onnxruntime's against")
    p.add_argument("--atol", type=float, default=1e-3, help="max abs difference allowed by --compare-npy")
    p.add_argument("--save-input", help="write the input used to this .npy")
    p.add_argument("--save-output", help="write onnxruntime's logits to this .npy")
    p.add_argument(
        "--no-ort-optimizations",
        action="store_true",
        help="run onnxruntime without graph rewrites (no GELU/LayerNorm fusion), to separate "
        "export bugs from fusion rounding",
    )
    return p.parse_args()


def main():
    args = parse_args()
    if args.compare_npy and not args.input_npy:
        print("warning: --compare-npy without --input-npy compares on the seeded random input", file=sys.stderr)

    model = onnx.load(args.model)
    # full_check runs strict shape inference as well as the structural checks.
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    print(f"onnx.checker: ok (ir_version {model.ir_version}, opsets {opsets}, "
          f"{len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers, "
          f"producer {model.producer_name!r} {model.producer_version})")
    metadata = {p.key: p.value for p in model.metadata_props}
    if "poolformer_edge.arch_json" in metadata:
        arch = json.loads(metadata["poolformer_edge.arch_json"])
        print(f"arch: {arch}")

    if args.input_npy:
        x = np.load(args.input_npy).astype(np.float32, copy=False)
    else:
        x = np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size), dtype=np.float32)
    if args.save_input:
        np.save(args.save_input, x)

    options = ort.SessionOptions()
    if args.no_ort_optimizations:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (logits,) = session.run(None, {input_name: x})
    print(f"onnxruntime {ort.__version__}: input {list(x.shape)} -> output {list(logits.shape)}")
    if args.save_output:
        np.save(args.save_output, logits)

    ok = True
    if not np.all(np.isfinite(logits)):
        print("FAIL: non-finite logits", file=sys.stderr)
        ok = False
    top = np.argsort(-logits[0])[:5]
    print("top-5: " + ", ".join(f"{i}: {logits[0, i]:.5f}" for i in top))
    print(f"logits: mean {logits.mean():.6f}, std {logits.std():.6f}")

    if args.compare_npy:
        reference = np.load(args.compare_npy)
        if reference.shape != logits.shape:
            print(f"FAIL: reference shape {list(reference.shape)} != {list(logits.shape)}", file=sys.stderr)
            return 1
        diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
        scale = np.abs(reference).max()
        print(f"vs {args.compare_npy}: max abs diff {diff.max():.3e}, mean abs diff {diff.mean():.3e}, "
              f"max |ref| {scale:.3e}, same argmax: {bool(np.argmax(logits) == np.argmax(reference))}")
        if diff.max() > args.atol:
            print(f"FAIL: max abs diff {diff.max():.3e} > atol {args.atol:.1e}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
