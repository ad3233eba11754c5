#!/usr/bin/env python3
"""Two flashpack binaries on one pack, interleaved, at 100/50/25% of the experts (CPU A/B).

    python3 scripts/ab_budgets.py --new BIN --base BIN --pack PACK [--reps 5] [--tokens 64]

Each repetition runs both binaries (in alternating order) at each budget, greedy, on the first 600
characters of README.md as a raw prompt. Prints per budget: decode tok/s median [min-max] of base
and new, their ratio, CPU ms per decoded token (base / new), and whether every run gave the same
tokens. bench_runtime.py budgets is the fuller table; this one is quicker and interleaves the two
binaries, so load from other work hits both alike.
"""
import argparse
import json
import os
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prompt = open(os.path.join(root, "README.md")).read()[:600]
    bins = {"new": a.new, "base": a.base}
    res = {}
    for rep in range(a.reps):
        for budget in ("100%", "50%", "25%"):
            for b in (("new", "base") if rep % 2 == 0 else ("base", "new")):
                cmd = [bins[b], "run", a.pack, "--prompt", prompt, "--raw", "--max-tokens",
                       str(a.tokens), "--json"]
                if budget != "100%":
                    cmd += ["--expert-budget", budget]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd[:3])}: {p.stderr[-1500:]}")
                s = json.loads(p.stderr.strip().splitlines()[-1])
                g = s["generation"]
                cpu = s["cpu_s"]["decode"] * 1e3 / max(g["generated_tokens"] - 1, 1)
                res.setdefault((budget, b), []).append(
                    (g["decode_tokens_per_s"], cpu, s["token_ids"]))
    print("| experts resident | base tok/s | new tok/s | new / base | CPU ms/tok base / new "
          "| same tokens |")
    print("|---|---|---|---:|---|---|")
    for budget in ("100%", "50%", "25%"):
        n, o = res[(budget, "new")], res[(budget, "base")]
        mn = statistics.median(x[0] for x in n)
        mo = statistics.median(x[0] for x in o)
        same = all(x[2] == n[0][2] for x in n + o)
        print(f"| {budget} | {mo:.1f} [{min(x[0] for x in o):.1f}-{max(x[0] for x in o):.1f}] | "
              f"{mn:.1f} [{min(x[0] for x in n):.1f}-{max(x[0] for x in n):.1f}] | "
              f"{mn / mo:.3f}x | {statistics.median(x[1] for x in o):.2f} / "
              f"{statistics.median(x[1] for x in n):.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
