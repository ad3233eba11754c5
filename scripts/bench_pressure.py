#!/usr/bin/env python3
"""Memory pressure in the middle of a run (issue 31, item 3; docs/benchmarks.md "Memory pressure").

    python3 scripts/bench_pressure.py --flashpack BIN --pack PACK [--reps 3] [--tokens 64] [--to 25]
                                      [--prompt-chars 100]

Runs, interleaved, `REPS` times each (greedy, the first PROMPT_CHARS characters of README.md as
a raw prompt, every expert resident unless said):
- calm: a pressure script that never shows pressure;
- static: `--expert-budget TO%` under the same calm script (what the pressured phase runs at);
- pressured: a script (FLASHPACK_PRESSURE_SCRIPT) whose readings, one per forward pass, are calm
  for the first third of the tokens, then short by what takes the cache to TO% of its budget,
  then inside the band (nothing changes) until two thirds, then plentiful (the cache grows back
  after three calm readings);
- floor: the same with nothing available, which takes the cache to its floor (one token's
  experts of one layer) and back.
Prints per run kind: decode tok/s median [min-max], whether the tokens equal the calm run's, and
for the pressured kinds (first repetition) the run report's memory just before the first resize,
the least just after one, and just after the last: RSS and MLX's active bytes; each resize's
time; and the most RSS of the process sampled every 10 ms from /proc/PID/statm (Linux: no
transient above the budget while a pool is reallocated).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time

PAGE = os.sysconf("SC_PAGESIZE")


def run(cmd, env):
    """Runs `cmd`, sampling its RSS; returns (report, stdout, rss samples in bytes)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/statm") as f:
                    samples.append(int(f.read().split()[1]) * PAGE)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    out, err = p.communicate()
    done.set()
    t.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}: {err[-1500:]}")
    if not samples:
        samples = [0]
    return json.loads(err.strip().splitlines()[-1]), out, samples


def script(max_bytes, target, tokens, floor):
    """The pressured run's readings, one per forward pass (2 for the prompt, one per token)."""
    total = 10 * max_bytes
    low, high = total // 20, total // 10
    mid = low + (high - low) // 2
    passes = tokens + 1
    first, second = passes // 3, 2 * passes // 3
    if floor:
        drop = ["available=0 repeat=2"]
    else:
        # One reading that asks for `target` bytes: the policy gives back what brings the
        # available memory to the middle of the band, mid - available.
        av = mid - (max_bytes - target)
        drop = [f"available={av}B" if av > 0 else "available=0"]
    lines = [f"total={total}B available={high}B repeat={first}"] + drop + [
        f"available={low + (high - low) // 4}B repeat={second - first - len(drop)}",
        f"available={total}B",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flashpack", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=100)
    ap.add_argument("--to", type=int, default=25, help="percent of the budget (at least 25)")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prompt = open(os.path.join(root, "README.md")).read()[:a.prompt_chars]
    base = [a.flashpack, "run", a.pack, "--prompt", prompt, "--raw", "--max-tokens",
            str(a.tokens), "--json"]
    tmp = tempfile.mkdtemp()

    def write(name, text):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    calm = write("calm.txt", "total=1TiB available=1TiB\n")
    report, _, _ = run(base, {"FLASHPACK_PRESSURE_SCRIPT": calm})
    max_bytes = report["pressure"]["max_expert_budget_bytes"]
    target = max_bytes * a.to // 100
    kinds = {
        "calm": (base, calm),
        f"static {a.to}%": (base + ["--expert-budget", f"{a.to}%"], calm),
        f"pressured 100 -> {a.to} -> 100%": (base, write("drop.txt",
                                                         script(max_bytes, target, a.tokens, False))),
        "floor 100 -> floor -> 100%": (base, write("floor.txt",
                                                   script(max_bytes, target, a.tokens, True))),
    }
    res = {}
    for rep in range(a.reps):
        order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
        for k in order:
            cmd, path = kinds[k]
            res.setdefault(k, []).append(run(cmd, {"FLASHPACK_PRESSURE_SCRIPT": path}))
    ref = res["calm"][0][0]["token_ids"]
    mb = lambda b: "-" if b is None else f"{b / 1e6:.0f}"
    print(f"pack {a.pack}: expert cache {max_bytes / 1e6:.0f} MB all resident, "
          f"{a.tokens} tokens, {a.reps} repetitions, interleaved")
    print("| run | decode tok/s | same tokens | resizes (shrink/grow) | RSS MB before / least / "
          "after | MLX active MB before / least / after | resize ms (each) | sampled RSS MB most |")
    print("|---|---|---|---|---|---|---|---|")
    for k, runs in res.items():
        tps = [r[0]["generation"]["decode_tokens_per_s"] for r in runs]
        same = all(r[0]["token_ids"] == ref for r in runs)
        p = runs[0][0]["pressure"]
        ch = p["changes"]
        samples = runs[0][2]
        def three(key):
            least = min(c["after"][key] or 0 for c in ch)
            return f"{mb(ch[0]['before'][key])} / {mb(least)} / {mb(ch[-1]['after'][key])}"
        rss, mlx = (three("rss_bytes"), three("mlx_active_bytes")) if ch else ("-", "-")
        ms = ", ".join(f"{c['ms']:.0f}" for c in ch) or "-"
        print(f"| {k} | {statistics.median(tps):.1f} [{min(tps):.1f}-{max(tps):.1f}] | "
              f"{'yes' if same else 'NO'} | {p['shrinks']}/{p['grows']} | {rss} | {mlx} | {ms} | "
              f"{mb(max(samples))} |")


if __name__ == "__main__":
    main()
