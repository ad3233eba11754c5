#!/usr/bin/env python3
"""Runtime benchmarks of `flashpack run` (docs/benchmarks.md, section "Runtime").

In: the flashpack binary, fixtures/qwen3moe-tiny, mlx-lm. Out: Markdown tables on stdout and
every raw measurement as JSON in WORK/results-<section>.json. Each run is a fresh process; the
pack (or model folder) is dropped from the OS page cache before each one (Linux
posix_fadvise DONTNEED), so reads come from the disk. Runs of the compared configurations are
interleaved (A B C A B C ...) so that load from other processes on the machine hits them alike;
tables give the median and the range over the repetitions.

  python scripts/bench_runtime.py mlx       # flashpack vs mlx-lm, all experts resident (issue 5)
  python scripts/bench_runtime.py budgets   # trained model at 100/50/25% of its experts (issue 6)
  python scripts/bench_runtime.py io        # pread vs mmap, lru/lfu/profile, prefetch on/off
  python scripts/bench_runtime.py large     # generated >= 8 GB model under a 4 GB budget
  python scripts/bench_runtime.py baseline  # peak RSS of the process on a tiny pack
  python scripts/bench_runtime.py disk FILE # sequential read bandwidth (dd after eviction)

Common options: --flashpack BIN (default $CARGO_TARGET_DIR/release/flashpack), --work DIR
(default /tmp/flashpack-bench), --reps N. Times are never asserted on; targets are printed as
"met"/"missed" next to the numbers.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "fixtures" / "qwen3moe-tiny"

# Fixed prompts. The trained model saw mostly Python (90%) and some prose (10%); its routing
# differs between the two (fixtures/qwen3moe-tiny/README.md), so both are used.
PROMPTS = {
    "code": (
        "import os\n"
        "import json\n"
        "\n"
        "\n"
        "def load_config(path, defaults=None):\n"
        '    """Read a JSON configuration file and merge it with the defaults.\n'
        "\n"
        "    Parameters\n"
        "    ----------\n"
        "    path : str\n"
        "        The file to read.\n"
        "    defaults : dict, optional\n"
        "        Values used when a key is missing.\n"
        '    """\n'
        "    config = dict(defaults or {})\n"
        "    if not os.path.exists(path):\n"
        "        return config\n"
        "    with open(path) as f:\n"
        "        data = json.load(f)\n"
        "    for key, value in data.items():\n"
    ),
    "prose": (
        "The committee met on Tuesday afternoon to consider the proposal for a new school "
        "in the northern part of the county. Several members said that the cost of the "
        "building would be too high for the taxpayers, while others argued that the children "
        "of the district had waited long enough. After a long discussion the chairman asked "
        "the members to vote, and the proposal was"
    ),
}


# ----------------------------------------------------------------------------- helpers


def evict(*paths):
    """Drops files (or every file under folders) from the OS page cache."""
    for p in paths:
        p = Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def cell(xs, fmt="{:.1f}"):
    """median [min-max] of a list."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(med(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def mb(x):
    return x / 1e6


def flashpack_bin(args):
    if args.flashpack:
        return str(Path(args.flashpack).resolve())
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return str(Path(target) / "release" / "flashpack")


def nice(args):
    """Optional scheduling priority for every measured process (the same for all of them)."""
    return ["nice", "-n", str(args.nice)] if args.nice else []


def run_flashpack(args, pack, extra, prompt, max_tokens, evict_paths=()):
    """One `flashpack run --json` in a fresh process; returns its stats plus text and wall."""
    evict(pack, *evict_paths)
    cmd = [
        *nice(args),
        flashpack_bin(args),
        "run",
        str(pack),
        "--prompt",
        prompt,
        "--max-tokens",
        str(max_tokens),
        "--raw",
        "--json",
        *extra,
    ]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"flashpack failed ({' '.join(cmd)}):\n{p.stderr}")
    line = [l for l in p.stderr.splitlines() if l.startswith("{")][-1]
    stats = json.loads(line)
    stats["text"] = p.stdout
    stats["wall_s"] = wall
    stats["cmd"] = cmd
    return stats


def load_results(path):
    return json.loads(path.read_text()) if path.exists() else {}


def save(args, section, data):
    out = Path(args.work) / f"results-{section}.json"
    out.write_text(json.dumps(data, indent=1))
    print(f"\n(raw results: {out})")


# ----------------------------------------------------------------------------- preparation


def prepare_tiny(args):
    """mlx-lm 4-bit folder of the trained fixture, and packs of the same codes."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mlx_dir = work / "qwen3moe-tiny-q4"
    if not (mlx_dir / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(TINY),
             "--mlx-path", str(mlx_dir), "-q", "--q-bits", "4", "--q-group-size", "64"],
            check=True,
        )
    packs = {}
    for codec in ["auto", "raw"]:
        pack = work / f"qwen3moe-tiny-q4-{codec}.flashpack"
        if not pack.exists():
            subprocess.run(
                [flashpack_bin(args), "convert", str(mlx_dir), "-o", str(pack), "--codec",
                 codec, "--quiet"],
                check=True,
            )
        packs[codec] = pack
    return mlx_dir, packs


