#!/usr/bin/env python3
"""Quantizes an fp32 PoolFormer ONNX with onnxruntime (QOperator format) and compares
`pfe run` with onnxruntime on the quantized files.

    cargo build --release --bin pfe
    python3 scripts/check_qoperator_ort.py [MODEL.onnx] [--out-dir target/qoperator]
        [--calib 32] [--calib-npy DIR] [--eval 8] [--pfe target/release/pfe] [--json]

MODEL defaults to the synthetic S12 that `target/release/pfe demo --iters 1` builds and
caches at ~/.cache/poolformer-edge/poolformer_s12-synthetic-seed0.onnx.

Steps:
  1. The input is fixed to 1x3x224x224 and onnxruntime's `quant_pre_process` (shape
     inference, graph optimisation) runs on it.
  2. Calibration inputs: --calib-npy (a folder of preprocessed float32 NCHW .npy) or
     photographs shipped with scikit-image (random crops and flips), preprocessed like
     timm's eval transform (resize 248 bicubic, centre crop 224, ImageNet mean/std);
     generated natural-looking images when scikit-image's data is missing.
  3. `quantize_static`, QuantFormat.QOperator, two variants written to --out-dir:
       all_u8           every op onnxruntime can quantize, per tensor, u8 activations
                        and weights, MinMax calibration (QLinearConv, QLinearAdd,
                        QLinearMul, QLinearAveragePool, QLinearGlobalAveragePool, QGemm)
       conv_perchannel  Conv only, i8 weights per output channel, u8 activations,
                        Percentile calibration
     and, on request (--variants), all ops with i8 weights per channel (QGemm too) and
     u8 (all_u8_perchannel) or i8 (all_s8_perchannel) activations, MinMax calibration.
  4. --eval inputs (other crops than the calibration ones, saved as .npy under
     --out-dir/inputs) go through onnxruntime and `pfe run --input X.npy -o out.npy`,
     first on the fp32 file (the baseline difference of the two runtimes), then on
     each quantized file.

Printed per variant: the op types, max |pfe - ort| over all logits, the same in units of
the output's quantization step when the logits are dequantized from a quantized tensor
(all_u8: QGemm's u8 output), the mean |diff| next to the spread (std) of the logits,
top-1 agreement pfe vs ort (for each disagreement: how far apart onnxruntime itself had
the two classes), and both runtimes' top-1 agreement with the fp32 model. Exit status 1 when pfe fails to load or
run a file.
"""

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

DEFAULT_MODEL = os.path.expanduser("~/.cache/poolformer-edge/poolformer_s12-synthetic-seed0.onnx")
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg",
          "hubble_deep_field.jpg", "retina.jpg", "camera.png", "brick.png", "grass.png",
          "gravel.png", "horse.png", "immunohistochemistry.png", "ihc.png", "color.png"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="fp32 ONNX file")
    p.add_argument("--out-dir", default="target/qoperator", help="where quantized files and inputs go")
    p.add_argument("--calib", type=int, default=32, help="number of calibration images (default 32)")
    p.add_argument("--calib-npy", help="folder of preprocessed float32 1x3x224x224 .npy for calibration")
    p.add_argument("--eval", type=int, default=8, help="number of comparison inputs (default 8)")
    p.add_argument("--pfe", default="target/release/pfe", help="pfe binary")
    p.add_argument("--variants", default="all_u8,conv_perchannel", help="comma-separated variants")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args()


# ----------------------------------------------------------------------------- inputs

def preprocess(img):
    """timm eval transform of a PIL image: resize shorter side to 248, centre crop 224."""
    from PIL import Image
    img = img.convert("RGB")
    w, h = img.size
    short = int(SIZE / 0.9)
    if w < h:
        nw, nh = short, max(short, round(h * short / w))
    else:
        nw, nh = max(short, round(w * short / h)), short
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    img = img.crop((left, top, left + SIZE, top + SIZE))
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    return ((x - MEAN) / STD)[None].astype(np.float32)


