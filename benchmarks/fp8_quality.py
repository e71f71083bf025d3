"""FP8 (E4M3) quality: per-timestep FP8 scales against the static FP8 baseline, INT8 W8A8 DilateQuant and FP.

Rows, each calibrated by dq-calibrate in its own subprocess with --seed s (WD and BKD in every quantized row):

    INT8 W8A8 DilateQuant   --bits W8A8 --sym                         (what TensorRT runs in INT8)
    FP8 per-timestep        --format fp8                              (E4M3, one scale per timestep: TPQ)
    FP8 static              --format fp8 --no-tpq --act-init minmax   (one amax / 448 per tensor over all timesteps:
                                                                       ModelOpt's FP8 max calibration)

on `default` (UNet input x_t in float, dq-calibrate's default) and `sd-digits` (prompted, guidance 3), then sampled
with DDIM beside FP from the same noise (evaluation seed 100 + s): digit-FID (and class accuracy by prompted digit on
sd-digits), per-step noise SQNR against FP on FP trajectories (seed 107 + s), image PSNR/SSIM against FP. Seed-paired
differences (same noise) say whether a gap holds on every seed; per-step SQNR differences say at which timesteps
per-timestep FP8 scales help. The FP8 per-timestep checkpoints also report how far their tables move across
timesteps (max/min step size per activation quantizer).

Resumable per cell: each (model, row, seed) is one JSON under <out>/rows/, skipped when present with the same
settings; a finished checkpoint (<out>/checkpoints, gitignored) is evaluated without calibrating again. Heavy:

    flock /tmp/dq-heavy.lock nice -n 10 python benchmarks/fp8_quality.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.metrics import FID_MIN_SAMPLES, digit_scores, fid_omitted_note, with_fid_floor
from dilatequant.core.models import load_model, make_prompt_bank
from dilatequant.core.prompts import read_prompts
from dilatequant.core.reporting import environment, write_json, write_text
from sd_ablation import done, evaluate, fmt_paired, fp_reference, paired, prompted_digits, stats  # benchmarks/ on sys.path

ROWS = {  # row -> dq-calibrate flags
    "INT8 W8A8 DilateQuant": ["--bits", "W8A8", "--sym"],
    "FP8 per-timestep": ["--format", "fp8"],
    "FP8 static": ["--format", "fp8", "--no-tpq", "--act-init", "minmax"],
}
MODELS = {"default": {"guidance": 1.0, "prompts": None},
          "sd-digits": {"guidance": 3.0, "prompts": "benchmarks/prompts/sd_digits.txt"}}
METRICS = ("digit_fid", "class_accuracy", "noise_mean_sqnr_db", "image_psnr_db", "image_ssim", "calib_wall_s")
RESULT_SETTINGS = ("steps", "calib_samples", "iters", "eval_samples", "traj_samples")
FP_SETTINGS = ("steps", "eval_samples", "traj_samples")  # what an FP row depends on (no calibration)


def slug(model: str, row: str, seed: int) -> str:
    return f"{model}_{row.lower().replace(' ', '-')}_seed{seed}"


def calibrate(model: str, row: str, seed: int, a, ckpt_dir: Path) -> tuple[dict, object]:
    """dq-calibrate in a subprocess (skipped when the checkpoint exists: q.pt is written last, atomically)."""
    ckpt = ckpt_dir / f"{slug(model, row, seed)}.q.pt"
    prompts = MODELS[model]["prompts"]
    cmd = [sys.executable, "-m", "dilatequant.cli", "calibrate", "--model", model, "--steps", str(a.steps),
           "--calib-samples", str(a.calib_samples), "--iters", str(a.iters), "--seed", str(seed),
           "--out", str(ckpt)] + (["--prompts", prompts, "--guidance", str(MODELS[model]["guidance"])] if prompts
                                  else []) + ROWS[row]
    if not ckpt.is_file():
        subprocess.run(cmd + ["--resume"], check=True)
    ck = load_checkpoint(ckpt)
    s = ck.summary
    return {"checkpoint": str(ckpt), "calib_wall_s": s["wall_s"], "peak_rss_mb": s["peak_rss_mb"],
            "val_noise_sqnr_db": s["val_after_training"]["noise_sqnr_db"],
            "calibrate_cmd": "dq-calibrate " + " ".join(cmd[4:])}, ck


def table_spread(ck) -> dict:
    """How far each activation quantizer's per-timestep step sizes move: max/min over t (1.0 for a static row)."""
    ratios = sorted((q.delta.max() / q.delta.min()).item() for q in ck.qunet.act_quantizers.values())
    return {"quantizers": len(ratios), "median_max_over_min": statistics.median(ratios), "max_max_over_min": ratios[-1],
            "share_over_2x": sum(r > 2 for r in ratios) / len(ratios)}


