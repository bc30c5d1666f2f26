#!/usr/bin/env python3
"""Latency of one ONNX file in onnxruntime and in `pfe`, interleaved in one run.

    cargo build --release --bin pfe
    python3 benches/compare_onnxruntime.py MODEL.onnx [--threads 1[,2,4...]] [--rounds 5]
        [--iters 20] [--warmup 3] [--pfe target/release/pfe] [--pfe-model OTHER.onnx] [--json]

`--pfe-model` has pfe run another file than onnxruntime (same input, same rounds): how
pfe on its own quantized model compares with onnxruntime on onnxruntime's best int8 file.

For each thread count, `--rounds` rounds alternate the two runtimes (ORT first
in even rounds, pfe first in odd ones, so drift hits both alike):

  onnxruntime  in this process: CPUExecutionProvider, intra_op_num_threads = N,
               inter_op_num_threads = 1, graph optimisations ALL, sequential
               execution; one session per thread count, `--warmup` untimed runs
               at the start of every round, then `--iters` runs timed one by one
               with time.perf_counter.
  pfe          `pfe bench MODEL --threads N --iters K --warmup W --json`, a fresh
               process per round (so its load time is measured every round);
               its median_ms / p90_ms are read from the JSON.

Reported per runtime: median and p90 (ORT: over all timed iterations of all
rounds; pfe: median of the per-round medians and of the per-round p90s), min
of the round medians, load time, and the ratio pfe/ORT of the medians (< 1:
pfe is faster). Both runtimes get the same deterministic input as `pfe bench`
((i mod 251)/125 - 1), 1x3xSxS. Also printed: the CPU model from /proc/cpuinfo
with its avx2 / avx512f / avx512_vnni flags, and the library versions.

Each runtime's process CPU time per run is measured beside its wall time (ORT:
time.process_time around each run; pfe: `cpu_median_ms` of its JSON) and
reported as "cpu ms" with its own pfe/ORT ratio. On one thread that is the
run's time less the time the system gave to other work meanwhile, which the
wall clock counts; it still moves with what other jobs do to shared caches,
memory bandwidth and clock speed. With several threads it sums the threads'
time, spin-waiting included, so it is a cost, not a latency.
--json prints one JSON object instead of the table. Exit status 1 if either
runtime fails.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "neon", "asimd")


def machine_info():
    info = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "flags": {}}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for key in ("model name", "Model", "Hardware", "CPU part"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if m:
            info["cpu"] = m.group(1).strip()
            break
    # Virtual machines often report a generic name: family/model/stepping identify the part.
    ids = [re.search(rf"^{k}\s*:\s*(\S+)", text, re.M) for k in ("cpu family", "model", "stepping")]
    if all(ids):
        info["cpu_id"] = "family {} model {} stepping {}".format(*(i.group(1) for i in ids))
    m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    present = set(m.group(1).split()) if m else set()
    info["flags"] = {f: f in present for f in FLAGS if f in present or f.startswith("avx")}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def versions(pfe_path):
    import onnxruntime
    v = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
         "numpy": np.__version__}
    try:
        v["pfe"] = subprocess.run([pfe_path, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
    except OSError as e:
        v["pfe"] = f"unavailable ({e})"
    lock = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Cargo.lock")
    try:
        m = re.search(r'name = "tract-core"\nversion = "([^"]+)"', open(lock).read())
        if m:
            v["tract"] = m.group(1)
    except OSError:
        pass
    return v


def parse_threads(s):
    try:
        t = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        t = []
    if not t or any(n < 1 for n in t):
        raise argparse.ArgumentTypeError(f"expected thread counts like 1 or 1,2,4, got {s!r}")
    return t


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


class OrtRunner:
    def __init__(self, model, threads, size):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        start = time.perf_counter()
        self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.load_ms = (time.perf_counter() - start) * 1e3
        inp = self.sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else None for d in inp.shape]
        if len(shape) != 4:
            raise SystemExit(f"{model}: expected a 4-D input, got {inp.shape}")
        shape = [shape[0] or 1, shape[1] or 3, shape[2] or size, shape[3] or size]
        n = int(np.prod(shape))
        self.x = ((np.arange(n) % 251).astype(np.float32) / 125.0 - 1.0).reshape(shape)
        self.feed = {inp.name: self.x}

    def round(self, warmup, iters):
        for _ in range(warmup):
            self.sess.run(None, self.feed)
        samples, cpu = [], []
        for _ in range(iters):
            c0 = time.process_time()
            start = time.perf_counter()
            self.sess.run(None, self.feed)
            samples.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        return samples, cpu


def pfe_round(pfe_path, model, threads, warmup, iters, size):
    cmd = [pfe_path, "bench", model, "--threads", str(threads), "--iters", str(iters),
           "--warmup", str(warmup), "--size", str(size), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: "
                           f"{(p.stderr.strip() or p.stdout.strip())[-800:]}")
    v = json.loads(p.stdout.strip().splitlines()[-1])
    if isinstance(v, list):
        v = v[0]
    return v


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("model", help="ONNX file (run as is by both runtimes)")
    parser.add_argument("--threads", type=parse_threads, default=[1],
                        help="thread count(s), e.g. 1 or 1,2,4 (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per round (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per round (default 3)")
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--pfe", default="target/release/pfe", help="pfe binary")
    parser.add_argument("--pfe-model", help="ONNX file pfe runs instead of MODEL")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--rounds and --iters must be >= 1, --warmup >= 0")
    pfe_model = args.pfe_model or args.model
    for path in (args.model, pfe_model):
        if not os.path.isfile(path):
            sys.exit(f"{path}: no such file")
    if not (os.path.isfile(args.pfe) and os.access(args.pfe, os.X_OK)):
        sys.exit(f"{args.pfe}: no pfe binary (cargo build --release --bin pfe, or --pfe PATH)")

    machine = machine_info()
    vers = versions(args.pfe)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    flags = " ".join(f"{f}{'+' if on else '-'}" for f, on in machine["flags"].items())
    cpu_id = f", {machine['cpu_id']}" if "cpu_id" in machine else ""
    log(f"machine   {machine['cpu']}{cpu_id} ({machine['logical_cpus']} logical CPUs"
        f"{', ' + str(machine.get('affinity_cpus')) + ' usable' if machine.get('affinity_cpus') not in (None, machine['logical_cpus']) else ''}); {flags}")
    log("versions  " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    log(f"model     {args.model}; {args.rounds} rounds x {args.iters} iterations "
        f"(+{args.warmup} warm-up) per runtime and thread count")
    if pfe_model != args.model:
        log(f"pfe model {pfe_model}")

    rows = []
    for threads in args.threads:
        try:
            ort_runner = OrtRunner(args.model, threads, args.size)
        except Exception as e:  # noqa: BLE001
            sys.exit(f"onnxruntime failed to load {args.model}: {type(e).__name__}: {e}")
        ort_samples, ort_round_medians, ort_cpu = [], [], []
        pfe_reports = []
        for r in range(args.rounds):
            order = ("ort", "pfe") if r % 2 == 0 else ("pfe", "ort")
            for which in order:
                if which == "ort":
                    s, c = ort_runner.round(args.warmup, args.iters)
                    ort_samples += s
                    ort_cpu += c
                    ort_round_medians.append(statistics.median(s))
                else:
                    try:
                        pfe_reports.append(pfe_round(args.pfe, pfe_model, threads, args.warmup,
                                                     args.iters, args.size))
                    except Exception as e:  # noqa: BLE001
                        sys.exit(f"pfe failed: {e}")
            log(f"  threads {threads} round {r + 1}/{args.rounds}: "
                f"ort median {ort_round_medians[-1]:.2f} ms, "
                f"pfe median {pfe_reports[-1]['median_ms']:.2f} ms")
        pfe_medians = [p["median_ms"] for p in pfe_reports]
        ort = dict(median_ms=statistics.median(ort_samples), p90_ms=percentile(ort_samples, 90),
                   min_ms=min(ort_samples), best_round_median_ms=min(ort_round_medians),
                   round_medians_ms=ort_round_medians, load_ms=ort_runner.load_ms,
                   samples=len(ort_samples))
        pfe = dict(median_ms=statistics.median(pfe_medians),
                   p90_ms=statistics.median(p["p90_ms"] for p in pfe_reports),
                   min_ms=min(p["min_ms"] for p in pfe_reports),
                   best_round_median_ms=min(pfe_medians), round_medians_ms=pfe_medians,
                   load_ms=statistics.median(p["load_ms"] for p in pfe_reports),
                   peak_rss_mb=max((p.get("peak_rss_mb") or 0) for p in pfe_reports) or None,
                   samples=sum(p["iters"] for p in pfe_reports))
        ort["cpu_median_ms"] = statistics.median(ort_cpu)
        pfe_cpu = [p["cpu_median_ms"] for p in pfe_reports if p.get("cpu_median_ms") is not None]
        pfe["cpu_median_ms"] = statistics.median(pfe_cpu) if len(pfe_cpu) == len(pfe_reports) else None
        row = dict(threads=threads, onnxruntime=ort, pfe=pfe,
                   ratio_pfe_over_ort=pfe["median_ms"] / ort["median_ms"])
        if pfe["cpu_median_ms"] is not None and ort["cpu_median_ms"] > 0:
            row["cpu_ratio_pfe_over_ort"] = pfe["cpu_median_ms"] / ort["cpu_median_ms"]
        rows.append(row)

    result = dict(model=os.path.abspath(args.model), pfe_model=os.path.abspath(pfe_model),
                  machine=machine, versions=vers,
                  rounds=args.rounds, iters=args.iters, warmup=args.warmup, size=args.size,
                  results=rows)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print()
    print(f"{'threads':>7}  {'runtime':<12} {'median ms':>9} {'p90 ms':>8} {'min ms':>8} "
          f"{'load ms':>8}  {'pfe/ORT':>7}  {'cpu ms':>7} {'cpu pfe/ORT':>11}")
    for row in rows:
        for name, key in (("onnxruntime", "onnxruntime"), ("pfe", "pfe")):
            s = row[key]
            ratio = f"{row['ratio_pfe_over_ort']:>7.2f}" if key == "pfe" else " " * 7
            cpu = f"{s['cpu_median_ms']:>7.2f}" if s.get("cpu_median_ms") is not None else f"{'?':>7}"
            cpu_ratio = (f"{row['cpu_ratio_pfe_over_ort']:>11.2f}"
                         if key == "pfe" and "cpu_ratio_pfe_over_ort" in row else "")
            print(f"{row['threads']:>7}  {name:<12} {s['median_ms']:>9.2f} {s['p90_ms']:>8.2f} "
                  f"{s['min_ms']:>8.2f} {s['load_ms']:>8.1f}  {ratio}  {cpu} {cpu_ratio}")
    print("\npfe/ORT = median(pfe round medians) / median(all ORT iterations); < 1 means pfe is faster")
    print("cpu ms = median process CPU time per run (all threads together); "
          "on one thread it leaves out time the system gave to other work")


if __name__ == "__main__":
    main()
