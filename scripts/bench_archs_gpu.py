#!/usr/bin/env python3
"""Every architecture on the GPU: flashpack against mlx-lm on the same codes, to 5% (issue 26).

Runs where `flashpack` and `make_fixture` are on PATH and `python3 -m mlx_lm` works on the GPU
(scripts/bench_gpu.sh sets that up on the device: `bash scripts/bench_gpu.sh archs [options]`).

Models (`make_fixture`, seeded), at each depth of --layers (default 8 and 32):
- 8 layers (any depth up to 8): hidden 2048, 64 experts top-8 of width 768, 16 heads of 128,
  vocabulary 8192 (the shape of the earlier rows of docs/benchmarks.md).
- 32 layers (any depth above 8): the same layer with 16 experts top-8 (--deep-experts). A decoded
  token reads and computes exactly what it does with 64 experts (8 experts of width 768 per layer,
  the same attention), so the host's graph per token is the same; only the router is narrower. 64
  experts would make a 19 GB bf16 source per architecture, too slow to write and convert within the
  device's limits; 16 make about 5 GB, as the 8-layer one.
- Per architecture: deepseek_v3 (MLA, first layer dense, 4 expert groups of which 2 chosen, a
  shared expert), glm4_moe (4 KV heads, half-rotary heads, q/k/v biases, q/k norm, first layer
  dense, a shared expert), gpt_oss (4 KV heads, sinks, a window of 128 on every other layer,
  MXFP4 experts with biases, which mlx-lm keeps), qwen3_moe (4 KV heads, q/k norm), mixtral (4 KV
  heads), and flashpack only (mlx-lm 0.32.2 cannot run them on CUDA): qwen3_next and qwen3_5_moe
  (make_fixture's hybrid layout: full attention every 2nd layer, Gated DeltaNet with 2 key and 4
  value heads of 32 in the others, a gated shared expert of width 128; not settable there).

Each model: `mlx_lm convert -q` (4-bit, group 64) and `flashpack convert` of that folder, so both
runtimes run the same codes (the hybrids: `flashpack convert` of the bf16 source); the source is
deleted once converted. Skipped when the pack and the mlx-lm folder are already in --work.

Runs: greedy, --max-tokens (256) tokens from a short prompt, all experts resident, each in a fresh
process after dropping the page cache. A first short run of each (model, runtime) on a machine
(--warmup-tokens) compiles the CUDA kernels and is discarded. Then --reps (5) repetitions; each
repetition runs every (model, runtime) once, the models in an order rotated by one per repetition
and the two runtimes of a model in alternating order. mlx-lm runs through MLX_LOOP below: mlx_lm's
generate_step pipeline (prefill in chunks of 2048, the model's prompt cache, step t+1 built and
`mx.async_eval`ed before token t is read with `.item()`), timed inside the loop: building the
next step (the model call and sampling, then `mx.async_eval`, which launches its kernels: the span
flashpack's host_build_ms covers; the async_eval part is also shown alone) apart from the wait
(`.item()`), and decode tok/s over the same loop (tokens after the first over the time from the
first token to the last, as flashpack's report counts it; stream_generate's own generation_tps
counts N tokens over N-1 intervals, N/(N-1) higher). The first repetition of each model also runs
`stream_generate` in the same process, after the timed loop, and checks that its tokens are the
loop's. flashpack's numbers come from its `--json` report (decode_tokens_per_s, host_build_ms and
host_wait_ms per token after the first). --uncompiled adds flashpack with `mx.compile` off
(FLASHPACK_COMPILE=0) as a third runtime of the same repetitions, with its own table.

Resumable: every run is saved into --work/results.json at once; a later call with the same --work
skips what already has --reps repetitions (and models already built), so the whole benchmark can be
spread over several device calls. --budget-s N stops starting new runs once N seconds have passed
(and a build when its expected time would pass N), then prints the table of what there is.
--resume FILE (repeatable) adds the repetitions of an earlier results.json, e.g. one brought back
in $OUT from a machine since given back; a model whose repetitions are all there is not built
again. --table-only prints the table of what there is and runs nothing.

Output: the table (markdown) on stdout and in --out/archs.md, all raw numbers in --out/archs.json
(and results.json copied there). Columns: medians with min-max and relative spread (max-min)/median
per runtime, the ratio of medians, the median (min-max) of the per-repetition ratios, host build
and wait ms per token for both runtimes, bytes of weights read per decoded token (the dense weights
but the embedding table, top-k experts per sparse layer, the KV cache and recurrent state at the
mean context, from `flashpack inspect --json`) and the bound that puts on tok/s at the GPU's memory
bandwidth (--hbm-gb-s, by default from `nvidia-smi`: H100 SXM 3350, H200 4800 GB/s), and whether
the greedy texts agree. The hybrids' host build per token is compared with qwen3_moe's at the same
depth (issue 26's target: at most 1.5x).

--small: a smoke test on any machine (hidden 256, 8 experts top-2 of width 128, 4 heads of 64,
vocabulary 8192, 2 layers, 16 tokens, 2 repetitions unless given).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import PROMPT, decode_stats, drop_caches, med, run_flashpack, sh  # noqa: E402

ARCHS = "deepseek_v3,glm4_moe,gpt_oss,qwen3_moe,mixtral,qwen3_next,qwen3_5_moe"
# mlx-lm 0.32.2 cannot run these on MLX's CUDA backend: flashpack only.
FLASHPACK_ONLY = {"qwen3_next", "qwen3_5_moe"}
MLA_ARCHS = {"deepseek_v3", "deepseek_v32", "glm_moe_dsa", "kimi_k25", "kimi_k3"}
RUNTIMES = ("mlx", "fp")
# Variants of flashpack, each one more runtime of the same interleaved repetitions, run with
# extra environment: --uncompiled (`mx.compile` off, FLASHPACK_COMPILE=0: the A/B of compiled
# activations and routers, issue 26) and --fp-variant NAME:KEY=VALUE[,KEY=VALUE] (e.g.
# fp_spin:FLASHPACK_SPIN_US=2000). Filled in by main().
RUNTIME_ENV = {}

# mlx-lm's decode, timed from inside: generate_step's pipeline (mlx_lm/generate.py, 0.32.2) with
# clocks around the graph building and around the wait for each token; stream_generate's token
# loop around it (eos stop, detokenizer, the last wanted token ends the loop). argv: model folder,
# prompt file, max tokens, 1 to also run stream_generate and compare its tokens.
MLX_LOOP = r"""
import json, sys, time
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