def row_done(path: Path, row: str, settings: dict) -> bool:
    """A row file made with these settings (an FP row: with the same sampling settings) is kept."""
    if row != "FP32":
        return done(path, settings)
    return path.is_file() and all(json.loads(path.read_text())["settings"].get(k) == settings[k] for k in FP_SETTINGS)


def run_model(name: str, a, row_dir: Path, ckpt_dir: Path, settings: dict) -> None:
    todo = [(r, s) for s in a.seeds for r in ["FP32"] + a.rows
            if not row_done(row_dir / f"{slug(name, r, s)}.json", r, settings)]
    if not todo:
        return
    model = load_model(name)
    prompts = read_prompts(Path(MODELS[name]["prompts"])) if MODELS[name]["prompts"] else None
    if prompts:
        model.prompt_bank = make_prompt_bank(model, prompts)
    ev = SimpleNamespace(steps=a.steps, guidance=MODELS[name]["guidance"], batch=a.batch,
                         eval_samples=a.eval_samples, traj_samples=a.traj_samples)
    for seed in a.seeds:
        rows = [r for r, s in todo if s == seed]
        if not rows:
            continue
        fp, traj, fp_s = fp_reference(model, ev, seed)
        digits = prompted_digits(prompts, fp.labels) if prompts else None
        for row in rows:
            out = {"model": name, "row": row, "seed": seed, "eval_noise_seed": 100 + seed, "settings": settings,
                   "guidance": ev.guidance, "environment": environment(),
                   "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:])}
            if row == "FP32":
                out.update(with_fid_floor(digit_scores(fp.images, digits)), sampling_s=fp_s)
            else:
                cal, ck = calibrate(name, row, seed, a, ckpt_dir)
                out.update(cal, **with_fid_floor(evaluate(model, ck.qunet.predictor(), fp, traj, digits, ev, seed)),
                           table_spread=table_spread(ck))
            write_json(row_dir / f"{slug(name, row, seed)}.json", out)
            summarize(row_dir.parent, row_dir, settings, a.rows, canonical_command(a))  # the table so far
            print(json.dumps({k: v for k, v in out.items() if k not in ("noise_per_step", "environment", "settings")}),
                  flush=True)


def per_step_gain(a_rows: list[dict], b_rows: list[dict]) -> list[dict]:
    """b - a noise SQNR at every t_index, paired by seed (same FP trajectories)."""
    seeds = sorted({r["seed"] for r in a_rows} & {r["seed"] for r in b_rows})
    by = lambda rows: {r["seed"]: r["noise_per_step"] for r in rows}  # noqa: E731
    pa, pb = by(a_rows), by(b_rows)
    out = []
    for i, step in enumerate(pa[seeds[0]]) if seeds else []:
        d = [pb[s][i]["sqnr_db"] - pa[s][i]["sqnr_db"] for s in seeds]
        out.append({"t_index": i, "timestep": step["timestep"], "per_seed": d, "mean": statistics.fmean(d),
                    "same_sign_every_seed": len(d) > 1 and (all(x > 0 for x in d) or all(x < 0 for x in d))})
    return out


def summarize(out: Path, row_dir: Path, settings: dict, rows: list[str], command: str) -> dict:
    files = sorted(row_dir.glob("*.json"))
    runs = [json.loads(f.read_text()) for f in files if row_done(f, json.loads(f.read_text())["row"], settings)]
    models = {}
    for name in MODELS:
        mine = {r: sorted((x for x in runs if x["model"] == name and x["row"] == r), key=lambda x: x["seed"])
                for r in ["FP32"] + rows}
        if not any(mine.values()):
            continue
        table = []
        for r, rr in mine.items():
            if rr:
                agg = {m: stats([x[m] for x in rr]) for m in METRICS if all(x.get(m) is not None for x in rr)}
                spread = [x["table_spread"] for x in rr if "table_spread" in x]
                table.append({"row": r, "seeds": [x["seed"] for x in rr], "num_samples": rr[0]["num_samples"], **agg,
                              **({"table_spread": spread[0]} if spread else {}),
                              "calibrate_cmd": rr[0].get("calibrate_cmd")})
        by = {t["row"]: t for t in table}
        comparisons = {}
        for a_row, b_row in (("FP8 static", "FP8 per-timestep"), ("INT8 W8A8 DilateQuant", "FP8 per-timestep"),
                             ("FP32", "FP8 per-timestep"), ("FP32", "FP8 static")):
            if a_row in by and b_row in by:
                ta, tb = by[a_row], by[b_row]
                comparisons[f"{b_row} - {a_row}"] = {
                    m: paired(ta[m], tb[m], ta["seeds"], tb["seeds"]) for m in METRICS[:5] if m in ta and m in tb}
                if mine[a_row] and "noise_per_step" in mine[a_row][0]:
                    comparisons[f"{b_row} - {a_row}"]["noise_sqnr_db_per_step"] = per_step_gain(mine[a_row], mine[b_row])
        models[name] = {"rows": table, "paired": comparisons}
    summary = {"settings": settings, "environment": environment(), "models": models,
               "command": command}
    write_json(out / "fp8_quality.json", summary)
    write_text(out / "README.md", markdown(summary))
    return summary


def canonical_command(a) -> str:
    """The run's command with every setting spelled out (rerunning it resumes: finished cells are kept)."""
    return ("flock /tmp/dq-heavy.lock nice -n 10 python benchmarks/fp8_quality.py "
            f"--models {' '.join(a.models)} --seeds {' '.join(map(str, a.seeds))} --steps {a.steps} "
            f"--calib-samples {a.calib_samples} --iters {a.iters} --eval-samples {a.eval_samples} "
            f"--traj-samples {a.traj_samples}")


def markdown(s: dict) -> str:
    st = s["settings"]
    pm = lambda r, k, fmt: ("-" if k not in r else fmt.format(r[k]["mean"]) + (  # noqa: E731
        f" ± {fmt.format(r[k]['std'])}" if r[k]["n_seeds"] > 1 else " (1 seed)"))
    lines = ["# FP8 (E4M3) with per-timestep scales: quality", "",
             f"DDIM-{st['steps']} (T = {st['steps']} calibrated steps), {st['calib_samples']} calibration inputs, "
             f"{st['iters']} BKD iterations per block, {st['eval_samples']} evaluation samples per row and seed; seed s "
             "= calibration `--seed s` and evaluation noise seed 100 + s; per-step noise SQNR on "
             f"{st['traj_samples']} FP trajectories (seed 107 + s). Cells: mean ± std over seeds.", ""]
    fid = st["eval_samples"] >= FID_MIN_SAMPLES
    if not fid:
        lines += [fid_omitted_note(st["eval_samples"]), ""]
    for name, m in s["models"].items():
        lines += [f"## `{name}`", "", "| row | seeds | samples | " + ("digit-FID | " if fid else "") + "class acc | "
                  "noise SQNR dB | image PSNR dB | SSIM | step-size max/min over t (median, max) |",
                  "|---|---|---|" + ("---|" if fid else "") + "---|---|---|---|---|"]
        for r in m["rows"]:
            ts = r.get("table_spread")
            spread = "-" if not ts else f"{ts['median_max_over_min']:.2f}, {ts['max_max_over_min']:.2f}"
            lines.append(f"| {r['row']} | {','.join(map(str, r['seeds']))} | {r['num_samples']} | "
                         + (f"{pm(r, 'digit_fid', '{:.2f}')} | " if fid else "") + f"{pm(r, 'class_accuracy', '{:.3f}')} | "
                         f"{pm(r, 'noise_mean_sqnr_db', '{:.2f}')} | {pm(r, 'image_psnr_db', '{:.2f}')} | "
                         f"{pm(r, 'image_ssim', '{:.3f}')} | {spread} |")
        lines += ["", "Seed-paired differences (same noise; a gap counts only with the same sign on every seed):", ""]
        for k, v in m["paired"].items():
            parts = [f"{metric} {fmt_paired(p)}" for metric, p in v.items() if metric != "noise_sqnr_db_per_step"]
            lines.append(f"- {k}: " + "; ".join(parts))
            steps = v.get("noise_sqnr_db_per_step")
            if steps:
                held = [f"t_index {x['t_index']} (t={x['timestep']}): {x['mean']:+.2f}" for x in steps
                        if x["same_sign_every_seed"]]
                lines.append("  - per-step noise SQNR, steps where every seed agrees in sign: "
                             + ("; ".join(held) if held else "none"))
        lines.append("")
    lines += ["Command (resumable per cell: rerun it to add missing rows or seeds):", "", "```", s["command"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--traj-samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_quality"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    settings = {k: getattr(a, k) for k in RESULT_SETTINGS}
    row_dir, ckpt_dir = a.out / "rows", a.out / "checkpoints"
    row_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        run_model(name, a, row_dir, ckpt_dir, settings)
    summarize(a.out, row_dir, settings, a.rows, canonical_command(a))


if __name__ == "__main__":
    main()
