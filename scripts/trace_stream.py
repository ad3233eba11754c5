#!/usr/bin/env python3
"""Where a streamed token's time goes, layer by layer (issue 25's profiling, on the GPU device).

Runs `flashpack run --json` on one pack under several variants (an expert budget, environment
switches), each after dropping the page cache and with `FLASHPACK_TRACE` set, so the runtime
writes one CSV line per routed layer (src/run/stream.rs, `Trace`): host time building the layer,
the routing's eval wait, misses and the load's wall time, the slot table, the rest of the stall,
and the load steps' thread times. Prints, per variant, decode tok/s and the per-layer means for
layers without and with misses; writes the CSVs and `trace.json` into --out.

  python3 scripts/trace_stream.py PACK --out DIR [--max-tokens 64] [--variants NAME,...]
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import time
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import PARAGRAPH, PROMPT, decode_stats, drop_caches  # noqa: E402

# A prompt of about 1,900 tokens (bench_gpu.py's long prompt): time to first token.
LONG = PARAGRAPH * (1900 // 34)

# name -> (run arguments, environment)
VARIANTS = {
    "resident": ([], {}),
    # Issue 26 (eighth session): a layer in one run of a multi-layer pool computes on a view of
    # its rows (the default) or through the whole pool and a slot table (views-off, before);
    # MLX's per-graph byte limit (MLX_MAX_MB_PER_BUFFER) raised so big pools close no graph.
    "resident views-off": ([], {"FLASHPACK_POOL_VIEWS": "0"}),
    "resident bigmb": ([], {"MLX_MAX_MB_PER_BUFFER": "1000000"}),
    "90%": (["--expert-budget", "90%"], {}),
    "90% bigmb": (["--expert-budget", "90%"], {"MLX_MAX_MB_PER_BUFFER": "1000000"}),
    "50% bigmb": (["--expert-budget", "50%"], {"MLX_MAX_MB_PER_BUFFER": "1000000"}),
    # Host reads through a contiguous copy, queued behind everything scheduled (before 2026-12-07).
    "resident copy-read": ([], {"FLASHPACK_READ_COPY": "1"}),
    "50% copy-read": (["--expert-budget", "50%"], {"FLASHPACK_READ_COPY": "1"}),
    "25% copy-read": (["--expert-budget", "25%"], {"FLASHPACK_READ_COPY": "1"}),
    "50%": (["--expert-budget", "50%"], {}),
    "50% no-eager": (["--expert-budget", "50%"], {"FLASHPACK_NO_EAGER": "1"}),
    "50% no-graphs": (["--expert-budget", "50%"], {"MLX_USE_CUDA_GRAPHS": "0"}),
    "resident no-graphs": ([], {"MLX_USE_CUDA_GRAPHS": "0"}),
    # Issue 26: the router and activations op by op instead of compiled (fused) kernels.
    "resident no-compile": ([], {"FLASHPACK_COMPILE": "0"}),
    "50% one-read": (["--expert-budget", "50%"], {"FLASHPACK_READ_SPLIT_KIB": "0"}),
    "50% upload-after": (["--expert-budget", "50%"], {"FLASHPACK_UPLOAD_PARTS": "0"}),
    "50% ahead": (["--expert-budget", "50%"], {"FLASHPACK_AHEAD": "1"}),
    "25% ahead": (["--expert-budget", "25%"], {"FLASHPACK_AHEAD": "1"}),
    "12% ahead": (["--expert-budget", "12%"], {"FLASHPACK_AHEAD": "1"}),
    # Waits for the device that poll for up to 2 ms before they sleep, against sleeping at once
    # (the shim's spin_us, FLASHPACK_SPIN_US).
    "resident spin": ([], {"FLASHPACK_SPIN_US": "2000"}),
    "50% spin": (["--expert-budget", "50%"], {"FLASHPACK_SPIN_US": "2000"}),
    "50% ahead spin": (["--expert-budget", "50%"], {"FLASHPACK_AHEAD": "1", "FLASHPACK_SPIN_US": "2000"}),
    "resident no-spin": ([], {"FLASHPACK_SPIN_US": "0"}),
    "50% no-spin": (["--expert-budget", "50%"], {"FLASHPACK_SPIN_US": "0"}),
    "50% ahead no-spin": (["--expert-budget", "50%"], {"FLASHPACK_AHEAD": "1", "FLASHPACK_SPIN_US": "0"}),
    "50% ahead no-graphs": (["--expert-budget", "50%"],
                            {"FLASHPACK_AHEAD": "1", "MLX_USE_CUDA_GRAPHS": "0"}),
    "25%": (["--expert-budget", "25%"], {}),
    "12%": (["--expert-budget", "12%"], {}),
    # Target 2: prefetch against none at each budget.
    "50% no-prefetch": (["--expert-budget", "50%", "--no-prefetch"], {}),
    "25% no-prefetch": (["--expert-budget", "25%", "--no-prefetch"], {}),
    "12% no-prefetch": (["--expert-budget", "12%", "--no-prefetch"], {}),
    # Time to first token on the long prompt (4 tokens generated: the phase snapshot comes at the second). `warm long` goes first: the
    # first long prompt on a machine compiles the prefill's kernels, so it is not a measurement.
    "warm long": ([], {}),
    # A budgeted run's expert pools have other shapes than resident's: their kernels compile on
    # the first budgeted long prompt of a machine (as on a user's first run, not later ones).
    "warm 50% long": (["--expert-budget", "50%"], {}),
    "resident long": ([], {}),
    "50% long": (["--expert-budget", "50%"], {}),
    "25% long": (["--expert-budget", "25%"], {}),
    "12% long": (["--expert-budget", "12%"], {}),
    "50% no-prefetch long": (["--expert-budget", "50%", "--no-prefetch"], {}),
    # Reading ahead within a chunk: every guessed expert (divisor 0 off, 1 only those named for
    # an expert's average share of the entries, the default 4 a quarter of it).
    "50% chunk-votes-0 long": (["--expert-budget", "50%"], {"FLASHPACK_CHUNK_VOTES": "0"}),
    "50% chunk-votes-1 long": (["--expert-budget", "50%"], {"FLASHPACK_CHUNK_VOTES": "1"}),
    "25% no-prefetch long": (["--expert-budget", "25%", "--no-prefetch"], {}),
    # How many sparse layers a chunk reads before its first routing (default 3).
    "50% pass-ahead-1 long": (["--expert-budget", "50%"], {"FLASHPACK_PASS_AHEAD": "1"}),
    "50% pass-ahead-0 long": (["--expert-budget", "50%"], {"FLASHPACK_PASS_AHEAD": "0"}),
    "50% chunk-votes-16 long": (["--expert-budget", "50%"], {"FLASHPACK_CHUNK_VOTES": "16"}),
}


def summarize(path, tokens):
    with open(path) as f:
        rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(f)]
    # The prompt's layers come first; decode layers route one token's k entries.
    k = min(r["entries"] for r in rows) if rows else 0
    dec = [r for r in rows if r["entries"] == k]
    out = {"layers_routed": len(dec)}
    for name, sel in [("hit", [r for r in dec if r["misses"] == 0 and r.get("ahead", 0) == 0]),
                      ("miss", [r for r in dec if r["misses"] > 0]),
                      ("ahead stood", [r for r in dec if r.get("ahead") == 1]),
                      ("ahead redone", [r for r in dec if r.get("ahead") == 2])]:
        if not sel:
            continue
        mean = lambda c: statistics.fmean(r[c] for r in sel)
        out[name] = {c: round(mean(c), 1) for c in sel[0]
                     if c not in ("layer", "entries", "ahead", "read_us", "verify_us", "decode_us",
                                  "scatter_us")}
        out[name]["count"] = len(sel)
        if name == "miss":
            m = sum(r["misses"] for r in sel)
            out[name]["load_us_per_miss"] = round(sum(r["load_us"] for r in sel) / m, 1)
    per_tok = lambda c: sum(r[c] for r in dec) / max(tokens, 1) / 1e3
    out["per_token_ms"] = {c: round(per_tok(c), 2)
                           for c in ("host_us", "eval_us", "load_us", "table_us", "other_us")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--binary", default="flashpack")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for name in a.variants.split(","):
        args, env = VARIANTS[name]
        trace = os.path.join(a.out, "trace-" + name.replace(" ", "_").replace("%", "pct") + ".csv")
        drop_caches()
        long = name.endswith(" long")
        cmd = [a.binary, "run", a.pack, "--prompt", LONG if long else PROMPT,
               "--max-tokens", "4" if long else str(a.max_tokens), "--raw", "--json"] + args
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, **env, "FLASHPACK_TRACE": trace})
        wall = time.time() - t0
        if p.returncode != 0:
            results[name] = {"error": p.stderr[-1500:]}
            print(f"{name}: failed: {p.stderr[-300:]}", flush=True)
            continue
        s = json.loads(p.stderr.strip().splitlines()[-1])
        g = s["generation"]
        n = g["generated_tokens"]
        r = {"tps": g["decode_tokens_per_s"], "ttft_s": g["time_to_first_token_s"],
             "build_ms": g.get("host_build_ms", 0) / max(n - 1, 1),
             "text": p.stdout[:120],
             # From the process's start (opening the pack, a resident run's expert loads) to exit.
             "wall_s": round(wall, 3)}
        if long:
            first = s.get("at_first_token") or {}
            r["prompt_tokens"] = g["prompt_tokens"]
            r["mb_read_prompt"] = first.get("bytes_read", 0) / 1e6
            r["stall_ms_prompt"] = first.get("stall_ms", 0.0)
            r["eval_wait_ms_prompt"] = first.get("eval_wait_ms", 0.0)
        else:
            # Target 2: decode bytes against (decode misses x one expert's stored bytes).
            d = decode_stats(s)
            c = s["expert_cache"]
            first = s.get("at_first_token") or {}
            misses = sum(c["misses_per_layer"].values()) - first.get("misses", 0)
            per_expert = c["bytes_read"] / max(c["experts_loaded"], 1)
            read = c["bytes_read"] - first.get("bytes_read", 0)
            r.update({"hit": d["hit"], "mb_per_tok": round(d["mb_per_tok"], 2),
                      "misses_per_tok": round(misses / max(n, 1), 2),
                      "read_over_misses": round(read / (misses * per_expert), 3) if misses else None,
                      "stall_ms_per_tok": round(d["stall_ms_per_tok"], 2)})
            if os.path.exists(trace) and os.path.getsize(trace) > 200:
                r["trace"] = summarize(trace, n)
        results[name] = r
        print(f"{name}: {r['tps']:.1f} tok/s, first token {r['ttft_s']:.3f} s, build "
              f"{r['build_ms']:.2f} ms/tok; "
              f"{json.dumps({k: v for k, v in r.items() if k not in ('text', 'tps')})}", flush=True)
    with open(os.path.join(a.out, "trace.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
