#!/usr/bin/env python3
"""The pipeline hop on loopback, against the ring backend's own ping-pong, in one run (issue 32).

1. `flashpack bench ring` between two ranks on 127.0.0.1: the median round trip of MLX's ring
   `send`/`recv` for the sizes one pass moves (the header, the model's hidden state of one
   position, and the reply: a greedy pick of 8 bytes, or the logits).
2. `flashpack run PACK --hostfile ...` on 2 ranks, greedy: rank 0 reports its passes down the
   pipeline and their total time from its first message sent to the reply received (its own
   layers already computed); every other rank reports the time it spent computing its passes,
   from the pass's arrival to its result (neither hop counted). Their difference over the passes
   is what the hops cost a pass: both messages' latency and transfer, the ring's threads, and
   each process's waiting, measured in the same run as the ping-pong.
3. The same prompt on one process, for the decode rate without a pipeline.

    python3 scripts/bench_pipeline.py --pack P.flashpack [--tokens 64] [--reps 3]

Prints a Markdown table; --json for the raw numbers. Repetitions are interleaved.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The history of the city"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def hostfile(n):
    ports = free_ports(n + 1)
    # The heartbeat port is the one after the hostfile's highest: leave it free.
    ports = sorted(ports)[:n]
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
    f.close()
    return f.name


def ranks(binary, n, args, env=None):
    """Starts n ranks of `binary args --hostfile H --rank r`; their (stdout, stderr), rank 0 first."""
    h = hostfile(n)
    e = dict(os.environ, **(env or {}))
    procs = [subprocess.Popen([binary] + args + ["--hostfile", h, "--rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
             for r in range(n - 1, -1, -1)]
    outs = [p.communicate(timeout=1800) for p in procs]
    os.unlink(h)
    for p, (o, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a rank failed ({p.returncode}): {err[-2000:]}")
    return list(reversed(outs))


def ping_pong(binary, sizes, reps):
    outs = ranks(binary, 2, ["bench", "ring", "--sizes", ",".join(map(str, sizes)),
                             "--reps", str(reps), "--json"])
    return json.loads(outs[0][0])


def pipeline_run(binary, pack, n, tokens):
    outs = ranks(binary, n, ["run", pack, "--prompt", PROMPT, "--max-tokens", str(tokens),
                             "--raw", "--json"])
    text = outs[0][0]
    down = re.search(r"rank 0: .*, (\d+) passes down \((\d+) answered, \d+ sampled there\) in ([0-9.]+) s", outs[0][1])
    busy = [re.search(r"rank \d+: .*, (\d+) passes \((\d+) positions\) in ([0-9.]+) s", e)
            for _, e in outs[1:]]
    if not down or not all(busy):
        raise SystemExit(f"no stats lines: {outs[0][1][-1500:]}")
    passes, rt = int(down.group(1)), float(down.group(3))
    busy_s = sum(float(b.group(3)) for b in busy)
    dec = re.search(r'"decode_tokens_per_s":([0-9.eE+-]+)', outs[0][1])
    return {"text": text, "passes": passes, "round_trip_s": rt, "busy_s": busy_s,
            "hop_ms_per_pass": (rt - busy_s) / max(passes, 1) * 1e3,
            "decode_tok_s": float(dec.group(1)) if dec else None}


def single_run(binary, pack, tokens):
    p = subprocess.run([binary, "run", pack, "--prompt", PROMPT, "--max-tokens", str(tokens),
                        "--raw", "--json"], capture_output=True, text=True, check=True)
    dec = re.search(r'"decode_tokens_per_s":([0-9.eE+-]+)', p.stderr)
    return {"text": p.stdout, "decode_tok_s": float(dec.group(1)) if dec else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/flashpack"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden-bytes", type=int, default=None,
                    help="one position's hidden state in bytes (default: from inspect)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.hidden_bytes is None:
        info = subprocess.run([a.binary, "inspect", a.pack, "--json"], capture_output=True,
                              text=True, check=True).stdout
        hidden = json.loads(info[info.index("{"):]).get("hidden_size")
        a.hidden_bytes = 2 * int(hidden) if hidden else 4096
    sizes = [32, a.hidden_bytes, 8]
    rows = []
    for rep in range(a.reps):
        pp = {r["bytes"]: r for r in ping_pong(a.binary, sizes, 200)}
        pipe = pipeline_run(a.binary, a.pack, 2, a.tokens)
        one = single_run(a.binary, a.pack, a.tokens)
        # One decode pass: header + hidden state to rank 1, then header + pick back.
        expect = sum(pp[s]["round_trip_us"] for s in (32, a.hidden_bytes)) / 2 * 1e-3 \
            + sum(pp[s]["round_trip_us"] for s in (32, 8)) / 2 * 1e-3
        rows.append({"rep": rep, "ping_pong": pp, "pipeline": pipe, "single": one,
                     "ping_pong_pass_ms": expect, "same_text": pipe["text"] == one["text"]})
        print(f"rep {rep}: hop {pipe['hop_ms_per_pass']:.3f} ms/pass, ping-pong's "
              f"{expect:.3f} ms; decode {pipe['decode_tok_s']} tok/s on 2 ranks, "
              f"{one['decode_tok_s']} on one", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"| measure (median of {a.reps}, interleaved) | value |")
    print("|---|---:|")
    for s in sizes:
        print(f"| ring ping-pong round trip, {s} bytes (us) | "
              f"{med([r['ping_pong'][s]['round_trip_us'] for r in rows]):.1f} |")
    print(f"| a decode pass's messages by the ping-pong (ms) | "
          f"{med([r['ping_pong_pass_ms'] for r in rows]):.3f} |")
    print(f"| hop per pass in the pipelined run (ms) | "
          f"{med([r['pipeline']['hop_ms_per_pass'] for r in rows]):.3f} |")
    print(f"| passes per run | {rows[0]['pipeline']['passes']} |")
    print(f"| decode tok/s, 2 ranks | {med([r['pipeline']['decode_tok_s'] for r in rows]):.2f} |")
    print(f"| decode tok/s, 1 process | {med([r['single']['decode_tok_s'] for r in rows]):.2f} |")
    print(f"| same text, every repetition | {all(r['same_text'] for r in rows)} |")


if __name__ == "__main__":
    main()
