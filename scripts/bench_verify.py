#!/usr/bin/env python3
"""What checking checksums at run time costs: `flashpack run` against `run --no-verify`.

In: packs, the flashpack binary. Out: a Markdown table on stdout, one row per pack and budget,
of medians over interleaved fresh processes (the pack dropped from the page cache before each):
whole-process wall and CPU time, and the ratio verify / --no-verify of each; and the load
threads' blake3 time as a share of their read + decode + copy time (`expert_cache.thread_ms`).

  cargo build --release
  python3 scripts/bench_verify.py --flashpack target/release/flashpack tiny.flashpack big.flashpack

docs/benchmarks.md ("Verification cost") says how the packs were made.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def evict(path):
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run(binary, pack, extra, prompt, max_tokens):
    evict(pack)
    cmd = [binary, "run", pack, "--prompt", prompt, "--max-tokens", str(max_tokens), "--raw",
           "--json", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"flashpack failed ({' '.join(cmd)}):\n{p.stderr}")
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    stats["wall_s"] = wall
    stats["cpu_s_total"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats["text"] = p.stdout
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packs", nargs="+")
    ap.add_argument("--flashpack", default="target/release/flashpack")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="The history of the world is a story about")
    ap.add_argument("--budgets", default="resident,25%",
                    help="comma separated: resident, or an --expert-budget value")
    a = ap.parse_args()
    budgets = a.budgets.split(",")
    configs = []
    for pack in a.packs:
        for b in budgets:
            extra = [] if b == "resident" else ["--expert-budget", b]
            for verify in [True, False]:
                configs.append((pack, b, verify, extra + ([] if verify else ["--no-verify"])))
    res = {(p, b, v): [] for p, b, v, _ in configs}
    for i in range(a.reps):
        for pack, b, verify, extra in configs:
            res[(pack, b, verify)].append(run(a.flashpack, pack, extra, a.prompt, a.max_tokens))
        print(f"rep {i} done", file=sys.stderr)
    med = statistics.median
    print(f"\n{a.reps} fresh processes each, interleaved; {a.max_tokens} tokens generated; "
          "median.\n")
    print("| pack | experts | wall s verify / no-verify | ratio | CPU s verify / no-verify | ratio "
          "| first token s verify / no-verify | decode tok/s verify / no-verify | ratio "
          "| blake3 share of expert load time | same text |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for pack in a.packs:
        for b in budgets:
            on, off = res[(pack, b, True)], res[(pack, b, False)]
            w1, w0 = med([s["wall_s"] for s in on]), med([s["wall_s"] for s in off])
            c1, c0 = med([s["cpu_s_total"] for s in on]), med([s["cpu_s_total"] for s in off])
            shares = []
            for s in on:
                t = s["expert_cache"]["thread_ms"]
                shares.append(t["verify"] / max(t["read"] + t["verify"] + t["decode"]
                                                + t["scatter"], 1e-9))
            same = all(s["text"] == on[0]["text"] for s in on + off)
            g = lambda runs, k: med([s["generation"][k] for s in runs])
            f1, f0 = g(on, "time_to_first_token_s"), g(off, "time_to_first_token_s")
            d1, d0 = g(on, "decode_tokens_per_s"), g(off, "decode_tokens_per_s")
            label = "all resident" if b == "resident" else f"--expert-budget {b}"
            print(f"| {os.path.basename(pack)} | {label} | {w1:.2f} / {w0:.2f} | {w1 / w0:.3f}x "
                  f"| {c1:.2f} / {c0:.2f} | {c1 / c0:.3f}x | {f1:.3f} / {f0:.3f} "
                  f"| {d1:.1f} / {d0:.1f} | {d1 / max(d0, 1e-9):.3f}x "
                  f"| {100 * med(shares):.1f}% | {same} |")


if __name__ == "__main__":
    main()
