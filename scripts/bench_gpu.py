#!/usr/bin/env python3
"""The GPU runtime table (issue: mlx-lm's speed all-resident, the disk's under a budget).

Runs on a machine where `flashpack` and `make_fixture` are on PATH and `python3 -m mlx_lm`
works on the GPU (see scripts/bench_gpu.sh, which sets that up on the device's H200 through
../shared/gpu/). One call builds everything and prints one table:

1. two synthetic Qwen3-MoE models of Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts,
   top-8, expert width 768, 16 heads of 128, 4 KV heads, vocabulary 8192) with `make_fixture`:
   `uniform` (random weights: near-uniform routing) and `skewed` (`--routing-skew 0.3`: skewed,
   token-to-token correlated routing, with hit rates near the bundled trained model's);
2. `mlx_lm convert -q` (4-bit, group 64) of `uniform`, and `flashpack convert` of that mlx-lm
   folder, so both runtimes run the same codes; `flashpack convert` of `skewed` from bf16;
3. runs, interleaved by repetition, each after dropping the page cache: mlx-lm generate, then
   flashpack all-resident, under expert budgets, with and without prefetch, and the naive
   `--no-cache` baseline; a long-prompt (2,048-token) prefill for both runtimes.

Writes `table.md` and `raw.json` into --out. Ratios are against numbers of the same call.

Options for issue 25 (streaming): `--baseline-bin flashpack-base` repeats every flashpack run with an older
binary, interleaved (rows marked [base]; `bash scripts/bench_gpu.sh prepare-base REV` stages it); `--no-mlx`
skips mlx-lm (the uniform pack is then converted from bf16); `--deep` runs 48 layers of Qwen3-30B-A3B's
layer shape (FP8 source, expert width 768) instead (`deep.md`). Columns: loads over needed loads, the host's own
build time per token (without routing and expert waits), the serial and overlapped limits from the same
model's resident step and the disk's speed.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

SHAPE = ["--arch", "qwen3_moe", "--hidden", "2048", "--experts", "128", "--top-k", "8",
         "--moe-intermediate", "768", "--heads", "16", "--kv-heads", "4", "--head-dim", "128",
         "--vocab", "8192"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PARAGRAPH = ("The committee met again in the spring to discuss the harbour, the new bridge, "
             "the price of grain and the letters that had come from the capital. ")


def sh(cmd, **kw):
    p = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if p.returncode != 0:
        # Say why before failing: a convert that ran out of disk otherwise shows only its exit code.
        sys.stderr.write(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}\n")
        p.check_returncode()
    return p


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"cannot drop the page cache: {e}", file=sys.stderr)


def disk_bw(path):
    drop_caches()
    t = time.time()
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                         capture_output=True, text=True)
    size = os.path.getsize(path)
    return size / (time.time() - t)


# Run names whose process gets extra environment variables.
RUN_ENV = {
    # The store before decision 0020: one pool for all 48 layers (6,144 slots of 768 x 2048
    # weights), past the 2^32-weight offsets of MLX's CUDA gather_qmm.
    "resident one pool": {"FLASHPACK_MAX_POOL_ELEMENTS": str(1 << 40)},
    # Decode running ahead of the routing checks (issue 25; src/model/mod.rs, layers_ahead).
    "50% ahead": {"FLASHPACK_AHEAD": "1"},
    "25% ahead": {"FLASHPACK_AHEAD": "1"},
    "12% ahead": {"FLASHPACK_AHEAD": "1"},
}


def run_flashpack(pack, extra, prompt, max_tokens, raw=True, binary="flashpack", env=None):
    drop_caches()
    cmd = [binary, "run", pack, "--prompt", prompt, "--max-tokens", str(max_tokens),
           "--json"] + (["--raw"] if raw else []) + extra
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "cmd": " ".join(cmd)}
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    stats["text"] = p.stdout
    return stats


MLX_SCRIPT = r"""
import json, sys, time
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
model, tok = load(sys.argv[1])
prompt = open(sys.argv[2]).read()
ids = tok.encode(prompt, add_special_tokens=False)
last = None
text = []
for r in stream_generate(model, tok, ids, max_tokens=int(sys.argv[3]), sampler=make_sampler(0.0)):
    last = r
    text.append(r.text)
