#!/usr/bin/env bash
# Thread scaling of pfe beside onnxruntime, one machine, one run.
#
#     benches/scaling.sh [OUT_DIR]        (default target/scaling)
#
# Environment: PFE (binary, default target/release/pfe), THREADS (default 1,2,4,8,16),
# ROUNDS (3), ITERS (15), FILES (default "fp32 own ortbest qdq").
#
# Models, made once and kept in OUT_DIR (a file already there is reused):
#   fp32     the synthetic S12 that `pfe demo` builds (~/.cache/poolformer-edge/)
#   own      `pfe quantize fp32 --synthetic 64` (the project's int8 QDQ file)
#   ortbest  onnxruntime's best int8: QOperator, Conv only, per-channel, percentile
#            (scripts/check_qoperator_ort.py --variants conv_perchannel)
#   qdq      onnxruntime's QDQ file, all ops, per-channel (scripts/make_ort_qdq.py)
# Then, per file, benches/compare_onnxruntime.py --threads $THREADS: onnxruntime and
# `pfe bench` interleaved, medians and pfe/ORT (wall time; "cpu pfe/ORT" is the ratio
# of process CPU times, which on one thread leaves out time the system gave to other
# work). Tables go to stdout and OUT_DIR/*.txt, JSON to OUT_DIR/*.json. Needs python3
# with onnxruntime, onnx and numpy (scripts/requirements.txt).
set -euo pipefail

out=${1:-target/scaling}
pfe=${PFE:-target/release/pfe}
threads=${THREADS:-1,2,4,8,16}
rounds=${ROUNDS:-3}
iters=${ITERS:-15}
files=${FILES:-fp32 own ortbest qdq}
mkdir -p "$out"

fp32=$HOME/.cache/poolformer-edge/poolformer_s12-synthetic-seed0.onnx
[ -f "$fp32" ] || "$pfe" demo --iters 1 >/dev/null

model() {
  case $1 in
    fp32) echo "$fp32" ;;
    own)
      local f=$out/s12_pfe_int8.onnx
      [ -f "$f" ] || "$pfe" quantize "$fp32" -o "$f" --synthetic 64 >&2
      echo "$f" ;;
    ortbest)
      local f=$out/poolformer_s12-synthetic-seed0-qop-conv_perchannel.onnx
      [ -f "$f" ] || python3 scripts/check_qoperator_ort.py "$fp32" --variants conv_perchannel \
        --eval 1 --pfe "$pfe" --out-dir "$out" >&2
      echo "$f" ;;
    qdq)
      local f=$out/s12_qdq_pc.onnx
      [ -f "$f" ] || python3 scripts/make_ort_qdq.py "$fp32" "$f" >&2
      echo "$f" ;;
    *) echo "unknown file kind $1" >&2; return 1 ;;
  esac
}

for kind in $files; do
  f=$(model "$kind")
  echo "== $kind: $f"
  python3 benches/compare_onnxruntime.py "$f" --threads "$threads" --rounds "$rounds" \
    --iters "$iters" --pfe "$pfe" --json >"$out/$kind.json"
  python3 - "$out/$kind.json" <<'EOF' | tee "$out/$kind.txt"
import json, sys
r = json.load(open(sys.argv[1]))
base = {}
print(f"{'threads':>7} {'ORT ms':>8} {'pfe ms':>8} {'pfe/ORT':>7} {'ORT speedup':>11} "
      f"{'pfe speedup':>11} {'pfe RSS MB':>10} {'cpu pfe/ORT':>11}")
for row in r["results"]:
    o, p = row["onnxruntime"]["median_ms"], row["pfe"]["median_ms"]
    base.setdefault("o", o); base.setdefault("p", p)
    cpu = row.get("cpu_ratio_pfe_over_ort")
    print(f"{row['threads']:>7} {o:>8.2f} {p:>8.2f} {p / o:>7.2f} {base['o'] / o:>11.2f} {base['p'] / p:>11.2f} "
          f"{row['pfe'].get('peak_rss_mb') or 0:>10.1f} {cpu if cpu is None else round(cpu, 2)!s:>11}")
EOF
done
