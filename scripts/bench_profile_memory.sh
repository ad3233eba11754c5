#!/usr/bin/env bash
# Benchmark (not a test): peak memory of the profile stage against a plain conversion.
#
# Usage: scripts/bench_profile_memory.sh [DIR] [LAYERS]
#   DIR     scratch folder (default /tmp/flashpack-profile-bench)
#   LAYERS  decoder layers of the generated Qwen3-MoE (default 2). Each layer holds 64 experts
#           of width 512 over hidden 1024 (192 MiB of bf16 experts), like scripts/bench_convert.sh;
#           profiling cost grows with layers, memory should not.
# Env: RUNS (default 2) repetitions of each measurement; BENCH_TARGET_DIR (default DIR/target).
#
# For the bundled trained model and the generated one, converts with no options (no profile)
# and with --cold-fraction 0.5 (profiles the built-in calibration set, 3,991 tokens), under
# /usr/bin/time, warm page cache, and prints peak RSS and wall time of each, and from the
# --json report the peak RSS of the profile stage and of the conversion stages after it.
set -euo pipefail
DIR=${1:-/tmp/flashpack-profile-bench}
LAYERS=${2:-2}
RUNS=${RUNS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${BENCH_TARGET_DIR:-$DIR/target}
cd "$ROOT"
mkdir -p "$DIR"
cargo build --release --quiet --bin flashpack --example make_fixture
BIN=$CARGO_TARGET_DIR/release/flashpack
SRC=$DIR/src-l$LAYERS
if [ ! -f "$SRC/config.json" ]; then
  "$CARGO_TARGET_DIR/release/examples/make_fixture" --arch qwen3_moe --out "$SRC" \
    --hidden 1024 --layers "$LAYERS" --experts 64 --top-k 8 --moe-intermediate 512 \
    --heads 16 --kv-heads 4 --head-dim 64 --vocab 8192 --shard-mb 2000 --seed 1 \
    --tokenizer-from fixtures/qwen3moe-tiny
fi

# measure CMD...: prints "wall_s peak_rss_kb profile_stage_peak_mb convert_stages_peak_mb"
# Stage peaks come from the --json report with FLASHPACK_STAGE_PEAKS=1 (VmHWM per stage, Linux);
# that restarts the high-water mark at each stage, so /usr/bin/time's peak is then the last
# stage's and the process peak is the largest stage peak: run plain conversions without it.
measure() {
  local log json; log=$(mktemp); json=$(mktemp)
  /usr/bin/time -f "%e %M" "$@" --json > "$json" 2> "$log" || { cat "$log" >&2; exit 1; }
  echo "$(tail -1 "$log") $(python3 -c '
import json, sys
st = json.load(open(sys.argv[1]))["stages"]
peak = lambda ss: max([s["peak_rss_bytes"] or 0 for s in ss] or [0]) / 1e6
prof = [s for s in st if s["stage"] == "profile"]
rest = [s for s in st if s["stage"] not in ("profile", "load")]
print("%.1f %.1f %.1f" % (peak(prof), peak(rest), peak(st)))' "$json")"
  rm -f "$log" "$json"
}

echo "| model | source GB | run | plain convert: peak RSS | wall s | with profile: process peak RSS | profile stage peak | conversion stages peak | wall s |"
echo "|---|---|---|---|---|---|---|---|---|"
for src in fixtures/qwen3moe-tiny "$SRC"; do
  gb=$(cat "$src"/*.safetensors | wc -c | awk '{printf "%.3f", $1/1e9}')
  cat "$src"/*.safetensors > /dev/null
  for i in $(seq 1 "$RUNS"); do
    read -r pw pr _ _ _ < <(measure "$BIN" convert "$src" -o "$DIR/plain.flashpack")
    read -r fw _ fp fc ft < <(FLASHPACK_STAGE_PEAKS=1 measure "$BIN" convert "$src" \
      -o "$DIR/profiled.flashpack" --cold-fraction 0.5)
    awk -v m="$(basename "$src")" -v g="$gb" -v i="$i" -v pw="$pw" -v pr="$pr" -v fw="$fw" -v ft="$ft" \
        -v fp="$fp" -v fc="$fc" 'BEGIN{
      printf "| %s | %s | %s | %.1f MB | %.1f | %.1f MB | %.1f MB | %.1f MB | %.1f |\n", m, g, i, pr/1e3, pw, ft, fp, fc, fw }'
  done
done
