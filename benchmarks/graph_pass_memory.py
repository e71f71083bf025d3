"""Peak memory of the graph passes on a graph with external data (a benchmark, never a test).

A synthetic QDQ graph of --layers int8 MatMul layers ([K, K] weights behind unit-scale activation Q/DQ, the
deployment form's shape) written as graph + external-data file, then, each in a fresh process: the TensorRT-rules
check (`dq-export --check`) and the FP16 fallback pass (`dq-export --fp16-from`), with the process's peak RSS
(VmHWM) and wall time. The code measured is whatever `dilatequant` each --trees entry puts first on PYTHONPATH,
so two commits are measured side by side.

    flock /tmp/dq-heavy.lock python benchmarks/graph_pass_memory.py --trees before=/path/a after=/path/b \
        --out benchmarks/results/export_profile/graph_pass_memory.json

Writes the JSON and, beside it, a markdown table (.md) with each tree's figures and the ratios to the first tree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from export_profile import machine  # benchmarks/ (this script's folder is on sys.path)

PROBE = r"""
import json, sys, time
from pathlib import Path
task, src, dst = sys.argv[1:4]
t0 = time.perf_counter()
if task == "check":
    from dilatequant.dq_export.trt_rules import check_file
    result = len(check_file(src))
else:
    from dilatequant.dq_export.fp16 import convert_file
    result = convert_file(src, dst)["fp32_nodes"]
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"result": result, "wall_s": round(wall, 2), "peak_rss_mib": round(hwm / 1024, 1)}))
"""


def build_graph(path: Path, layers: int, k: int, typed: bool) -> int:
    """typed: every node output declared (value_info), as the torch exporter writes it; else the passes infer
    the types first (graph_passes.ensure_types), as for a hand-built graph."""
    import numpy as np
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    from dilatequant.dq_export.onnx_files import save_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes, x = [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, k), dtype=np.int8), f"w{i}"),
                  numpy_helper.from_array(np.full(k, 1e-3, np.float32), f"s{i}"),
                  numpy_helper.from_array(np.full(k, 0.5, np.float32), f"m{i}")]
        nodes += [helper.make_node("Mul", [x, f"m{i}"], [f"u{i}"], name=f"mul{i}"),
                  helper.make_node("Clip", [f"u{i}", "", ""], [f"c{i}"], name=f"clip{i}"),
                  helper.make_node("QuantizeLinear", [f"c{i}", "one", "z"], [f"q{i}"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", "one", "z"], [f"d{i}"], name=f"dq{i}"),
                  helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"wf{i}"], axis=1, name=f"dqw{i}"),
                  helper.make_node("MatMul", [f"d{i}", f"wf{i}"], [f"y{i}"], name=f"mm{i}"),
                  helper.make_node("Tanh", [f"y{i}"], [f"t{i}"], name=f"act{i}")]
        x = f"t{i}"
    declared = [helper.make_tensor_value_info(o, TP.INT8 if n.op_type == "QuantizeLinear" else TP.FLOAT,
                                              [k, k] if n.name.startswith("dqw") else ["batch", k])
                for n in nodes for o in n.output if o != x] if typed else []
    g = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info(x, TP.FLOAT, ["batch", k])], inits, value_info=declared)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    return save_model(model, path, threshold=0)["bytes"]


# name -> (probe task, graph typed?, what). The graph carries no value_info: the passes infer its types first, as
# for a hand-built graph (the recorded figures are of that graph).
TASKS = {"check": ("check", False, "rules check (dq-export --check)"),
         "fp16": ("fp16", False, "FP16 fallback (dq-export --fp16-from)")}


def tree_commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"not a git checkout: {tree}"


def probe(tree: str, task: str, graph: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, task, str(graph), str(out)],
                          env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {task} probe failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    labels = list(report["results"])
    first = labels[0]
    rows = []
    for task, (_, _, what) in TASKS.items():
        for label in labels:
            r, b = report["results"][label][task], report["results"][first][task]
            rows.append(f"| {what} | {label} ({report['trees'][label]['commit'][:10]}) | {r['peak_rss_mib']:.0f} | "
                        f"{r['peak_rss_mib'] / b['peak_rss_mib']:.2f} | {r['wall_s']:.1f} | {r['wall_s'] / b['wall_s']:.2f}"
                        f" | {r['result']} |")
    m, env = report["machine"], report["environment"]
    return f"""# Graph passes on a graph with external data: peak memory

{report['graph']}, {report['graph_bytes'] / 2**20:.0f} MiB (graph + external data file), without value_info, so
the passes infer the types first (graph_passes.ensure_types). Each pass runs in a fresh process that imports the tree
named; peak RSS is the process's VmHWM (imports included), wall time is the pass alone.

| pass | tree | peak RSS MiB | vs {first} | wall s | vs {first} | result (violations / FP32 nodes) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- Machine: {m['cpu_model']} (avx512: {m['avx512']}), {m['cores']} cores, shared with other jobs (one run each;
  wall times are contended, peak RSS is not). torch {env['torch']}, onnx {env['onnx']}.
- Command: `{report['command']}`; full record in {report['json']}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", required=True, metavar="LABEL=PATH",
                   help="code trees to measure, the first is the baseline of the ratios")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--k", type=int, default=4096, help="weights are [k, k] int8 (16 MiB at 4096)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dq-graph-pass-memory"), help="graphs (not committed)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export_profile/graph_pass_memory.json"))
    a = p.parse_args()
    trees = {}
    for entry in a.trees:
        label, sep, tree = entry.partition("=")
        if not sep or not (Path(tree) / "dilatequant").is_dir():
            p.error(f"--trees {entry}: give LABEL=PATH, PATH a folder holding the dilatequant package")
        trees[label] = str(Path(tree).resolve())
    from dilatequant.core.reporting import environment, write_json, write_text

    a.work.mkdir(parents=True, exist_ok=True)
    graphs = {typed: a.work / ("unet_typed.onnx" if typed else "unet.onnx") for typed in {t[1] for t in TASKS.values()}}
    sizes = {typed: build_graph(g, a.layers, a.k, typed) for typed, g in graphs.items()}
    results = {}
    for label, tree in trees.items():
        for name, (task, typed, _) in TASKS.items():
            results.setdefault(label, {})[name] = probe(tree, task, graphs[typed], a.work / f"{label}_fp16.onnx")
            print(label, name, results[label][name], flush=True)
    report = {"what": "peak RSS and wall time of the rules check and the FP16 pass on a graph with external data, "
                      "one fresh process each", "graph_bytes": sizes[False],
              "graph": f"{a.layers} int8 MatMul layers of [{a.k}, {a.k}] behind unit-scale Q/DQ",
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "trees": {label: {"path": tree, "commit": tree_commit(tree)} for label, tree in trees.items()},
              "results": results, "environment": environment(), "machine": machine(), "json": a.out.name}
    write_json(a.out, report)
    write_text(a.out.with_suffix(".md"), markdown(report))


if __name__ == "__main__":
    main()
