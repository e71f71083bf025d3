"""dq-generate's path on sd-digits, measured: exported QDQ graphs inside diffusers' own pipeline vs the FP pipeline.

Issue 12's acceptance: graphs calibrated for DDIM-50 sampled with DDIM, Euler and DPM-Solver++ at 20 steps
(other step counts use the nearest calibrated timestep's scales). Every image is made the way `dq-generate
--compare-fp` makes it (dilatequant.engines.generate.run_pipeline, one prompt and one seed per call, the
quantized UNet as pipe.unet), so the numbers are the CLI's own; one process avoids reloading per image.

Image (digit d, seed s) starts from torch.Generator().manual_seed(1000 * s + d) for FP and quantized alike.
PSNR/SSIM are against the FP pipeline's image from that same noise, pooled over the digits of one seed; the
table gives the mean over seeds and the seed-to-seed spread (min..max).

    python benchmarks/sd_generate.py --runtime W8A8=/tmp/sdq/W8A8.onnx --runtime W4A8=/tmp/sdq/W4A8.onnx
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dilatequant.core.digit_classifier import classify
from dilatequant.core.digits import captions_for
from dilatequant.core.metrics import psnr_db, ssim
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, save_grid, write_json, write_text
from dilatequant.engines.generate import check_pairing, run_pipeline
from dilatequant.engines.generate_config import SCHEDULERS, GenerateConfig
from dilatequant.engines.pytorch.diffusers_unet import QuantizedUNet
from dilatequant.engines.runners import open_runner

SEED_STRIDE = 1000  # image (digit d, seed s) uses generator seed SEED_STRIDE * s + d


def digit_prompts(phrasing: int) -> list[str]:
    """Prompt d asks for digit d in training phrasing `phrasing` (0: "a handwritten digit <word>")."""
    return [captions_for(d)[phrasing] for d in range(10)]


def images_for(model, unet, prompts: list[str], scheduler: str, steps: int, guidance: float, seed: int,
               negative_prompt: str | None) -> torch.Tensor:
    """[10, C, H, W] in [-1, 1]: one run_pipeline call per prompt, exactly as one `dq-generate` makes one image."""
    out = []
    for d, prompt in enumerate(prompts):
        cfg = GenerateConfig(model="sd-digits", runtime=Path("-"), prompt=prompt, steps=steps, scheduler=scheduler,
                             guidance=guidance, seed=SEED_STRIDE * seed + d, negative_prompt=negative_prompt)
        out.append(run_pipeline(model, unet, cfg) * 2 - 1)
    return torch.cat(out)


def spread(values: list[float]) -> dict:
    """Mean, sample std and range over seeds: a difference inside the range is not a result."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "per_seed": values}


