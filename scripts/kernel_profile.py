#!/usr/bin/env python3
"""Device kernels per decoded token, flashpack against mlx-lm, kernel by kernel (issue 26).

Where flashpack's decode is device-bound and mlx-lm's is not, the ratio of tok/s cannot say which
kernels take the extra time. This runs each runtime twice under Nsight Compute (`ncu`, the one CUDA
profiler the device machine has), generating --short and --long greedy tokens from the same prompt,
and takes the difference: what a decode step adds, without loading and prefill. Per kernel name:
launches per token and device microseconds per token (`gpu__time_duration.sum`), for both runtimes.

    python3 scripts/kernel_profile.py --pack P.flashpack --mlx Q4_FOLDER [--short 4 --long 12]

(`bash scripts/bench_gpu.sh kernels --arch qwen3_moe` builds the archs benchmark's 8-layer model
first when it is missing, then runs this.) Out: kernels.md (and kernels.json) in --out.

ncu replays every kernel to time it alone, so the times are each kernel's own duration, without
the gaps between launches; the launch counts are exact. A run of N tokens takes about a second per
hundred kernels.
"""
import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys

PROMPT = "The history of the city"

MLX_GEN = r"""
import sys
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
model, tok = load(sys.argv[1])
ids = tok.encode(sys.argv[2], add_special_tokens=False)
n = 0
for r in stream_generate(model, tok, ids, max_tokens=int(sys.argv[3]), sampler=make_sampler(0.0)):
    n = r.generation_tokens
print(n)
"""


def ncu(cmd, log):
    """Runs `cmd` under ncu; per kernel name: [launches, total ns]."""
    full = ["ncu", "--csv", "--print-units", "base", "--metrics", "gpu__time_duration.sum",
            "--target-processes", "all", "--log-file", log] + cmd
    p = subprocess.run(full, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"ncu failed ({p.returncode}): {' '.join(full)}\n{p.stderr[-3000:]}")
    text = open(log).read()
    # ncu writes "==PROF==" lines before the CSV.
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"no kernels in {log}: {text[-2000:]}")
    out = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = short(row["Kernel Name"])
        v = float(row["Metric Value"].replace(",", ""))
        c = out.setdefault(name, [0, 0.0])
        c[0] += 1
        c[1] += v
    return out


def short(name):
    """A kernel's name without its argument list, templates kept short."""
    name = re.sub(r"\(.*\)$", "", name.strip())
    name = re.sub(r"^void ", "", name)
    return name[:110]


def per_token(short_run, long_run, tokens):
    keys = set(short_run) | set(long_run)
    out = {}
    for k in keys:
        a = short_run.get(k, [0, 0.0])
        b = long_run.get(k, [0, 0.0])
        n = (b[0] - a[0]) / tokens
        t = (b[1] - a[1]) / tokens / 1e3  # us
        if n or t:
            out[k] = {"launches": n, "us": t}
    return out


def parse_args(doc, work):
    """The options both profilers take (this one and graph_profile.py), parsed; the output and
    work folders made, and mlx-lm's generator written as `a.gen`."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--mlx", required=True, help="the mlx-lm folder the pack was converted from")
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--binary", default="flashpack")
    ap.add_argument("--fp-env", action="append", default=[],
                    help="NAME:K=V[,K=V]: flashpack with this environment, as one more runtime "
                    "(graph_profile.py)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--work", default=work)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    a.gen = os.path.join(a.work, "mlx_gen.py")
    with open(a.gen, "w") as f:
        f.write(MLX_GEN)
    return a


def command(a, rt, n):
    """Runtime `rt`'s command for `n` greedy tokens: mlx-lm's generator, else flashpack."""
    if rt == "mlx":
        return [sys.executable, a.gen, a.mlx, a.prompt, str(n)]
    return [a.binary, "run", a.pack, "--prompt", a.prompt, "--raw", "--max-tokens", str(n)]


def main():
    a = parse_args(__doc__, "/tmp/kprof")
    runs = {}
    for rt in ("fp", "mlx"):
        got = []
        for n in (a.short, a.long):
            cmd = command(a, rt, n)
            log = os.path.join(a.work, f"ncu-{rt}-{n}.csv")
            print(f"{rt}, {n} tokens: {' '.join(cmd)}", file=sys.stderr, flush=True)
            got.append(ncu(cmd, log))
        runs[rt] = per_token(got[0], got[1], a.long - a.short)
    names = sorted(set(runs["fp"]) | set(runs["mlx"]),
                   key=lambda k: -(runs["fp"].get(k, {}).get("us", 0)
                                   + runs["mlx"].get(k, {}).get("us", 0)))
    tot = {rt: (sum(v["launches"] for v in r.values()), sum(v["us"] for v in r.values()))
           for rt, r in runs.items()}
    lines = [
        f"Per decoded token (runs of {a.long} and {a.short} greedy tokens, the difference over "
        f"{a.long - a.short}): kernel launches and device time (`ncu` gpu__time_duration.sum, each "
        "kernel timed alone).",
        "",
        f"- flashpack: {tot['fp'][0]:.1f} launches, {tot['fp'][1]:.1f} us per token",
        f"- mlx-lm: {tot['mlx'][0]:.1f} launches, {tot['mlx'][1]:.1f} us per token",
        "",
        "| kernel | fp launches/tok | fp us/tok | mlx-lm launches/tok | mlx-lm us/tok | fp - mlx-lm us |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in names:
        f, m = runs["fp"].get(k, {}), runs["mlx"].get(k, {})
        lines.append(f"| `{k}` | {f.get('launches', 0):.1f} | {f.get('us', 0):.1f} | "
                     f"{m.get('launches', 0):.1f} | {m.get('us', 0):.1f} | "
                     f"{f.get('us', 0) - m.get('us', 0):+.1f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "kernels.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump({"runs": runs, "totals": tot, "short": a.short, "long": a.long}, f, indent=1)


if __name__ == "__main__":
    main()