print(json.dumps({"prompt_tokens": last.prompt_tokens, "prefill_tps": last.prompt_tps,
                  "generated": last.generation_tokens, "decode_tps": last.generation_tps,
                  "peak_gb": last.peak_memory, "text": "".join(text)}))
"""


def run_mlx(folder, prompt_file, max_tokens, work):
    drop_caches()
    script = os.path.join(work, "mlx_run.py")
    with open(script, "w") as f:
        f.write(MLX_SCRIPT)
    p = subprocess.run([sys.executable, script, folder, prompt_file, str(max_tokens)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def decode_stats(s):
    """Decode-phase numbers from a flashpack --json report."""
    g = s["generation"]
    n = max(g["generated_tokens"], 1)
    first = s.get("at_first_token") or {}
    c = s["expert_cache"]
    st = s["stream"]
    read = c["bytes_read"] - first.get("bytes_read", 0)
    stall = st["stall_ms"] - first.get("stall_ms", 0.0)
    hits = sum(c["hits_per_layer"].values()) - first.get("hits", 0)
    misses = sum(c["misses_per_layer"].values()) - first.get("misses", 0)
    evw = st.get("eval_wait_ms", 0.0) - first.get("eval_wait_ms", 0.0)
    # Loads over the loads the run needed (demand misses plus prefetched experts then used),
    # whole run: 1.00 means no byte was read that the model did not use.
    needed = sum(c["misses_per_layer"].values()) + c.get("prefetch_used", 0)
    return {
        "load_ratio": c["experts_loaded"] / needed if needed else None,
        # Older binaries do not snapshot the routing wait at the first token: no split there.
        "host_only_ms": ((g.get("host_build_ms", 0.0) - stall - evw) / max(n - 1, 1)
                         if "eval_wait_ms" in first or not first else None),
        "table_ms": c.get("table_ms", 0.0) / max(n + g["prompt_tokens"], 1),
        "tps": g["decode_tokens_per_s"],
        "prefill_tps": g["prefill_tokens_per_s"],
        "ttft_s": g["time_to_first_token_s"],
        "hit": hits / max(hits + misses, 1) if (hits + misses) else None,
        "mb_per_tok": read / n / 1e6,
        "stall_ms_per_tok": stall / n,
        "eval_wait_ms_per_tok": st.get("eval_wait_ms", 0.0) / max(
            g["generated_tokens"] + g["prompt_tokens"], 1),
        "prefetch_acc": st["predicted_correct"] / max(st["predicted"], 1) if st["predicted"] else None,
        "thread_ms": c.get("thread_ms"),
        "rss_gb": s["peak_rss_bytes"] / 1e9,
        "mlx_peak_gb": s.get("mlx_peak_bytes", 0) / 1e9,
        "mlx_active_gb": s.get("mlx_active_bytes", 0) / 1e9,
        "budget_gb": (s.get("expert_budget_bytes") or 0) / 1e9,
        "dense_gb": s["dense_bytes"] / 1e9,
        "text": s.get("text", ""),
        "build_ms": g.get("host_build_ms", 0.0) / max(n - 1, 1),
        "wait_ms": g.get("host_wait_ms", 0.0) / max(n - 1, 1),
    }


def log_run(log, key, s):
    if "error" in s:
        log(f"{key} failed: {s['error'][-300:]}")
        return
    d = decode_stats(s)
    log(f"{key}: {d['tps']:.1f} tok/s, hit {fmt(d['hit'], '{:.2f}')}, "
        f"{d['mb_per_tok']:.1f} MB/tok, loads/needed {fmt(d['load_ratio'], '{:.2f}')}, "
        f"stall {d['stall_ms_per_tok']:.1f} ms/tok, build {d['build_ms']:.2f} "
        f"(host only {fmt(d['host_only_ms'], '{:.2f}')}) wait {d['wait_ms']:.2f} ms/tok")


def binaries(a):
    """(row tag, binary) of each flashpack build a run is repeated with."""
    return [("", "flashpack")] + ([(" [base]", a.baseline_bin)] if a.baseline_bin else [])


def run_decode_rows(a, log, packs, runs, res, res_path, rep=None):
    """One repetition of `runs` with every binary, interleaved; results saved after every run,
    so a call cut short by its time limit keeps what ran. With `rep`, runs that already have
    that many repetitions are skipped (a later call resumes)."""
    for model, name, extra in runs:
        for tag, binary in binaries(a):
            if rep is not None and len(res.get(f"{model}:{name}{tag}", [])) > rep:
                continue
            env = dict(RUN_ENV.get(name, {}))
            if getattr(a, "trace", False):
                # One CSV line per routed layer (scripts/trace_stream.py reads them).
                tag_name = f"{model}-{name}{tag}".replace(" ", "_").replace("%", "pct")
                env["FLASHPACK_TRACE"] = os.path.join(a.out, f"trace-{tag_name}-{rep or 0}.csv")
            s = run_flashpack(packs[model], extra, PROMPT, a.max_tokens, binary=binary, env=env)
            res.setdefault(f"{model}:{name}{tag}", []).append(s)
            log_run(log, f"{model}:{name}{tag}", s)
            with open(res_path, "w") as f:
                json.dump(res, f)


def same_text(row, base):
    """Whether every repetition generated the resident run's text (greedy: it must)."""
    if not base or not base["texts"]:
        return ""
    want = base["texts"][0]
    return "yes" if all(t == want for t in row["texts"]) else "**NO**"