def accuracy(images: torch.Tensor) -> float:
    """Share of the 10 images classified as their prompted digit (image d asks for digit d)."""
    return (classify(images)[1].argmax(-1) == torch.arange(len(images)) % 10).double().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd-digits", help="the pipeline the runtimes were calibrated from")
    p.add_argument("--runtime", action="append", required=True, metavar="LABEL=PATH",
                   help="a dq-export graph (or q.pt) with its table label; repeat for more")
    p.add_argument("--schedulers", nargs="+", default=["ddim", "euler", "dpm"], choices=SCHEDULERS)
    p.add_argument("--steps", type=int, nargs="+", default=[20])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--phrasing", type=int, default=0, help="caption template index (0: 'a handwritten digit <word>')")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sd_generate"))
    p.add_argument("--calibration", action="append", default=[],
                   help="a command that made the runtimes (recorded in the report); repeat for more")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runtimes = dict(r.split("=", 1) for r in a.runtime)
    model = load_model(a.model)
    prompts = digit_prompts(a.phrasing)
    start = time.perf_counter()
    fp: dict[tuple, torch.Tensor] = {}
    rows, grid = [], []
    for label, path in runtimes.items():
        runner = open_runner(path, threads=a.threads)
        check_pairing(model, runner, path)
        qunet = QuantizedUNet(runner, model.unet.config)
        for steps in a.steps:
            for sched in a.schedulers:
                per_seed = {"image_psnr_db": [], "image_ssim": [], "class_accuracy": [], "fp_class_accuracy": []}
                t0 = time.perf_counter()
                for seed in a.seeds:
                    key = (steps, sched, seed)
                    if key not in fp:
                        fp[key] = images_for(model, model.unet, prompts, sched, steps, a.guidance, seed, a.negative_prompt)
                    q = images_for(model, qunet, prompts, sched, steps, a.guidance, seed, a.negative_prompt)
                    per_seed["image_psnr_db"].append(psnr_db(q, fp[key]))
                    per_seed["image_ssim"].append(ssim(q, fp[key]))
                    per_seed["class_accuracy"].append(accuracy(q))
                    per_seed["fp_class_accuracy"].append(accuracy(fp[key]))
                    if seed == a.seeds[0] and steps == a.steps[0]:
                        grid.append((f"{sched} FP", fp[key]))
                        grid.append((f"{sched} {label}", q))
                row = {"runtime": label, "path": path, "scheduler": sched, "steps": steps,
                       "images_per_seed": len(prompts), **{k: spread(v) for k, v in per_seed.items()},
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(label, sched, steps, {k: round(row[k]["mean"], 3) for k in per_seed}, flush=True)
        runner_meta = runner.metadata.to_dict()
        rows[-1]["runner"] = runner_meta
    a.out.mkdir(parents=True, exist_ok=True)
    # grid: per scheduler, the FP row then every runtime's row (FP rows repeat per runtime; keep the first)
    seen, ordered = set(), []
    for sched in a.schedulers:
        for name, imgs in grid:
            if name.split(" ", 1)[0] == sched and name not in seen:
                seen.add(name)
                ordered.append((name, imgs))
    save_grid(a.out / "prompt_grid.png", torch.cat([imgs for _, imgs in ordered]), nrow=10, scale=3)
    command = "python " + shlex.join(sys.argv)
    settings = {"model": a.model, "runtimes": runtimes, "schedulers": a.schedulers, "steps": a.steps, "seeds": a.seeds,
                "seed_rule": f"image (digit d, seed s): torch.Generator().manual_seed({SEED_STRIDE} * s + d)",
                "prompts": prompts, "guidance": a.guidance, "negative_prompt": a.negative_prompt,
                "threads": a.threads, "calibration": a.calibration}
    result = {"command": command, "settings": settings, "environment": environment(), "rows": rows,
              "grid_rows": [name for name, _ in ordered], "wall_s": round(time.perf_counter() - start, 1)}
    write_json(a.out / "sd_generate.json", result)
    write_text(a.out / "sd_generate.md", markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    n = len(s["seeds"])
    lines = [f"Quantized UNet inside diffusers' StableDiffusionPipeline (`{s['model']}`) vs the FP pipeline from the "
             f"same noise: {len(s['prompts'])} prompts (\"{s['prompts'][0]}\" .. \"{s['prompts'][-1]}\") x {n} seeds "
             f"({', '.join(map(str, s['seeds']))}), guidance {s['guidance']}, negative prompt \"{s['negative_prompt']}\".",
             f"Seed rule: {s['seed_rule']}. PSNR/SSIM pooled over the {len(s['prompts'])} images of a seed; "
             f"mean over the {n} seeds with the min..max across seeds. Class accuracy: the digit classifier on "
             f"the {len(s['prompts'])} x {n} images vs the prompted digit.", "",
             "Runtimes made by (calibration for DDIM-50; other samplers and step counts use the nearest calibrated "
             "timestep's scales):", "", "```", *s["calibration"], "```", "",
             "| runtime | sampler | steps | image PSNR dB (min..max) | SSIM (min..max) | class acc quantized | class acc FP |",
             "|---|---|---|---|---|---|---|"]
    names = {"ddim": "DDIM", "euler": "Euler", "dpm": "DPM-Solver++"}
    for row in r["rows"]:
        ps, ss = row["image_psnr_db"], row["image_ssim"]
        lines.append(f"| {row['runtime']} | {names[row['scheduler']]} | {row['steps']} | {ps['mean']:.2f} "
                     f"({ps['min']:.2f}..{ps['max']:.2f}) | {ss['mean']:.3f} ({ss['min']:.3f}..{ss['max']:.3f}) | "
                     f"{row['class_accuracy']['mean']:.3f} | {row['fp_class_accuracy']['mean']:.3f} |")
    lines += ["", f"`prompt_grid.png` (seed {s['seeds'][0]}, columns digit 0..9), rows top to bottom: "
              + "; ".join(r["grid_rows"]) + ".", "", f"Wall time {r['wall_s']:.0f} s "
              f"({s['threads']} thread, {r['environment']['cpu']}).", "", "Command:", "", "```", r["command"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