# ----------------------------------------------------------------------------- mlx-lm


def mlx_once(a):
    """Worker (fresh process): mlx-lm's stream_generate, greedy, timed per token."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(a.model)  # evaluates every weight before the clock starts
    prompt = Path(a.prompt_file).read_text()
    ids = tok._tokenizer.encode(prompt, add_special_tokens=False)
    out = {"prompt_tokens": len(ids), "runs": []}
    for _ in range(a.repeat):
        stamps, cpu, tokens, last = [], [], [], None
        c0 = time.process_time()
        t0 = time.perf_counter()
        for r in stream_generate(
            model, tok, mx.array(ids), max_tokens=a.max_tokens, sampler=make_sampler(0.0)
        ):
            stamps.append(time.perf_counter())
            if len(cpu) < 1:
                cpu.append(time.process_time())
            tokens.append(r.token)
            last = r
        cpu.append(time.process_time())
        ttft = stamps[0] - t0
        decode_s = stamps[-1] - stamps[0]
        out["runs"].append(
            {
                "time_to_first_token_s": ttft,
                "prefill_tokens_per_s": len(ids) / ttft,
                # Same rule as flashpack: forward passes after the first token over their time.
                "decode_tokens_per_s": (len(tokens) - 1) / max(decode_s, 1e-9),
                "generated_tokens": len(tokens),
                # Process CPU seconds (all threads) of each phase. mlx-lm evaluates the next
                # token while it yields this one, so each phase may hold up to one extra step.
                "cpu_prefill_s": cpu[0] - c0,
                "cpu_decode_s": cpu[1] - cpu[0],
                "mlx_prompt_tps": last.prompt_tps,
                "mlx_generation_tps": last.generation_tps,
                "mlx_peak_memory_bytes": mx.get_peak_memory(),
                "tokens": tokens,
                "text": tok.decode(tokens),
            }
        )
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def run_mlx(args, mlx_dir, prompt, max_tokens, repeat=2):
    work = Path(args.work)
    pf = work / "prompt.txt"
    pf.write_text(prompt)
    evict(mlx_dir)
    p = subprocess.run(
        [*nice(args), sys.executable, __file__, "_mlx_once", "--model", str(mlx_dir), "--prompt-file",
         str(pf), "--max-tokens", str(max_tokens), "--repeat", str(repeat)],
        capture_output=True, text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"mlx-lm worker failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def section_mlx(args):
    mlx_dir, packs = prepare_tiny(args)
    pack = packs["auto"]
    prompt, n = PROMPTS[args.prompt], args.max_tokens
    rows = []
    for i in range(args.reps):
        m = run_mlx(args, mlx_dir, prompt, n)
        f = run_flashpack(args, pack, [], prompt, n)
        rows.append({"mlx": m, "flashpack": f})
        print(
            f"rep {i}: mlx-lm cold prefill {m['runs'][0]['prefill_tokens_per_s']:.1f} "
            f"decode {m['runs'][0]['decode_tokens_per_s']:.1f}, warm prefill "
            f"{m['runs'][-1]['prefill_tokens_per_s']:.1f} decode "
            f"{m['runs'][-1]['decode_tokens_per_s']:.1f} | flashpack prefill "
            f"{f['generation']['prefill_tokens_per_s']:.1f} decode "
            f"{f['generation']['decode_tokens_per_s']:.1f}",
            file=sys.stderr,
        )
    m0 = rows[0]["mlx"]
    f0 = rows[0]["flashpack"]
    same_prompt = m0["prompt_tokens"] == f0["generation"]["prompt_tokens"]
    same_text = all(r["mlx"]["runs"][0]["text"] == r["flashpack"]["text"].rstrip("\n")
                    for r in rows)
    cold = [r["mlx"]["runs"][0] for r in rows]
    warm = [r["mlx"]["runs"][-1] for r in rows]
    fp = [r["flashpack"]["generation"] for r in rows]

    def col(rs, k):
        return [r[k] for r in rs]

    # Tokens per CPU-second: steadier than wall time when other processes share the cores.
    for r, f in zip(rows, fp):
        fc = r["flashpack"]["cpu_s"]
        f["prefill_per_cpu_s"] = f["prompt_tokens"] / fc["prefill"]
        f["decode_per_cpu_s"] = (f["generated_tokens"] - 1) / fc["decode"]
        for m in r["mlx"]["runs"]:
            m["prefill_per_cpu_s"] = m0["prompt_tokens"] / m["cpu_prefill_s"]
            m["decode_per_cpu_s"] = (m["generated_tokens"] - 1) / m["cpu_decode_s"]

    print(f"\nModel: {mlx_dir.name} (mlx-lm 4-bit, group 64) and {pack.name} (same codes); "
          f"prompt '{args.prompt}' of {f0['generation']['prompt_tokens']} tokens "
          f"(mlx-lm: {m0['prompt_tokens']}), {n} generated, greedy; {args.reps} fresh "
          f"processes each, interleaved. Same generated text: {same_text}.\n")
    print("| runtime | prefill tok/s | decode tok/s | prefill tok per CPU-s | decode tok per "
          "CPU-s | time to first token (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def line(name, rs, rss):
        print(f"| {name} | {cell(col(rs, 'prefill_tokens_per_s'))} | "
              f"{cell(col(rs, 'decode_tokens_per_s'))} | {cell(col(rs, 'prefill_per_cpu_s'))} | "
              f"{cell(col(rs, 'decode_per_cpu_s'))} | "
              f"{cell(col(rs, 'time_to_first_token_s'), '{:.3f}')} | {rss} |")

    line("mlx-lm 0.32.2, first generation in the process", cold,
         cell([mb(r["mlx"]["peak_rss_bytes"]) for r in rows], "{:.0f}"))
    line("mlx-lm 0.32.2, second generation in the process", warm, "")
    line("flashpack run (all resident)", fp,
         cell([mb(r["flashpack"]["peak_rss_bytes"]) for r in rows], "{:.0f}"))
    for name, ref in [("first", cold), ("second", warm)]:
        rs = [med(col(fp, k)) / med(col(ref, k)) for k in
              ["prefill_tokens_per_s", "decode_tokens_per_s", "prefill_per_cpu_s",
               "decode_per_cpu_s"]]
        print(f"| ratio flashpack / mlx-lm ({name}) | " +
              " | ".join(f"{x:.2f}x" for x in rs) + " | | |")
    # Paired ratios (same repetition), which cancel slow drifts in machine load.
    pr = [f["decode_tokens_per_s"] / c["decode_tokens_per_s"] for f, c in zip(fp, cold)]
    print(f"\nPaired decode ratios (vs first generation): {', '.join(f'{x:.2f}' for x in pr)}")
    if not same_prompt:
        print("WARNING: prompt token counts differ between the two runtimes")
    save(args, f"mlx-{args.prompt}", rows)


# ----------------------------------------------------------------------------- budgets


def budget_of(stats):
    """What the run's memory budget amounts to: dense + KV/activation margin + expert cache."""
    eb = stats.get("expert_budget_bytes")
    if eb is None:
        return None
    return stats["dense_bytes"] + stats["margin_bytes"] + eb


