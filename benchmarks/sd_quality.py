"""Quality of a digits pipeline (issue 13's bar): prompted samples -> VAE -> digit classifier.

Each sample i asks for digit i % 10 in one of the training phrasings (cycled; --phrasing canonical uses only
"a handwritten digit <word>"), through the folder's own diffusers pipeline with classifier-free guidance
(negative prompt ""): StableDiffusionPipeline with DDIM (sd-digits), a diffusion-transformer pipeline with its own
scheduler and its folder's pipeline keywords (sd3-digits). Reports class accuracy by prompted digit and by
phrasing, and digit-FID.

    python benchmarks/sd_quality.py --model /tmp/sd-digits --samples 200 --guidance 1.5 3 5   # a sweep
    python benchmarks/sd_quality.py --samples 1000                                            # the bar
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import checkpoint_hash
from dilatequant.core.digit_classifier import classify
from dilatequant.core.digits import CAPTION_TEMPLATES, IMAGE_SIZE, captions_for, load_digits
from dilatequant.core.errors import UserError
from dilatequant.core.metrics import digit_scores
from dilatequant.core.reporting import environment, save_grid, write_json, write_text

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "dilatequant" / "assets" / "sd-digits"
BAR = 0.90


def prompts(n: int, phrasing: str) -> tuple[list[str], torch.Tensor, list[int]]:
    """(prompt, prompted digit, phrasing index) of sample i: digit i % 10, phrasing (i // 10) % #templates."""
    digits = torch.arange(n) % 10
    which = [0 if phrasing == "canonical" else (i // 10) % len(CAPTION_TEMPLATES) for i in range(n)]
    return [captions_for(int(d))[k] for d, k in zip(digits, which)], digits, which


def load_pipeline(folder: Path):
    """The folder's pipeline (DDIM for a UNet pipeline, as sd-digits was measured) and its call keywords."""
    from diffusers import DDIMScheduler

    from dilatequant.core.models import load_model
    from dilatequant.engines.generate import pipeline_call_kwargs

    if not (folder / "model_index.json").is_file():
        raise UserError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json); "
                        "pass --model with the folder sd_training or dit_training wrote")
    model = load_model(folder)
    pipe = model.pipeline
    if not model.is_transformer:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe, pipeline_call_kwargs(model)


@torch.no_grad()
def generate(pipe, prompt_list: list[str], steps: int, guidance: float, seed: int, batch: int,
             call_kwargs: dict | None = None) -> torch.Tensor:
    """Images in [-1, 1], [N,1,32,32]; sample i's noise comes from seed*1_000_003 + i, whatever the batching."""
    out = []
    for start in range(0, len(prompt_list), batch):
        chunk = prompt_list[start:start + batch]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + j) for j in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="pt", **(call_kwargs or {})).images  # [0, 1]
        out.append(images * 2.0 - 1.0)
    images = torch.cat(out)
    if images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"the pipeline makes images of shape {tuple(images.shape[1:])}, the digit classifier "
                        f"reads (1, {IMAGE_SIZE}, {IMAGE_SIZE}); this benchmark is for the sd-digits pipeline")
    return images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="an SD pipeline folder (default: the shipped sd-digits)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="CFG scale(s); several give one row each")
    p.add_argument("--phrasing", choices=("all", "canonical"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sd_quality"))
    a = p.parse_args()
    if a.samples < 10 or a.steps < 1 or a.batch < 1:
        raise SystemExit("error: --samples must be at least 10 (one per digit), --steps and --batch at least 1")
    torch.set_num_threads(a.threads)
    try:
        pipe, call_kwargs = load_pipeline(a.model)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    prompt_list, labels, which = prompts(a.samples, a.phrasing)
    training = a.model / "training.json"
    out = {"settings": {k: str(v) for k, v in vars(a).items()}, "environment": environment(),
           "denoiser_sha256": checkpoint_hash(next((a.model / d / "diffusion_pytorch_model.safetensors" for d in
                                                    ("unet", "transformer") if (a.model / d).is_dir()))),
           "training_command": json.loads(training.read_text())["command"] if training.is_file() else None,
           "bar": BAR, "rows": {}}
    digits = load_digits()
    pick = torch.randperm(len(digits.train_images), generator=torch.Generator().manual_seed(a.seed))[: a.samples]
    out["real_train_digits"] = digit_scores(digits.train_images[pick], digits.train_labels[pick])
    for g in a.guidance:
        start = time.perf_counter()
        images = generate(pipe, prompt_list, a.steps, g, a.seed, a.batch, call_kwargs)
        scores = digit_scores(images, labels)
        hit = (classify(images)[1].argmax(-1) == labels).double()
        per_phrasing = {CAPTION_TEMPLATES[k]: round(hit[torch.tensor(which) == k].mean().item(), 4)
                        for k in sorted(set(which))}
        scores.update(guidance_scale=g, steps=a.steps, sampling_s=round(time.perf_counter() - start, 1),
                      class_accuracy_per_phrasing=per_phrasing, meets_bar=scores["class_accuracy"] >= BAR)
        key = f"guidance {g}"
        save_grid(a.out / f"samples_guidance_{g}.png", images[:100])  # columns: prompted digit 0..9
        out["rows"][key] = scores
        print(key, {k: v for k, v in scores.items() if k not in ("class_share",)}, flush=True)
    write_json(a.out / "sd_quality.json", out)
    sampler = "DDIM" if type(pipe).__name__.startswith("StableDiffusionPipeline") else type(pipe.scheduler).__name__
    rows = [f"Model `{a.model.name}`, {sampler}-{a.steps}, negative prompt \"\", phrasing `{a.phrasing}`, seed {a.seed}.", "",
            "| guidance | samples | class accuracy | min..max by prompted digit | digit-FID | mean confidence | >= 90% |",
            "|---|---|---|---|---|---|---|"]
    for s in out["rows"].values():
        per = [v for v in s["class_accuracy_per_class"] if v is not None]
        rows.append(f"| {s['guidance_scale']} | {s['num_samples']} | {s['class_accuracy']:.3f} | {min(per):.2f}..{max(per):.2f} | "
                    f"{s['digit_fid']:.2f} | {s['classifier_mean_confidence']:.3f} | {'yes' if s['meets_bar'] else 'no'} |")
    r = out["real_train_digits"]
    rows.append(f"| real digits (train split) | {r['num_samples']} | {r['class_accuracy']:.3f} | - | {r['digit_fid']:.2f} | "
                f"{r['classifier_mean_confidence']:.3f} | - |")
    write_text(a.out / "sd_quality.md", "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
