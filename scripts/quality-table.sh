#!/usr/bin/env bash
# The quality table of docs/benchmarks.md: uniform, mlx-lm position-based and flashpack
# usage-based (and merged) packs of the bundled trained model, scored by `flashpack eval` on
# fixtures/eval/{prose,code}.txt (never used to profile) against the bf16 source.
# Usage: scripts/quality-table.sh FLASHPACK_BINARY OUT_DIR [ROW...]
# Needs python with mlx-lm 0.32.2 for the mlx-lm rows. Prints a markdown table at the end.
set -euo pipefail
FP=$(realpath "$1"); OUT=$(realpath -m "$2"); shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/fixtures/qwen3moe-tiny
mkdir -p "$OUT"
cd "$OUT"

mlx() { # name, mlx_lm convert args
  local name=$1; shift
  [ -d "$name" ] || python -m mlx_lm convert --hf-path "$SRC" --mlx-path "$name" -q "$@" >/dev/null
}
pack() { # name, flashpack convert args (raw codec: sizes are quantized bytes, no entropy coding)
  local name=$1; shift
  [ -f "$name.flashpack" ] || "$FP" convert "$SRC" -o "$name.flashpack" --codec raw --quiet --json "$@" >"$name.convert.json"
}

mlx mlx-q4 --q-bits 4 --q-group-size 64
mlx mlx-q2 --q-bits 2 --q-group-size 64
mlx mlx-mixed_3_4 --quant-predicate mixed_3_4
mlx mlx-mixed_2_6 --quant-predicate mixed_2_6
size() { python - "$1" <<'PY'
import os, sys
d = sys.argv[1]
print(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) / 1e9)
PY
}
pack fp-u4
pack fp-u2 --expert-bits 2
pack fp-c25 --cold-fraction 0.25
pack fp-c50 --cold-fraction 0.5
pack fp-c75 --cold-fraction 0.75
pack fp-at-mixed_3_4 --target-size "$(size mlx-mixed_3_4)"
pack fp-at-mixed_2_6 --target-size "$(size mlx-mixed_2_6)"
for extra in "$@"; do
  # ROW spec "name:flashpack convert args", e.g. "fp-m25:--merge-ratio 0.25"
  pack "${extra%%:*}" ${extra#*:}
done

for m in mlx-*/ *.flashpack; do m=${m%/}
  for t in prose code; do
    echo "$m $t"
  done
done | xargs -P 2 -n 2 sh -c '[ -s "$0.$1.json" ] || "'"$FP"'" eval "$0" --text "'"$ROOT"'/fixtures/eval/$1.txt" --reference "'"$SRC"'" --json > "$0.$1.json"'

python - <<'PY'
import glob, json, os
rows = []
for m in sorted(set(f.rsplit(".", 2)[0] for f in glob.glob("*.prose.json"))):
    r = {t: json.load(open(f"{m}.{t}.json")) for t in ("prose", "code")}
    if m.endswith(".flashpack"):
        rep = json.load(open(m.replace(".flashpack", ".convert.json")))
        size = rep["pack"]["overall"]["bytes"]
        bpw = rep["pack"]["experts"]["bits_per_weight"]
    else:
        size = r["prose"]["model"]["weight_bytes"]
        bpw = None
    rows.append((size, m, bpw, r))
rows.sort(key=lambda x: -x[0])
print("| model | weights MB | expert bits/weight | prose ppl | prose KL | prose top-1 | code ppl | code KL | code top-1 |")
print("|---|---|---|---|---|---|---|---|---|")
ref = None
for size, m, bpw, r in rows:
    cells = []
    for t in ("prose", "code"):
        x = r[t]; c = x["reference"]
        ref = ref or {}
        ref[t] = c["perplexity"]
        cells += [f"{x['perplexity']:.2f}", f"{c['kl_mean']:.4f}", f"{100*c['top1_agreement']:.1f}%"]
    b = f"{bpw:.2f}" if bpw else "-"
    print(f"| {m} | {size/1e6:.2f} | {b} | " + " | ".join(cells) + " |")
print(f"| bf16 source (reference) | | | {ref['prose']:.2f} | 0 | 100% | {ref['code']:.2f} | 0 | 100% |")
PY
