#!/usr/bin/env bash
# The GPU runtime table (docs/benchmarks.md, "GPU") on the device's H200, MLX's CUDA backend.
#
# Here, from the project root:
#   bash scripts/bench_gpu.sh prepare
#   mv fixtures/qwen3moe-tiny /tmp/     # the tree must travel under 64 MiB; move it back after
# Then two device calls, back to back (a machine stays warm 30 s):
#   1. carry [".gpu/p1", ".gpu/kcache"], command:
#      mkdir -p /root/stash && cp .gpu/p1/part.00 .gpu/kcache/kcache.tar.zst /root/stash/
#   2. carry [".gpu/p2"], command: bash scripts/bench_gpu.sh device [bench_gpu.py options]
#   3. (optional, at once, same machine) command: bash scripts/bench_gpu.sh more --reps 1
# The table comes back as $OUT/table.md (raw numbers in $OUT/raw.json), built from every
# repetition so far on that machine. Put $OUT/kcache.tar.zst in .gpu/kcache/ and carry
# ".gpu/kcache" too, to skip the kernel compilation (minutes) on the next fresh machine.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
z() { LD_LIBRARY_PATH=.gpu/p2/bin .gpu/p2/bin/zstd "$@"; }
# The compiled-kernel caches (MLX's PTX in /tmp/mlx, the driver's in ~/.nv): restored from
# .gpu/kcache.tar.zst when carried, saved to $OUT after each call, so a fresh machine does not
# spend minutes compiling kernels again.
kcache_restore() {
  # (call 1 may leave it in /root/stash: p1 and the cache fit one call, p2 and the cache do not)
  for k in .gpu/kcache/kcache.tar.zst /root/stash/kcache.tar.zst; do
    if [ -f "$k" ] && [ ! -d /tmp/mlx ]; then
      z -dc "$k" | tar -xf - -C / || true
    fi
  done
}
# Installs on a machine not yet set up, restores the kernel cache, and makes the 8-layer uniform
# model of the Qwen3-30B-A3B layer shape ($w/uniform) and convert's default pack of it
# ($w/trace.flashpack) unless they are there (trace, batch and plan use them).
trace_model() {
  command -v flashpack >/dev/null || bash .gpu/p2/install.sh
  kcache_restore
  w=/root/fpbench; mkdir -p "$w"
  if [ ! -f "$w/uniform/config.json" ]; then
    make_fixture --out "$w/uniform" --tokenizer-from .gpu/p2/tok --arch qwen3_moe --hidden 2048 \
      --experts 128 --top-k 8 --moe-intermediate 768 --heads 16 --kv-heads 4 --head-dim 128 \
      --vocab 8192 --layers 8 >/dev/null
  fi
  [ -f "$w/trace.flashpack" ] || flashpack convert "$w/uniform" -o "$w/trace.flashpack" --quiet
}
kcache_save() {
  # Saved even when a run failed: the kernels compiled so far are still good.
  if [ -n "${OUT:-}" ]; then
    tar -cf - -C / tmp/mlx root/.nv 2>/dev/null | z -q -19 -T0 -o "$OUT/kcache.tar.zst" || true
  fi
}
bench() {
  kcache_restore
  local rc=0
  PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --tokenizer-from .gpu/p2/tok --out "${OUT:-.}" "$@" || rc=$?
  kcache_save
  return $rc
}
# An older binary to compare against (`--baseline-bin flashpack-base`): prepare-base puts it in
# .gpu/p2/bin/flashpack_base.bin.zst; here it gets a wrapper on PATH like install.sh's.
base_wrapper() {
  [ -f .gpu/p2/bin/flashpack_base.bin.zst ] || return 0
  SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  z -dqf .gpu/p2/bin/flashpack_base.bin.zst -o /usr/local/libexec/flashpack_base.bin
  chmod 755 /usr/local/libexec/flashpack_base.bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/mlx/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec /usr/local/libexec/flashpack_base.bin "$@"\n' "$SP" > /usr/local/bin/flashpack-base
  chmod +x /usr/local/bin/flashpack-base
}
# The miss path (issue 25, target 1): `flashpack bench io` on a Huffman and a raw pack of the
# Qwen3-30B-A3B layer shape (8 layers), into $OUT/io.md.
io_bench() {
  w=/root/fpbench; mkdir -p "$w"
  # The same source as bench_gpu.py's `uniform` model (reused when it is there).
  if [ ! -f "$w/uniform/config.json" ]; then
    make_fixture --out "$w/uniform" --tokenizer-from .gpu/p2/tok --arch qwen3_moe --hidden 2048 \
      --experts 128 --top-k 8 --moe-intermediate 768 --heads 16 --kv-heads 4 --head-dim 128 \
      --vocab 8192 --layers 8 >/dev/null
  fi
  [ -f "$w/io-huffman.flashpack" ] || flashpack convert "$w/uniform" -o "$w/io-huffman.flashpack" --codec huffman --quiet
  [ -f "$w/io-raw.flashpack" ] || flashpack convert "$w/uniform" -o "$w/io-raw.flashpack" --codec raw --quiet
  for p in huffman raw; do
    echo "### $p pack, MLX on the GPU"
    flashpack bench io "$w/io-$p.flashpack" "$@"
    echo
  done | tee "${OUT:-.}/io.md"
}
case "${1:-}" in
  prepare)
    bash ../shared/gpu/prepare.sh
    mkdir -p .gpu/p2/whl .gpu/p2/tok
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_35_x86_64 -d .gpu/p2/whl mlx==0.32.4 mlx-lm==0.32.2
    cp fixtures/qwen3moe-tiny/tokenizer.json fixtures/qwen3moe-tiny/tokenizer_config.json .gpu/p2/tok/
    du -sh .gpu/p1 .gpu/p2
    ;;
  device)
    shift
    bash .gpu/p2/install.sh
    python3 -m pip install -q --no-deps --no-index --disable-pip-version-check .gpu/p2/whl/*.whl
    python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
    base_wrapper
    bench "$@"
    ;;
  more)
    # Another call on the same warm machine: more repetitions, one table from all of them.
    shift
    command -v flashpack-base >/dev/null || base_wrapper
    bench "$@"
    ;;
  io)
    # `flashpack bench io` (installs first on a machine not yet set up).
    shift
    command -v flashpack >/dev/null || bash .gpu/p2/install.sh
    io_bench "$@"
    ;;
  trace)
    # Where a streamed token's time goes, per layer (scripts/trace_stream.py) on the 8-layer
    # uniform model of the Qwen3-30B-A3B layer shape, convert's default pack; installs first on
    # a machine not yet set up. Options go to trace_stream.py (--variants, --max-tokens).
    shift
    trace_model
    flashpack run "$w/trace.flashpack" --prompt warm --max-tokens 4 >/dev/null 2>&1 || true
    PYTHONUNBUFFERED=1 python3 scripts/trace_stream.py "$w/trace.flashpack" --out "${OUT:-.}" "$@"
    kcache_save
    ;;
  batch)
    # Issue 27, item 6: decode throughput of 1, 2, 4 and 8 sequences at once, all experts
    # resident (`flashpack bench serve --batch-only`), on the 8-layer uniform model of the
    # Qwen3-30B-A3B layer shape, convert's default pack; installs first on a machine not yet set
    # up. Options go to `bench serve` (e.g. --reps 5). Out: $OUT/batch.md.
    shift
    trace_model
    flashpack bench serve "$w/trace.flashpack" --batch-only --batch-sizes 1,2,4,8 "$@" | tee "${OUT:-.}/batch.md"
    kcache_save
    ;;
  plan)
    # Issue 31: `flashpack plan`'s predicted decode tok/s against `flashpack run`'s measured ones at
    # 100/50/25/12% of the experts (scripts/bench_plan.py), on the 8-layer uniform model of the
    # Qwen3-30B-A3B layer shape, converted with --profile; installs first on a
    # machine not yet set up. Options go to bench_plan.py (--reps, --tokens, --budgets). The table
    # comes back as $OUT/plan.md, every plan and run as $OUT/plan-bench.json.
    shift
    trace_model
    # With a routing profile (the built-in calibration text), plan's hit rates come from the routing
    # the model has instead of the uniform floor (the ninth session's run without one: the floor held,
    # 2.3-5.2x below the measured speed under a budget).
    [ -f "$w/plan.flashpack" ] || flashpack convert "$w/uniform" -o "$w/plan.flashpack" --profile --quiet
    flashpack run "$w/plan.flashpack" --prompt warm --max-tokens 4 >/dev/null 2>&1 || true
    rc=0
    PYTHONUNBUFFERED=1 python3 scripts/bench_plan.py --pack "$w/plan.flashpack" \
      --flashpack "$(command -v flashpack)" --measure --out "${OUT:-.}" "$@" \
      | tee "${OUT:-.}/plan.md" || rc=$?
    kcache_save
    exit $rc
    ;;
  prepare-base)
    # The binary of another commit (default: main's first parent of this work) for --baseline-bin.
    shift
    rev=${1:-HEAD~1}
    rm -rf /tmp/fp-base && git worktree add -f /tmp/fp-base "$rev" >/dev/null
    (cd /tmp/fp-base && CARGO_TARGET_DIR=/tmp/fp-base-target cargo build --release -q)
    strip -o /tmp/fp-base.bin /tmp/fp-base-target/release/flashpack
    zstd -q -19 -T0 -f /tmp/fp-base.bin -o .gpu/p2/bin/flashpack_base.bin.zst
    git worktree remove --force /tmp/fp-base
    du -sh .gpu/p2
    ;;
  archs)
    # Every architecture against mlx-lm, 8 and 32 layers (scripts/bench_archs_gpu.py, issue 26);
    # installs first when this machine has not been set up (call 2 of the recipe). Resumable:
    # repeat the same command (e.g. with --budget-s 500) on the same warm machine until the
    # table has no "Incomplete" line; each call adds what fits. Restores the compiled-kernel
    # cache when carried and saves it to $OUT, as `device` does.
    shift
    command -v flashpack >/dev/null || bash .gpu/p2/install.sh
    python3 -c 'import mlx_lm' 2>/dev/null ||
      python3 -m pip install -q --no-deps --no-index --disable-pip-version-check .gpu/p2/whl/*.whl
    kcache_restore
    rc=0
    PYTHONUNBUFFERED=1 python3 scripts/bench_archs_gpu.py --tokenizer-from .gpu/p2/tok --out "${OUT:-.}" "$@" || rc=$?
    kcache_save
    exit $rc
    ;;
  kernels|graphs)
    # flashpack against mlx-lm per decoded token (issue 26), on the archs benchmark's 8-layer
    # model of --arch (default qwen3_moe), built first when /root/fparch does not have it:
    # `kernels` kernel by kernel under ncu (scripts/kernel_profile.py), `graphs` the CUDA graphs
    # MLX launches (scripts/graph_profile.py). Options after --arch go to that script.
    mode=$1
    shift
    arch=qwen3_moe
    if [ "${1:-}" = "--arch" ]; then arch=$2; shift 2; fi
    command -v flashpack >/dev/null || bash .gpu/p2/install.sh
    python3 -c 'import mlx_lm' 2>/dev/null ||
      python3 -m pip install -q --no-deps --no-index --disable-pip-version-check .gpu/p2/whl/*.whl
    kcache_restore
    w=/root/fparch
    [ -f "$w/$arch-L8.flashpack" ] ||
      python3 scripts/bench_archs_gpu.py --tokenizer-from .gpu/p2/tok --work "$w" --out /tmp/archs-out \
        --archs "$arch" --layers 8 --build-only >&2
    script=scripts/kernel_profile.py
    [ "$mode" = graphs ] && script=scripts/graph_profile.py
    rc=0
    PYTHONUNBUFFERED=1 python3 "$script" --pack "$w/$arch-L8.flashpack" \
      --mlx "$w/$arch-L8-q4" --out "${OUT:-.}" "$@" || rc=$?
    exit $rc
    ;;
  *)
    echo "usage: bash scripts/bench_gpu.sh prepare | prepare-base [REV] | device|more [bench_gpu.py options] | io [bench io options] | trace [trace_stream.py options] | batch [bench serve options] | plan [bench_plan.py options] | archs [bench_archs_gpu.py options] | kernels|graphs [--arch A] [kernel_profile.py|graph_profile.py options]" >&2
    exit 2
    ;;
esac
