#!/usr/bin/env python3
"""CUDA graphs per decoded token, flashpack against mlx-lm (issue 26).

The `ncu` table (scripts/kernel_profile.py) showed the same kernels with the same device time in both
runtimes, yet flashpack waits for the device 0.3-0.5 ms a token where mlx-lm does not. What `ncu`
cannot see is how the kernels are put into CUDA graphs: how many graphs a token launches, how many
nodes each holds, and how much of each graph can run at once. MLX's CUDA backend writes each graph it
launches as a Graphviz file when MLX_SAVE_CUDA_GRAPHS_DOT_FILE is set; this runs each runtime for
--short and --long greedy tokens with it and compares, per decoded token (the difference of the two
runs over the extra tokens):

- graphs launched; nodes by type (kernel, memcpy, memset, empty, child graph, ...); edges;
- the critical path: the longest chain of kernel nodes through each graph's edges (what cannot
  overlap), summed over the graphs;
- the distinct graph shapes (a shape is the node types and edges without addresses): MLX keys its
  graph cache on them, and a shape that keeps changing is re-instantiated.

    python3 scripts/graph_profile.py --pack P.flashpack --mlx Q4_FOLDER [--short 4 --long 12]

(`bash scripts/bench_gpu.sh graphs --arch mixtral` builds the archs benchmark's 8-layer model first
when it is missing.) Out: graphs.md, graphs.json and dots.tar (the long runs' last graphs) in --out.
"""
import collections
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

from kernel_profile import command, parse_args

NODE = re.compile(r'^\s*"([^"]+)"\s*\[(.*)$')
EDGE = re.compile(r'^\s*"([^"]+)"\s*->\s*"([^"]+)"')
TYPES = ("KERNEL", "MEMCPY", "MEMSET", "HOST", "CHILD_GRAPH", "GRAPH", "EMPTY", "WAIT_EVENT",
         "EVENT_RECORD", "EXT_SEMAS_SIGNAL", "EXT_SEMAS_WAIT", "MEM_ALLOC", "MEM_FREE", "CONDITIONAL")


def node_type(label):
    for line in label.split("\\n") + label.split("\n"):
        word = line.strip().strip('"').upper()
        for t in TYPES:
            if word == t or word.startswith(t + " ") or word.startswith(t + "\\"):
                return t
    for t in TYPES:
        if re.search(r"\b" + t + r"\b", label.upper()):
            return t
    return "OTHER"


def parse(path):
    """One dot file: node types, edges, the longest chain of kernel-like nodes, and a shape key."""
    nodes = {}
    edges = []
    text = open(path, errors="replace").read()
    # Labels span lines: join each node definition up to its closing '];'.
    buf = None
    for line in text.splitlines():
        if buf is not None:
            buf[1].append(line)
            if line.rstrip().endswith("];") or line.rstrip().endswith("]"):
                nodes[buf[0]] = node_type("\n".join(buf[1]))
                buf = None
            continue
        e = EDGE.match(line)
        if e:
            edges.append((e.group(1), e.group(2)))
            continue
        m = NODE.match(line)
        if m:
            rest = m.group(2)
            if rest.rstrip().endswith("];") or rest.rstrip().endswith("]"):
                nodes[m.group(1)] = node_type(rest)
            else:
                buf = (m.group(1), [rest])
    weight = {n: (1 if t in ("KERNEL", "MEMCPY", "MEMSET", "CHILD_GRAPH", "GRAPH") else 0)
              for n, t in nodes.items()}
    succ = collections.defaultdict(list)
    indeg = collections.Counter()
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
        weight.setdefault(a, 0)
        weight.setdefault(b, 0)
    # Longest weighted path (Kahn's order).
    best = {n: weight[n] for n in weight}
    queue = [n for n in weight if indeg[n] == 0]
    seen = 0
    while queue:
        n = queue.pop()
        seen += 1
        for s in succ[n]:
            best[s] = max(best[s], best[n] + weight[s])
            indeg[s] -= 1
            if indeg[s] == 0:
                queue.append(s)
    types = collections.Counter(nodes.values())
    # The shape: node types in order of their names' numbers, and edges by index.
    order = sorted(nodes, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)])
    index = {n: i for i, n in enumerate(order)}
    key = ",".join(nodes[n][0] for n in order) + "|" + ",".join(
        f"{index.get(a, -1)}-{index.get(b, -1)}" for a, b in sorted(edges, key=lambda e: (index.get(e[0], -1), index.get(e[1], -1))))
    return {
        "nodes": len(nodes),
        "types": dict(types),
        "edges": len(edges),
        "critical": max(best.values()) if best else 0,
        "work": sum(weight.values()),
        "acyclic": seen == len(weight),
        "shape": hashlib.blake2s(key.encode(), digest_size=6).hexdigest(),
    }