def stream_table(res, keys, bw, mlx_tps=None):
    """The decode table for runs `keys` ("model:name" or "model:name [base]"). Limits use the
    resident step of the same model and binary: serial = 1 / (read time + compute time),
    overlapped = 1 / max(read time, compute time), read time = MB per token / disk speed."""
    lines = ["| model | run | decode tok/s | vs resident | hit rate | MB read/tok | loads / needed "
             "| stall ms/tok | host ms/tok (build, no waits) | serial limit | of serial "
             "| overlapped limit | of overlapped | prefetch acc | RSS GB | MLX peak GB "
             "| expert budget GB | text = resident |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for key in keys:
        model, name = key.split(":", 1)
        ds = [decode_stats(s) for s in res.get(key, []) if "error" not in s]
        if not ds:
            lines.append(f"| {model} | {name} | failed | | | | | | | | | | | | | | | |")
            continue
        row = {k: med([d[k] for d in ds]) for k in ds[0] if k not in ("thread_ms", "text")}
        row["tps_all"] = [round(d["tps"], 1) for d in ds]
        row["thread_ms"] = ds[0]["thread_ms"]
        row["texts"] = [d["text"] for d in ds]
        table[key] = row
        tag = name[name.index(" ["):] if " [" in name else ""
        base = table.get(f"{model}:resident{tag}")
        step = 1.0 / base["tps"] if base and base["tps"] else None
        serial = over = None
        if step and row["mb_per_tok"] and row["budget_gb"]:
            io = row["mb_per_tok"] * 1e6 / bw
            serial = 1.0 / (io + step)
            over = 1.0 / max(io, step)
        lines.append(
            f"| {model} | {name} | {'/'.join(fmt(x) for x in row['tps_all'])} | "
            f"{fmt(row['tps'] / base['tps'] if step else None, '{:.2f}')} | "
            f"{fmt(row['hit'], '{:.2f}')} | {fmt(row['mb_per_tok'])} | "
            f"{fmt(row['load_ratio'], '{:.2f}')} | {fmt(row['stall_ms_per_tok'])} | "
            f"{fmt(row['host_only_ms'], '{:.2f}')} | {fmt(serial)} | "
            f"{fmt(row['tps'] / serial if serial else None, '{:.2f}')} | {fmt(over)} | "
            f"{fmt(row['tps'] / over if over else None, '{:.2f}')} | "
            f"{fmt(row['prefetch_acc'], '{:.2f}')} | {fmt(row['rss_gb'], '{:.2f}')} | "
            f"{fmt(row['mlx_peak_gb'], '{:.2f}')} | {fmt(row['budget_gb'], '{:.2f}')} | "
            f"{same_text(row, base)} |")
    if mlx_tps:
        r = table.get("uniform:resident")
        if r:
            lines += ["", f"uniform resident vs mlx-lm: {r['tps'] / mlx_tps:.2f}x"]
    for key in keys:
        if key.endswith(":resident [base]") and key[:-len(" [base]")] in table:
            same = table[key]["texts"][:1] == table[key[:-len(" [base]")]]["texts"][:1]
            lines += ["", f"{key.split(':')[0]}: resident text equal to the base binary's: "
                      f"{'yes' if same else '**NO**'}"]
    lines += ["", "load-step thread ms (first rep), eval wait and host times per decoded token:"]
    for k, row in table.items():
        lines.append(f"- {k}: {row['thread_ms']}, eval wait "
                     f"{fmt(row['eval_wait_ms_per_tok'], '{:.2f}')} ms, host build "
                     f"{fmt(row['build_ms'], '{:.2f}')} (of it host only "
                     f"{fmt(row['host_only_ms'], '{:.2f}')}) / wait {fmt(row['wait_ms'], '{:.2f}')} ms, "
                     f"slot table {fmt(row['table_ms'], '{:.3f}')} ms per token of the run")
    return table, lines


def deep(a, log):
    """48 sparse layers of Qwen3-30B-A3B's shape (expert width 768), uniform and skewed: each
    model is generated as FP8 with 128x128 block scales (29 GB; bf16 would be 58 GB, more than the
    machine's disk), converted to the default 4-bit pack and its source deleted before the next."""
    w = a.work
    shape = ["--arch", "qwen3_moe", "--hidden", "2048", "--experts", "128", "--top-k", "8",
             "--moe-intermediate", "768", "--heads", "32", "--kv-heads", "4", "--head-dim", "128",
             "--vocab", "8192", "--layers", "48", "--fp8-block", "128"]
    packs = {}
    models = [("deep-uniform", []), ("deep-skewed", ["--routing-skew", "0.3"])]
    models = [m for m in models if m[0].removeprefix("deep-") in a.deep_models.split(",")]
    for name, extra in models:
        pack = f"{w}/{name}.flashpack"
        if not os.path.exists(pack):
            # The disk holds one 29 GB source beside one pack: other deep packs go first, and
            # so do the 8-layer sources and packs of `io` and `trace` (about 15 GB; 2026-12-07
            # a deep convert ran out of disk beside them).
            for other, _ in models + [("deep-uniform", []), ("deep-skewed", [])]:
                if other != name and os.path.exists(f"{w}/{other}.flashpack") and len(models) == 1:
                    os.remove(f"{w}/{other}.flashpack")
            for small in ("uniform", "io-huffman.flashpack", "io-raw.flashpack", "trace.flashpack"):
                subprocess.run(["rm", "-rf", f"{w}/{small}"])
            sh(["make_fixture", "--out", f"{w}/{name}", "--tokenizer-from", a.tokenizer_from]
               + shape + extra)
            sh(["flashpack", "convert", f"{w}/{name}", "-o", pack, "--quiet"])
            subprocess.run(["rm", "-rf", f"{w}/{name}"])
            log(f"{name} ready ({os.path.getsize(pack) / 1e9:.1f} GB)")
        packs[name] = pack
    first = next(iter(packs.values()))
    bw = disk_bw(first)
    log(f"disk {bw / 1e9:.2f} GB/s")
    run_flashpack(first, [], PROMPT, 4)
    runs = []
    for model in packs:
        runs += [(model, "resident", [])] + (
            [(model, "resident one pool", [])] if a.one_pool else [])
        for b in ("50%", "25%", "12%"):
            runs += [(model, b, ["--expert-budget", b]),
                     (model, f"{b} no-prefetch", ["--expert-budget", b, "--no-prefetch"])] + (
                [(model, f"{b} ahead", ["--expert-budget", b])] if a.ahead else [])
    res_path = os.path.join(w, "deep-results.json")
    res = {}
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    for rep in range(a.reps):
        run_decode_rows(a, log, packs, runs, res, res_path, rep)
    keys = [f"{m}:{n}{t}" for m, n, _ in runs for t, _ in binaries(a)]
    _, lines = stream_table(res, keys, bw)
    lines = [f"disk {bw / 1e9:.2f} GB/s; 48 layers, 128 experts top-8, hidden 2048, expert width "
             f"768, 32 query and 4 KV heads (Qwen3-30B-A3B's shape; FP8 source, 4-bit pack); "
             f"{a.max_tokens} greedy tokens; medians of {a.reps} reps", ""] + lines
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "deep.md"), "w") as f:
        f.write(text + "\n")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, f="{:.1f}"):
    return "-" if x is None else f.format(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/root/fpbench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=1900,
                    help="about this many tokens, under the model's 2,048 context (0: skip)")
    ap.add_argument("--runs", default="all",
                    help="list of run names to do (see RUNS), separated by ';' (or ',' when no "
                         "name has one), or all")
    ap.add_argument("--skip-skewed", action="store_true")
    ap.add_argument("--no-mlx", action="store_true",
                    help="no mlx-lm runs: the uniform pack is converted from bf16 (limits use "
                         "flashpack's own resident step anyway)")
    ap.add_argument("--small", action="store_true",
                    help="a small model (hidden 256, 32 experts): a smoke test of the script")
    ap.add_argument("--baseline-bin", default=None,
                    help="an older flashpack binary: every flashpack run is repeated with it, "
                         "interleaved, as rows marked [base]")
    ap.add_argument("--deep", action="store_true",
                    help="instead of the 8-layer models: 48 layers of Qwen3-30B-A3B's layer "
                         "shape (an FP8 source: the device's 64 GB disk cannot hold the bf16 "
                         "one), uniform and skewed; resident and 50/25/12%% budgets, flashpack "
                         "only")
    ap.add_argument("--trace", action="store_true",
                    help="write each run's per-layer trace (FLASHPACK_TRACE) into --out")
    ap.add_argument("--one-pool", action="store_true",
                    help="with --deep: also the store before decision 0020 (one pool for all "
                         "layers, wrong on CUDA), as the row `resident one pool`")
    ap.add_argument("--ahead", action="store_true",
                    help="with --deep: also each budget with FLASHPACK_AHEAD=1 (rows `N% ahead`)")
    ap.add_argument("--deep-models", default="uniform,skewed",
                    help="which deep models (one per call when the disk cannot hold both packs "
                         "and a source: the other's pack is then deleted first)")
    a = ap.parse_args()
    global SHAPE
    if a.small:
        SHAPE = ["--arch", "qwen3_moe", "--hidden", "256", "--experts", "32", "--top-k", "4",
                 "--moe-intermediate", "128", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "64", "--vocab", "8192"]
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    w = a.work
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)
    if a.deep:
        deep(a, log)
        return

    layers = ["--layers", str(a.layers)]
    for name, extra in [("uniform", []), ("skewed", ["--routing-skew", "0.3"])]:
        if name == "skewed" and a.skip_skewed:
            continue
        if not os.path.exists(f"{w}/{name}/config.json"):
            sh(["make_fixture", "--out", f"{w}/{name}", "--tokenizer-from", a.tokenizer_from]
               + SHAPE + layers + extra)
            log(f"made {name}")
    if not a.no_mlx and not os.path.exists(f"{w}/uniform-mlx/config.json"):
        sh([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", f"{w}/uniform",
            "--mlx-path", f"{w}/uniform-mlx", "-q", "--q-bits", "4", "--q-group-size", "64"])
        log("mlx_lm convert done")
    packs = {"uniform": f"{w}/uniform.flashpack", "skewed": f"{w}/skewed.flashpack"}
    if not os.path.exists(packs["uniform"]):
        src = f"{w}/uniform" if a.no_mlx else f"{w}/uniform-mlx"
        sh(["flashpack", "convert", src, "-o", packs["uniform"], "--quiet"])
    if not a.skip_skewed and not os.path.exists(packs["skewed"]):
        sh(["flashpack", "convert", f"{w}/skewed", "-o", packs["skewed"], "--quiet"])
    log("packs ready")
    bw = disk_bw(packs["uniform"])
    log(f"disk {bw / 1e9:.2f} GB/s")

    prompt_file = f"{w}/prompt.txt"
    with open(prompt_file, "w") as f:
        f.write(PROMPT)
    long_file = f"{w}/long.txt"
    long_text = PARAGRAPH * max(1, a.long_prompt // 34)
    with open(long_file, "w") as f:
        f.write(long_text)

    # Warm-up: the first CUDA run compiles kernels (NVRTC); discard it.
    run_flashpack(packs["uniform"], [], PROMPT, 4)
    run_flashpack(packs["uniform"], ["--expert-budget", "25%"], long_text, 2)
    if not a.no_mlx:
        run_mlx(f"{w}/uniform-mlx", prompt_file, 4, w)
        run_mlx(f"{w}/uniform-mlx", long_file, 2, w)
    log("warm-up done")

    RUNS = [
        ("uniform", "resident", []),
        ("uniform", "resident, sync baseline", ["--sync-baseline"]),
        ("uniform", "50%", ["--expert-budget", "50%"]),
        ("uniform", "50% no-prefetch", ["--expert-budget", "50%", "--no-prefetch"]),
        ("uniform", "25%", ["--expert-budget", "25%"]),
        ("uniform", "25% no-prefetch", ["--expert-budget", "25%", "--no-prefetch"]),
        ("uniform", "25% mmap", ["--expert-budget", "25%", "--io", "mmap"]),
        ("uniform", "12%", ["--expert-budget", "12%"]),
        ("uniform", "no-cache", ["--no-cache"]),
        ("skewed", "resident", []),
        ("skewed", "50%", ["--expert-budget", "50%"]),
        ("skewed", "25%", ["--expert-budget", "25%"]),
    ]
    wanted = None if a.runs == "all" else set(a.runs.split(";" if ";" in a.runs else ","))
    runs = [r for r in RUNS if (wanted is None or r[1] in wanted or f"{r[0]}:{r[1]}" in wanted)
            and not (r[0] == "skewed" and a.skip_skewed)]
    # Results accumulate in the work folder across invocations (each call adds --reps), so a
    # table can be built from several device calls on one warm machine.
    res_path = os.path.join(w, "results.json")
    res = {"mlx": [], "mlx_long": [], "long": {}}
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    bins = binaries(a)
    for rep in range(a.reps):
        res["mlx"].append({} if a.no_mlx else run_mlx(f"{w}/uniform-mlx", prompt_file, a.max_tokens, w))
        run_decode_rows(a, log, packs, runs, res, res_path)
        if a.long_prompt:
            res["mlx_long"].append({} if a.no_mlx else run_mlx(f"{w}/uniform-mlx", long_file, 8, w))
            for name, extra in [("resident", []), ("50%", ["--expert-budget", "50%"]),
                                ("25%", ["--expert-budget", "25%"])]:
                for tag, binary in bins:
                    s = run_flashpack(packs["uniform"], extra, long_text, 8, binary=binary)
                    res["long"].setdefault(f"{name}{tag}", []).append(s)
        with open(res_path, "w") as f:
            json.dump(res, f)
        log(f"rep {rep + 1} done; mlx-lm {res['mlx'][-1].get('decode_tps')} tok/s")

    # ---- table ----
    mlx_tps = med([r.get("decode_tps") for r in res["mlx"]])
    reps = len(res["mlx"])
    lines = [f"disk {bw / 1e9:.2f} GB/s (dd iflag=direct); {a.layers} layers; {reps} reps, "
             f"medians; prompt {len(PROMPT)} chars, {a.max_tokens} greedy tokens; page cache "
             f"dropped before each run", ""]
    lines.append(f"mlx_lm generate (uniform): {fmt(mlx_tps)} tok/s decode, MLX peak "
                 f"{fmt(med([r.get('peak_gb') for r in res['mlx']]), '{:.2f}')} GB")
    lines.append("")
    keys = [f"{m}:{n}{t}" for m, n, _ in runs for t, _ in bins]
    table, tlines = stream_table(res, keys, bw, mlx_tps)
    lines += tlines
    for tag, _ in bins:
        nc, b50 = table.get(f"uniform:no-cache{tag}"), table.get(f"uniform:50%{tag}")
        if nc and b50:
            lines += ["", f"50% vs --no-cache{tag}: {b50['tps'] / nc['tps']:.2f}x"]
    if a.long_prompt:
        ml = med([r.get("prefill_tps") for r in res["mlx_long"]])
        mlp = med([r.get("prompt_tokens") for r in res["mlx_long"]])
        lines += ["", f"Long prompt ({mlp} tokens), prefill:", "",
                  "| run | prefill tok/s | vs mlx-lm | first token s | vs resident | MB read |",
                  "|---|---|---|---|---|---|",
                  f"| mlx_lm | {fmt(ml)} | 1.00 | {fmt(mlp / ml if ml and mlp else None, '{:.2f}')} | | |"]
        ttft_res = {}
        for name, ss in res["long"].items():
            ss = [s for s in ss if "error" not in s]
            if not ss:
                lines.append(f"| flashpack {name} | failed | | | | |")
                continue
            p = med([s["generation"]["prefill_tokens_per_s"] for s in ss])
            t = med([s["generation"]["time_to_first_token_s"] for s in ss])
            tag = name[name.index(" ["):] if " [" in name else ""
            if name.startswith("resident"):
                ttft_res[tag] = t
            mb = med([(s.get("at_first_token") or {}).get("bytes_read", 0) / 1e6 for s in ss])
            r = ttft_res.get(tag)
            lines.append(f"| flashpack {name} | {fmt(p)} | {fmt(p / ml if ml else None, '{:.2f}')} "
                         f"| {fmt(t, '{:.2f}')} | {fmt(t / r if r else None, '{:.2f}')} | {fmt(mb)} |")
    # Same text as mlx-lm?
    mt = (res["mlx"][0] or {}).get("text", "") if res["mlx"] else ""
    ft = (res.get("uniform:resident") or [{}])[0].get("text", "")
    lines += ["", f"greedy text equal to mlx-lm's (first 64 chars): "
              f"{mt.strip()[:64] == ft.strip()[:64]}"]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    def strip(v):
        if isinstance(v, dict):
            v.pop("text", None)
            for x in v.values():
                strip(x)
        elif isinstance(v, list):
            for x in v:
                strip(x)
    strip(res)
    with open(os.path.join(a.out, "raw.json"), "w") as f:
        json.dump({"disk_bw": bw, "res": res, "mlx_text": mt, "fp_text": ft}, f)
    log("done")


if __name__ == "__main__":
    main()
