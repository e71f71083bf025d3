"""Quality of DilateQuant on the shipped diffusion transformer `sd3-digits`, over several seeds: does per-timestep
quantization (TPQ) pay off on a DiT, and by how much beyond the seed spread?

Rows: FP; at W8A8 and W4A8 each: DilateQuant (WD + TPQ + BKD), its static-scale twin (the same with one scale per
activation, --no-tpq), static-scale PTQ in the style of NVIDIA ModelOpt's diffusers recipe (SmoothQuant scaling,
one min-mean percentile scale per activation, no training) and naive PTQ (no scaling, one min/max scale); at W4A8
also DilateQuant with the adaLN modulation linears in float (they read only the timestep and pooled text), and
with the final projection in float (else 8-bit, --first-last-bits). Every
quantized row of seed s is calibrated by dq-calibrate (its own subprocess) with --seed s on the same prompts,
guidance and steps, on the pipeline's own FlowMatchEuler sampler, then sampled from evaluation noise seed 100 + s
beside FP from the same noise: digit-FID and class accuracy by prompted digit (>= 1,000 samples), per-step noise
SQNR on 16 FP trajectories (seed 107 + s), image PSNR/SSIM vs FP.

Resumable (row files under <out>/rows_n<samples>/, checkpoints reused), as benchmarks/sd_ablation.py, whose
calibration and evaluation it shares; --summary-only rewrites the summary from the row files there (the declared
rows and seeds without one are listed as not run).

    flock /tmp/dq-heavy.lock nice -n 10 python benchmarks/dit_quality.py --eval-samples 1000 --seeds 0 1 2
"""
from __future__ import annotations

from pathlib import Path

from dilatequant.core.models import load_model
from dilatequant.core.prompts import read_prompts
from dilatequant.core.reporting import environment, write_json, write_text
from sd_ablation import aggregate, fmt_paired, paired, parse_args, run_rows

MODULATION = ["*norm1*.linear", "norm_out.linear"]  # SD3's adaLN modulation linears (blocks' and the final norm's)
VARIANTS = {
    "dilatequant": [],
    "dilatequant-static": ["--no-tpq"],
    "static-ptq": ["--no-tpq", "--no-bkd", "--act-init", "minmean", "--scaling", "smoothquant"],
    "naive-ptq": ["--scaling", "none", "--no-tpq", "--no-bkd", "--act-init", "minmax"],
    "dilatequant-float-modulation": ["--float-layers", "pos_embed.proj", *MODULATION],
    "dilatequant-float-output": ["--float-layers", "pos_embed.proj", "proj_out"],
    # the same min-mean calibrator per timestep: what TPQ alone changes against the ModelOpt-style row
    "tpq-ptq": ["--no-bkd", "--act-init", "minmean", "--scaling", "smoothquant"],
    # the ModelOpt-style row with the per-sample vectors (adaLN modulation, timestep/text embeddings) in float
    "static-ptq-float-modulation": ["--no-tpq", "--no-bkd", "--act-init", "minmean", "--scaling", "smoothquant",
                                    "--float-layers", "pos_embed.proj", *MODULATION, "time_text_embed.*"],
}
DESCRIPTIONS = {
    "fp": "full precision",
    "dilatequant": "DilateQuant (WD + TPQ + BKD)",
    "dilatequant-static": "DilateQuant's static twin (--no-tpq: one scale, same WD + BKD)",
    "static-ptq": "static-scale PTQ, ModelOpt-style (SmoothQuant, min-mean, no training)",
    "naive-ptq": "naive PTQ (no scaling, min/max, no training)",
    "dilatequant-float-modulation": "DilateQuant, adaLN modulation linears in float",
    "dilatequant-float-output": "DilateQuant, final projection (proj_out) in float",
    "tpq-ptq": "per-timestep PTQ with the ModelOpt-style calibrator (SmoothQuant, min-mean per step, no training)",
    "static-ptq-float-modulation": "static-scale PTQ, ModelOpt-style, adaLN modulation + embeddings in float",
}
ROWS = [("FP32", "fp"), *[(b, v) for b in ("W8A8", "W4A8") for v in
                          ("dilatequant", "dilatequant-static", "static-ptq", "naive-ptq")],
        ("W4A8", "dilatequant-float-modulation"), ("W4A8", "dilatequant-float-output"),
        ("W8A8", "tpq-ptq"), ("W8A8", "static-ptq-float-modulation")]