def source_images():
    """Photographs from scikit-image's data folder, or generated ones."""
    from PIL import Image
    images = []
    try:
        import skimage
        data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
        for name in PHOTOS:
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                images.append(Image.open(path).convert("RGB"))
    except ImportError:
        pass
    if len(images) < 4:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from check_parity import natural_image
        images += [natural_image(w, h, seed=i) for i, (w, h) in
                   enumerate([(640, 480), (480, 640), (1024, 512), (300, 300), (800, 600), (512, 512)])]
    return images


def crops(images, n, seed):
    """n random crops (40-100% of the shorter side) with random flips, preprocessed."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = images[k % len(images)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        c = img.crop((x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(preprocess(c))
    return out


# ----------------------------------------------------------------------------- quantization

def fix_input_shape(src, dst):
    import onnx
    m = onnx.load(src)
    inputs = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inputs:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, [1, 3, SIZE, SIZE]):
            d.ClearField("dim_param")
            d.dim_value = v
    onnx.save(m, dst)
    return m.graph.input[0].name


def quantize(variant, pre, dst, input_name, calib):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{input_name: x} for x in calib])

        def get_next(self):
            return next(self.it, None)

    if variant == "all_u8":
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        per_channel=False, calibrate_method=CalibrationMethod.MinMax)
    elif variant == "conv_perchannel":
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=["Conv"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.Percentile)
    elif variant == "all_s8_perchannel":
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    elif variant == "all_u8_perchannel":
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    else:
        raise SystemExit(f"unknown variant {variant!r}")


def output_step(path):
    """Scale of the quantized tensor the graph output is dequantized from, if any."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    out = m.graph.output[0].name
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if out in n.output and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            s = numpy_helper.to_array(inits[n.input[1]])
            if s.size == 1:
                return float(s.reshape(()))
    return None


def op_types(path):
    import onnx
    m = onnx.load(path)
    return dict(collections.Counter(n.op_type for n in m.graph.node).most_common())


# ----------------------------------------------------------------------------- comparison

