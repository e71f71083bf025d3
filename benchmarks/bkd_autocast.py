"""Block-wise distillation with bfloat16 against FP32: what bf16 costs in accuracy (issues 16 and 14).

`--compare autocast` (default): `--autocast bf16` runs BKD's captures and training forwards in bfloat16 (losses
and reductions in FP32); it is meant for GPUs. `--compare teacher-dtype`: `--teacher-dtype bf16` keeps the FP
teacher in bfloat16 (half its memory; what lets SDXL calibrate in 24 GB) while the student stays FP32. This
measures the part that does not depend on the device: the numbers bf16 arithmetic produces. Two seeds (each its
own calibration set and BKD draws), FP32 and bf16 at each, one process with two threads: validation noise SQNR
after BKD, bf16 minus FP32 at the same seed against the seed-to-seed spread, and how far bf16 moves the trained
tensors. CPU wall times are listed but say nothing about a GPU (our CPUs have no native bfloat16 arithmetic: no
AMX, no AVX512-BF16; benchmarks/gpu_calibration.py times it on a GPU).

    python benchmarks/bkd_autocast.py --out benchmarks/results/bkd_autocast
    python benchmarks/bkd_autocast.py --compare teacher-dtype --out benchmarks/results/teacher_dtype
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from distributed import calibration_args, calibration_parser, run  # benchmarks/ (this script's folder is on sys.path)
from dilatequant.core.reporting import environment, write_json, write_text

# what is compared: the dq-calibrate flag, its FP32 value and its bf16 value
COMPARISONS = {"autocast": ("--autocast", "none", "bf16"), "teacher-dtype": ("--teacher-dtype", "fp32", "bf16")}


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
    flag = COMPARISONS[res["compare"]][0]
    lines = [f"# BKD with `{flag} bf16` vs FP32 (CPU)", "", f"Settings: `{' '.join(res['args'])}`, one process x "
             f"2 threads; {res['machine_note']}", "",
             f"| seed | {flag} | SQNR before BKD (dB) | SQNR after BKD (dB) | BKD s (CPU) |", "|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['seed']} | {r['mode']} | {r['val_sqnr_db_before_bkd']:.3f} | "
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
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="autocast")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bkd_autocast"))
    a = p.parse_args()
    flag, fp32_mode, bf16_mode = COMPARISONS[a.compare]
    args = calibration_args(a)
    work = a.out / "runs"
    load_before = os.getloadavg()
    runs, states = [], {}
    for seed in a.seeds:
        for mode in (fp32_mode, bf16_mode):
            r = run(f"seed{seed}_{mode}", 1, 2, [*args, "--seed", str(seed), flag, mode], work)
            states[(seed, mode)] = r.pop("state")
            r.pop("cache")
            runs.append({**r, "seed": seed, "mode": mode})
    after = {(r["seed"], r["mode"]): r["val_sqnr_db_after_bkd"] for r in runs}
    fp32 = [after[(s, fp32_mode)] for s in a.seeds]
    res = {"compare": a.compare, "args": args, "seeds": a.seeds, "runs": runs,
           "machine_note": f"2 shared cores, load average {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after",
           "bf16_vs_fp32": {str(s): {"sqnr_delta_db": after[(s, bf16_mode)] - after[(s, fp32_mode)],
                                     "state": relative_change(states[(s, fp32_mode)], states[(s, bf16_mode)])}
                            for s in a.seeds},
           "fp32_seed_spread_db": max(fp32) - min(fp32), "environment": environment()}
    stem = a.compare.replace("-", "_") if a.compare != "autocast" else "bkd_autocast"
    write_json(a.out / f"{stem}.json", res)
    write_text(a.out / f"{stem}.md", markdown(res))
    print(markdown(res))
    shutil.rmtree(work)  # checkpoints and caches are scratch


if __name__ == "__main__":
    main()
