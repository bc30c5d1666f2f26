#!/usr/bin/env python3
"""Shows whether this machine's onnxruntime computes QLinearConv (u8 activations,
i8 weights) exactly, or saturates its 16-bit pair sums.

Without AVX-512 VNNI / AVX-VNNI, onnxruntime's x86 u8×s8 kernels multiply with
`vpmaddubsw`, which adds two u8·s8 products into a saturating i16: 255·127 + 255·127
= 64770 becomes 32767. This builds one 1×1 QLinearConv with 8 input channels, all
activations 255 and all weights 127 (zero points 0, scales 1, output scale 1024), so
the exact accumulator is 8·255·127 = 259080 → y = round(259080 / 1024) = 253, and a
saturating one 4·32767 → 128. poolformer-edge's kernels are exact on every CPU
(tests/qgemm.rs); on such a machine its int8 outputs therefore differ from
onnxruntime's wherever the graph's sums saturate there.

    python3 scripts/ort_avx2_saturation.py      # prints exact / saturated and the CPU flags

Needs onnx, onnxruntime and numpy.
"""

import re

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

C = 8


def model():
    inits = [
        numpy_helper.from_array(np.full((1, C, 1, 1), 127, np.int8), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(np.array([1.0], np.float32), "ws"),
        numpy_helper.from_array(np.array([0], np.int8), "wz"),
        numpy_helper.from_array(np.array(1024.0, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yz"),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node], "saturation",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, C, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 4, 4])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def main():
    sess = ort.InferenceSession(model().SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.full((1, C, 4, 4), 255, np.uint8)})[0]
    exact = round(C * 255 * 127 / 1024)
    flags = []
    try:
        text = open("/proc/cpuinfo").read()
        have = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
        flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in have]
    except (OSError, AttributeError):
        pass
    got = int(y.ravel()[0])
    verdict = "exact" if got == exact else "saturated" if got == round(C // 2 * 32767 / 1024) else "other"
    print(f"onnxruntime {ort.__version__}, CPU flags {' '.join(flags) or '?'}: "
          f"QLinearConv y = {got}, exact {exact} -> {verdict}")


if __name__ == "__main__":
    main()