def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def pfe_run(pfe, model, x_path, tmp):
    out = os.path.join(tmp, "out.npy")
    r = subprocess.run([pfe, "run", "--input", x_path, "-o", out, model], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pfe run {model}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return np.load(out)


def compare(variant, path, fp32, input_paths, inputs, pfe, tmp):
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    step = output_step(path)
    diffs, mean_diffs, stds, agree, ort_fp32, pfe_fp32 = [], [], [], 0, 0, 0
    disagreements = []
    for x_path, x in zip(input_paths, inputs):
        ref = sess.run(None, {name: x})[0]
        got = pfe_run(pfe, path, x_path, tmp)
        if got.shape != ref.shape:
            raise RuntimeError(f"{variant}: pfe output {got.shape}, onnxruntime {ref.shape}")
        d = np.abs(got.astype(np.float64) - ref)
        diffs.append(float(d.max()))
        mean_diffs.append(float(d.mean()))
        stds.append(float(ref.std()))
        top_ref, top_got, top_fp32 = int(ref.argmax()), int(got.argmax()), int(fp32[x_path].argmax())
        agree += top_ref == top_got
        if top_ref != top_got:
            # How close the two classes were in onnxruntime's own logits.
            gap = float(ref.flat[top_ref] - ref.flat[top_got])
            disagreements.append({"input": os.path.basename(x_path), "ort_top1": top_ref,
                                  "pfe_top1": top_got, "ort_logit_gap": gap,
                                  "ort_logit_gap_steps": None if step is None else gap / step})
        ort_fp32 += top_ref == top_fp32
        pfe_fp32 += top_got == top_fp32
    n = len(inputs)
    return {
        "variant": variant,
        "file": path,
        "ops": op_types(path),
        "inputs": n,
        "max_abs_diff": max(diffs),
        "mean_abs_diff": float(np.mean(mean_diffs)),
        "ort_logit_std": float(np.mean(stds)),
        "output_step": step,
        "max_diff_steps": None if step is None else max(diffs) / step,
        "top1_pfe_vs_ort": f"{agree}/{n}",
        "top1_ort_vs_fp32": f"{ort_fp32}/{n}",
        "top1_pfe_vs_fp32": f"{pfe_fp32}/{n}",
        "top1_disagreements": disagreements,
    }


def main():
    args = parse_args()
    if not os.path.isfile(args.model):
        raise SystemExit(f"{args.model}: not found (build it with `target/release/pfe demo --iters 1`)")
    if not os.path.isfile(args.pfe):
        raise SystemExit(f"{args.pfe}: not found (cargo build --release --bin pfe)")
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnxruntime

    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.splitext(os.path.basename(args.model))[0]
    fixed = os.path.join(args.out_dir, f"{base}-fp32-224.onnx")
    pre = os.path.join(args.out_dir, f"{base}-fp32-pre.onnx")
    input_name = fix_input_shape(args.model, fixed)
    quant_pre_process(fixed, pre)

    images = source_images()
    if args.calib_npy:
        files = sorted(f for f in os.listdir(args.calib_npy) if f.endswith(".npy"))
        calib = [np.load(os.path.join(args.calib_npy, f)).astype(np.float32) for f in files[:args.calib]]
    else:
        calib = crops(images, args.calib, seed=1)
    inputs = crops(images, args.eval, seed=2)
    input_dir = os.path.join(args.out_dir, "inputs")
    os.makedirs(input_dir, exist_ok=True)
    input_paths = []
    for k, x in enumerate(inputs):
        p = os.path.join(input_dir, f"eval_{k:02d}.npy")
        np.save(p, x)
        input_paths.append(p)
    fp32_sess = ort_session(fixed)
    fp32 = {p: fp32_sess.run(None, {input_name: x})[0] for p, x in zip(input_paths, inputs)}

    results, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        # Baseline: how far apart the two runtimes already are on the fp32 file.
        fp32_diff = max(float(np.abs(pfe_run(args.pfe, fixed, p, tmp).astype(np.float64) - fp32[p]).max())
                        for p in input_paths)
        for variant in args.variants.split(","):
            path = os.path.join(args.out_dir, f"{base}-qop-{variant}.onnx")
            # The calibrators print progress on stdout; keep stdout for the report.
            with contextlib.redirect_stdout(sys.stderr):
                quantize(variant, pre, path, input_name, calib)
            try:
                results.append(compare(variant, path, fp32, input_paths, inputs, args.pfe, tmp))
            except RuntimeError as e:
                failed = True
                results.append({"variant": variant, "file": path, "error": str(e)})

    report = {"model": args.model, "onnxruntime": onnxruntime.__version__, "calibration": len(calib),
              "fp32_max_abs_diff": fp32_diff,
              "calibration_source": args.calib_npy or "scikit-image photos (crops)", "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {args.model}; onnxruntime {onnxruntime.__version__}; "
              f"{len(calib)} calibration inputs ({report['calibration_source']}); {len(inputs)} eval inputs")
        print(f"fp32 baseline: max |pfe - ort| {fp32_diff:.3g} on the unquantized file")
        for r in results:
            print(f"\n{r['variant']}: {r['file']}")
            if "error" in r:
                print(f"  ERROR {r['error']}")
                continue
            print(f"  ops: {r['ops']}")
            steps = "n/a (float output)" if r["output_step"] is None else \
                f"{r['max_diff_steps']:.2f} steps of {r['output_step']:.5g}"
            print(f"  max |pfe - ort| {r['max_abs_diff']:.5g} ({steps}); mean {r['mean_abs_diff']:.3g}; "
                  f"std of ort's logits {r['ort_logit_std']:.3g}")
            print(f"  top-1 pfe vs ort {r['top1_pfe_vs_ort']}; vs fp32: ort {r['top1_ort_vs_fp32']}, "
                  f"pfe {r['top1_pfe_vs_fp32']}")
            for d in r["top1_disagreements"]:
                steps = "" if d["ort_logit_gap_steps"] is None else f" = {d['ort_logit_gap_steps']:.1f} steps"
                print(f"    {d['input']}: ort class {d['ort_top1']}, pfe class {d['pfe_top1']}; "
                      f"ort's logit gap between them {d['ort_logit_gap']:.4g}{steps}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
