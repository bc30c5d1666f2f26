#!/usr/bin/env bash
# Footprint for a board: sizes of `pfe` and of the C library built with the device profile
# (fat LTO, one codegen unit, stripped), and the peak RSS of `pfe bench` under qemu-user.
#
#   scripts/footprint.sh [boards/rpi4.toml]          # default: the Pi 4
#   INT8_MODEL=s12-int8.onnx scripts/footprint.sh    # also bench an int8 model
#
# Not part of CI: fat LTO takes several minutes per target on 2 cores. Needs what .ci/cross
# installs (rustup target, Debian's cross gcc, qemu-user-static) and GNU time.
# Under qemu-user the RSS is the emulator's: guest memory plus qemu's own (translated code,
# its heap), so the script also prints qemu's RSS for a run that does no work, and the same
# bench run natively on this host (x86 release build) for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."

board=${1:-boards/rpi4.toml}
triple=$(sed -n 's/^target *= *"\(.*\)"/\1/p' "$board")
target_dir=${CARGO_TARGET_DIR:-target}
out="$target_dir/$triple/device"
work="$target_dir/footprint"
mkdir -p "$work"

case "$triple" in
  aarch64-*) qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu -cpu cortex-a72)
    cc=aarch64-linux-gnu-gcc objcopy=aarch64-linux-gnu-objcopy ;;
  armv7-*) qemu=(qemu-arm-static -L /usr/arm-linux-gnueabihf -cpu cortex-a7)
    cc=arm-linux-gnueabihf-gcc objcopy=arm-linux-gnueabihf-objcopy
    export TRACT_CPU_ARM32_NEON=true ;; # qemu shows the host's /proc/cpuinfo; see .ci/cross
  x86_64-*) qemu=() cc=cc objcopy=objcopy ;;
  *) echo "unknown target $triple in $board" >&2; exit 1 ;;
esac

echo "=== $board: cargo build --profile device ($triple)"
start=$SECONDS
cargo build --profile device --config "$board" --bin pfe --lib
echo "built in $((SECONDS - start))s"

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
size_of() { stat -c %s "$1"; }
echo
echo "=== sizes ($out)"
printf "%-28s %12s  %s\n" "pfe (stripped)" "$(size_of "$out/pfe")" "$(mib "$(size_of "$out/pfe")")"
for lib in libpoolformer_edge.so libpoolformer_edge.a; do
  [ -f "$out/$lib" ] || { printf "%-28s %12s\n" "$lib" "(not built: crate-type)"; continue; }
  printf "%-28s %12s  %s\n" "$lib" "$(size_of "$out/$lib")" "$(mib "$(size_of "$out/$lib")")"
done
if [ -f "$out/libpoolformer_edge.a" ]; then
  # Most of the .a is LLVM bitcode (.llvmbc): with rlib among the crate types every object
  # keeps it for LTO, and the staticlib is not LTO'd. What a C program takes from it is far
  # less: the bitcode-free archive, and the example linked statically with --gc-sections.
  cp "$out/libpoolformer_edge.a" "$work/lib-nobitcode.a"
  "${objcopy}" --remove-section=.llvmbc --remove-section=.llvmcmd "$work/lib-nobitcode.a"
  printf "%-28s %12s  %s\n" "libpoolformer_edge.a, no .llvmbc" "$(size_of "$work/lib-nobitcode.a")" \
    "$(mib "$(size_of "$work/lib-nobitcode.a")")"
  if [ -f examples/c/classify.c ] && [ -f include/pfe.h ]; then
    "$cc" -O2 -I include examples/c/classify.c "$out/libpoolformer_edge.a" \
      -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -Wl,--gc-sections -s -o "$work/classify-static"
    printf "%-28s %12s  %s\n" "classify.c + .a, stripped" "$(size_of "$work/classify-static")" \
      "$(mib "$(size_of "$work/classify-static")")"
  fi
fi

echo
echo "=== model"
host_pfe="$target_dir/release/pfe"
[ -x "$host_pfe" ] || cargo build --release --bin pfe
model="$work/s12.onnx"
if [ ! -f "$model" ]; then
  "$host_pfe" synth --arch poolformer_s12 --seed 0 -o "$work/s12.safetensors"
  "$host_pfe" export --arch poolformer_s12 --weights "$work/s12.safetensors" -o "$model"
fi
ls -l "$model"

# peak_rss LABEL CMD…: the command's maximum resident set size, from GNU time.
peak_rss() {
  local label=$1
  shift
  /usr/bin/time -f "%M" -o "$work/rss" "$@" >"$work/stdout" 2>"$work/stderr" || {
    cat "$work/stderr"
    return 1
  }
  printf "%-40s %8.1f MiB\n" "$label" "$(awk '{ print $1 / 1024 }' "$work/rss")"
}

echo
echo "=== peak RSS (${qemu[*]:-native})"
peak_rss "qemu alone (pfe --version)" "${qemu[@]}" "$out/pfe" --version
peak_rss "pfe bench fp32, 1 thread" "${qemu[@]}" "$out/pfe" bench "$model" --iters 2 --warmup 1
grep -v '^$' "$work/stdout"
peak_rss "pfe bench fp32, 4 threads" "${qemu[@]}" "$out/pfe" bench "$model" --iters 2 --warmup 1 --threads 4
if [ -n "${INT8_MODEL:-}" ]; then
  peak_rss "pfe bench int8 ($INT8_MODEL), 1 thread" "${qemu[@]}" "$out/pfe" bench "$INT8_MODEL" --iters 2 --warmup 1
fi
if [ -x "$host_pfe" ]; then
  peak_rss "x86 release pfe bench fp32, 1 thread" "$host_pfe" bench "$model" --iters 2 --warmup 1
fi