METRICS = ("digit_fid", "class_accuracy", "noise_mean_sqnr_db", "image_psnr_db", "image_ssim", "calib_wall_s",
           "eval_s")


def main() -> None:
    a = parse_args(__doc__, "sd3-digits", None, 20, ROWS, Path("benchmarks/results/dit_quality"))
    rows = [tuple(r.split(":", 1)) for r in a.rows]
    model = load_model(a.model)
    a.guidance = a.guidance if a.guidance is not None else model.guidance_scale
    settings = {"model": a.model, "prompts": str(a.prompts), "guidance": a.guidance, "steps": a.steps,
                "calib_samples": a.calib_samples, "iters": a.iters, "eval_samples": a.eval_samples,
                "traj_samples": a.traj_samples, "sampler": type(model.scheduler).__name__}
    row_dir, ckpt_dir = a.out / f"rows_n{a.eval_samples}", a.out / "checkpoints"
    row_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not a.summary_only:
        run_rows(lambda: model, read_prompts(a.prompts), rows, a, settings, row_dir, ckpt_dir, VARIANTS)
    write_summary(a.out, row_dir, settings)


def find(table: list[dict], bits: str, variant: str) -> dict | None:
    return next((r for r in table if (r["bits"], r["variant"]) == (bits, variant)), None)


# (bits, row, baseline): the first row minus the second, paired per seed
PAIRS = [(b, "dilatequant", v) for b in ("W8A8", "W4A8") for v in ("dilatequant-static", "static-ptq", "naive-ptq")] + [
    ("W4A8", "dilatequant", "dilatequant-float-modulation"), ("W4A8", "dilatequant", "dilatequant-float-output"),
    ("W8A8", "tpq-ptq", "static-ptq"), ("W8A8", "static-ptq-float-modulation", "static-ptq")]


def comparisons(table: list[dict]) -> dict:
    """Paired (same evaluation noise per seed) differences of the PAIRS.

    `beyond_spread`: every seed's difference has the same sign and the mean difference exceeds the largest
    seed-to-seed standard deviation of the two rows' own values."""
    out: dict = {}
    for bits, row, base in PAIRS:
        a, b = find(table, bits, row), find(table, bits, base)
        if not (a and b):
            continue
        entry = {}
        for metric, better in (("noise_mean_sqnr_db", 1), ("image_psnr_db", 1), ("digit_fid", -1),
                               ("class_accuracy", 1)):
            d = paired(b[metric], a[metric], b["seeds"], a["seeds"])
            spread = max(b[metric]["std"], a[metric]["std"])
            d["beyond_spread"] = (None if d["same_sign_every_seed"] is None else
                                  bool(d["same_sign_every_seed"] and abs(d["mean"]) > spread))
            d["first_better"] = None if d["mean"] is None else d["mean"] * better > 0
            entry[metric] = d
        out[f"{bits}: {row} vs {base}"] = entry
    return out


DECLARED_SEEDS = (0, 1, 2)


def not_run(table: list[dict]) -> list[str]:
    """Every declared (row, seed) without a row file: the table says what it lacks instead of leaving it out."""
    have = {(r["bits"], r["variant"]): set(r["seeds"]) for r in table}
    return [f"{b}:{v} seed {s}" for b, v in ROWS for s in DECLARED_SEEDS if s not in have.get((b, v), set())]


def machine(runs: list[dict]) -> dict:
    """Where the rows ran (each row file records its own environment)."""
    envs = [r["environment"] for r in runs]
    return {k: sorted({str(e.get(k)) for e in envs}) for k in ("cpu", "cpu_count", "torch_threads", "torch",
                                                                  "diffusers")}