def section_budgets(args):
    mlx_dir, packs = prepare_tiny(args)
    bw = measure_disk(args, packs["auto"], quiet=True) if args.disk_bw is None else args.disk_bw
    fracs = [int(x) for x in args.fractions.split(",")]
    prompt, n = PROMPTS[args.prompt], args.max_tokens
    configs = [("resident", packs["auto"], [])]
    for f in fracs:
        b = ["--expert-budget", f"{f}%"]
        configs += [
            (f"flashpack@{f}", packs["auto"], b),
            (f"naive@{f}", packs["auto"], b + ["--no-cache"]),
            (f"mmap@{f}", packs["raw"], b + ["--no-cache", "--io", "mmap"]),
        ]
    res = {name: [] for name, _, _ in configs}
    for i in range(args.reps):
        for name, pack, extra in configs:
            res[name].append(run_flashpack(args, pack, extra, prompt, n))
        print(f"rep {i} done", file=sys.stderr)
    base = load_results(Path(args.work) / "results-baseline.json").get("peak_rss_bytes")
    print_budget_table(res, fracs, bw, base, f"{TINY.name}, prompt '{args.prompt}' "
                       f"({res['resident'][0]['generation']['prompt_tokens']} tokens), {n} "
                       f"generated, greedy, {args.reps} repetitions")
    save(args, f"budgets-{args.prompt}", {"disk_bw": bw, "runs": res})


