#!/usr/bin/env bash
# Benchmark (not a test): flashpack convert vs mlx_lm convert on the same seeded checkpoint.
#
# Usage: scripts/bench_convert.sh [DIR] [LAYERS]
#   DIR     scratch folder (default /tmp/flashpack-bench); the model is generated once there.
#   LAYERS  decoder layers of the generated Qwen3-MoE (default 20: ~4.2 GB of bf16 weights).
# Env: RUNS (default 1) repetitions per tool and cache state; SKIP_COLD=1 to skip cold runs;
#      BENCH_TARGET_DIR (default DIR/target) where flashpack is built.
#
# Prints a markdown table: wall time, source GB/s, peak RSS for each tool, warm and cold page
# cache, and the disk's sequential read bandwidth (O_DIRECT dd of the largest shard).
set -euo pipefail
DIR=${1:-/tmp/flashpack-bench}
LAYERS=${2:-20}
RUNS=${RUNS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# A target folder of its own (BENCH_TARGET_DIR): a CARGO_TARGET_DIR shared with other checkouts
# can be rebuilt from another branch between our build and our run.
export CARGO_TARGET_DIR=${BENCH_TARGET_DIR:-$DIR/target}
cd "$ROOT"
mkdir -p "$DIR"
cargo build --release --quiet --bin flashpack --example make_fixture
cp "$CARGO_TARGET_DIR/release/flashpack" "$CARGO_TARGET_DIR/release/examples/make_fixture" "$DIR/"
BIN=$DIR/flashpack
SRC=$DIR/src-l$LAYERS
if [ ! -f "$SRC/config.json" ]; then
  "$DIR/make_fixture" --arch qwen3_moe --out "$SRC" \
    --hidden 1024 --layers "$LAYERS" --experts 64 --top-k 8 --moe-intermediate 512 \
    --heads 16 --kv-heads 4 --head-dim 64 --vocab 8192 --shard-mb 2000 --seed 1 \
    --tokenizer-from fixtures/qwen3moe-tiny
fi
SRC_BYTES=$(cat "$SRC"/*.safetensors | wc -c)

evict() { for f in "$SRC"/*.safetensors; do dd if="$f" iflag=nocache count=0 status=none; done; }
warm() { cat "$SRC"/*.safetensors > /dev/null; }

# Disk: sequential read of the largest shard with O_DIRECT (bypasses the page cache).
BIG=$(ls -S "$SRC"/*.safetensors | head -1)
DISK=$(dd if="$BIG" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1 | sed -E 's/.*, ([0-9.]+ [GM]B\/s)$/\1/')

# measure CMD...: prints "wall_seconds cpu_seconds peak_rss_kb" (cpu = user + sys)
measure() {
  local log; log=$(mktemp)
  /usr/bin/time -f "%e %U %S %M" "$@" > /dev/null 2> "$log" || { cat "$log" >&2; exit 1; }
  tail -1 "$log" | awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }'
  rm -f "$log"
}

rows=()
for cache in warm cold; do
  [ "$cache" = cold ] && [ "${SKIP_COLD:-0}" = 1 ] && continue
  for i in $(seq 1 "$RUNS"); do
    rm -rf "$DIR/out.flashpack" "$DIR/mlx-q4"
    if [ "$cache" = cold ]; then evict; else warm; fi
    load=$(cut -d' ' -f1 /proc/loadavg)
    read -r fs fc frss < <(measure "$BIN" convert "$SRC" -o "$DIR/out.flashpack" --quiet)
    if [ "$cache" = cold ]; then evict; else warm; fi
    read -r ms mc mrss < <(measure python3 -m mlx_lm convert --hf-path "$SRC" --mlx-path "$DIR/mlx-q4" \
      -q --q-bits 4 --q-group-size 64)
    rows+=("$cache $i $fs $fc $frss $ms $mc $mrss $load")
  done
done
PACK_BYTES=$(wc -c < "$DIR/out.flashpack")
MLX_BYTES=$(cat "$DIR"/mlx-q4/*.safetensors | wc -c)

echo
echo "source: $SRC ($(awk -v b="$SRC_BYTES" 'BEGIN{printf "%.2f", b/1e9}') GB bf16, qwen3_moe, $LAYERS layers x 64 experts, hidden 1024, expert width 512)"
echo "disk sequential read (dd O_DIRECT, 16 MiB blocks): $DISK"
echo "cores: $(nproc); flashpack pack $(awk -v b="$PACK_BYTES" 'BEGIN{printf "%.3f", b/1e9}') GB, mlx_lm output $(awk -v b="$MLX_BYTES" 'BEGIN{printf "%.3f", b/1e9}') GB"
echo
echo "| page cache | run | load before | flashpack wall s | flashpack CPU s | flashpack source GB/s | flashpack peak RSS | mlx_lm wall s | mlx_lm CPU s | mlx_lm source GB/s | mlx_lm peak RSS | wall speed-up | CPU ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
  set -- $r
  awk -v c="$1" -v i="$2" -v fs="$3" -v fc="$4" -v fr="$5" -v ms="$6" -v mc="$7" -v mr="$8" \
      -v ld="$9" -v b="$SRC_BYTES" 'BEGIN{
    printf "| %s | %s | %s | %.1f | %.1f | %.2f | %.2f GB | %.1f | %.1f | %.2f | %.2f GB | %.2fx | %.2fx |\n",
      c, i, ld, fs, fc, b/1e9/fs, fr/1e6, ms, mc, b/1e9/ms, mr/1e6, ms/fs, mc/fc }'
done