def run(cmd, dot_dir, env_extra):
    shutil.rmtree(dot_dir, ignore_errors=True)
    os.makedirs(dot_dir)
    env = dict(os.environ, MLX_SAVE_CUDA_GRAPHS_DOT_FILE=os.path.join(dot_dir, "g"), **env_extra)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    files = sorted(glob.glob(os.path.join(dot_dir, "g_*.dot")),
                   key=lambda f: int(re.search(r"_(\d+)\.dot$", f).group(1)))
    return files, [parse(f) for f in files]


def totals(graphs):
    t = collections.Counter()
    for g in graphs:
        t["graphs"] += 1
        t["nodes"] += g["nodes"]
        t["edges"] += g["edges"]
        t["critical"] += g["critical"]
        t["work"] += g["work"]
        for k, v in g["types"].items():
            t["type:" + k] += v
    return t


def main():
    a = parse_args(__doc__, "/tmp/gprof")
    runtimes = [("fp", {}), ("mlx", {})]
    for spec in a.fp_env:
        name, _, kv = spec.partition(":")
        runtimes.append((name, dict(x.split("=", 1) for x in kv.split(",") if x)))
    steps = a.long - a.short
    result = {}
    tails = {}
    for rt, env in runtimes:
        got = []
        for n in (a.short, a.long):
            cmd = command(a, "mlx" if rt == "mlx" else "fp", n)
            print(f"{rt}, {n} tokens", file=sys.stderr, flush=True)
            files, graphs = run(cmd, os.path.join(a.work, f"{rt}-{n}"), env)
            got.append(graphs)
            if n == a.long:
                tails[rt] = files[-3 * 12:]
        t0, t1 = totals(got[0]), totals(got[1])
        per = {k: (t1[k] - t0[k]) / steps for k in set(t0) | set(t1)}
        long_graphs = got[1]
        tail = long_graphs[len(got[0]):]
        shapes = collections.Counter(g["shape"] for g in tail)
        all_shapes = collections.Counter(g["shape"] for g in long_graphs)
        result[rt] = {
            "per_token": per,
            "tail_sequence": [(g["nodes"], g["types"].get("KERNEL", 0), g["edges"], g["critical"],
                               g["shape"]) for g in tail[-40:]],
            "shapes_in_decode": len(shapes),
            "shapes_in_run": len(all_shapes),
            "acyclic": all(g["acyclic"] for g in long_graphs),
            "graphs_short": len(got[0]),
            "graphs_long": len(got[1]),
        }
    keys = sorted({k for r in result.values() for k in r["per_token"]},
                  key=lambda k: (k.startswith("type:"), k))
    names = [rt for rt, _ in runtimes]
    lines = [f"Per decoded token (CUDA graphs of runs of {a.long} and {a.short} greedy tokens, the "
             f"difference over {steps}):", "",
             "| per token | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{result[n]['per_token'].get(k, 0):.1f}" for n in names) + " |")
    for n in names:
        r = result[n]
        lines += ["", f"**{n}**: graphs {r['graphs_short']} / {r['graphs_long']} (short / long run), "
                  f"distinct shapes in the decode tail {r['shapes_in_decode']}, in the whole run "
                  f"{r['shapes_in_run']}, acyclic {r['acyclic']}. Last graphs (nodes, kernels, edges, "
                  "critical path, shape):", "",
                  " ".join(f"{x[0]}/{x[1]}/{x[2]}/{x[3]}/{x[4][:4]}" for x in r["tail_sequence"])]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "graphs.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "graphs.json"), "w") as f:
        json.dump(result, f, indent=1)
    with tarfile.open(os.path.join(a.out, "dots.tar.gz"), "w:gz") as tar:
        for rt, files in tails.items():
            for p in files:
                tar.add(p, arcname=f"{rt}/{os.path.basename(p)}")


if __name__ == "__main__":
    main()
