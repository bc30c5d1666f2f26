#!/usr/bin/env python3
"""Export timm's poolformer_s12 to ONNX twice (TorchScript and dynamo exporters).

Third-party ONNX files for checking that `pfe` loads and runs graphs it did not
write itself. Given a safetensors state dict with timm's key names (real
`timm/poolformer_s12.sail_in1k` weights, or `pfe synth` output):

    cargo build --release --bin pfe
    target/release/pfe synth --arch poolformer_s12 --seed 0 -o target/parity/s12_seed0.safetensors
    python3 scripts/export_timm.py --weights target/parity/s12_seed0.safetensors --out-dir target/parity

writes to --out-dir:

    poolformer_s12_torchscript.onnx     torch.onnx.export(dynamo=False), opset 17
    poolformer_s12_dynamo.onnx          torch.onnx.export(dynamo=True), opset 18,
    poolformer_s12_dynamo.onnx.data       weights in this external data file
    timm_input.npy                      seeded N(0,1) input, float32 [1, 3, 224, 224]
    timm_logits.npy                     timm's own float32 logits for that input

and prints each graph's op histogram and the GroupNorm / GELU patterns found
in it. Both exports are run once with onnxruntime on timm_input.npy as a sanity
check against timm's logits (--tolerance); the script exits non-zero if an
export fails, the external data file is missing, or a check fails.

Input name "input", output name "logits", static shape 1x3x224x224.
"""

import argparse
import collections
import os
import sys
import warnings

import numpy as np
import onnx
import timm
import torch
from safetensors.torch import load_file

ARCH = "poolformer_s12"
SIZE = 224


