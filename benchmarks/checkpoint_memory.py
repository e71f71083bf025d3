"""q.pt save and load at SD shape: peak RSS rise and wall time, the old in-memory way beside the streamed / mmap way.

The model is SD 1.5's UNet (configs/sd15_unet.json) with block_out_channels divided by 2.5 (142 M parameters,
568 MB of float32), random weights, wrapped for W8A8 with 4 steps. "in-memory" is the code of --old-ref
(default: the commit before the streamed save; `git archive` of its dilatequant/ into a temporary folder),
"streamed-mmap" is this checkout. Every measurement is its own process: build the model (save) or nothing
(load), reset the peak-RSS mark (/proc/self/clear_refs 5), save_checkpoint / load_checkpoint, read VmHWM.
The load then reads every tensor once (what an export or a forward pass does): with the mapped file those pages
are the page cache's (RssFile, reclaimable), not the process's own (RssAnon). The file is read warm (just written).

    nice -n 19 python benchmarks/checkpoint_memory.py [--unet sd15/2.5] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "checkpoint_memory"
OLD_REF = "5e38fb8"  # main before the streamed save / mmap load
# glibc returns large blocks to the OS at once, so RSS tracks live memory (as in bkd_memory.py)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclass
class Setup:
    unet: str = "sd15/2.5"
    steps: int = 4
    bits: str = "W8A8"
    threads: int = 1


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def _reset_peak() -> dict[str, float]:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the next peak is the step's own
    return _status()


def child_save(setup: Setup, path: Path) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from dilatequant.calibrate.checkpoint import save_checkpoint
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.quant_unet import QuantUNet
    from dilatequant.core.models import ClassTokenEncoder, DiffusionModel, default_scheduler
    from dilatequant.core.sampling import sampling_timesteps
    from unet_configs import unet_config

    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config(setup.unet)).eval()
    dim = unet.config.cross_attention_dim
    model = DiffusionModel(unet, default_scheduler(), ClassTokenEncoder(num_tokens=4, dim=dim).eval(), source="random")
    wbits, abits = (int(v) for v in setup.bits[1:].split("A"))
    q = QuantUNet(unet, QuantConfig(weight_bits=wbits, act_bits=abits, num_steps=setup.steps))
    model.unet = q.unet
    del unet
    params = sum(p.numel() for p in q.unet.parameters())
    before = _reset_peak()
    start = time.perf_counter()
    save_checkpoint(path, q, model, sampling_timesteps(model, setup.steps), "random", {})
    wall = time.perf_counter() - start
    after = _status()
    return {"unet_params": params, "file_mb": round(path.stat().st_size / 2**20, 1), "wall_s": round(wall, 2),
            "rss_before_mb": round(before["VmRSS"], 1), "peak_rise_mb": round(after["VmHWM"] - before["VmRSS"], 1)}


def child_load(setup: Setup, path: Path) -> dict:
    import torch

    from dilatequant.calibrate.checkpoint import load_checkpoint

    torch.set_num_threads(setup.threads)
    before = _reset_peak()
    start = time.perf_counter()
    ck = load_checkpoint(path)
    wall = time.perf_counter() - start
    loaded = _status()
    start = time.perf_counter()
    total = sum(float(t.double().nansum()) for t in (*ck.qunet.parameters(), *ck.qunet.buffers()))  # read every page
    read = time.perf_counter() - start
    after = _status()
    return {"wall_s": round(wall, 2), "rss_before_mb": round(before["VmRSS"], 1),
            "peak_rise_mb": round(loaded["VmHWM"] - before["VmRSS"], 1),
            "anon_rise_mb": round(loaded["RssAnon"] - before["RssAnon"], 1),
            "read_all_s": round(read, 2), "checksum": total,
            "after_read_anon_rise_mb": round(after["RssAnon"] - before["RssAnon"], 1),
            "after_read_file_rise_mb": round(after["RssFile"] - before["RssFile"], 1),
            "after_read_peak_rise_mb": round(after["VmHWM"] - before["VmRSS"], 1)}


def _run(tree: Path, what: str, setup: Setup, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(Path(__file__).parent)]), **MALLOC_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, "--path", str(path), "--setup", json.dumps(asdict(setup))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"{what} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _old_tree(ref: str, into: Path) -> Path:
    """dilatequant/ as it was at `ref` (git archive), so the old code runs unchanged beside this checkout."""
    tar = into / "old.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), ref, "dilatequant"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(into / "old", filter="data")
    return into / "old"


def _markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"# q.pt save and load: in-memory vs streamed / memory-mapped ({s['unet']}, "
             f"{report['unet_params'] / 1e6:.1f} M parameters, {report['file_mb']:.0f} MB file)", "",
             f"`{report['command']}`", "",
             "Each figure is its own fresh process; peak rise = VmHWM after the step - VmRSS before it; median of "
             f"{report['repeats']} runs (every run in the JSON). Load then reads every tensor once: the mapped "
             "file's pages count as RssFile (page cache), not RssAnon.", "",
             "| | save: peak RSS rise | save: wall | load: peak RSS rise | load: wall | after reading every tensor: "
             "anon / file RSS rise |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, m in report["median"].items():
        lines.append(f"| {label} | {m['save_peak_rise_mb']:,.1f} MB | {m['save_wall_s']:.2f} s | "
                     f"{m['load_peak_rise_mb']:,.1f} MB | {m['load_wall_s']:.2f} s | "
                     f"{m['after_read_anon_rise_mb']:,.1f} / {m['after_read_file_rise_mb']:,.1f} MB |")
    env = report["environment"]
    lines += ["", f"in-memory: dilatequant/ at {report['old_ref']}; streamed-mmap: this checkout. "
              f"torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}, {env['cpu']} "
              f"({env['cpu_count']} cores, shared), {env['platform']}. Load reads a file just written (warm page cache).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unet", default=Setup.unet, help="a name of benchmarks/unet_configs.py (default sd15/2.5)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--old-ref", default=OLD_REF, help="commit whose dilatequant/ is the in-memory baseline")
    p.add_argument("--child", choices=("save", "load"), help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        setup = Setup(**json.loads(a.setup))
        print(json.dumps((child_save if a.child == "save" else child_load)(setup, a.path)))
        return
    setup = Setup(unet=a.unet)
    runs: dict[str, list[dict]] = {"in-memory": [], "streamed-mmap": []}
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT, prefix=".work-") as tmp:
        trees = {"in-memory": _old_tree(a.old_ref, Path(tmp)), "streamed-mmap": ROOT}
        for i in range(a.repeats):
            for label, tree in trees.items():  # interleaved: a drift in machine load hits both alike
                path = Path(tmp) / f"{label}.pt"
                save = _run(tree, "save", setup, path)
                load = _run(tree, "load", setup, path)
                path.unlink()
                runs[label].append({"save": save, "load": load})
                print(label, i, "save", save, "load", load, flush=True)
    sys.path.insert(0, str(ROOT))
    from dilatequant.core.reporting import environment, write_json, write_text

    first = runs["streamed-mmap"][0]["save"]
    columns = {"save_peak_rise_mb": ("save", "peak_rise_mb"), "save_wall_s": ("save", "wall_s"),
               "load_peak_rise_mb": ("load", "peak_rise_mb"), "load_wall_s": ("load", "wall_s"),
               "after_read_anon_rise_mb": ("load", "after_read_anon_rise_mb"),
               "after_read_file_rise_mb": ("load", "after_read_file_rise_mb")}
    median = {label: {col: round(statistics.median([r[part][k] for r in rs]), 2) for col, (part, k) in columns.items()}
              for label, rs in runs.items()}
    report = {"command": "nice -n 19 python benchmarks/checkpoint_memory.py " + " ".join(sys.argv[1:]),
              "setup": asdict(setup), "old_ref": a.old_ref, "repeats": a.repeats,
              "unet_params": first["unet_params"], "file_mb": first["file_mb"], "median": median, "runs": runs,
              "malloc_env": MALLOC_ENV, "machine": platform.node(), "environment": environment()}
    write_json(OUT / "checkpoint_memory.json", report)
    write_text(OUT / "checkpoint_memory.md", _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
