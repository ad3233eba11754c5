#!/usr/bin/env python3
"""`flashpack plan`'s predicted decode speed against `flashpack run`'s measured one (issue 31).

    python3 scripts/bench_plan.py --pack PACK [--flashpack BIN] [--reps 3] [--tokens 64]
                                  [--budgets 50,25,12] [--prompt-chars 600] [--measure] [--out DIR]

Each repetition runs `flashpack plan PACK --json` (its compute probe times this machine then,
under the same load as the runs beside it; the disk's numbers come from plan's cache unless
--measure) and then `flashpack run PACK --expert-budget B%` at each budget (and with every expert
resident, the 100% row), greedy, on the first 600 characters of README.md (--prompt-chars) as a
raw prompt, each
in a fresh process with the pack dropped from the page cache first (Linux). Budgets run in a
rotated order each repetition, so load from other work hits them alike.

Prints a Markdown table: per budget the predicted decode tok/s (median over the plan runs) and
the measured one (median [min-max]), measured / predicted, whether that is within 25%, and the
predicted and measured expert hit rate and MB read per decoded token (decode phase only: the
counters at the first token subtracted). Raw numbers go to OUT/plan-bench.json.
Times are never asserted on; the 25% target is printed as met or missed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def evict(path):
    """Drops a file from the OS page cache (Linux; elsewhere a no-op)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def flashpack_bin(a):
    if a.flashpack:
        return str(Path(a.flashpack).resolve())
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return str(Path(target) / "release" / "flashpack")


def plan(a):
    cmd = [flashpack_bin(a), "plan", a.pack, "--json"]
    if a.measure:
        cmd.append("--measure")
        a.measure = False  # once: later plans use the numbers just cached
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}:\n{p.stderr}")
    return json.loads(p.stdout)


def run(a, budget, prompt):
    cmd = [flashpack_bin(a), "run", a.pack, "--prompt", prompt, "--raw", "--max-tokens",
           str(a.tokens), "--json"]
    if budget != "100%":
        cmd += ["--expert-budget", budget]
    evict(a.pack)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} {budget}:\n{p.stderr[-2000:]}")
    s = json.loads([l for l in p.stderr.splitlines() if l.startswith("{")][-1])
    g = s["generation"]
    c = s["expert_cache"]
    first = s.get("at_first_token") or {}
    hits = sum(c["hits_per_layer"].values()) - first.get("hits", 0)
    misses = sum(c["misses_per_layer"].values()) - first.get("misses", 0)
    decoded = max(g["generated_tokens"] - 1, 1)
    return {
        "decode_tok_s": g["decode_tokens_per_s"],
        "prefill_tok_s": g["prefill_tokens_per_s"],
        "prompt_tokens": g["prompt_tokens"],
        "hit_rate": hits / max(hits + misses, 1) if budget != "100%" else 1.0,
        "mb_per_token": (c["bytes_read"] - first.get("bytes_read", 0)) / decoded / 1e6
        if first or budget != "100%" else 0.0,
        "cpu_ms_per_token": s["cpu_s"]["decode"] * 1e3 / decoded,
        "wall_s": wall,
    }


def row_of(report, label):
    opt = report["options"][0]
    return next(b for b in opt["budgets"] if b["label"] == label)


def cell(xs, fmt="{:.1f}"):
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--flashpack", help="the binary (default $CARGO_TARGET_DIR/release/flashpack)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budgets", default="50,25,12", help="expert budgets in percent")
    ap.add_argument("--prompt-chars", type=int, default=600,
                    help="characters of README.md in the prompt (a slow model: fewer)")
    ap.add_argument("--no-resident", action="store_true", help="leave out the 100%% row")
    ap.add_argument("--measure", action="store_true", help="measure the disk again (first plan)")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    prompt = (REPO / "README.md").read_text()[:a.prompt_chars]
    budgets = [f"{b.strip()}%" for b in a.budgets.split(",") if b.strip()]
    if not a.no_resident:
        budgets = ["100%"] + budgets
    predicted = {b: [] for b in budgets}
    measured = {b: [] for b in budgets}
    plans = []
    for rep in range(a.reps):
        report = plan(a)
        plans.append(report)
        for b in budgets:
            predicted[b].append(row_of(report, b))
        order = budgets[rep % len(budgets):] + budgets[:rep % len(budgets)]
        for b in order:
            measured[b].append(run(a, b, prompt))
        print(f"repetition {rep + 1}/{a.reps} done", file=sys.stderr)
    r = plans[-1]
    rates = r["rates"]
    print(f"pack: {a.pack} ({r['model']['architecture']}, {r['model']['layers']} layers, "
          f"{r['model']['experts']} experts, top-{r['model']['experts_per_token']}); "
          f"{a.reps} repetition(s), {a.tokens} tokens, prompt {measured[budgets[0]][0]['prompt_tokens']} "
          f"tokens")
    print(f"plan's rates (last run): a layer's misses {rates['disk']['latency_s'] * 1e3:.2f} ms then "
          f"{rates['disk']['bytes_per_s'] / 1e9:.2f} GB/s ({rates['disk_origin']}); compute "
          f"{rates['compute']['decode_s'] * 1e3:.1f} ms/token resident, "
          f"{rates['compute']['streamed_decode_s'] * 1e3:.1f} ms streamed")
    print()
    print("| experts resident | predicted decode tok/s | measured decode tok/s | measured / predicted "
          "| within 25% | hit rate predicted / measured | MB read per token predicted / measured "
          "| prefill tok/s predicted / measured |")
    print("|---|---:|---:|---:|---|---|---|---|")
    out = []
    for b in budgets:
        p = statistics.median(x["decode_tokens_per_s"] for x in predicted[b])
        m = [x["decode_tok_s"] for x in measured[b]]
        ratio = statistics.median(m) / p
        ok = abs(ratio - 1) <= 0.25
        ph = statistics.median(x["hit_rate"] for x in predicted[b])
        mh = statistics.median(x["hit_rate"] for x in measured[b])
        pb = statistics.median(x["bytes_read_per_token"] for x in predicted[b]) / 1e6
        mbt = statistics.median(x["mb_per_token"] for x in measured[b])
        pp = statistics.median(x["prefill_tokens_per_s"] for x in predicted[b])
        mp = statistics.median(x["prefill_tok_s"] for x in measured[b])
        print(f"| {b} | {p:.1f} | {cell(m)} | {ratio:.2f} | {'met' if ok else 'missed'} | "
              f"{ph:.2f} / {mh:.2f} | {pb:.3f} / {mbt:.3f} | {pp:.1f} / {mp:.1f} |")
        out.append({"budget": b, "predicted": predicted[b], "measured": measured[b],
                    "ratio": ratio})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "plan-bench.json", "w") as f:
        json.dump({"pack": a.pack, "plans": plans, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