def tps(s):
    return s["generation"]["decode_tokens_per_s"]


def decode_bytes_per_token(s):
    g = s["generation"]
    first = s.get("at_first_token") or {"bytes_read": 0}
    return (s["expert_cache"]["bytes_read"] - first["bytes_read"]) / max(
        g["generated_tokens"] - 1, 1)


def print_budget_table(res, fracs, bw, base, title):
    print(f"\n{title}. Decode tokens/s, median [min-max]. Disk: {bw / 1e9:.2f} GB/s "
          f"sequential.\n")
    print("| experts resident | (a) flashpack | (b) naive | (c) all resident | (d) mmap, raw "
          "pack | a/b | a/c | read per token (MB) | physical limit tok/s | peak RSS (MB) "
          "| budget (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    c = [tps(s) for s in res["resident"]]
    for f in fracs:
        a = [tps(s) for s in res[f"flashpack@{f}"]]
        b = [tps(s) for s in res[f"naive@{f}"]]
        d = [tps(s) for s in res[f"mmap@{f}"]]
        per_tok = med([decode_bytes_per_token(s) for s in res[f"flashpack@{f}"]])
        phys = bw / per_tok if per_tok > 0 else float("inf")
        rss = med([s["peak_rss_bytes"] for s in res[f"flashpack@{f}"]])
        budget = budget_of(res[f"flashpack@{f}"][0])
        print(f"| {f}% | {cell(a)} | {cell(b)} | {cell(c)} | {cell(d)} | "
              f"{med(a) / med(b):.2f}x | {med(a) / med(c):.2f} | {mb(per_tok):.2f} | "
              f"{phys:.0f} | {mb(rss):.0f} | {mb(budget):.1f} |")
    if base:
        print(f"\nProcess baseline (peak RSS on a tiny pack): {mb(base):.0f} MB.")
    print("\nPeak RSS of every run (MB), median over repetitions, and what the budget covers:\n")
    print("| run | peak RSS | RSS - baseline | budget (dense + KV/activations + experts) | "
          "(RSS - baseline) / budget |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in res.items():
        rss = med([s["peak_rss_bytes"] for s in runs])
        budget = budget_of(runs[0])
        over = rss - base if base else None
        ratio = f"{over / budget:.2f}" if (budget and over is not None) else "-"
        print(f"| {name} | {mb(rss):.1f} | {mb(over):.1f} | "
              f"{mb(budget) if budget else float('nan'):.1f} | {ratio} |"
              if over is not None else f"| {name} | {mb(rss):.1f} | - | - | - |")


# ----------------------------------------------------------------------------- io / policy


def section_io(args, pack=None, prompt=None, n=None, budgets=None, tag="tiny"):
    if pack is None:
        _, packs = prepare_tiny(args)
        pack = packs["auto"]
        prompt, n = PROMPTS[args.prompt], args.max_tokens
        budgets = [["--expert-budget", f"{f}%"] for f in args.fractions.split(",") if f != "100"]
    configs = []
    for b in budgets:
        label = " ".join(b)
        configs += [
            (f"{label} | pread | profile | on", b),
            (f"{label} | mmap | profile | on", b + ["--io", "mmap"]),
            (f"{label} | pread | lru | on", b + ["--policy", "lru"]),
            (f"{label} | pread | lfu | on", b + ["--policy", "lfu"]),
            (f"{label} | pread | profile | off", b + ["--no-prefetch"]),
        ]
    res = {name: [] for name, _ in configs}
    for i in range(args.reps):
        for name, extra in configs:
            res[name].append(run_flashpack(args, pack, extra, prompt, n))
        print(f"rep {i} done", file=sys.stderr)
    print(f"\n{pack.name}, {n} generated tokens, {args.reps} repetitions; decode tok/s median "
          f"[min-max].\n")
    print("| budget | io | policy | prefetch | decode tok/s | prefill tok/s | hit rate (decode) "
          "| MB read per decoded token | prefetch used/loaded | stall ms | peak RSS MB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in res.items():
        s0 = runs[0]
        ec = s0["expert_cache"]
        first = s0["at_first_token"] or {"hits": 0, "misses": 0}
        hits = sum(ec["hits_per_layer"].values()) - first["hits"]
        miss = sum(ec["misses_per_layer"].values()) - first["misses"]
        print(f"| {name} | {cell([tps(s) for s in runs])} | "
              f"{cell([s['generation']['prefill_tokens_per_s'] for s in runs])} | "
              f"{100 * hits / max(hits + miss, 1):.1f}% | "
              f"{mb(med([decode_bytes_per_token(s) for s in runs])):.2f} | "
              f"{ec['prefetch_used']}/{ec['prefetch_loaded']} | "
              f"{med([s['stream']['stall_ms'] for s in runs]):.0f} | "
              f"{mb(med([s['peak_rss_bytes'] for s in runs])):.0f} |")
    save(args, f"io-{tag}", res)


# ----------------------------------------------------------------------------- large model


def section_large(args):
    work = Path(args.work)
    packs = {c: work / f"large-{c}.flashpack" for c in ["auto", "raw"]}
    for c, p in packs.items():
        if not p.exists():
            raise SystemExit(f"{p} is missing: run scripts/make_large_moe.py first (see its "
                             "docstring), then flashpack convert with --codec {c}")
    bw = measure_disk(args, packs["auto"], quiet=True) if args.disk_bw is None else args.disk_bw
    prompt, n = args.large_prompt, args.max_tokens
    budget = ["--mem-budget", args.large_budget]
    configs = [
        ("flashpack pread", packs["auto"], budget),
        ("flashpack mmap", packs["auto"], budget + ["--io", "mmap"]),
        ("naive", packs["auto"], budget + ["--no-cache"]),
        ("mmap raw pack", packs["raw"], budget + ["--no-cache", "--io", "mmap"]),
    ]
    if not args.skip_resident:
        configs.append(("all resident", packs["auto"], []))
    if args.policies:
        configs += [
            ("flashpack pread lru", packs["auto"], budget + ["--policy", "lru"]),
            ("flashpack pread lfu", packs["auto"], budget + ["--policy", "lfu"]),
            ("flashpack pread no prefetch", packs["auto"], budget + ["--no-prefetch"]),
        ]
    res = {name: [] for name, _, _ in configs}
    for i in range(args.reps):
        for name, pack, extra in configs:
            s = run_flashpack(args, pack, extra, prompt, n)
            res[name].append(s)
            print(f"rep {i} {name}: decode {tps(s):.2f} tok/s, prefill "
                  f"{s['generation']['prefill_tokens_per_s']:.2f}, "
                  f"{mb(decode_bytes_per_token(s)):.0f} MB/token, rss "
                  f"{mb(s['peak_rss_bytes']):.0f} MB", file=sys.stderr)
    size = packs["auto"].stat().st_size
    print(f"\n{packs['auto'].name}: {size / 1e9:.2f} GB pack ({packs['raw'].stat().st_size / 1e9:.2f}"
          f" GB raw-codec pack); budget {args.large_budget}; prompt of "
          f"{res[configs[0][0]][0]['generation']['prompt_tokens']} tokens, {n} generated; "
          f"{args.reps} repetitions; disk {bw / 1e9:.2f} GB/s sequential.\n")
    print("| run | decode tok/s | prefill tok/s | MB read per decoded token | physical limit "
          "tok/s | measured / limit time | stall ms | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in res.items():
        per_tok = med([decode_bytes_per_token(s) for s in runs])
        phys = bw / per_tok if per_tok > 0 else float("inf")
        t = med([tps(s) for s in runs])
        print(f"| {name} | {cell([tps(s) for s in runs], '{:.2f}')} | "
              f"{cell([s['generation']['prefill_tokens_per_s'] for s in runs], '{:.2f}')} | "
              f"{mb(per_tok):.0f} | {phys:.1f} | "
              f"{(phys / t if per_tok > 0 else float('nan')):.1f}x | "
              f"{med([s['stream']['stall_ms'] for s in runs]):.0f} | "
              f"{mb(med([s['peak_rss_bytes'] for s in runs])):.0f} |")
    save(args, "large", {"disk_bw": bw, "runs": res})


# ----------------------------------------------------------------------------- baseline, disk


def section_baseline(args):
    """Peak RSS of `flashpack run` on a pack whose weights are negligible (~1 MB)."""
    work = Path(args.work)
    hf, pack = work / "baseline-hf", work / "baseline.flashpack"
    if not pack.exists():
        make = args.make_fixture or str(Path(flashpack_bin(args)).parent / "examples"
                                        / "make_fixture")
        subprocess.run([make, "--arch", "qwen3_moe", "--out", str(hf), "--hidden", "64",
                        "--layers", "1", "--experts", "4", "--top-k", "2",
                        "--moe-intermediate", "64", "--vocab", "8192", "--tokenizer-from",
                        str(TINY)], check=True)
        subprocess.run([flashpack_bin(args), "convert", str(hf), "-o", str(pack), "--quiet"],
                       check=True)
    runs = [run_flashpack(args, pack, [], PROMPTS["code"], 8) for _ in range(args.reps)]
    rss = [s["peak_rss_bytes"] for s in runs]
    print(f"\nProcess baseline: peak RSS {cell([mb(x) for x in rss])} MB for `flashpack run` on "
          f"{pack.name} ({pack.stat().st_size / 1e6:.1f} MB; dense "
          f"{mb(runs[0]['dense_bytes']):.1f} MB, experts "
          f"{mb(runs[0]['all_experts_bytes']):.2f} MB)")
    save(args, "baseline", {"peak_rss_bytes": med(rss), "runs": runs})


def measure_disk(args, path, quiet=False):
    """Sequential read bandwidth of `path`'s disk: dd with 16 MiB blocks after eviction."""
    path = Path(path)
    evict(path)
    t = time.perf_counter()
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True,
                       text=True, check=True)
    secs = time.perf_counter() - t
    size = path.stat().st_size
    m = re.search(r"copied, ([0-9.]+) s", p.stderr)
    secs = float(m.group(1)) if m else secs
    bw = size / secs
    if not quiet:
        print(f"dd if={path} of=/dev/null bs=16M (after eviction): {size / 1e9:.2f} GB in "
              f"{secs:.2f} s = {bw / 1e9:.2f} GB/s")
    evict(path)
    return bw


def section_disk(args):
    bws = [measure_disk(args, args.file) for _ in range(args.reps)]
    print(f"median {med(bws) / 1e9:.2f} GB/s over {len(bws)} reads")
    save(args, "disk", {"file": str(args.file), "bw": bws})


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)

    def common(p, reps=3, max_tokens=64):
        p.add_argument("--flashpack", help="flashpack binary")
        p.add_argument("--work", default="/tmp/flashpack-bench")
        p.add_argument("--reps", type=int, default=reps)
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--prompt", choices=sorted(PROMPTS), default="code")
        p.add_argument("--disk-bw", type=float, help="bytes/s; measured with dd when absent")
        p.add_argument("--fractions", default="100,50,25", help="expert budgets, percent")
        p.add_argument("--nice", type=int, default=0,
                       help="run measured processes under `nice -n N` (negative needs root)")
        return p

    common(sub.add_parser("mlx", help="flashpack vs mlx-lm, all resident (issue 5)"), reps=5)
    common(sub.add_parser("budgets", help="trained model under expert budgets (issue 6)"))
    common(sub.add_parser("io", help="pread/mmap, policies, prefetch on the trained model"))
    p = common(sub.add_parser("large", help="generated >= 8 GB model under a budget"),
               reps=3, max_tokens=16)
    p.add_argument("--large-budget", default="4GB")
    p.add_argument("--large-prompt", default=PROMPTS["prose"][:60])
    p.add_argument("--skip-resident", action="store_true")
    p.add_argument("--policies", action="store_true", help="also lru, lfu, no prefetch")
    p = common(sub.add_parser("baseline", help="process peak RSS on a tiny pack"))
    p.add_argument("--make-fixture", help="make_fixture example binary")
    p = common(sub.add_parser("disk", help="sequential read bandwidth of a file's disk"))
    p.add_argument("file")
    w = sub.add_parser("_mlx_once")
    w.add_argument("--model")
    w.add_argument("--prompt-file")
    w.add_argument("--max-tokens", type=int)
    w.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    if a.section == "_mlx_once":
        return mlx_once(a)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    {"mlx": section_mlx, "budgets": section_budgets, "io": section_io,
     "large": section_large, "baseline": section_baseline, "disk": section_disk}[a.section](a)


if __name__ == "__main__":
    main()