def load_state_dict(model, path):
    """Strictly load a safetensors state dict with timm key names into `model`.

    timm's metaformer `Scale` stores `layer_scale{1,2}.scale` as [C] (viewed as
    [C, 1, 1] in forward); the original PoolFormer repository stores [C, 1, 1].
    Same values, so any tensor whose element count matches is reshaped.
    """
    state = load_file(path)
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise SystemExit(f"{path}: {len(unknown)} tensors are not parameters of timm's {ARCH}, "
                         f"e.g. {unknown[:3]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SystemExit(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    fixed, reshaped = {}, 0
    for name, tensor in state.items():
        want = expected[name].shape
        if tensor.shape != want:
            if tensor.numel() != expected[name].numel():
                raise SystemExit(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"timm expects {tuple(want)}")
            tensor = tensor.reshape(want)
            reshaped += 1
        fixed[name] = tensor.to(torch.float32)
    model.load_state_dict(fixed, strict=True)
    return len(fixed), reshaped


def op_histogram(model):
    """op_type -> count over the main graph and any local functions."""
    hist = collections.Counter(n.op_type for n in model.graph.node)
    for f in model.functions:
        hist.update(f"{f.name}::{n.op_type}" for n in f.node)
    return hist


def patterns(graph):
    """Counts the GroupNorm and GELU decompositions in `graph`'s top level."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def chain(node, length):
        """op types of the single-consumer chain starting after `node`."""
        ops = []
        for _ in range(length):
            nxt = consumers.get(node.output[0], [])
            if len(nxt) != 1:
                break
            node = nxt[0]
            ops.append(node.op_type)
        return ops

    found = collections.Counter()
    for n in graph.node:
        if n.op_type == "InstanceNormalization":
            before = producer.get(n.input[0])
            seq = [before.op_type if before else "<input>", n.op_type] + chain(n, 3)
            found[" -> ".join(seq)] += 1
        elif n.op_type == "GroupNormalization":
            found["GroupNormalization"] += 1
        elif n.op_type == "Erf":
            before = producer.get(n.input[0])
            seq = [before.op_type if before else "<input>", n.op_type] + chain(n, 2)
            found[" -> ".join(seq)] += 1
        elif n.op_type == "Gelu":
            found["Gelu"] += 1
    return found


def describe(path):
    model = onnx.load(path, load_external_data=False)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    ins = [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
           for i in model.graph.input]
    outs = [(o.name, [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim])
            for o in model.graph.output]
    external = sum(1 for t in model.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL)
    print(f"\n{path}")
    print(f"  producer    {model.producer_name} {model.producer_version}")
    print(f"  opsets      {opsets}")
    print(f"  inputs      {ins}")
    print(f"  outputs     {outs}")
    print(f"  initializers {len(model.graph.initializer)} ({external} external), "
          f"nodes {len(model.graph.node)}, local functions {len(model.functions)}")
    print("  op histogram:")
    for op, n in sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {n:>5}  {op}")
    print("  patterns (GroupNorm: around InstanceNormalization; GELU: around Erf):")
    found = patterns(model.graph)
    if not found:
        print("    none found")
    for p, n in sorted(found.items(), key=lambda kv: -kv[1]):
        print(f"    {n:>5}  {p}")
    return model


def ort_logits(path, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})[0]


def export_torchscript(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            do_constant_folding=True,
        )


def export_dynamo(model, x, path):
    data_name = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), data_name)
    for stale in (path, data_path):
        if os.path.exists(stale):
            os.remove(stale)
    program = torch.onnx.export(
        model, (x,),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        external_data=True,
    )
    if program is None:
        raise SystemExit("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    program.save(path, external_data=True)
    if not os.path.isfile(data_path):
        # Older/newer torch may keep small models inline: force the external file.
        proto = onnx.load(path)
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=0)
    if not os.path.isfile(data_path):
        raise SystemExit(f"dynamo export: {data_path} was not written")
    return data_path


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="See the module docstring (head -30 scripts/export_timm.py) for the outputs.")
    parser.add_argument("--weights", required=True, help="safetensors state dict, timm key names")
    parser.add_argument("--out-dir", required=True, help="directory for the ONNX files and .npy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference input")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="max |onnxruntime - timm| allowed for the sanity check")
    parser.add_argument("--skip-dynamo", action="store_true", help="only the TorchScript export")
    args = parser.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = timm.create_model(ARCH, pretrained=False).eval()
    n, reshaped = load_state_dict(model, args.weights)
    print(f"timm {timm.__version__} / torch {torch.__version__} / onnx {onnx.__version__}: "
          f"{ARCH}, loaded {n} tensors from {args.weights} (strict, {reshaped} reshaped)")

    rng = np.random.default_rng(args.seed)
    x_np = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        logits = model(x).numpy()
    input_path = os.path.join(args.out_dir, "timm_input.npy")
    logits_path = os.path.join(args.out_dir, "timm_logits.npy")
    np.save(input_path, x_np)
    np.save(logits_path, logits)
    print(f"wrote {input_path} (seed {args.seed}) and {logits_path} {logits.shape}, "
          f"top-1 {int(logits.argmax())}, max |logit| {np.abs(logits).max():.4f}")

    failures = []
    outputs = []
    ts_path = os.path.join(args.out_dir, f"{ARCH}_torchscript.onnx")
    try:
        export_torchscript(model, x, ts_path)
        onnx.checker.check_model(ts_path)
        print(f"wrote {ts_path} ({os.path.getsize(ts_path) / 1e6:.1f} MB)")
        outputs.append(ts_path)
    except Exception as e:  # noqa: BLE001 - report and keep going with the other export
        failures.append(f"TorchScript export: {type(e).__name__}: {e}")

    if not args.skip_dynamo:
        dy_path = os.path.join(args.out_dir, f"{ARCH}_dynamo.onnx")
        try:
            data_path = export_dynamo(model, x, dy_path)
            onnx.checker.check_model(dy_path)
            print(f"wrote {dy_path} ({os.path.getsize(dy_path) / 1e6:.2f} MB) + "
                  f"{data_path} ({os.path.getsize(data_path) / 1e6:.1f} MB)")
            outputs.append(dy_path)
        except SystemExit as e:
            failures.append(str(e))
        except Exception as e:  # noqa: BLE001
            failures.append(f"dynamo export: {type(e).__name__}: {e}")

    for path in outputs:
        describe(path)
        try:
            got = ort_logits(path, x_np)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{path}: onnxruntime failed: {e}")
            continue
        diff = float(np.abs(got.astype(np.float64) - logits).max())
        ok = diff <= args.tolerance
        print(f"  onnxruntime vs timm: max abs diff {diff:.3e} "
              f"({'ok' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
        if not ok:
            failures.append(f"{path}: onnxruntime differs from timm by {diff:.3e}")

    if failures:
        print("\nFAILED:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print("\nall exports written and checked")


if __name__ == "__main__":
    main()
