"""dq-calibrate in 1 process vs 2 torchrun processes (gloo) on CPU: same settings, same global BKD batch.

Three runs: one process with one thread (the bit-for-bit reference: CPU kernels round differently at other
thread counts), one process with two threads (the fair wall-time baseline on two cores) and two processes
with one thread each. Reported: process wall time (start-up included) and stages, whether the calibration
sets (the disk-cache files) and the PTQ validation figures are identical, and the q.pt difference of each
trained tensor against bkd_divergence_bound (distill.py) from the common initial model.

    python benchmarks/distributed.py --out benchmarks/results/distributed
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dilatequant.calibrate.calibration_data import build_calibration_sets, trajectory_count
from dilatequant.calibrate.distill import adam_radius, bkd_divergence_bound
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.recipe import apply_scaling, init_act_tables, init_weight_scales, observe_activations
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, write_json, write_text


def run(name: str, nproc: int, threads: int, args: list[str], out: Path) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DQ_CACHE_DIR=str(folder / "cache"))
    cli = ["-m", "dilatequant.cli", "calibrate", *args, "--out", str(folder / "q.pt")]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                             if nproc > 1 else []), *cli]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ckpt = torch.load(folder / "q.pt", weights_only=True)
    s = json.loads(ckpt["summary"])
    cache = sorted((folder / "cache").glob("calib-*.pt"))
    return {"name": name, "processes": nproc, "threads_per_process": threads, "wall_s": round(wall, 1),
            "calibration_wall_s": s["wall_s"], "stages_s": {k: round(v, 2) for k, v in s["stages"].items()},
            "val_sqnr_db_before_bkd": s["val_before_training"]["noise_sqnr_db"],
            "val_sqnr_db_after_bkd": s["val_after_training"]["noise_sqnr_db"],
            "state": ckpt["state_dict"], "cache": {p.name: p.read_bytes() for p in cache}}


def initial_bound(a, sample_batch: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model = load_model(a.model)
    data, _ = build_calibration_sets(model, a.calib_samples, a.steps, 0, seed=0, use_cache=False,
                                     sample_batch=sample_batch)
    qunet = QuantUNet(model.unet, QuantConfig(weight_bits=4, act_bits=8, num_steps=a.steps))
    apply_scaling(qunet, data)
    init_weight_scales(qunet)
    observe_activations(qunet, data)
    init_act_tables(qunet)
    return bkd_divergence_bound(qunet, DistillConfig(iters=a.iters, batch=a.batch))


def compare(ref: dict, other: dict, bound: dict[str, float]) -> dict:
    worst, within, trained_diff, frozen_equal = 0.0, True, 0.0, True
    rel = []
    for k, va in ref["state"].items():
        vb = other["state"][k]
        diff = (va.double() - vb.double()).abs().max().item() if va.numel() else 0.0
        if bound[k] == 0.0:
            frozen_equal &= diff == 0.0
            continue
        trained_diff = max(trained_diff, diff)
        worst = max(worst, diff / bound[k])
        within &= diff <= bound[k]
        if va.is_floating_point() and va.numel():
            rel.append(((va - vb).norm() / va.norm().clamp_min(1e-30)).item())
    return {"calibration_set_identical": ref["cache"] == other["cache"] and bool(ref["cache"]),
            "ptq_validation_identical": ref["val_sqnr_db_before_bkd"] == other["val_sqnr_db_before_bkd"],
            "untrained_tensors_identical": frozen_equal, "trained_within_bound": within,
            "max_abs_diff_trained": trained_diff, "max_diff_over_bound": round(worst, 6),
            "median_relative_l2_diff_trained": sorted(rel)[len(rel) // 2] if rel else 0.0,
            "val_sqnr_db_after_bkd_delta": round(other["val_sqnr_db_after_bkd"] - ref["val_sqnr_db_after_bkd"], 4)}


def markdown(res: dict) -> str:
    rows = ["| run | processes x threads | wall s (process) | calibration s | sampling s | BKD s | "
            "SQNR before / after BKD (dB) |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        st = r["stages_s"]
        rows.append(f"| {r['name']} | {r['processes']} x {r['threads_per_process']} | {r['wall_s']} | "
                    f"{r['calibration_wall_s']} | {st.get('calibration_data', 0)} | {st.get('bkd', 0)} | "
                    f"{r['val_sqnr_db_before_bkd']:.3f} / {r['val_sqnr_db_after_bkd']:.3f} |")
    lines = ["# 1 vs 2 processes (torchrun, gloo, CPU)", "", f"Settings: `{' '.join(res['args'])}`; "
             f"{res['machine_note']}", "", *rows, "", "Against the 1 x 1 reference:", "",
             "| run | calibration set identical | PTQ validation identical | untrained tensors identical | "
             "trained max abs diff | max diff / bound | within bound | SQNR after BKD delta (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in res["vs_reference"].items():
        lines.append(f"| {name} | {c['calibration_set_identical']} | {c['ptq_validation_identical']} | "
                     f"{c['untrained_tensors_identical']} | {c['max_abs_diff_trained']:.3g} | "
                     f"{c['max_diff_over_bound']:.3g} | {c['trained_within_bound']} | "
                     f"{c['val_sqnr_db_after_bkd_delta']} |")
    lines += ["", f"Bound (distill.bkd_divergence_bound): 2 x lr x adam_radius(iters) per trained element, "
              f"adam_radius({res['iters']}) = {res['adam_radius']:.3f}.", ""]
    return "\n".join(lines)


def calibration_parser(description: str) -> argparse.ArgumentParser:
    """The small BKD run these benchmarks repeat (default: `default`, 10 steps, 64 samples, 20 iterations)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    return p


def calibration_args(a: argparse.Namespace) -> list[str]:
    return ["--model", a.model, "--steps", str(a.steps), "--calib-samples", str(a.calib_samples), "--iters",
            str(a.iters), "--batch", str(a.batch)]


def main() -> None:
    p = calibration_parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed"))
    a = p.parse_args()
    sample_batch = -(-trajectory_count(a.calib_samples, a.steps) // 2)
    args = [*calibration_args(a), "--sample-batch", str(sample_batch)]
    work = a.out / "runs"
    load_before = os.getloadavg()
    runs = [run("1proc_1thread", 1, 1, args, work), run("1proc_2threads", 1, 2, args, work),
            run("2proc_1thread", 2, 1, args, work)]
    bound = initial_bound(a, sample_batch)
    res = {"args": args, "iters": a.iters, "adam_radius": adam_radius(a.iters),
           "machine_note": f"2 shared cores, load average {load_before[0]:.2f} before / "
                           f"{os.getloadavg()[0]:.2f} after",
           "runs": [{k: v for k, v in r.items() if k not in ("state", "cache")} for r in runs],
           "vs_reference": {r["name"]: compare(runs[0], r, bound) for r in runs[1:]},
           "environment": environment()}
    write_json(a.out / "distributed.json", res)
    write_text(a.out / "distributed.md", markdown(res))
    print(markdown(res))
    shutil.rmtree(work)  # checkpoints and caches are scratch


if __name__ == "__main__":
    main()
