"""Quality table of DilateQuant on the prompted sd-digits pipeline (issue 13 item 2), over several seeds.

Rows: FP; W8A8 DilateQuant; W4A8 DilateQuant against naive PTQ, a static scale (no TPQ), SmoothQuant
scaling and no scaling. Every quantized row of seed s is calibrated by dq-calibrate (its own subprocess, so
peak memory is its own) with --seed s on the same prompts, guidance and step count, then sampled with DDIM
from evaluation noise seed 100 + s beside the FP pipeline from the same noise:
digit-FID, class accuracy by prompted digit, per-step noise SQNR (on 16 FP trajectories, seed 107 + s),
image PSNR/SSIM vs FP. Sample i asks for prompt i % #prompts (the sd-digits prompt file: digit i % 10 in
phrasing (i // 10) % 8), guidance 3 by default, negative prompt "".

Resumable: each (row, seed) is one JSON file under <out>/rows_n<eval samples>/, skipped when present, and a finished
checkpoint is evaluated without calibrating again; the table is redrawn from every row file present.

    nice -n 10 python benchmarks/sd_ablation.py --eval-samples 1000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.digits import captions_for
from dilatequant.core.evaluation import per_step_noise_error
from dilatequant.core.metrics import digit_scores, psnr_db, ssim
from dilatequant.core.models import load_model, make_prompt_bank
from dilatequant.core.prompts import read_prompts
from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.core.sampling import sample

# dq-calibrate flags of each variant on top of its defaults (conv_in, whose input is x_t, stays float as in
# every dq-calibrate run); names follow benchmarks/ablation.py
VARIANTS = {
    "dilatequant": [],
    "naive-ptq": ["--scaling", "none", "--no-tpq", "--no-bkd", "--act-init", "minmax"],
    "no-tpq (static scale)": ["--no-tpq"],
    "smoothquant": ["--scaling", "smoothquant"],
    "no-scaling": ["--scaling", "none"],
}
ROWS = [("FP32", "fp"), ("W8A8", "dilatequant"), ("W4A8", "dilatequant"), ("W4A8", "naive-ptq"),
        ("W4A8", "no-tpq (static scale)"), ("W4A8", "smoothquant"), ("W4A8", "no-scaling")]
# settings that change every number: rows made with others are refused, never mixed into one table
RESULT_SETTINGS = ("model", "prompts", "guidance", "steps", "calib_samples", "iters", "eval_samples", "traj_samples")


def slug(bits: str, variant: str, seed: int) -> str:
    return f"{bits}_{variant.replace(' ', '_').replace('(', '').replace(')', '')}_seed{seed}"


def prompted_digits(prompts: list[str], labels: torch.Tensor) -> torch.Tensor:
    """The digit each sample's prompt asks for, through the sd-digits captions (every prompt must name one)."""
    table = {c: d for d in range(10) for c in captions_for(d)}
    missing = [p for p in prompts if p not in table]
    if missing:
        raise SystemExit(f"error: prompt '{missing[0]}' is not an sd-digits caption; class accuracy needs the digit")
    return torch.tensor([table[prompts[int(i)]] for i in labels])


def calibrate(bits: str, variant: str, seed: int, a, ckpt_dir: Path,
              variants: dict[str, list[str]] = VARIANTS) -> tuple[dict, object]:
    """dq-calibrate in a subprocess (skipped when the checkpoint exists: q.pt is written last, atomically)."""
    ckpt = ckpt_dir / f"{slug(bits, variant, seed)}.q.pt"
    cmd = [sys.executable, "-m", "dilatequant.cli", "calibrate", "--model", a.model, "--bits", bits,
           "--steps", str(a.steps), "--prompts", str(a.prompts), "--guidance", str(a.guidance),
           "--calib-samples", str(a.calib_samples), "--iters", str(a.iters), "--seed", str(seed),
           "--out", str(ckpt)] + variants[variant]
    if not ckpt.is_file():
        subprocess.run(cmd + ["--resume"], check=True)
    ck = load_checkpoint(ckpt)
    s = ck.summary
    return {"checkpoint": str(ckpt), "calib_wall_s": s["wall_s"], "peak_rss_mb": s["peak_rss_mb"],
            "distill_mode": s["distill"]["mode"], "calibrate_cmd": "dq-calibrate " + " ".join(cmd[4:])}, ck


