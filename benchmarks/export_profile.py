"""Where dq-export's time goes (a benchmark, never a test): wall time per stage, cProfile's hot spots, and the
exporter options tried.

One q.pt per model (`dq-calibrate --model M --bits W4A8 --steps 10 --calib-samples 64 --iters 0`, cached in
--work), then `export_and_verify` (what `dq-export --ckpt q.pt --onnx unet.onnx` runs) --repeats times, every
stage timed by a wrapper (inclusive wall seconds; stages nest: the exporter runs inside export_onnx), each run
with an empty calibration-input cache (a first export: the layer-wise parity samples its FP inputs), then once
more under cProfile. The code measured is whatever `dilatequant` is importable, so the same script times two
commits side by side (--label names the run; --append adds this invocation's runs to the label's JSON, so two
commits' runs can alternate process by process). --exporter-ab N times torch.onnx.export alone N times per
option, alternating, in one process (after a warm-up export), and checks that the graphs are identical.

    flock /tmp/dq-heavy.lock python benchmarks/export_profile.py --out benchmarks/results/export_profile --label after
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# (module, attribute): the stages, outermost first. Missing ones (an older commit) are skipped.
STAGES = [
    ("dilatequant.dq_export.pipeline", "export_and_verify"),
    ("dilatequant.calibrate.checkpoint", "load_checkpoint"),
    ("dilatequant.calibrate.checkpoint", "checkpoint_hash"),
    ("dilatequant.dq_export.qdq_graph", "export_onnx"),
    ("dilatequant.dq_export.fold", "deploy_unet"),
    ("torch.onnx", "export"),
    ("torch.export", "export"),
    ("dilatequant.dq_export.graph_passes", "simplify"),
    ("dilatequant.dq_export.graph_passes", "finalize_graph"),
    ("dilatequant.dq_export.fp16", "to_fp16"),
    ("dilatequant.dq_export.onnx_files", "save_model"),
    ("dilatequant.dq_export.trt_rules", "enforce"),
    ("dilatequant.dq_export.layer_parity", "layer_parity_report"),
    ("dilatequant.dq_export.layer_parity", "layer_inputs"),
    ("dilatequant.dq_export.layer_parity", "find_sites"),
    ("dilatequant.dq_export.layer_parity", "capture_layers"),
    ("dilatequant.dq_export.parity", "parity_report"),
    ("dilatequant.dq_export.parity", "parity_inputs"),
    ("dilatequant.dq_export.parity", "run_ort"),
    ("dilatequant.dq_export.parity", "run_torch"),
]
# functions inside torch.onnx.export, from the cProfile run: (path suffix, function name) -> what it is
EXPORTER_PARTS = {
    ("torch/export/_trace.py", "_export"): "torch.export tracing (non-strict, symbolic shapes)",
    ("torch/export/exported_program.py", "run_decompositions"): "decomposition (a second trace)",
    ("torch/onnx/_internal/exporter/_core.py", "_exported_program_to_onnx_program"): "translation to ONNX",
    ("torch/utils/_traceback.py", "format"): "stack traces: symbolization",
    ("torch/fx/experimental/sym_node.py", "binary_magic_impl"): "symbolic-shape arithmetic",
}


class StageTimer:
    """Wraps each stage function in every loaded module that refers to it; records inclusive wall seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def install(self) -> list[str]:
        import importlib

        found = []
        for mod_name, attr in STAGES:
            try:
                fn = getattr(importlib.import_module(mod_name), attr)
            except (ImportError, AttributeError):
                continue
            key = f"{mod_name.removeprefix('dilatequant.')}.{attr}"
            wrapped = self._wrap(key, fn)
            for m in list(sys.modules.values()):
                name = getattr(m, "__name__", "")
                if name.startswith("dilatequant") or name in ("torch.onnx", "torch.export"):
                    for k, v in list(vars(m).items()):
                        if v is fn:
                            setattr(m, k, wrapped)
            found.append(key)
        return found

    def _wrap(self, key, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
        return timed


def checkpoint(model: str, work: Path, steps: int, calib_samples: int) -> Path:
    from dilatequant.calibrate.distill import DistillConfig
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration

    path = work / f"{model}_W4A8.q.pt"
    if not path.is_file():
        w, act = QuantConfig.parse_bits("W4A8")
        run_calibration(CalibrationJob(model=model, config=QuantConfig(weight_bits=w, act_bits=act, num_steps=steps),
                                       distill=DistillConfig(iters=0, seed=0), bkd=False,
                                       calib_samples=calib_samples, out=path))
    return path


@contextlib.contextmanager
def fresh_cache():
    """An empty calibration-input cache (calibration_data.CACHE_ENV): every run samples its inputs, as a first
    export does."""
    before = os.environ.get("DQ_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="dq-export-profile-cache-") as tmp:
        os.environ["DQ_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("DQ_CACHE_DIR", None)
            else:
                os.environ["DQ_CACHE_DIR"] = before


def profile(run, top: int) -> dict:
    prof = cProfile.Profile()
    with fresh_cache():
        prof.runcall(run)
    stats = pstats.Stats(prof).stats
    rows = [{"function": f"{Path(file).name}:{line}({func})", "path": file, "calls": nc, "tottime_s": round(tt, 3),
             "cumtime_s": round(ct, 3)} for (file, line, func), (cc, nc, tt, ct, _) in stats.items()]
    parts = {}
    for (suffix, func), what in EXPORTER_PARTS.items():
        hits = [r for r in rows if r["path"].endswith(suffix) and r["function"].endswith(f"({func})")]
        if hits:
            parts[what] = max(r["cumtime_s"] for r in hits)
    total = max(r["cumtime_s"] for r in rows)
    return {"total_s": total, "note": "cProfile inflates Python-heavy code (tracing) more than native kernels",
            "exporter_parts_cumulative_s": parts,
            "top_cumulative": sorted(rows, key=lambda r: -r["cumtime_s"])[:top],
            "top_own_time": sorted(rows, key=lambda r: -r["tottime_s"])[:top]}


def exporter_ab(ckpt: Path, repeats: int) -> dict:
    """torch.onnx.export of the deployment-form UNet alone: stack traces recorded (torch's default) or not, and, for
    scale, static shapes; graphs compared after simplify (value_info aside)."""
    import onnx_ir as ir
    import torch
    import torch.fx.config as fx_config

    from dilatequant.calibrate.checkpoint import load_checkpoint
    from dilatequant.dq_export import qdq_graph as qg
    from dilatequant.dq_export.fold import deploy_unet
    from dilatequant.dq_export.graph_passes import simplify

    ck = load_checkpoint(ckpt)
    unet, ctx = deploy_unet(ck.qunet)
    wrapper = qg.ExportWrapper(unet.eval(), ctx, len(ck.timesteps), True).eval()
    names = qg.input_names(ck.model.cond_names, True)
    ins = qg.example_inputs(ck, 2, True)
    args = tuple(ins[n] for n in names)

    def export(stack_traces: bool, static: bool) -> tuple[float, bytes]:
        fx_config.do_not_emit_stack_traces = not stack_traces
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            prog = torch.onnx.export(wrapper, args, input_names=names, output_names=["noise_pred"], dynamo=True,
                                     opset_version=qg.OPSET, verbose=False, optimize=False,
                                     dynamic_shapes=qg._dynamic_shapes(names, static, qg.spatial_multiple(ck.qunet.unet)))
            seconds = time.perf_counter() - t0
        proto = ir.to_proto(simplify(prog.model))
        proto.graph.ClearField("value_info")
        return seconds, proto.SerializeToString(deterministic=True)

    export(True, False)  # warm-up: first-call registration costs
    options = {"stack traces recorded (torch default)": (True, False), "no stack traces": (False, False),
               "static shapes, no stack traces (not an option: the graph must take any batch and size)": (False, True)}
    times, graphs = {k: [] for k in options}, {}
    for _ in range(repeats):
        for name, (stack, static) in options.items():
            seconds, graph = export(stack, static)
            times[name].append(round(seconds, 2))
            graphs.setdefault(name, graph)
    fx_config.do_not_emit_stack_traces = False
    base = "stack traces recorded (torch default)"
    return {"seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "no_stack_traces_graph_identical": graphs["no stack traces"] == graphs[base],
            "torchscript_exporter": torchscript_export(wrapper, args, names)}


def torchscript_export(wrapper, args, names) -> str:
    """dynamo=False (the TorchScript exporter): whether it takes the deployment form at all."""
    import torch

    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, args, str(Path(tmp) / "ts.onnx"), input_names=names, output_names=["noise_pred"],
                              dynamo=False, opset_version=21, dynamic_axes={n: {0: "batch"} for n in names})
        except Exception as err:  # noqa: BLE001 - recorded, not raised
            return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return "exports"


def git_commit() -> str:
    import dilatequant

    root = Path(dilatequant.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DQ_CODE_COMMIT", f"not a git checkout: {root}")


def machine() -> dict:
    """lscpu's model name and whether the CPU has AVX-512: wall times compare only on the same CPU."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown")
    except (OSError, subprocess.CalledProcessError):
        model = "unknown (no lscpu)"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu_model": model, "avx512": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "cores": os.cpu_count()}


def markdown(out_dir: Path) -> str:
    """Every label's medians side by side, per model, from the JSONs in out_dir."""
    reports = [json.loads(f.read_text()) for f in sorted(out_dir.glob("*.json"))]
    reports = [r for r in reports if r.get("what", "").startswith("wall seconds per stage")]
    lines = ["# Where dq-export's time goes", "",
             "Wall seconds per stage of `dq_export.pipeline.export_and_verify` (what `dq-export --ckpt q.pt "
             "--onnx unet.onnx` runs), medians over the runs; stages nest (the exporter runs inside export_onnx), "
             "so columns do not add up. Each run starts from an empty calibration-input cache (a first export). "
             "Written by `benchmarks/export_profile.py`; the records are the JSONs beside this file.", ""]
    for model in sorted({r["model"] for r in reports}):
        rs = sorted((r for r in reports if r["model"] == model and r.get("median_stages_s")),
                    key=lambda r: (r["label"] != "before", r["label"]))  # a ratio reads new / before
        if not rs:
            continue
        labels = [r["label"] for r in rs]
        keys = list(dict.fromkeys(k for r in rs for k in r["median_stages_s"]))
        ratio = len(rs) == 2
        head = " | ".join(f"{r['label']} ({r['repeats']} runs) s" for r in rs)
        lines += [f"## {model}", "", f"| stage | {head} |" + (f" {labels[1]} / {labels[0]} |" if ratio else ""),
                  "|---|" + "---|" * (len(rs) + ratio)]
        for k in keys:
            vals = [r["median_stages_s"].get(k) for r in rs]
            row = f"| {k} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |"
            if ratio:
                row += f" {vals[1] / vals[0]:.2f} |" if vals[0] and vals[1] is not None else " - |"
            lines.append(row)
        lines.append("")
        for r in rs:
            m, env = r["machine"], r["environment"]
            lines.append(f"- {r['label']}: code {r['code_commit'][:10]}, {m['cpu_model']} (avx512: {m['avx512']}), "
                         f"{m['cores']} cores, torch {env['torch']}, onnx {env['onnx']}, onnxruntime "
                         f"{env['onnxruntime']}; 1-min load average before each run "
                         f"{[x['load_average_1min_before'] for x in r['runs']]}; graph {r.get('graph_bytes')} bytes; "
                         f"parity min SQNR {r.get('parity', {}).get('min_sqnr_db')} dB; command `{r['benchmark_command']}`")
        for r in rs:
            parts = r.get("cprofile", {}).get("exporter_parts_cumulative_s")
            if parts:
                lines.append(f"- {r['label']}, under cProfile (total {r['cprofile']['total_s']:.1f} s; cProfile "
                             "inflates Python-heavy code): " + "; ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
        for r in rs:
            ab = r.get("exporter_options")
            if ab:
                lines.append(f"- {r['label']}, torch.onnx.export alone, median s: " + "; ".join(
                    f"{k} {v:.2f}" for k, v in ab["median_s"].items()) + f"; graphs identical without stack traces: "
                    f"{ab['no_stack_traces_graph_identical']}; TorchScript exporter: {ab['torchscript_exporter']}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export_profile"))
    p.add_argument("--work", type=Path, default=Path("/tmp/dq-export-profile"), help="q.pt and graphs (not committed)")
    p.add_argument("--label", default="current", help="names the JSON (e.g. before / after)")
    p.add_argument("--models", nargs="+", default=["default"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed exports per model (0: only the cProfile run)")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    p.add_argument("--exporter-ab", type=int, default=0, metavar="N", help="time the exporter options N times each")
    p.add_argument("--top", type=int, default=40, help="functions kept from the cProfile run")
    p.add_argument("--append", action="store_true", help="add the runs to an existing JSON of the same label")
    a = p.parse_args()
    if a.repeats < 0 or a.exporter_ab < 0:
        p.error("--repeats and --exporter-ab count runs: give 0 or more")
    if a.repeats == 0 and a.no_profile and not a.exporter_ab:
        p.error("nothing to measure: --repeats 0 with --no-profile and no --exporter-ab")
    import torch

    from dilatequant.core.reporting import environment, write_json, write_text
    from dilatequant.dq_export import pipeline
    try:
        from dilatequant.dq_export.export_config import ExportConfig
    except ImportError:  # a commit from before export_config.py
        from dilatequant.dq_export.qdq_graph import ExportConfig

    torch.manual_seed(0)
    a.work.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    installed = timer.install()
    for model in a.models:
        ckpt = checkpoint(model, a.work, a.steps, a.calib_samples)
        onnx_path = a.work / f"{model}_{a.label}.onnx"
        summaries: list[dict] = []

        def export() -> None:
            summaries.append(pipeline.export_and_verify(ckpt, onnx_path, ExportConfig()))

        runs = []
        for _ in range(a.repeats):
            timer.seconds.clear()
            timer.calls.clear()
            gc.collect()
            load = os.getloadavg()[0]
            with fresh_cache():
                export()
            runs.append({"stages_s": {k: round(v, 3) for k, v in timer.seconds.items()}, "calls": dict(timer.calls),
                         "load_average_1min_before": round(load, 2)})
        out = a.out / f"{model}_{a.label}.json"
        result = json.loads(out.read_text()) if a.append and out.is_file() else {}
        runs = result.get("runs", []) + runs
        result.update({
            "what": "wall seconds per stage of dq_export.pipeline.export_and_verify (inclusive; stages nest)",
            "command": f"dq-calibrate --model {model} --bits W4A8 --steps {a.steps} --calib-samples "
                       f"{a.calib_samples} --iters 0 --out q.pt && dq-export --ckpt q.pt --onnx unet.onnx",
            "benchmark_command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "label": a.label, "code_commit": git_commit(), "model": model, "repeats": len(runs), "seed": 0,
            "runs": runs, "stages_timed": installed, "environment": environment(), "machine": machine()})
        if runs:
            result["median_stages_s"] = {k: round(statistics.median(r["stages_s"].get(k, 0.0) for r in runs), 2)
                                         for k in dict.fromkeys(k for r in runs for k in r["stages_s"])}
        if not a.no_profile:
            result["cprofile"] = profile(export, a.top)
        if summaries:  # this invocation ran the export: what it made
            summary = summaries[-1]
            result.update({
                "parity": {k: summary["parity"][k] for k in ("min_sqnr_db", "min_median_sample_sqnr_db",
                                                              "samples_below", "samples")},
                "layer_parity": {k: summary["layer_parity"].get(k) for k in ("passed", "layers", "max_level_diff",
                                                                             "differing_levels", "min_layer_sqnr_db")},
                "graph_bytes": summary["bytes"]})
        if a.exporter_ab:
            result["exporter_options"] = exporter_ab(ckpt, a.exporter_ab)
        write_json(out, result)
        print(f"{model} [{a.label}]: " + ", ".join(f"{k} {v}" for k, v in result.get("median_stages_s", {}).items()),
              flush=True)
    write_text(a.out / "export_profile.md", markdown(a.out))


if __name__ == "__main__":
    main()