folder, prompt_file = sys.argv[1], sys.argv[2]
max_tokens, check = int(sys.argv[3]), sys.argv[4] == "1"
t_load = time.perf_counter()
model, tok = load(folder)
load_s = time.perf_counter() - t_load
ids = tok.encode(open(prompt_file).read(), add_special_tokens=False)
sampler = make_sampler(0.0)
eos = tok.eos_token_ids
prefill_step_size = 2048  # generate_step's default


def timed():
    prompt = mx.array(ids)
    cache = make_prompt_cache(model)
    detok = tok.detokenizer

    def _step(input_tokens):
        with mx.stream(generation_stream):
            logits = model(input_tokens[None], cache=cache)
            logits = logits[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            sampled = sampler(logprobs)
            return sampled, logprobs.squeeze(0)

    tokens, build, sched, wait = [], 0.0, 0.0, 0.0
    with wired_limit(model, [generation_stream]):
        t0 = time.perf_counter()
        with mx.stream(generation_stream):
            total = len(prompt)
            done = 0
            while total - done > 1:
                n_to_process = min(prefill_step_size, total - done - 1)
                model(prompt[:n_to_process][None], cache=cache)
                mx.eval([c.state for c in cache])
                done += n_to_process
                prompt = prompt[n_to_process:]
                mx.clear_cache()
            y, logprobs = _step(prompt)
            mx.async_eval(y, logprobs)
            n = 0
            reads = 0
            while True:
                tb = time.perf_counter()
                if n != max_tokens:
                    next_y, next_logprobs = _step(y)
                    ta = time.perf_counter()
                    mx.async_eval(next_y, next_logprobs)
                else:
                    ta = time.perf_counter()
                tw = time.perf_counter()
                if n == 0:
                    mx.eval(y)
                if n == max_tokens:
                    break
                token = y.item()
                te = time.perf_counter()
                reads += 1
                if n == 0:
                    t_first = te
                else:
                    build += ta - tb
                    sched += tw - ta
                    wait += te - tw
                if token in eos:
                    break
                tokens.append(token)
                detok.add_token(token)
                if len(tokens) == max_tokens:
                    break
                if n % 256 == 0:
                    mx.clear_cache()
                y, logprobs = next_y, next_logprobs
                n += 1
        t_end = time.perf_counter()
    detok.finalize()
    steps = max(reads - 1, 1)
    return {"tokens": tokens, "text": detok.text, "prompt_tokens": total,
            "generated": len(tokens), "ttft_s": t_first - t0,
            "prefill_tps": total / (t_first - t0),
            "tps": (reads - 1) / max(t_end - t_first, 1e-9),
            "build_ms": (build + sched) * 1e3 / steps, "graph_ms": build * 1e3 / steps,
            "async_eval_ms": sched * 1e3 / steps, "wait_ms": wait * 1e3 / steps}


out = timed()
out["load_s"] = load_s
out["peak_gb"] = mx.get_peak_memory() / 1e9
if check:
    ref, last = [], None
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens, sampler=make_sampler(0.0)):
        last = r
        if r.finish_reason != "stop":
            ref.append(r.token)
    out["stream_tps"] = last.generation_tps
    out["stream_tokens_equal"] = ref == out["tokens"]
    out["stream_tokens"] = len(ref)
