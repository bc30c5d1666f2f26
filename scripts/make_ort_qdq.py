#!/usr/bin/env python3
"""Quantize an fp32 PoolFormer ONNX file with onnxruntime's static QDQ quantizer.

    python3 scripts/make_ort_qdq.py FP32.onnx OUT.onnx [--per-tensor] [--activations u8|s8]
        [--calib 16] [--size 224] [--seed 0] [--ops Conv,Gemm,MatMul]

Pre-processes the model (onnxruntime.quantization.shape_inference.quant_pre_process:
shape inference and graph cleanup), then runs quantize_static in QDQ format with
MinMax calibration on `--calib` image-like inputs: smooth random RGB images in [0, 1]
(low-resolution noise upsampled, plus a gradient) normalized with the ImageNet
mean/std, as the engine's preprocessing produces. Weights are s8 (symmetric),
per-channel unless --per-tensor; activations u8 (asymmetric) or s8.
`--ops` restricts the quantized op types (default: onnxruntime's full QDQ set).
Also writes OUT.input.npy, one of the same kind of input (a different seed), for
agreement checks (`pfe run OUT.onnx --input OUT.input.npy`).
"""

import argparse
import os
import tempfile

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def image_like(rng, size):
    low = rng.random((1, 3, 8, 8), dtype=np.float32)
    reps = -(-size // 8)
    img = np.kron(low, np.ones((1, 1, reps, reps), np.float32))[:, :, :size, :size]
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    img = 0.7 * img + 0.3 * ramp[None, None, :, None]
    img += 0.05 * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    return ((img - MEAN) / STD).astype(np.float32)


class Reader(CalibrationDataReader):
    def __init__(self, name, count, size, seed):
        rng = np.random.default_rng(seed)
        self.items = iter([{name: image_like(rng, size)} for _ in range(count)])

    def get_next(self):
        return next(self.items, None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--activations", choices=["u8", "s8"], default="u8")
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ops", default=None, help="comma-separated op types to quantize")
    a = p.parse_args()

    import onnx
    model = onnx.load(a.model)
    input_name = model.graph.input[0].name
    # Fixed 1x3xSxS input: the value_info shape inference writes then has no symbolic
    # batch/height/width that would disagree with the engine's fixed input.
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, a.size, a.size)):
        d.Clear()
        d.dim_value = v
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    out_dims[0].Clear()
    out_dims[0].dim_value = 1
    del model.graph.value_info[:]
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fixed = os.path.join(tmp, "fixed.onnx")
        onnx.save(model, fixed)
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(fixed, pre, skip_symbolic_shape=False)
        quantize_static(
            pre,
            a.output,
            Reader(input_name, a.calib, a.size, a.seed),
            quant_format=QuantFormat.QDQ,
            per_channel=not a.per_tensor,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if a.activations == "u8" else QuantType.QInt8,
            op_types_to_quantize=a.ops.split(",") if a.ops else None,
        )
    x = image_like(np.random.default_rng(a.seed + 1000), a.size)
    np.save(a.output + ".input.npy", x)
    m = onnx.load(a.output, load_external_data=False)
    counts = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print(a.output, "nodes:", dict(sorted(counts.items())))


if __name__ == "__main__":
    main()
