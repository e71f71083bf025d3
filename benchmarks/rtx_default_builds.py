"""dq-build-engine on a machine without a GPU: the int8, int4 and FP16-fallback graphs of the embedded `default`
model, each built by TensorRT-RTX through the user's own commands (a record, not a test: the tests build tiny
graphs of every flavor on every run).

    python benchmarks/rtx_default_builds.py --out benchmarks/results/rtx_default_builds

Runs, each in a fresh process: dq-calibrate W8A8 and W4A8 (--sym, PTQ: the builds need valid tables, not good
ones), dq-export (int8, of the W8A8 q.pt), dq-export --precision int4 (of the W4A8 one), dq-export --fp16-from,
then dq-build-engine --onnx G --engine P (no --backend: `auto` must pick TensorRT-RTX here) for each graph. Writes
<out>/rtx_default_builds.json and <out>/README.md with each build's sidecar summary (backend, version, built without a GPU, targets, plan size, Q/DQ layers) and
wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rtx_default_builds")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from dilatequant.core.reporting import environment, write_json, write_text

    work = a.work or Path(tempfile.mkdtemp(prefix="dq-rtx-default-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "dilatequant.cli"]
    q, q4 = work / "q.pt", work / "q_w4a8.pt"
    graphs = {"int8": work / "unet.onnx", "int4": work / "unet_int4.onnx", "fp16": work / "unet_fp16.onnx"}
    steps = {}
    for step, bits, ckpt in (("calibrate", "W8A8", q), ("calibrate W4A8", "W4A8", q4)):
        steps[step] = run([*cli, "calibrate", "--model", "default", "--bits", bits, "--sym", "--steps", "10",
                           "--calib-samples", "32", "--no-bkd", "--seed", "0", "--out", str(ckpt)])
    steps["export int8"] = run([*cli, "export", "--ckpt", str(q), "--onnx", str(graphs["int8"])])
    steps["export int4"] = run([*cli, "export", "--ckpt", str(q4), "--onnx", str(graphs["int4"]), "--precision",
                                 "int4"])
    steps["export --fp16-from"] = run([*cli, "export", "--fp16-from", str(graphs["int8"]), "--onnx",
                                       str(graphs["fp16"])])
    builds = {}
    for name, graph in graphs.items():
        plan = graph.with_suffix(".plan")
        wall = run([*cli, "build-engine", "--onnx", str(graph), "--engine", str(plan)])
        side = json.loads(Path(f"{plan}.json").read_text())
        layers = side["network"]["layer_types"]
        builds[name] = {"graph": graph.name, "wall_s": wall, "backend": side["backend"],
                        "backend_choice": side["backend_choice"], "tensorrt_rtx": side["tensorrt_rtx"],
                        "built_without_gpu": side["built_without_gpu"], "targets": side["targets"],
                        "engine_bytes": side["engine_bytes"], "plan_on_disk": plan.stat().st_size,
                        "rules_check": side["rules_check"], "quantize_layers": layers.get("QUANTIZE", 0),
                        "dequantize_layers": layers.get("DEQUANTIZE", 0)}
        print(name, builds[name], flush=True)
    report = {"what": "dq-build-engine (auto) on the int8, int4 and --fp16-from graphs of `default`, no GPU",
              "command": "python benchmarks/rtx_default_builds.py " + " ".join(sys.argv[1:]),
              "steps_wall_s": steps, "builds": builds, "environment": environment()}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "rtx_default_builds.json", report)
    env = report["environment"]
    rows = [f"| {n} | {b['backend']} {b['tensorrt_rtx']} | {b['built_without_gpu']} | "
            f"{b['targets']['source']} | {b['engine_bytes'] / 2**20:.1f} | {b['quantize_layers']} / "
            f"{b['dequantize_layers']} | {b['wall_s']} |" for n, b in builds.items()]
    write_text(a.out / "README.md", "\n".join([
        "# TensorRT-RTX plans of `default`'s graphs, built without a GPU", "",
        "`dq-build-engine --onnx G --engine P` with no `--backend` (auto picked TensorRT-RTX: no TensorRT 11 and no "
        "GPU here), on the graphs `dq-export` writes from W8A8 (int8, FP16) and W4A8 (int4) PTQ q.pt files of the embedded `default` model.", "",
        "| graph | backend | built without a GPU | targets | plan MiB | Q / DQ layers | build wall s |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Machine: {env.get('cpu')}, {env.get('cpu_count')} cores; torch {env.get('torch')}. Command: "
        f"`{report['command']}`; every figure in rtx_default_builds.json.", ""]))


if __name__ == "__main__":
    main()
