"""Which sampler to calibrate with: calibrated with X, run with Y, inside diffusers' own pipeline.

For each model and seed, dq-calibrate (W8A8 symmetric, 10 steps, PTQ + a short BKD) once per calibration sampler;
then every q.pt runs with every sampler through the model's own diffusers pipeline with the fake-quant UNet
dropped in (pipe.unet = QuantizedUNet(fake-quant runner)):
- per-call SQNR: fake-quant vs FP on every UNet call, teacher-forced on the FP trajectory (the pipeline goes on
  with the FP output), energies pooled over the images per step;
- image PSNR: the fake-quant pipeline's images vs the FP pipeline's from the same per-image seeds;
- sd-digits: prompted class accuracy (the shipped digit classifier) of both.

Models: `sd-digits` (its scheduler/ is SD 1.x's PNDM config with clip_sample false; it samples with DDIM), and a
random SDXL-style folder (tests/sd_pipelines.tiny_sdxl, UNet 32/64 channels, 16x16 latents) whose
EulerDiscreteScheduler config, saved by diffusers, has no clip_sample. Calibration samplers: DDIM, Euler and
DPM-Solver++ built on the folder's noise schedule (core.schedulers), and for the SDXL folder also
DDIMScheduler.from_config(its config) - what calibration sampled before it could choose, with DDIM's default
clip_sample=True leaking in. Run samplers: DDIM, Euler, DPM-Solver++.

    flock /tmp/dq-heavy.lock python benchmarks/cross_sampler.py --work /tmp/cross_sampler

Resumable: every q.pt and every evaluation is kept under --work and reused when its settings match.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SDXL_PROMPTS = ["a red cat", "a blue dog", "a green tree", "a yellow car", "a small house", "a big boat",
                "an old man", "a white horse", "a black bird", "a tall tower", "a pink flower", "a brown bear",
                "a grey cloud", "a dark forest", "a bright sun", "a quiet lake"]
RUN_SAMPLERS = ("ddim", "euler", "dpm")
LEAKY = "ddim-from-config"
NAMES = {"ddim": "DDIM", "euler": "Euler", "dpm": "DPM-Solver++",
         LEAKY: "DDIMScheduler.from_config (clip_sample=True leaks in)"}


def sdxl_folder(work: Path) -> Path:
    """The random SDXL-style pipeline folder, built once (seeded: the same on every machine)."""
    folder = work / "sdxl-random"
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from sd_pipelines import tiny_sdxl

        tiny_sdxl(seed=0, channels=(32, 64), sample_size=16).save_pretrained(folder)
    return folder


def eval_prompts(model_name: str, n: int) -> tuple[list[str], torch.Tensor | None]:
    """Prompt i, and for sd-digits the digit it asks for: digit i % 10 in training phrasing (i // 10) % 8."""
    if model_name == "sd-digits":
        from dilatequant.core.digits import CAPTION_TEMPLATES, captions_for

        digits = torch.arange(n) % 10
        return [captions_for(int(d))[(i // 10) % len(CAPTION_TEMPLATES)] for i, d in enumerate(digits)], digits
    return [SDXL_PROMPTS[i % len(SDXL_PROMPTS)] for i in range(n)], None


def calibrate(model_name: str, source: str, sampler: str, seed: int, a, work: Path) -> Path:
    """q.pt of one (model, calibration sampler, seed), reused when already there with the same settings."""
    from diffusers import DDIMScheduler

    from dilatequant.calibrate.distill import DistillConfig
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
    from dilatequant.core.models import load_model

    out = work / f"{model_name}-{sampler}-seed{seed}.q.pt"
    settings = {"steps": a.steps, "calib_samples": a.calib_samples, "iters": a.iters, "seed": seed, "sampler": sampler}
    stamp = out.with_suffix(".json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings:
        return out
    scheduler = sampler
    if sampler == LEAKY:
        scheduler = DDIMScheduler.from_config(load_model(source).scheduler.config)
    prompts = SDXL_PROMPTS if model_name != "sd-digits" else None
    job = CalibrationJob(model=source, config=QuantConfig(num_steps=a.steps, weight_bits=8, act_bits=8, symmetric=True),
                         distill=DistillConfig(iters=a.iters, seed=seed), calib_samples=a.calib_samples,
                         bkd=a.iters > 0, out=out, prompts=prompts, scheduler=scheduler)
    t0 = time.perf_counter()
    s = run_calibration(job)
    stamp.write_text(json.dumps({"settings": settings, "wall_s": time.perf_counter() - t0,
                                 "val_sqnr_db": s["val_after_training"]["noise_sqnr_db"],
                                 "timesteps": s["scheduler"]["timesteps"]}, indent=1))
    return out


class StepTracker(torch.nn.Module):
    """pipe.unet for the teacher-forced pass: runs the fake-quant UNet and the FP UNet on every call, returns FP's,
    and pools the signal and error energies of each step (call i of a pipeline run) over all images."""

    def __init__(self, quantized, fp_unet):
        super().__init__()
        self.quantized, self.fp_unet = quantized, fp_unet
        self.config = quantized.config
        if hasattr(quantized, "add_embedding"):
            self.add_embedding = quantized.add_embedding
        self.signal: list[float] = []
        self.error: list[float] = []
        self.call = 0

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True, **kw):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        q = self.quantized(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
        with torch.no_grad():
            ref = self.fp_unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
        if self.call == len(self.signal):
            self.signal.append(0.0)
            self.error.append(0.0)
        self.signal[self.call] += ref.double().pow(2).sum().item()
        self.error[self.call] += (q - ref).double().pow(2).sum().item()
        self.call += 1
        return UNet2DConditionOutput(sample=ref) if return_dict else (ref,)


def run_pipeline(model, unet, scheduler, prompts: list[str], steps: int, guidance: float, seed: int,
                 batch: int, tracker: StepTracker | None = None) -> torch.Tensor:
    """Images in [-1, 1]; image i's noise from Generator(1000 * seed + i), whatever the batching."""
    pipe = model.pipeline
    original = pipe.unet, pipe.scheduler
    pipe.unet, pipe.scheduler = unet, scheduler
    out = []
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            if tracker is not None:
                tracker.call = 0
            gens = [torch.Generator().manual_seed(1000 * seed + start + j) for j in range(len(chunk))]
            with torch.no_grad():
                images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                              height=model.image_size[0], width=model.image_size[1], output_type="pt").images
            out.append(images.float() * 2 - 1)
    finally:
        pipe.unet, pipe.scheduler = original
    return torch.cat(out)


def evaluate(model_name: str, model, ckpt: Path, run: str, seed: int, a, work: Path) -> dict:
    """One q.pt run with one sampler: per-step SQNR (teacher-forced), image PSNR, class accuracy."""
    import math

    from dilatequant.calibrate.checkpoint import checkpoint_hash, load_checkpoint
    from dilatequant.core.digit_classifier import classify
    from dilatequant.core.metrics import psnr_db
    from dilatequant.core.schedulers import describe, resolve_scheduler
    from dilatequant.engines.pytorch.diffusers_unet import QuantizedUNet
    from dilatequant.engines.pytorch.runner import TorchRunner

    path = work / "evals" / f"{ckpt.stem}-run-{run}-n{a.images}.json"
    digest = checkpoint_hash(ckpt)
    if path.is_file() and json.loads(path.read_text()).get("checkpoint_sha256") == digest:
        return json.loads(path.read_text())
    ck = load_checkpoint(ckpt)
    quantized = QuantizedUNet(TorchRunner.from_checkpoint(ck), model.unet.config)
    scheduler = resolve_scheduler(model, run)
    prompts, digits = eval_prompts(model_name, a.images)
    guidance = model.guidance_scale if model.guidance_scale is not None else 7.5
    tracker = StepTracker(quantized, model.unet)
    fp = run_pipeline(model, tracker, scheduler, prompts, a.steps, guidance, seed, a.batch, tracker)
    q = run_pipeline(model, quantized, scheduler, prompts, a.steps, guidance, seed, a.batch)
    per_step = [10 * math.log10(s / e) if e > 0 else float("inf") for s, e in zip(tracker.signal, tracker.error)]
    row = {"checkpoint_sha256": digest, "run_sampler": describe(scheduler), "calibrated_with": ck.schedule.label,
           "calibrated_timesteps": ck.timesteps, "images": len(prompts),
           "per_call_sqnr_db": per_step, "per_call_sqnr_mean_db": statistics.fmean(per_step),
           "per_call_sqnr_min_db": min(per_step), "image_psnr_db": psnr_db(q, fp)}
    if digits is not None:
        row["class_accuracy"] = (classify(q)[1].argmax(-1) == digits).double().mean().item()
        row["fp_class_accuracy"] = (classify(fp)[1].argmax(-1) == digits).double().mean().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def cpu_has_avx512() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return "avx512" in flags


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "per_seed": values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/cross_sampler"), help="q.pt files, evaluations, the folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cross_sampler")
    p.add_argument("--models", nargs="+", default=["sd-digits", "sdxl-random"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=10, help="calibrated and sampled steps")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="BKD iterations per block (0: PTQ)")
    p.add_argument("--images", type=int, default=100, help="evaluation images per (q.pt, run sampler)")
    p.add_argument("--batch", type=int, default=50, help="images per pipeline call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown-only", action="store_true", help="rewrite README.md from --out's cross_sampler.json")
    a = p.parse_args()
    if a.markdown_only:
        from dilatequant.core.reporting import write_text

        write_text(a.out / "README.md", markdown(json.loads((a.out / "cross_sampler.json").read_text())))
        return
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DQ_CACHE_DIR", str(a.work / "cache"))
    from dilatequant.core.models import load_model
    from dilatequant.core.reporting import environment, write_json, write_text

    start = time.perf_counter()
    rows = []
    for model_name in a.models:
        source = "sd-digits" if model_name == "sd-digits" else str(sdxl_folder(a.work))
        model = load_model(source)
        calibrations = ["ddim", "euler", "dpm"] + ([LEAKY] if model_name != "sd-digits" else [])
        for calib in calibrations:
            for run in RUN_SAMPLERS:
                per_seed = []
                for seed in a.seeds:
                    ckpt = calibrate(model_name, source, calib, seed, a, a.work)
                    per_seed.append(evaluate(model_name, model, ckpt, run, seed, a, a.work))
                    print(f"{model_name} calibrated {calib} seed {seed}, run {run}: per-call SQNR mean "
                          f"{per_seed[-1]['per_call_sqnr_mean_db']:.2f} min {per_seed[-1]['per_call_sqnr_min_db']:.2f}, "
                          f"PSNR {per_seed[-1]['image_psnr_db']:.2f}", flush=True)
                row = {"model": model_name, "calibrated_with": calib, "run_with": run,
                       "calibrated_label": per_seed[0]["calibrated_with"], "run_label": per_seed[0]["run_sampler"],
                       "per_call_sqnr_mean_db": spread([r["per_call_sqnr_mean_db"] for r in per_seed]),
                       "per_call_sqnr_min_db": spread([r["per_call_sqnr_min_db"] for r in per_seed]),
                       "image_psnr_db": spread([r["image_psnr_db"] for r in per_seed]),
                       "per_call_sqnr_db_by_step": [r["per_call_sqnr_db"] for r in per_seed],
                       "calibrated_timesteps": per_seed[0]["calibrated_timesteps"]}
                if "class_accuracy" in per_seed[0]:
                    row["class_accuracy"] = spread([r["class_accuracy"] for r in per_seed])
                    row["fp_class_accuracy"] = spread([r["fp_class_accuracy"] for r in per_seed])
                rows.append(row)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.update({"bits": "W8A8 symmetric", "run_samplers": list(RUN_SAMPLERS),
                     "seed_rule": "seed s: calibration (trajectories, BKD) seeded s; evaluation image i from "
                                  "Generator(1000 * s + i)",
                     "guidance": {"sd-digits": 3.0, "sdxl-random": 7.5}})
    result = {"command": "python " + shlex.join(sys.argv), "settings": settings,
              "environment": {**environment(), "cpu_avx512": cpu_has_avx512()},
              "rows": rows, "wall_s": round(time.perf_counter() - start, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "cross_sampler.json", result)
    write_text(a.out / "README.md", markdown(result))
    print(f"wrote {a.out}/README.md")


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Calibrated with X, run with Y", "",
             f"W8A8 symmetric, {s['steps']} calibrated and sampled steps, {s['calib_samples']} calibration inputs, "
             f"BKD {s['iters']} iterations per block; seeds {s['seeds']} ({s['seed_rule']}); {s['images']} images "
             f"per (q.pt, run sampler) through the model's own diffusers pipeline with the fake-quant UNet in it. "
             "Per-call SQNR: fake-quant vs FP on every UNet call, teacher-forced on the FP trajectory (mean and "
             "worst step); image PSNR: fake-quant pipeline vs FP pipeline, same seeds. Each cell: mean over the "
             "seeds (min..max).", ""]
    for model in dict.fromkeys(row["model"] for row in r["rows"]):
        digits = any("class_accuracy" in row for row in r["rows"] if row["model"] == model)
        lines += [f"## {model}", "", "| calibrated with | run with | per-call SQNR mean dB | worst step dB | "
                  "image PSNR dB |" + (" class acc (FP) |" if digits else ""),
                  "|---|---|---|---|---|" + ("---|" if digits else "")]
        for row in (x for x in r["rows"] if x["model"] == model):
            cells = [NAMES[row["calibrated_with"]], NAMES[row["run_with"]]]
            for key in ("per_call_sqnr_mean_db", "per_call_sqnr_min_db", "image_psnr_db"):
                v = row[key]
                cells.append(f"{v['mean']:.2f} ({v['min']:.2f}..{v['max']:.2f})")
            if digits:
                v = row["class_accuracy"]
                cells.append(f"{v['mean']:.3f} ({v['min']:.3f}..{v['max']:.3f}) ({row['fp_class_accuracy']['mean']:.3f})")
            lines.append("| " + " | ".join(cells) + " |")
        mine = [x for x in r["rows"] if x["model"] == model]
        grids = {NAMES[x["calibrated_with"]]: x["calibrated_timesteps"] for x in mine}
        lines += ["", "Calibrated timesteps: " + "; ".join(f"{k} {v}" for k, v in grids.items()) + ".", "",
                  f"Per-call SQNR (dB) by step, seed {s['seeds'][0]}:", "",
                  "| calibrated with | run with | " + " | ".join(f"step {i}" for i in range(s["steps"])) + " |",
                  "|---|---|" + "---|" * s["steps"]]
        for x in mine:
            lines.append(f"| {NAMES[x['calibrated_with']]} | {NAMES[x['run_with']]} | "
                         + " | ".join(f"{v:.1f}" for v in x["per_call_sqnr_db_by_step"][0]) + " |")
        lines.append("")
    env = r["environment"]
    avx = {True: ", AVX-512", False: ", no AVX-512"}.get(env.get("cpu_avx512"), "")
    lines += [f"Wall time {r['wall_s']:.0f} s, {s['threads']} thread, on {env['cpu']}{avx} (a machine shared with other "
              f"jobs: not a speed figure); torch {env['torch']}, diffusers {env.get('diffusers', '-')}.", "",
              "Command:", "", "```", r["command"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