print(json.dumps(out))
"""


def gpu_name():
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        names = [x.strip() for x in p.stdout.splitlines() if x.strip()]
        return names[0] if p.returncode == 0 and names else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def default_hbm(name):
    """GB/s of the card's memory, from its name (None where unknown: no bound shown)."""
    n = name.upper()
    if "H200" in n:
        return 4800.0
    if "H100" in n:
        return 2000.0 if "PCIE" in n else 3900.0 if "NVL" in n else 3350.0
    return None


def shape(a, arch, layers):
    """make_fixture's options for (arch, layers), and the numbers the tables need."""
    if a.small:
        s = {"hidden": 256, "experts": 8, "top_k": 2, "width": 128, "heads": 4, "head_dim": 64,
             "kv_heads": 2, "vocab": 8192, "window": 8}
        deep = a.deep_experts or 4
    else:
        s = {"hidden": 2048, "experts": 64, "top_k": 8, "width": 768, "heads": 16,
             "head_dim": 128, "kv_heads": 4, "vocab": 8192, "window": 128}
        deep = a.deep_experts or 16
    if layers > 8:
        s["experts"] = deep
    s["layers"] = layers
    # MLA (the DeepSeek-V3 family, Kimi-K3's full-attention layers): a key and value per head.
    kv = s["heads"] if arch in MLA_ARCHS else s["kv_heads"]
    args = ["--arch", arch, "--hidden", str(s["hidden"]), "--layers", str(layers),
            "--experts", str(s["experts"]), "--top-k", str(s["top_k"]),
            "--moe-intermediate", str(s["width"]), "--heads", str(s["heads"]),
            "--kv-heads", str(kv), "--head-dim", str(s["head_dim"]), "--vocab", str(s["vocab"])]
    if arch == "gpt_oss":
        args += ["--sliding-window", str(s["window"])]
    return args, s


