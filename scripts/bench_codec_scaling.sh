#!/usr/bin/env bash
# Benchmark (not a test): decode throughput of the expert codecs against the number of threads
# decoding segments in parallel (one decoder per thread, segments independent).
#
# Usage: scripts/bench_codec_scaling.sh [FLASHPACK_BIN] [MAX_THREADS]
#   FLASHPACK_BIN  a built flashpack (default target/release/flashpack)
#   MAX_THREADS    largest thread count (default: nproc); counts 1, 2, 4, ... and MAX_THREADS
# Env: SEGMENT_KIB (default 64), ROUNDS (default 7), SRC (default fixtures/qwen3moe-tiny: the
#      trained MoE's expert tensors, quantized at 4 bits as mx.quantize does).
#
# Prints a Markdown table: per codec and thread count, decoded GB/s (wall clock, best of ROUNDS
# interleaved rounds), speed-up over one thread, and parallel efficiency (speed-up / threads).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/flashpack}
MAX=${2:-$(nproc)}
SRC=${SRC:-$ROOT/fixtures/qwen3moe-tiny}
counts=()
t=1
while [ "$t" -lt "$MAX" ]; do counts+=("$t"); t=$((t * 2)); done
counts+=("$MAX")
out=$(mktemp -d)
for t in "${counts[@]}"; do
  "$BIN" bench codecs --safetensors "$SRC" --name-contains experts --bits 4 \
    --codecs huffman,zstd-3,lz4 --segment-kib "${SEGMENT_KIB:-64}" --rounds "${ROUNDS:-7}" \
    --threads "$t" --json > "$out/$t.json"
done
echo "cores: $(nproc); segments of ${SEGMENT_KIB:-64} KiB; $(uname -m)"
python3 - "$out" <<'PY'
import json, sys
import glob
rows = []
for f in glob.glob(sys.argv[1] + "/*.json"):
    rows.extend(json.load(open(f)))
base = {}
print("| codec | threads | decode GB/s (all threads, wall) | speed-up vs 1 thread | efficiency |")
print("|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (r["codec"], r["threads"])):
    gb = r["decode_mb_s_all"] / 1e3
    if r["threads"] == 1:
        base[r["codec"]] = gb
    b = base.get(r["codec"])
    up = gb / b if b else float("nan")
    print(f"| {r['codec']} | {r['threads']} | {gb:.2f} | {up:.2f}x | {up / r['threads']:.0%} |")
PY
rm -rf "$out"
