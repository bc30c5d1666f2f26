#!/usr/bin/env python3
"""onnxruntime's static quantizer on the same calibration data as `pfe quantize`, so
`pfe compare` can score both quantizers' outputs side by side.

Calibration inputs are the .npy files `pfe quantize --save-inputs DIR` writes
(f32 1x3xSxS, preprocessed exactly as inference does). Writes into OUT:

  ort_qdq_conv_{minmax,percentile,entropy}.onnx  QDQ, Conv only, per-channel int8
      weights, uint8 activations: the same scope as `pfe quantize`.
  ort_qdq_all_minmax.onnx  QDQ, every op type ORT quantizes by default (Conv, Gemm,
      Add, Mul, pooling, ...), per-channel: ORT's out-of-the-box result.
  ort_qop_conv_percentile.onnx  QOperator format (QLinearConv), Conv only,
      per-channel, percentile calibration.

    target/release/pfe quantize fp32.onnx -o pfe.onnx --synthetic 64 --save-inputs calib/
    python3 scripts/ort_quantize_baseline.py fp32.onnx calib/ out/
    target/release/pfe compare fp32.onnx out/ort_qdq_conv_percentile.onnx --synthetic 32

Needs onnx, onnxruntime (tested with 1.32) and numpy.
"""

import argparse
import glob
import os
import sys
import time

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


class NpyReader(CalibrationDataReader):
    """Feeds the calibration .npy files, one per run."""

    def __init__(self, files, input_name):
        self.files = files
        self.input_name = input_name
        self.rewind()

    def get_next(self):
        if self.index >= len(self.files):
            return None
        x = np.load(self.files[self.index]).astype(np.float32)
        self.index += 1
        return {self.input_name: x}

    def rewind(self):
        self.index = 0


def strip_value_info(path):
    """Drops the intermediate shape annotations ORT's quantizer writes: they keep the
    symbolic `batch` dimension, which tract refuses to unify with the engine's fixed
    batch of 1 (the graph itself is unchanged)."""
    m = onnx.load(path)
    del m.graph.value_info[:]
    onnx.save(m, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="fp32 ONNX model")
    p.add_argument("calib", help="directory of calibration .npy files")
    p.add_argument("out", help="output directory")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--only", help="comma-separated subset of the variants to build")
    args = p.parse_args()

    files = sorted(glob.glob(os.path.join(args.calib, "*.npy")))
    if not files:
        sys.exit(f"error: no .npy files in {args.calib}")
    model = onnx.load(args.model)
    input_name = model.graph.input[0].name
    os.makedirs(args.out, exist_ok=True)

    variants = {
        "ort_qdq_conv_minmax": (QuantFormat.QDQ, ["Conv"], CalibrationMethod.MinMax),
        "ort_qdq_conv_percentile": (QuantFormat.QDQ, ["Conv"], CalibrationMethod.Percentile),
        "ort_qdq_conv_entropy": (QuantFormat.QDQ, ["Conv"], CalibrationMethod.Entropy),
        "ort_qdq_all_minmax": (QuantFormat.QDQ, None, CalibrationMethod.MinMax),
        "ort_qop_conv_percentile": (QuantFormat.QOperator, ["Conv"], CalibrationMethod.Percentile),
    }
    only = set(args.only.split(",")) if args.only else set(variants)
    for name, (fmt, ops, method) in variants.items():
        if name not in only:
            continue
        out = os.path.join(args.out, name + ".onnx")
        start = time.time()
        extra = {}
        if method == CalibrationMethod.Percentile:
            extra["CalibPercentile"] = args.percentile
        quantize_static(
            args.model,
            out,
            NpyReader(files, input_name),
            quant_format=fmt,
            op_types_to_quantize=ops,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options=extra,
        )
        strip_value_info(out)
        print(f"{out}  ({len(files)} calibration inputs, {time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