def fp_reference(model, a, seed: int):
    """FP images from evaluation noise seed 100 + s, FP trajectories (seed 107 + s) for the per-step noise error,
    and the seconds both took (a: eval_samples, traj_samples, steps, guidance, batch)."""
    t0 = time.perf_counter()
    fp = sample(model, num_samples=a.eval_samples, steps=a.steps, seed=100 + seed, guidance_scale=a.guidance,
                batch_size=a.batch, progress=False)
    traj = sample(model, num_samples=a.traj_samples, steps=a.steps, seed=107 + seed, guidance_scale=a.guidance,
                  return_trajectory=True, progress=False, decode=False)
    return fp, traj, round(time.perf_counter() - t0, 1)


def evaluate(model, predict, fp, traj, digits: torch.Tensor | None, a, seed: int) -> dict:
    """Per-step noise error on the FP trajectories, then DDIM images from the FP images' noise."""
    start = time.perf_counter()
    noise = per_step_noise_error(model, predict, traj)
    res = sample(model, predict, num_samples=len(fp.images), steps=a.steps, seed=100 + seed, labels=fp.labels,
                 guidance_scale=a.guidance, batch_size=a.batch, progress=False)
    return {"noise_mean_mse": noise["mean_mse"], "noise_mean_mse_before_final": noise["mean_mse_before_final"],
            "noise_mean_sqnr_db": noise["mean_sqnr_db"], "noise_per_step": noise["per_step"],
            "image_psnr_db": psnr_db(res.images, fp.images), "image_ssim": ssim(res.images, fp.images),
            **digit_scores(res.images, digits), "eval_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    a = parse_args(__doc__, "sd-digits", 3.0, 50, ROWS, Path("benchmarks/results/sd_ablation"))
    rows = [tuple(r.split(":", 1)) for r in a.rows]
    settings = {"model": a.model, "prompts": str(a.prompts), "guidance": a.guidance, "steps": a.steps,
                "calib_samples": a.calib_samples, "iters": a.iters, "eval_samples": a.eval_samples,
                "traj_samples": a.traj_samples}
    # rows of each evaluation size in their own folder (a 1,000-sample run never skips a 200-sample row file);
    # checkpoints are shared: the calibration does not depend on the evaluation size
    row_dir, ckpt_dir = a.out / f"rows_n{a.eval_samples}", a.out / "checkpoints"
    row_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(a.prompts)
    if not a.summary_only:
        run_rows(lambda: load_model(a.model), prompts, rows, a, settings, row_dir, ckpt_dir, VARIANTS)
    write_summary(a.out, row_dir, settings)


def parse_args(doc: str, model: str, guidance: float | None, steps: int, rows, out: Path) -> argparse.Namespace:
    """The flags of a digits quality table (this script's and dit_quality.py's), with the given defaults;
    torch threads set from --threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model)
    p.add_argument("--prompts", type=Path, default=Path("benchmarks/prompts/sd_digits.txt"))
    p.add_argument("--guidance", type=float, default=guidance, help="default: %(default)s (None: the model's own)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--traj-samples", type=int, default=16, help="FP trajectories for the per-step noise error")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=[f"{b}:{v}" for b, v in rows], help="BITS:VARIANT (FP32:fp)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--summary-only", action="store_true", help="rewrite the summary from the row files there, "
                   "running nothing (rows not run are listed as such)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    return a


def run_rows(load, prompts: list[str], rows: list[tuple[str, str]], a, settings: dict, row_dir: Path,
             ckpt_dir: Path, variants: dict[str, list[str]]) -> None:
    """Every (row, seed) not yet in row_dir: FP images and trajectories once per seed, each quantized row
    calibrated (its own process) and evaluated against them; one JSON file per (row, seed)."""
    model = None
    for seed in a.seeds:
        todo = [(b, v) for b, v in rows if not done(row_dir / f"{slug(b, v, seed)}.json", settings)]
        if not todo:
            continue
        if model is None:
            model = load()
            model.prompt_bank = make_prompt_bank(model, prompts)
        fp, traj, fp_s = fp_reference(model, a, seed)
        digits = prompted_digits(prompts, fp.labels)
        for bits, variant in todo:
            row = {"bits": bits, "variant": variant, "seed": seed, "eval_noise_seed": 100 + seed,
                   "settings": settings, "environment": environment(),
                   "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:])}
            if variant == "fp":
                row.update(digit_scores(fp.images, digits), sampling_s=fp_s)
            else:
                cal, ck = calibrate(bits, variant, seed, a, ckpt_dir, variants)
                row.update(cal, **evaluate(model, ck.qunet.predictor(), fp, traj, digits, a, seed))
            write_json(row_dir / f"{slug(bits, variant, seed)}.json", row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("noise_per_step", "environment", "settings")}),
                  flush=True)


def done(path: Path, settings: dict) -> bool:
    """A row file counts only if it was made with these settings (else it is redone and replaced)."""
    return path.is_file() and json.loads(path.read_text())["settings"] == settings


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n_seeds": len(values), "per_seed": values}


def paired(a: dict, b: dict, seeds_a: list[int], seeds_b: list[int]) -> dict:
    """b - a on the seeds both rows have: rows of one seed share the evaluation noise, so the difference is
    far steadier than either row; it counts only if every seed agrees in sign."""
    common = [s for s in seeds_a if s in seeds_b]
    d = [b["per_seed"][seeds_b.index(s)] - a["per_seed"][seeds_a.index(s)] for s in common]
    if len(d) < 2:  # one seed measures no spread: nothing can be claimed from it
        return {"seeds": common, "per_seed": d, "mean": d[0] if d else None, "std": None, "same_sign_every_seed": None}
    return {"seeds": common, "per_seed": d, "mean": statistics.fmean(d),
            "std": statistics.stdev(d) if len(d) > 1 else None, "same_sign_every_seed": all(x > 0 for x in d) or all(x < 0 for x in d)}


METRICS = ("digit_fid", "class_accuracy", "noise_mean_sqnr_db", "noise_mean_mse_before_final", "image_psnr_db",
           "image_ssim", "calib_wall_s", "eval_s")


def aggregate(row_dir: Path, settings: dict, rows, metrics) -> tuple[list[dict], list[dict], list[Path], list[str]]:
    """Every row file made with these settings, aggregated per (bits, variant) in `rows` order: mean, std and
    range over seeds. Returns (table, runs, files, names of row files made with other settings)."""
    files = sorted(row_dir.glob("*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    other = [f.name for f, r in zip(files, runs) if r["settings"] != settings]
    runs = [r for r in runs if r["settings"] == settings]
    table = []
    for bits, variant in rows:
        mine = sorted((r for r in runs if (r["bits"], r["variant"]) == (bits, variant)), key=lambda r: r["seed"])
        if not mine:
            continue
        agg = {m: stats([r[m] for r in mine]) for m in metrics if all(m in r for r in mine)}
        per_digit = [[r["class_accuracy_per_class"][d] for r in mine] for d in range(10)]
        agg["class_accuracy_per_digit"] = [round(statistics.fmean(v), 4) for v in per_digit]
        table.append({"bits": bits, "variant": variant, "seeds": [r["seed"] for r in mine],
                      "num_samples": mine[0]["num_samples"], **agg,
                      "calibrate_cmd": mine[0].get("calibrate_cmd")})
    return table, runs, files, other


def write_summary(out: Path, row_dir: Path, settings: dict) -> None:
    """Aggregate every row file made with these settings: mean, std and range over seeds; the acceptance checks."""
    table, runs, files, other = aggregate(row_dir, settings, ROWS, METRICS)
    checks = acceptance(table)
    summary = {"settings": settings, "environment": environment(), "rows": table, "acceptance": checks,
               "row_files": [f.name for f in files if f.name not in other], "ignored_row_files": other,
               "command": canonical_command(settings, sorted({r["seed"] for r in runs}))}
    n = settings["eval_samples"]
    write_json(out / f"sd_ablation_n{n}.json", summary)
    write_text(out / f"sd_ablation_n{n}.md", markdown(summary))


def beyond(a: dict, b: dict, separated: bool) -> bool | None:
    """None (not measured) unless both rows have at least two seeds."""
    return separated if min(a["n_seeds"], b["n_seeds"]) >= 2 else None


def canonical_command(settings: dict, seeds: list[int]) -> str:
    """The one command that makes (or, rerun, completes) this table: row files are skipped when present."""
    return (f"nice -n 10 python benchmarks/sd_ablation.py --eval-samples {settings['eval_samples']} --seeds "
            + " ".join(map(str, seeds)) + f" --calib-samples {settings['calib_samples']} --iters {settings['iters']}"
            f" --guidance {settings['guidance']} --steps {settings['steps']} --prompts {settings['prompts']}")


def find(table: list[dict], bits: str, variant: str) -> dict | None:
    return next((r for r in table if (r["bits"], r["variant"]) == (bits, variant)), None)


def acceptance(table: list[dict]) -> dict:
    """Issue 13: W8A8 digit-FID within 10% of FP (means); W4A8 DilateQuant better than each baseline by more
    than the seed spread, read strictly: its worst seed beats the baseline's best seed (ranges do not overlap)."""
    out: dict = {}
    fp, w8 = find(table, "FP32", "fp"), find(table, "W8A8", "dilatequant")
    if fp and w8:
        common = [x for x in w8["seeds"] if x in fp["seeds"]]  # the same evaluation noise on both sides
        pick = lambda r: statistics.fmean(r["digit_fid"]["per_seed"][r["seeds"].index(x)] for x in common)  # noqa: E731
        ratio = pick(w8) / pick(fp) if common else float("nan")
        out["w8a8_fid_over_fp"] = {"ratio": ratio, "seeds": common, "within_10_percent": ratio <= 1.10,
                                   "paired_fid_minus_fp": paired(fp["digit_fid"], w8["digit_fid"], fp["seeds"], w8["seeds"])}
    dq = find(table, "W4A8", "dilatequant")
    for variant in ("naive-ptq", "no-tpq (static scale)", "smoothquant", "no-scaling"):
        base = find(table, "W4A8", variant)
        if not (dq and base):
            continue
        fid_d, fid_b = dq["digit_fid"], base["digit_fid"]
        sq_d, sq_b = dq["noise_mean_sqnr_db"], base["noise_mean_sqnr_db"]
        out[f"w4a8_vs_{variant}"] = {
            "digit_fid_gain": fid_b["mean"] - fid_d["mean"],
            "digit_fid_beats_beyond_spread": beyond(fid_d, fid_b, fid_d["max"] < fid_b["min"]),
            "noise_sqnr_gain_db": sq_d["mean"] - sq_b["mean"],
            "noise_sqnr_beats_beyond_spread": beyond(sq_d, sq_b, sq_d["min"] > sq_b["max"]),
            "paired_fid_gain": paired(fid_d, fid_b, dq["seeds"], base["seeds"]),
            "paired_sqnr_gain_db": paired(sq_b, sq_d, base["seeds"], dq["seeds"]),
        }
    return out


def fmt_beyond(v: bool | None) -> str:
    return "one seed: spread not measured" if v is None else ("beyond" if v else "NOT beyond") + " the seed spread"


def fmt_paired(p: dict) -> str:
    if not p["seeds"]:
        return "no common seeds"
    if p["same_sign_every_seed"] is None:
        return "[" + ", ".join(f"{x:+.2f}" for x in p["per_seed"]) + "] (one seed: no claim)"
    sign = "same sign on every seed" if p["same_sign_every_seed"] else "sign differs between seeds"
    return "[" + ", ".join(f"{x:+.2f}" for x in p["per_seed"]) + f"] ({sign})"


def markdown(s: dict) -> str:
    st = s["settings"]
    pm = lambda r, k, fmt: ("-" if k not in r else  # noqa: E731
                            f"{fmt.format(r[k]['mean'])} ± {fmt.format(r[k]['std'])} "
                            f"({fmt.format(r[k]['min'])}..{fmt.format(r[k]['max'])})")
    lines = [f"`{st['model']}` (StableDiffusionPipeline), DDIM-{st['steps']}, guidance {st['guidance']}, negative prompt "
             f"\"\", prompts `{Path(st['prompts']).name}` (sample i: prompt i % 80 = digit i % 10, phrasing (i // 10) % 8). "
             f"Every cell: mean ± std over seeds (min..max). {st['eval_samples']} evaluation samples per row and seed; "
             "seed s = calibration `--seed s`, evaluation noise seed 100 + s, per-step noise SQNR on "
             f"{st['traj_samples']} FP trajectories (seed 107 + s).", "",
             "| bits | variant | seeds | samples/seed | digit-FID | class acc | noise SQNR dB | image PSNR dB | SSIM | "
             "min class acc by digit | calib s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['bits']} | {r['variant']} | {','.join(map(str, r['seeds']))} | {r['num_samples']} | "
                     f"{pm(r, 'digit_fid', '{:.2f}')} | {pm(r, 'class_accuracy', '{:.3f}')} | "
                     f"{pm(r, 'noise_mean_sqnr_db', '{:.2f}')} | {pm(r, 'image_psnr_db', '{:.2f}')} | "
                     f"{pm(r, 'image_ssim', '{:.3f}')} | {min(r['class_accuracy_per_digit']):.3f} | "
                     f"{r['calib_wall_s']['mean']:.0f} |" if "calib_wall_s" in r else
                     f"| {r['bits']} | {r['variant']} | {','.join(map(str, r['seeds']))} | {r['num_samples']} | "
                     f"{pm(r, 'digit_fid', '{:.2f}')} | {pm(r, 'class_accuracy', '{:.3f}')} | - | - | - | "
                     f"{min(r['class_accuracy_per_digit']):.3f} | - |")
    lines += ["", "Class accuracy by prompted digit (mean over seeds):", "",
              "| bits | variant | " + " | ".join(str(d) for d in range(10)) + " |", "|---|---|" + "---|" * 10]
    for r in s["rows"]:
        lines.append(f"| {r['bits']} | {r['variant']} | " + " | ".join(f"{v:.3f}" for v in r["class_accuracy_per_digit"]) + " |")
    c = s["acceptance"]
    lines += ["", "Acceptance (issue 13; \"beyond spread\": the W4A8 DilateQuant row's worst seed beats the baseline's best):", ""]
    if "w8a8_fid_over_fp" in c:
        w = c["w8a8_fid_over_fp"]
        lines.append(f"- W8A8 digit-FID / FP digit-FID on seeds {w['seeds']} = {w['ratio']:.3f} (bar <= 1.10): "
                     f"{'met' if w['within_10_percent'] else 'NOT met'}; paired (same noise) W8A8 - FP per seed: "
                     f"{fmt_paired(w['paired_fid_minus_fp'])}")
    for k, v in c.items():
        if k.startswith("w4a8_vs_"):
            lines.append(f"- W4A8 DilateQuant vs {k[8:]}: digit-FID better by {v['digit_fid_gain']:.2f} "
                         f"({fmt_beyond(v['digit_fid_beats_beyond_spread'])}), "
                         f"noise SQNR better by {v['noise_sqnr_gain_db']:.2f} dB "
                         f"({fmt_beyond(v['noise_sqnr_beats_beyond_spread'])}); "
                         f"paired per seed: FID gain {fmt_paired(v['paired_fid_gain'])}, SQNR gain "
                         f"{fmt_paired(v['paired_sqnr_gain_db'])} dB")
    cmds = [r["calibrate_cmd"] for r in s["rows"] if r.get("calibrate_cmd")]
    lines += ["", "Command (resumable: rerun it to add missing rows/seeds):", "", "```", str(s["command"]), "```", "",
              "Calibration of each row (seed 0 shown; seed s passes --seed s):", "", "```"] + cmds + ["```"]
    if s["ignored_row_files"]:
        lines += ["", f"Row files made with other settings, not in this table: {', '.join(s['ignored_row_files'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
