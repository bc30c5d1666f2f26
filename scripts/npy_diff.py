#!/usr/bin/env python3
"""Compare two float32 .npy files (e.g. logits from the x86 and the ARM build of `pfe run`).

    scripts/npy_diff.py x86.npy arm.npy [--tol 1e-3] [--top 5]

Passes (exit 0) when both have the same shape, the largest absolute difference is at most
--tol, and the top-k indices agree, in order. Two entries may swap places in the top-k only
if their values are within --tol of each other (a near-tie, not a different answer).
Standard library only, so CI needs no numpy.
"""

import argparse
import ast
import math
import struct
import sys


def read_npy_f32(path):
    """(shape, values) of a little-endian float32 .npy file in C order."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        sys.exit(f"{path}: not a .npy file")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        sys.exit(f"{path}: unsupported .npy version {major}")
    header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    if header["descr"] not in ("<f4", "=f4", "f4"):
        sys.exit(f"{path}: dtype {header['descr']}, expected float32 (<f4)")
    if header.get("fortran_order"):
        sys.exit(f"{path}: Fortran order is not supported")
    shape = tuple(header["shape"])
    count = math.prod(shape)
    body = data[start + hlen :]
    if len(body) != 4 * count:
        sys.exit(f"{path}: {len(body)} bytes of data for shape {shape}")
    return shape, struct.unpack(f"<{count}f", body)


def top_k(values, k):
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args()

    shape_a, a = read_npy_f32(args.a)
    shape_b, b = read_npy_f32(args.b)
    if shape_a != shape_b:
        print(f"FAIL shapes differ: {shape_a} vs {shape_b}")
        return 1
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if not (math.isfinite(x) and math.isfinite(y))]
    if bad:
        print(f"FAIL non-finite values at {bad[:5]}")
        return 1
    diffs = [abs(x - y) for x, y in zip(a, b)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    top_a, top_b = top_k(a, args.top), top_k(b, args.top)
    # Same indices in the same order, up to swaps between values closer than tol.
    same_top = top_a == top_b or (
        set(top_a) == set(top_b)
        and all(a[i] == a[j] or abs(a[i] - a[j]) <= args.tol for i, j in zip(top_a, top_b))
    )
    ok = diffs[worst] <= args.tol and same_top
    print(
        f"{'OK  ' if ok else 'FAIL'} shape {shape_a}: max |a-b| = {diffs[worst]:.3g} at {worst}"
        f" (tol {args.tol:g}); top-{args.top} {top_a} vs {top_b}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