def write_summary(out: Path, row_dir: Path, settings: dict) -> None:
    table, runs, files, other = aggregate(row_dir, settings, ROWS, METRICS)
    for r in table:
        r["description"] = DESCRIPTIONS[r["variant"]]
    seeds = " ".join(map(str, DECLARED_SEEDS))
    summary = {"settings": settings, "environment": environment(), "rows_machine": machine(runs),
               "command": f"flock /tmp/dq-heavy.lock nice -n 10 python benchmarks/dit_quality.py --eval-samples "
                          f"{settings['eval_samples']} --steps {settings['steps']} --seeds {seeds}",
               "declared_seeds": list(DECLARED_SEEDS), "rows": table, "comparisons": comparisons(table),
               "not_run": not_run(table), "row_files": [f.name for f in files if f.name not in other],
               "ignored_row_files": other}
    n = settings["eval_samples"]
    write_json(out / f"dit_quality_n{n}.json", summary)
    write_text(out / f"dit_quality_n{n}.md", markdown(summary))


def markdown(s: dict) -> str:
    st = s["settings"]
    pm = lambda r, k, fmt: ("-" if k not in r else  # noqa: E731
                            f"{fmt.format(r[k]['mean'])} ± {fmt.format(r[k]['std'])}")
    lines = [f"`{st['model']}` (StableDiffusion3Pipeline, {st['sampler']}-{st['steps']}), guidance {st['guidance']}, "
             f"negative prompt \"\", prompts `{Path(st['prompts']).name}` (sample i: digit i % 10). Every cell: mean ± "
             f"std over seeds. {st['eval_samples']} evaluation samples per row and seed; seed s = calibration --seed s "
             f"({st['calib_samples']} samples, {st['iters']} BKD iterations per block), evaluation noise seed 100 + s, "
             f"per-step noise SQNR on {st['traj_samples']} FP trajectories (seed 107 + s).", "",
             "| bits | variant | seeds | digit-FID | class acc | noise SQNR dB | image PSNR dB | SSIM | calib s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['bits']} | {r['description']} | {','.join(map(str, r['seeds']))} | "
                     f"{pm(r, 'digit_fid', '{:.2f}')} | {pm(r, 'class_accuracy', '{:.3f}')} | "
                     f"{pm(r, 'noise_mean_sqnr_db', '{:.2f}')} | {pm(r, 'image_psnr_db', '{:.2f}')} | "
                     f"{pm(r, 'image_ssim', '{:.3f}')} | {pm(r, 'calib_wall_s', '{:.0f}')} |")
    lines += ["", "Row minus baseline, paired per seed (same evaluation noise); 'beyond spread': the same sign on every "
              "seed and a mean difference above both rows' seed-to-seed std:", ""]
    for name, entry in s["comparisons"].items():
        parts = [f"{m} {fmt_paired(d)}{' beyond spread' if d['beyond_spread'] else ''}" for m, d in entry.items()]
        lines.append(f"- {name}: " + "; ".join(parts))
    m = s["rows_machine"]
    lines += ["", f"Rows measured on {', '.join(m['cpu'])} ({', '.join(m['cpu_count'])} cores, torch threads "
              f"{', '.join(m['torch_threads'])}; torch {', '.join(m['torch'])}, diffusers {', '.join(m['diffusers'])}). "
              f"Command (resumes: rows with a file are kept): `{s['command']}`"]
    if s["not_run"]:
        lines += ["", f"Not run ({len(s['not_run'])} of {len(ROWS) * len(s['declared_seeds'])} declared row-seeds): "
                  + ", ".join(s["not_run"]) + "."]
    cmds = [r["calibrate_cmd"] for r in s["rows"] if r.get("calibrate_cmd")]
    lines += ["", "Calibration of each row (seed 0 shown; seed s passes --seed s):", "", "```"] + cmds + ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
