"""Quality of the embedded FP models (issue 2's acceptance numbers): DDIM samples -> digit metrics.

    python benchmarks/fp_quality.py --samples 1000 --steps 50 --out benchmarks/results/fp_quality
    python benchmarks/fp_quality.py --models default-cond --guidance 1.0 1.2 1.5 --samples 200   # a guidance sweep
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import checkpoint_hash
from dilatequant.core.digits import load_digits
from dilatequant.core.guidance import DEFAULT_GUIDANCE
from dilatequant.core.metrics import digit_scores
from dilatequant.core.models import EMBEDDED_MODELS, embedded_model_dir, load_model
from dilatequant.core.reporting import environment, save_grid, write_json, write_text
from dilatequant.core.sampling import sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE],
                   help="classifier-free guidance scale(s) for conditional models; several give one row each")
    p.add_argument("--models", nargs="+", default=["default", "default-cond"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp_quality"))
    a = p.parse_args()
    torch.manual_seed(a.seed)
    out = {"settings": {k: str(v) for k, v in vars(a).items()}, "environment": environment(), "models": {}}
    # the floor: real training digits (a seeded random subset: the split is ordered by class) vs held-out digits
    digits = load_digits()
    pick = torch.randperm(len(digits.train_images), generator=torch.Generator().manual_seed(a.seed))[: a.samples]
    out["real_train_digits"] = digit_scores(digits.train_images[pick], digits.train_labels[pick])
    for name in a.models:
        model = load_model(name)
        folder = embedded_model_dir(name) if name in EMBEDDED_MODELS else Path(name)
        weights_sha256 = checkpoint_hash(folder / "unet" / "diffusion_pytorch_model.safetensors")
        scales = a.guidance if model.is_conditional else [1.0]
        for g in scales:
            start = time.perf_counter()
            res = sample(model, num_samples=a.samples, steps=a.steps, seed=a.seed, guidance_scale=g)
            scores = digit_scores(res.images, res.labels)
            scores.update(sampling_s=round(time.perf_counter() - start, 1), guidance_scale=g, weights_sha256=weights_sha256)
            key = name if len(scales) == 1 else f"{name} guidance {g}"
            save_grid(a.out / f"{Path(key).name.replace(' ', '_')}_samples.png", res.images[:100])
            out["models"][key] = scores
            print(key, {k: v for k, v in scores.items() if k != "class_share"}, flush=True)
    write_json(a.out / "fp_quality.json", out)
    rows = ["| model | samples | guidance | digit-FID | mean confidence | class share min..max | class accuracy |",
            "|---|---|---|---|---|---|---|"]
    for name, s in out["models"].items():
        acc = f"{s['class_accuracy']:.3f}" if "class_accuracy" in s else "-"
        rows.append(f"| {name} | {s['num_samples']} | {s['guidance_scale']} | {s['digit_fid']:.2f} | "
                    f"{s['classifier_mean_confidence']:.3f} | {min(s['class_share']):.3f}..{max(s['class_share']):.3f} | {acc} |")
    r = out["real_train_digits"]
    rows.append(f"| real digits (train split) | {r['num_samples']} | - | {r['digit_fid']:.2f} | "
                f"{r['classifier_mean_confidence']:.3f} | {min(r['class_share']):.3f}..{max(r['class_share']):.3f} | "
                f"{r['class_accuracy']:.3f} |")
    write_text(a.out / "fp_quality.md", "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
