"""Block-wise distillation under bfloat16 autocast against FP32: what bf16 costs in accuracy (issue 16).

`--autocast bf16` runs BKD's captures and training forwards in bfloat16 (losses and reductions in FP32); it is
meant for GPUs. No GPU is lent here, so this measures the part that does not depend on the device: the
numbers bf16 arithmetic produces. Two seeds (each its own calibration set and BKD draws), FP32 and bf16 at each,
one process with two threads: validation noise SQNR after BKD, bf16 minus FP32 at the same seed against the
seed-to-seed spread, and how far bf16 moves the trained tensors. CPU wall times are listed but say nothing
about a GPU (this CPU has no native bfloat16 arithmetic: no AMX, no AVX512-BF16).

    python benchmarks/bkd_autocast.py --out benchmarks/results/bkd_autocast
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from distributed import calibration_args, calibration_parser, run  # benchmarks/ (this script's folder is on sys.path)
from dilatequant.calibrate.reporting import environment, write_json, write_text


def relative_change(a: dict, b: dict) -> dict:
    """Median and max relative L2 change over the trained floating tensors (those that differ at all)."""
    rel = []
    for k, va in a.items():
        vb = b[k]
        if va.is_floating_point() and va.numel() and not bool((va == vb).all()):
            rel.append(((va.double() - vb.double()).norm() / va.double().norm().clamp_min(1e-30)).item())
    rel.sort()
    return {"tensors_changed": len(rel), "median_relative_l2": rel[len(rel) // 2] if rel else 0.0,
            "max_relative_l2": rel[-1] if rel else 0.0}


def markdown(res: dict) -> str:
    lines = ["# BKD under bfloat16 autocast vs FP32 (CPU)", "", f"Settings: `{' '.join(res['args'])}`, one process x "
             f"2 threads; {res['machine_note']}", "",
             "| seed | autocast | SQNR before BKD (dB) | SQNR after BKD (dB) | BKD s (CPU) |", "|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['seed']} | {r['autocast']} | {r['val_sqnr_db_before_bkd']:.3f} | "
                     f"{r['val_sqnr_db_after_bkd']:.3f} | {r['stages_s'].get('bkd', 0)} |")
    lines += ["", "| seed | bf16 - FP32 SQNR after BKD (dB) | trained tensors moved (median / max relative L2) |",
              "|---|---|---|"]
    for seed, c in res["bf16_vs_fp32"].items():
        lines.append(f"| {seed} | {c['sqnr_delta_db']:+.3f} | {c['state']['median_relative_l2']:.2e} / "
                     f"{c['state']['max_relative_l2']:.2e} |")
    lines += ["", f"Seed-to-seed spread of FP32 SQNR after BKD: {res['fp32_seed_spread_db']:.3f} dB.", ""]
    return "\n".join(lines)


def main() -> None:
    p = calibration_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bkd_autocast"))
    a = p.parse_args()
    args = calibration_args(a)
    work = a.out / "runs"
    load_before = os.getloadavg()
    runs, states = [], {}
    for seed in a.seeds:
        for mode in ("none", "bf16"):
            r = run(f"seed{seed}_{mode}", 1, 2, [*args, "--seed", str(seed), "--autocast", mode], work)
            states[(seed, mode)] = r.pop("state")
            r.pop("cache")
            runs.append({**r, "seed": seed, "autocast": mode})
    after = {(r["seed"], r["autocast"]): r["val_sqnr_db_after_bkd"] for r in runs}
    fp32 = [after[(s, "none")] for s in a.seeds]
    res = {"args": args, "seeds": a.seeds, "runs": runs,
           "machine_note": f"2 shared cores, load average {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after",
           "bf16_vs_fp32": {str(s): {"sqnr_delta_db": after[(s, "bf16")] - after[(s, "none")],
                                     "state": relative_change(states[(s, "none")], states[(s, "bf16")])}
                            for s in a.seeds},
           "fp32_seed_spread_db": max(fp32) - min(fp32), "environment": environment()}
    write_json(a.out / "bkd_autocast.json", res)
    write_text(a.out / "bkd_autocast.md", markdown(res))
    print(markdown(res))
    shutil.rmtree(work)  # checkpoints and caches are scratch


if __name__ == "__main__":
    main()
