"""Ablation grid of the DilateQuant method on the default models (a benchmark, never a test).

Every variant is calibrated in its own subprocess (so peak memory is its own) through the same code
path as dq-calibrate, then evaluated against the FP model on the same noise:
per-step noise MSE/SQNR, image PSNR/SSIM, digit-FID (and class accuracy for default-cond).

    python benchmarks/ablation.py --models default default-cond --bits W4A8 --out benchmarks/results/ablation_w4a8

Rerun with the same --out to continue: rows already in ablation.json are kept and skipped, and a
finished checkpoint is evaluated without calibrating again (other --models/--bits/--variants add rows).
Runs side by side may share one --out if they do different rows: each row is merged in under a lock.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.evaluation import compare_to_fp, fp_reference, mean_mse_before_final
from dilatequant.core.guidance import DEFAULT_GUIDANCE
from dilatequant.core.metrics import digit_scores
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, write_json, write_text

ALL = ["--float-layers", "none"]  # every layer quantized, the UNet input included (the grid's common setting)
VARIANTS = {
    "naive-ptq": ALL + ["--scaling", "none", "--no-tpq", "--no-bkd", "--act-init", "minmax"],
    "static-ptq": ALL + ["--scaling", "none", "--no-tpq", "--no-bkd"],
    "wd+tpq (no bkd)": ALL + ["--no-bkd"],                 # TPQ initialised by MSE search (the default)
    "wd+tpq percentile-init (no bkd)": ALL + ["--no-bkd", "--act-init", "percentile"],
    "tpq (no scaling, no bkd)": ALL + ["--scaling", "none", "--no-bkd"],  # WD's effect before BKD
    "no-scaling": ALL + ["--scaling", "none"],
    "smoothquant": ALL + ["--scaling", "smoothquant"],
    "no-tpq (static scale)": ALL + ["--no-tpq"],
    "dilatequant": ALL,
    "full-model-qat": ALL + ["--full-qat"],
    # the UNet input x_t unquantized (conv_in in float, dq-calibrate's default): layer_sensitivity.py's finding
    "dilatequant, float input": ["--float-layers", "conv_in"],
    "no-scaling, float input": ["--scaling", "none", "--float-layers", "conv_in"],
}


# settings that change every number: a rerun into the same --out must keep them
RESULT_SETTINGS = ("sym", "steps", "calib_samples", "iters", "full_qat_factor", "eval_samples", "seed")


def calibrate(model: str, bits: str, variant: str, args, out: Path) -> dict:
    ckpt = out / f"{model}_{bits}_{re.sub('[()+,]', '', variant).replace(' ', '_')}.q.pt"
    iters = args.iters * args.full_qat_factor if variant == "full-model-qat" else args.iters
    cmd = [sys.executable, "-m", "dilatequant.cli", "calibrate", "--model", model, "--bits", bits, "--out", str(ckpt),
           "--calib-samples", str(args.calib_samples), "--iters", str(iters), "--steps", str(args.steps),
           "--seed", str(args.seed)] + (["--sym"] if args.sym else []) + VARIANTS[variant]
    start = time.perf_counter()
    if not ckpt.is_file():  # q.pt is written atomically at the very end: present means finished
        subprocess.run(cmd + ["--resume"], check=True)
    ck = load_checkpoint(ckpt)
    s = ck.summary
    return {"checkpoint": str(ckpt), "wall_s": round(time.perf_counter() - start, 1), "calib_wall_s": s["wall_s"],
            "peak_rss_mb": s["peak_rss_mb"], "distill_mode": s["distill"]["mode"], "cmd": " ".join(cmd[1:])}, ck


def previous_results(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run into the same folder, if it used the same settings."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    changed = [k for k in RESULT_SETTINGS if old["settings"].get(k) != settings[k]]
    if changed:
        raise SystemExit(f"error: {path} was made with other settings ({', '.join(changed)}); "
                         "pass the same settings or another --out")
    return old["runs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "default-cond"])
    p.add_argument("--bits", nargs="+", default=["W4A8"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--sym", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--full-qat-factor", type=int, default=20, help="full QAT runs iters x this many steps")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = vars(a) | {"out": str(a.out)}
    done = {(r["model"], r["bits"], r["variant"]) for r in previous_results(a.out / "ablation.json", settings)}
    for model_name in a.models:
        todo = [(b, v) for b in a.bits for v in a.variants if (model_name, b, v) not in done]
        if not todo:
            continue
        model = load_model(model_name)
        guidance = DEFAULT_GUIDANCE if model.is_conditional else 1.0
        fp_images, fp_traj = fp_reference(model, a.eval_samples, a.steps, a.seed + 100, guidance)
        if (model_name, "FP32", "fp") not in done:
            add_row(a.out, settings, {"model": model_name, "bits": "FP32", "variant": "fp", "guidance_scale": guidance,
                                      **digit_scores(fp_images.images, fp_images.labels)})
        for bits, variant in todo:
            cal, ck = calibrate(model_name, bits, variant, a, a.out)
            metrics, _ = compare_to_fp(model, ck.qunet.predictor(), fp_images, fp_traj, a.steps, a.seed + 100, guidance)
            row = {"model": model_name, "bits": bits, "variant": variant, **cal, **metrics}
            add_row(a.out, settings, row)
            print(json.dumps({k: v for k, v in row.items() if k != "noise_per_step"}), flush=True)
    add_row(a.out, settings, None)


def add_row(out: Path, settings: dict, row: dict | None) -> None:
    """Merge one row into ablation.json (and the table) under a lock, re-reading what other runs wrote."""
    with open(out / ".ablation.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = previous_results(out / "ablation.json", settings)
        if row is None:  # only redraw the table
            if runs:
                write_text(out / "ablation.md", markdown(json.loads((out / "ablation.json").read_text())))
            return
        key = (row["model"], row["bits"], row["variant"])
        runs = [r for r in runs if (r["model"], r["bits"], r["variant"]) != key]
        results = {"settings": settings, "environment": environment(), "runs": runs + [row]}
        write_json(out / "ablation.json", results)
        write_text(out / "ablation.md", markdown(results))


def markdown(results: dict) -> str:
    lines = ["| model | bits | variant | noise MSE | noise MSE, t > 0 | noise SQNR dB | image PSNR dB | SSIM | "
             "digit-FID | class acc | calib s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    variant_order = ["fp"] + list(VARIANTS)
    ordered = sorted(results["runs"], key=lambda r: (r["model"], r["bits"] != "FP32", r["bits"] == "W4A4", r["bits"],
                                                     variant_order.index(r["variant"]) if r["variant"] in variant_order
                                                     else len(variant_order)))
    for r in ordered:
        if "noise_per_step" in r and "noise_mean_mse_before_final" not in r:  # rows written before the column
            r = dict(r, noise_mean_mse_before_final=mean_mse_before_final(r["noise_per_step"]))
        f = lambda k, fmt: (fmt.format(r[k]) if k in r and r[k] is not None else "-")  # noqa: E731
        lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {f('noise_mean_mse', '{:.5f}')} | "
                     f"{f('noise_mean_mse_before_final', '{:.6f}')} | "
                     f"{f('noise_mean_sqnr_db', '{:.2f}')} | {f('image_psnr_db', '{:.2f}')} | {f('image_ssim', '{:.3f}')} | "
                     f"{f('digit_fid', '{:.2f}')} | {f('class_accuracy', '{:.3f}')} | {f('calib_wall_s', '{:.0f}')} | "
                     f"{f('peak_rss_mb', '{:.0f}')} |")
    s = results["settings"]
    lines += ["", "noise MSE, t > 0: every step but the last (t = 0), whose noise prediction reaches the image "
              "multiplied by 0.01 at most (dilatequant.core.evaluation.mean_mse_before_final)."]
    lines += ["", f"Settings: {s['calib_samples']} calibration samples, {s['iters']} BKD iterations per block, "
              f"{s['eval_samples']} evaluation samples, DDIM-{s['steps']}, seed {s['seed']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