class Bench:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.stopped = None
        self.device = gpu_name()
        self.hbm = a.hbm_gb_s if a.hbm_gb_s is not None else default_hbm(self.device)
        self.path = os.path.join(a.work, "results.json")
        self.state = {"models": {}, "runs": {}, "warm": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.state = json.load(f)
        for path in a.resume or []:
            # Repetitions (and the packs' sizes) only: builds and warm-ups belong to the
            # machine that made them.
            with open(path) as f:
                old = json.load(f)
            for key, r in old.get("runs", {}).items():
                for rt, recs in r.items():
                    have = self.state["runs"].setdefault(key, {}).setdefault(rt, [])
                    seen = {(x.get("at"), x.get("tps"), x.get("wall_s")) for x in have}
                    have += [x for x in recs if (x.get("at"), x.get("tps"), x.get("wall_s"))
                             not in seen]
            for m, v in old.get("models", {}).items():
                if "inspect" in v and "inspect" not in self.state["models"].get(m, {}):
                    self.state["models"].setdefault(m, {})["inspect"] = v["inspect"]
        if a.retry_errors:
            for r in self.state["runs"].values():
                for rt in r:
                    r[rt] = [x for x in r[rt] if "error" not in x]
        self.prompt_file = os.path.join(a.work, "prompt.txt")
        with open(self.prompt_file, "w") as f:
            f.write(PROMPT)
        self.script = os.path.join(a.work, "mlx_loop.py")
        with open(self.script, "w") as f:
            f.write(MLX_LOOP)

    def log(self, m):
        print(f"[{self.elapsed():6.1f}s] {m}", file=sys.stderr, flush=True)

    def elapsed(self):
        return time.time() - self.t0

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def over_budget(self, expected=0.0):
        b = self.a.budget_s
        return b is not None and self.elapsed() + expected > b

    # ---- models ----
    def names(self, arch, layers):
        name = f"{arch}-L{layers}" + ("-small" if self.a.small else "")
        w = self.a.work
        return name, os.path.join(w, name + "-src"), os.path.join(w, name + "-q4"), \
            os.path.join(w, name + ".flashpack")

    def built(self, arch, layers):
        _, _, q, pack = self.names(arch, layers)
        return os.path.exists(pack) and (arch in FLASHPACK_ONLY
                                         or os.path.exists(os.path.join(q, "config.json")))

    def build(self, arch, layers):
        """Source, mlx-lm folder, pack (each written under a temporary name, then renamed, so a
        call cut short leaves nothing half-written that a later call would take as done)."""
        name, src, q, pack = self.names(arch, layers)
        info = self.state["models"].setdefault(name, {})
        if not self.built(arch, layers):
            args, _ = shape(self.a, arch, layers)
            # A source (about 5 GB), an mlx-lm folder and a pack (1.5 GB each) at once.
            need = 0.1e9 if self.a.small else 9e9
            free = shutil.disk_usage(self.a.work).free
            if free < need:
                raise subprocess.CalledProcessError(
                    1, "build", stderr=f"{free / 1e9:.1f} GB free in {self.a.work}, "
                    f"{need / 1e9:.0f} GB needed: delete other packs there first")
            t = time.time()
            if not os.path.exists(os.path.join(src, "config.json")):
                shutil.rmtree(src, ignore_errors=True)
                sh(["make_fixture", "--out", src, "--tokenizer-from", self.a.tokenizer_from] + args)
            if arch not in FLASHPACK_ONLY and not os.path.exists(os.path.join(q, "config.json")):
                shutil.rmtree(q + ".tmp", ignore_errors=True)
                sh([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", src, "--mlx-path",
                    q + ".tmp", "-q", "--q-bits", "4", "--q-group-size", "64"])
                os.replace(q + ".tmp", q)
            if not os.path.exists(pack):
                sh(["flashpack", "convert", src if arch in FLASHPACK_ONLY else q, "-o",
                    pack + ".tmp", "--quiet"])
                os.replace(pack + ".tmp", pack)
            info["build_s"] = time.time() - t
            self.log(f"built {name} in {info['build_s']:.0f} s "
                     f"({os.path.getsize(pack) / 1e9:.2f} GB pack)")
        shutil.rmtree(src, ignore_errors=True)
        if "expert_bits" not in info.get("inspect", {}):
            p = sh(["flashpack", "inspect", pack, "--json"])
            j = json.loads(p.stdout[p.stdout.index("{"):])
            info["inspect"] = {k: j.get(k) for k in (
                "dense", "experts", "dense_bits", "expert_bits", "quantization",
                "experts_per_layer", "layers",
                "kv_cache_bytes_per_token", "kv_cache_window_bytes", "recurrent_state_bytes",
                "file_bytes", "attention")}
        self.save()

    def build_all(self, models):
        ready = []
        for arch, layers in models:
            name = self.names(arch, layers)[0]
            r = self.state["runs"].get(self.run_key(arch, layers), {})
            if (all(len(r.get(rt, [])) >= self.a.reps for rt in self.runtimes(arch))
                    and "expert_bits" in self.state["models"].get(name, {}).get("inspect", {})):
                ready.append((arch, layers))  # nothing left to run: no need of the model here
                continue
            if not self.built(arch, layers):
                known = [m["build_s"] for m in self.state["models"].values() if m.get("build_s")]
                expect = max(known) if known else (5.0 if self.a.small else 150.0)
                if self.over_budget(expect):
                    self.stopped = f"budget: not building {name} (about {expect:.0f} s)"
                    self.log(self.stopped)
                    break
            try:
                self.build(arch, layers)
                self.state["models"][name].pop("error", None)
                ready.append((arch, layers))
            except subprocess.CalledProcessError as e:
                err = (e.stderr or "")[-1500:]
                self.state["models"].setdefault(name, {})["error"] = err
                self.save()
                self.log(f"building {name} failed: {err[-300:]}")
        return ready

    # ---- runs ----
    def run_one(self, arch, layers, rt, tokens, check=False):
        name, _, q, pack = self.names(arch, layers)
        t = time.time()
        if rt.startswith("fp"):
            s = run_flashpack(pack, [], PROMPT, tokens, env=RUNTIME_ENV.get(rt))
            if "error" in s:
                rec = {"error": s["error"]}
            else:
                d = decode_stats(s)
                g = s["generation"]
                rec = {"tps": d["tps"], "build_ms": d["build_ms"], "wait_ms": d["wait_ms"],
                       "generated": g["generated_tokens"], "prompt_tokens": g["prompt_tokens"],
                       "stop_reason": g.get("stop_reason"), "prefill_tps": d["prefill_tps"],
                       "ttft_s": d["ttft_s"], "rss_gb": d["rss_gb"],
                       "mlx_peak_gb": d["mlx_peak_gb"], "text": s["text"],
                       # Arrays the host made per decode step (graph nodes and constants).
                       "arrays": g.get("host_arrays", 0) / max(g["generated_tokens"] - 1, 1)}
        else:
            drop_caches()
            try:
                p = subprocess.run([sys.executable, self.script, q, self.prompt_file,
                                    str(tokens), "1" if check else "0"],
                                   capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired as e:
                p = subprocess.CompletedProcess(e.cmd, 124, "", f"timed out: {e}")
            if p.returncode != 0:
                rec = {"error": p.stderr[-2000:]}
            else:
                rec = json.loads(p.stdout.strip().splitlines()[-1])
                rec.pop("tokens", None)
        rec["wall_s"] = time.time() - t
        rec["device"] = self.device
        rec["at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return rec

    def run_key(self, arch, layers):
        return f"{self.names(arch, layers)[0]}:T{self.a.max_tokens}"

    def runtimes(self, arch):
        fp = ("fp",) + tuple(RUNTIME_ENV)
        return fp if arch in FLASHPACK_ONLY or self.a.no_mlx else ("mlx",) + fp

    def log_run(self, key, rt, rec, tag=""):
        if "error" in rec:
            self.log(f"{key} {rt}{tag}: error {rec['error'][-300:]}")
        else:
            extra = ""
            if "stream_tokens_equal" in rec:
                extra = (f", stream_generate {rec['stream_tps']:.1f} tok/s, same tokens "
                         f"{rec['stream_tokens_equal']}")
            self.log(f"{key} {rt}{tag}: {rec['tps']:.1f} tok/s, build {rec['build_ms']:.2f} wait "
                     f"{rec['wait_ms']:.2f} ms/tok, {rec['generated']} tokens, "
                     f"{rec['wall_s']:.1f} s{extra}")

    def warm(self, arch, layers, rt):
        """One short discarded run per (model, runtime) and machine: the CUDA kernels compile."""
        name = self.names(arch, layers)[0]
        wkey = f"{name}:{rt}"
        if self.a.warmup_tokens <= 0 or self.state["warm"].get(wkey) == self.device:
            return True
        if self.over_budget():
            return False
        rec = self.run_one(arch, layers, rt, self.a.warmup_tokens)
        self.log_run(name, rt, rec, " (warm-up)")
        self.state["warm"][wkey] = self.device
        self.save()
        return True

    def run_reps(self, models):
        runs = self.state["runs"]
        for rep in range(self.a.reps):
            k = rep % max(len(models), 1)
            order = models[k:] + models[:k]
            for arch, layers in order:
                key = self.run_key(arch, layers)
                rts = self.runtimes(arch)
                for rt in (rts if rep % 2 == 0 else tuple(reversed(rts))):
                    done = runs.setdefault(key, {}).setdefault(rt, [])
                    if len(done) > rep:
                        continue
                    if self.over_budget() or not self.warm(arch, layers, rt):
                        self.stopped = (f"budget: stopped before {key} {rt}, repetition "
                                        f"{rep + 1}")
                        self.log(self.stopped)
                        return
                    # The first repetition of mlx-lm also checks stream_generate's tokens.
                    check = rt == "mlx" and not any("stream_tokens_equal" in r for r in done)
                    rec = self.run_one(arch, layers, rt, self.a.max_tokens, check)
                    done.append(rec)
                    self.save()
                    self.log_run(f"{key} rep {len(done)}", rt, rec)

    # ---- table ----
    def bytes_per_token(self, name, s, ctx):
        """Bytes read per decoded token: dense weights but the embedding table (one row is read),
        top-k experts in each sparse layer, the KV cache at context `ctx` (sliding-window layers
        up to their window) and the recurrent state (read and written). Weights count at their
        size in memory (the pack may entropy-code them on disk): N-bit affine codes at N bits plus
        a bf16 scale and bias per group of 64 (mlx_lm convert's --q-group-size here), MXFP4 at
        4.25 bits, the float tensors at their bytes in the pack."""
        insp = (self.state["models"].get(name) or {}).get("inspect")
        if not insp or "expert_bits" not in insp:
            return None

        def mem_bytes(classes):
            total = 0.0
            for label, c in (classes or {}).items():
                if label.endswith("-bit"):
                    total += c["weights"] * (int(label[:-4]) + 32 / 64) / 8
                elif label.startswith("mx"):
                    total += c["weights"] * (int(label[4:]) + 8 / 32) / 8
                else:
                    total += c["bytes"]
            return total

        per_layer = {k: v for k, v in (insp.get("experts_per_layer") or {}).items() if v}
        n_exp = sum(per_layer.values())
        experts = 0.0
        if n_exp:
            per_expert = mem_bytes(insp["expert_bits"]) / n_exp
            experts = sum(min(s["top_k"], v) for v in per_layer.values()) * per_expert
        embed = s["vocab"] * s["hidden"] * (4 + 32 / 64) / 8
        kv = (insp.get("kv_cache_bytes_per_token") or 0) * ctx
        kv += (insp.get("kv_cache_window_bytes") or 0) * min(1.0, ctx / s["window"])
        kv += 2 * (insp.get("recurrent_state_bytes") or 0)
        return mem_bytes(insp["dense_bits"]) - embed + experts + kv

    def rows(self, models):
        rows = {}
        for arch, layers in models:
            name = self.names(arch, layers)[0]
            key = self.run_key(arch, layers)
            _, s = shape(self.a, arch, layers)
            r = self.state["runs"].get(key, {})
            row = {"arch": arch, "layers": layers, "experts": s["experts"], "top_k": s["top_k"],
                   "model": name, "key": key}
            err = (self.state["models"].get(name) or {}).get("error")
            if err:
                row["build_error"] = err[-500:]
            ok = {}
            for rt in self.runtimes(arch):
                recs = r.get(rt, [])
                good = [x for x in recs if "error" not in x]
                ok[rt] = good
                row[f"{rt}_reps"] = len(good)
                row[f"{rt}_errors"] = [x["error"][-500:] for x in recs if "error" in x]
                if not good:
                    continue
                tps = [x["tps"] for x in good]
                m = statistics.median(tps)
                row[rt] = {
                    "tps_median": m, "tps_min": min(tps), "tps_max": max(tps),
                    "rel_spread": (max(tps) - min(tps)) / m if m else None,
                    "tps_all": tps,
                    "build_ms": med([x.get("build_ms") for x in good]),
                    "async_eval_ms": med([x.get("async_eval_ms") for x in good]),
                    "wait_ms": med([x.get("wait_ms") for x in good]),
                    "arrays": med([x.get("arrays") for x in good]),
                    "prompt_tokens": good[0].get("prompt_tokens"),
                    "generated": [x.get("generated") for x in good],
                    "devices": sorted({x.get("device", "?") for x in good}),
                    "texts_agree": all(x["text"] == good[0]["text"] for x in good),
                }
                if rt == "mlx":
                    chk = [x for x in good if "stream_tokens_equal" in x]
                    row[rt]["stream_tokens_equal"] = chk[0]["stream_tokens_equal"] if chk else None
                    row[rt]["stream_tps"] = chk[0]["stream_tps"] if chk else None
                    row[rt]["stream_tps_loop"] = chk[0]["tps"] if chk else None
            if ok.get("mlx") and ok.get("fp"):
                row["ratio_of_medians"] = row["fp"]["tps_median"] / row["mlx"]["tps_median"]
                # Repetition i of one runtime against repetition i of the other (same pass).
                per = [f["tps"] / m["tps"] for f, m in zip(r["fp"], r["mlx"])
                       if "error" not in f and "error" not in m]
                row["per_rep_ratios"] = per
                row["median_per_rep_ratio"] = statistics.median(per) if per else None
                a_t, b_t = ok["fp"][0]["text"].strip(), ok["mlx"][0]["text"].strip()
                common = next((i for i, (x, y) in enumerate(zip(a_t, b_t)) if x != y),
                              min(len(a_t), len(b_t)))
                row["same_text"] = a_t == b_t
                row["common_prefix_chars"] = common
                row["chars"] = max(len(a_t), len(b_t))
            for v in RUNTIME_ENV:
                if not (ok.get(v) and ok.get("fp")):
                    continue
                tv = row[v]["tps_median"]
                row[v]["vs_fp"] = tv / row["fp"]["tps_median"]
                if ok.get("mlx"):
                    row[v]["vs_mlx"] = tv / row["mlx"]["tps_median"]
                row[v]["per_rep_vs_fp"] = [
                    n["tps"] / f["tps"] for n, f in zip(r[v], r["fp"])
                    if "error" not in n and "error" not in f]
                row[v]["text_equals_fp"] = ok[v][0]["text"] == ok["fp"][0]["text"]
            if ok.get("fp"):
                f = ok["fp"][0]
                ctx = (f.get("prompt_tokens") or 0) + (f.get("generated") or 0) / 2
                b = self.bytes_per_token(name, s, ctx)
                row["bytes_per_token"] = b
                if b and self.hbm:
                    row["hbm_bound_tps"] = self.hbm * 1e9 / b
                    row["fp_of_bound"] = row["fp"]["tps_median"] / row["hbm_bound_tps"]
            rows[name] = row
        # Hybrids: host build per token against qwen3_moe's at the same depth.
        for row in rows.values():
            if row["arch"] in FLASHPACK_ONLY and "fp" in row:
                base = rows.get(row["model"].replace(row["arch"], "qwen3_moe", 1))
                if base and "fp" in base and base["fp"]["build_ms"]:
                    row["build_vs_qwen3_moe"] = row["fp"]["build_ms"] / base["fp"]["build_ms"]
        return rows

    def table(self, models):
        a = self.a
        rows = self.rows(models)
        devices = sorted({d for r in rows.values() for rt in RUNTIMES + tuple(RUNTIME_ENV) if rt in r
                          for d in r[rt]["devices"]})
        f1 = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        f2 = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        pct = lambda x: "-" if x is None else f"{100 * x:.2g}%"  # noqa: E731
        f0 = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731

        def mlx_build(m):
            if not m or m["build_ms"] is None:
                return "-"
            return f"{m['build_ms']:.2f} ({f2(m['async_eval_ms'])})"

        def tps(r):
            if r is None:
                return "-"
            return (f"{r['tps_median']:.1f} ({r['tps_min']:.1f}-{r['tps_max']:.1f}, "
                    f"{100 * r['rel_spread']:.1f}%)")

        deep = a.deep_experts or (4 if a.small else 16)
        _, s8 = shape(a, "qwen3_moe", 8)
        lines = [
            f"{', '.join(devices) or self.device}"
            + (" **(MIXED CARDS: compare only rows of one card)**" if len(devices) > 1 else "")
            + f"; {a.max_tokens} greedy tokens, all experts resident, page cache dropped before "
            f"each run; medians of the repetitions (reps per row in the last column), "
            f"interleaved; spread = (max - min) / median.",
            "",
            f"Shape: hidden {s8['hidden']}, {s8['heads']} heads of {s8['head_dim']}, vocabulary "
            f"{s8['vocab']}, {s8['experts']} experts top-{s8['top_k']} of width {s8['width']} up "
            f"to 8 layers, {deep} experts top-{s8['top_k']} above 8 layers (the same work per "
            f"token); mlx-lm's 4-bit group-64 codes, the same in the pack. HBM {f1(self.hbm)} GB/s"
            + (" (from the card's name)" if a.hbm_gb_s is None and self.hbm else "") + ".",
            "",
            "| arch | layers | experts | mlx-lm tok/s med (min-max, spread) | flashpack tok/s "
            "med (min-max, spread) | ratio of medians | median per-rep ratio (min-max) | fp "
            "build ms/tok | fp wait ms/tok | fp arrays/tok | mlx build ms/tok (of it async_eval) "
            "| mlx wait ms/tok | MB read/tok | HBM bound tok/s | fp of bound | same greedy text "
            "(common prefix chars) | reps mlx/fp |",
            "|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in rows.values():
            m, f = row.get("mlx"), row.get("fp")
            only = row["arch"] in FLASHPACK_ONLY or a.no_mlx
            if row.get("median_per_rep_ratio") is not None:
                per = row["per_rep_ratios"]
                prr = f"{row['median_per_rep_ratio']:.3f}x ({min(per):.3f}-{max(per):.3f})"
                same = (f"{'yes' if row['same_text'] else 'no'} ({row['common_prefix_chars']}/"
                        f"{row['chars']})")
                ratio = f"**{row['ratio_of_medians']:.3f}x**"
            else:
                prr = same = ratio = "-"
            if only:
                same = "flashpack only"
            errs = row.get("mlx_errors", []) + row.get("fp_errors", [])
            if row.get("build_error"):
                same = f"build error: {row['build_error'][-200:]!r}"
            elif errs:
                same += f"; {len(errs)} errors: {errs[0][-200:]!r}"
            lines.append(
                f"| {row['arch']} | {row['layers']} | {row['experts']} top-{row['top_k']} | "
                f"{'n/a' if only else tps(m)} | {tps(f)} | {ratio} | {prr} | "
                f"{f2(f and f['build_ms'])} | {f2(f and f['wait_ms'])} | "
                f"{f0(f and f.get('arrays'))} | "
                f"{mlx_build(m)} | {f2(m and m['wait_ms'])} | "
                f"{f1(row['bytes_per_token'] / 1e6 if row.get('bytes_per_token') else None)} | "
                f"{f0(row.get('hbm_bound_tps'))} | "
                f"{pct(row.get('fp_of_bound'))} | "
                f"{same} | {'-' if only else row.get('mlx_reps', 0)}/{row.get('fp_reps', 0)} |")
        hyb = [r for r in rows.values() if r["arch"] in FLASHPACK_ONLY]
        if hyb:
            lines += ["", "Hybrids, flashpack's host build per token against qwen3_moe's at the "
                      "same depth (target: at most 1.5x):", ""]
            for r in hyb:
                base = rows.get(r["model"].replace(r["arch"], "qwen3_moe", 1))
                mine = r["fp"]["build_ms"] if "fp" in r else None
                theirs = base["fp"]["build_ms"] if base and "fp" in base else None
                lines.append(
                    f"- {r['arch']}, {r['layers']} layers: {f2(mine)} ms against {f2(theirs)} ms: "
                    f"**{f2(r.get('build_vs_qwen3_moe'))}x**; "
                    f"{f1(r['fp']['tps_median'] if 'fp' in r else None)} tok/s, "
                    f"{f0(r.get('hbm_bound_tps'))} tok/s bound by the bytes read")
        for v, env in RUNTIME_ENV.items():
            have = [r for r in rows.values() if r.get(v)]
            if not have:
                continue
            spelt = " ".join(f"{k}={x}" for k, x in env.items())
            lines += ["", f"flashpack with `{spelt}` ({v}), in the same interleaved repetitions:",
                      "",
                      f"| arch | layers | {v} tok/s med (min-max, spread) | against fp (ratio of "
                      "medians) | per-rep (min-max) | against mlx-lm | build / wait ms/tok | "
                      "arrays/tok | same text as fp |",
                      "|---|---:|---|---:|---|---:|---|---:|---|"]
            for r in have:
                n = r[v]
                per = n.get("per_rep_vs_fp") or []
                prr = (f"{statistics.median(per):.3f}x ({min(per):.3f}-{max(per):.3f})"
                       if per else "-")
                vs_fp = f"**{n['vs_fp']:.3f}x**" if n.get("vs_fp") else "-"
                vs_mlx = f"{n['vs_mlx']:.3f}x" if n.get("vs_mlx") else "-"
                same = {True: "yes", False: "**no**", None: "-"}[n.get("text_equals_fp")]
                lines.append(f"| {r['arch']} | {r['layers']} | {tps(n)} | {vs_fp} | {prr} | "
                             f"{vs_mlx} | {f2(n['build_ms'])} / {f2(n['wait_ms'])} | "
                             f"{f0(n.get('arrays'))} | {same} |")
        notes = []
        for r in rows.values():
            m = r.get("mlx")
            if m and m.get("stream_tokens_equal") is not None:
                notes.append(f"- {r['model']}: timed loop {m['stream_tps_loop']:.1f} tok/s, "
                             f"stream_generate after it in the same process "
                             f"{m['stream_tps']:.1f} tok/s, same tokens: "
                             f"{'yes' if m['stream_tokens_equal'] else '**NO**'}")
            for rt in RUNTIMES + tuple(RUNTIME_ENV):
                if r.get(rt) and not r[rt]["texts_agree"]:
                    notes.append(f"- {r['model']}: {rt} texts differ between repetitions")
        if notes:
            lines += ["", "Checks (mlx-lm's timed loop against stream_generate on the first "
                      "repetition; repeatability of the greedy texts):", ""]
            lines += notes
        want = sum(a.reps * len(self.runtimes(r["arch"])) for r in rows.values())
        have = sum(min(a.reps, r.get(f"{rt}_reps", 0)) for r in rows.values()
                   for rt in self.runtimes(r["arch"]))
        if have < want or self.stopped:
            lines += ["", f"Incomplete: {have} of {want} runs"
                      + (f" ({self.stopped})" if self.stopped else "")
                      + ": run again with the same --work (or --resume) to go on."]
        return rows, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/root/fparch")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--layers", default=None, help="depths, comma-separated (default 8,32; "
                    "--small: 2)")
    ap.add_argument("--deep-experts", type=int, default=None,
                    help="experts per layer above 8 layers (default 16; --small: 4)")
    ap.add_argument("--reps", type=int, default=None, help="default 5 (--small: 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 256 (--small: 16)")
    ap.add_argument("--warmup-tokens", type=int, default=32,
                    help="a discarded run of this many tokens per (model, runtime) on each "
                         "machine, first (0: none)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run after this many seconds (nor a build expected to end "
                         "after it); print the table of what there is")
    ap.add_argument("--hbm-gb-s", type=float, default=None,
                    help="the GPU's memory bandwidth (default from nvidia-smi's card name: H100 "
                         "SXM 3350, H200 4800)")
    ap.add_argument("--resume", action="append", default=None,
                    help="an earlier results.json (e.g. brought back from another machine in "
                         "$OUT) whose repetitions count as done here; may be repeated")
    ap.add_argument("--table-only", action="store_true",
                    help="no builds, no runs: the table of the results there are")
    ap.add_argument("--retry-errors", action="store_true",
                    help="drop failed runs from the results, so they run again")
    ap.add_argument("--no-mlx", action="store_true", help="flashpack only")
    ap.add_argument("--uncompiled", action="store_true",
                    help="also flashpack with mx.compile off (FLASHPACK_COMPILE=0), a third "
                         "runtime in the same interleaved repetitions")
    ap.add_argument("--fp-variant", action="append", default=[],
                    help="NAME:KEY=VALUE[,KEY=VALUE]: flashpack run with that environment as "
                         "one more runtime of the same repetitions (may be repeated)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--small", action="store_true",
                    help="a smoke test: hidden 256, 8 experts top-2 of width 128, 4 heads of 64, "
                         "2 layers, 16 tokens, 2 reps")
    a = ap.parse_args()
    a.layers = a.layers or ("2" if a.small else "8,32")
    a.reps = a.reps if a.reps is not None else (2 if a.small else 5)
    a.max_tokens = a.max_tokens if a.max_tokens is not None else (16 if a.small else 256)
    if a.uncompiled:
        RUNTIME_ENV["fp_nc"] = {"FLASHPACK_COMPILE": "0"}
    for spec in a.fp_variant:
        name, _, env = spec.partition(":")
        if not name.startswith("fp_") or not env:
            ap.error(f"--fp-variant {spec!r}: give NAME:KEY=VALUE with NAME starting fp_")
        RUNTIME_ENV[name] = dict(kv.split("=", 1) for kv in env.split(","))
    a.work = os.path.abspath(a.work)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    b = Bench(a)
    b.log(f"device {b.device}, HBM {b.hbm} GB/s")
    models = [(arch, int(l)) for l in a.layers.split(",") for arch in a.archs.split(",")]
    if not a.table_only:
        ready = b.build_all(models)
        if not a.build_only:
            b.run_reps(ready)
        b.save()
    rows, lines = b.table(models)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "archs.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "archs.json"), "w") as f:
        json.dump({"device": b.device, "hbm_gb_s": b.hbm, "max_tokens": a.max_tokens,
                   "reps": a.reps, "small": a.small, "stopped": b.stopped, "rows": rows,
                   "runs": b.state["runs"], "models": b.state["models"]}, f, indent=1)
    if os.path.abspath(a.out) != os.path.abspath(a.work):
        shutil.copy(b.path, os.path.join(a.out, "results.json"))
    b.log("done" if not b.stopped else b.stopped)


if __name__ == "__main__":
    main()
