"""How close a quantized noise predictor is to the FP model: per-step noise error and final images."""
from __future__ import annotations

import time

import torch

from .metrics import digit_scores, mse, psnr_db, sqnr_db, ssim
from .models import DiffusionModel
from .sampling import NoisePredictor, SampleResult, fp_predictor, sample


def per_step_noise_error(model: DiffusionModel, predict: NoisePredictor, reference: SampleResult) -> dict:
    """Noise-prediction MSE/SQNR against FP on the FP trajectory's own inputs, at every t_index."""
    traj = reference.trajectory
    fp = fp_predictor(model)
    rows = []
    for i in range(traj.sample.shape[0]):
        x, t, ti = traj.sample[i], traj.timestep[i], traj.t_index[i]
        cond = traj.step_cond(i)
        with torch.no_grad():
            ref, out = fp(x, t, ti, cond), predict(x, t, ti, cond)
        rows.append({"t_index": i, "timestep": int(t[0]), "mse": mse(out, ref), "sqnr_db": sqnr_db(out, ref)})
    return {"per_step": rows, "mean_mse": sum(r["mse"] for r in rows) / len(rows),
            "mean_mse_before_final": mean_mse_before_final(rows),
            "mean_sqnr_db": sum(r["sqnr_db"] for r in rows) / len(rows)}


def mean_mse_before_final(per_step: list[dict]) -> float:
    """Mean noise MSE over every step but the last.

    The last DDIM step (t = 0) carries most of a plain mean (the noise left in x_0 is nearly unpredictable,
    so its error dwarfs every other step's), yet its prediction reaches the image multiplied by
    sqrt((1 - abar_0) / abar_0) = 0.01 at most: it says little about image quality. Both are reported.
    """
    rows = per_step[:-1] if len(per_step) > 1 else per_step
    return sum(r["mse"] for r in rows) / len(rows)


def requested_digits(model: DiffusionModel, labels) -> torch.Tensor | None:
    """The digit each sample asked for, for the digit metrics: class labels as they are; prompts (or prompt-bank
    indices) through the sd-digits captions. None when a prompt names no digit (accuracy is then not reported)."""
    if labels is None or not model.is_text_conditioned:
        return labels
    from .digits import captions_for

    if isinstance(labels, torch.Tensor):
        if model.prompt_bank is None:
            return None
        labels = [model.prompt_bank.prompts[int(i)] for i in labels]
    table = {caption: digit for digit in range(10) for caption in captions_for(digit)}
    if not all(p in table for p in labels):
        return None
    return torch.tensor([table[p] for p in labels])


def fp_trajectories(model: DiffusionModel, steps: int, seed: int, guidance: float, num: int = 16,
                    scheduler=None, timestep_kwargs: dict | None = None) -> SampleResult:
    """A short set of FP trajectories: the inputs at which per-step noise errors are measured (default sampler:
    the model's own)."""
    return sample(model, num_samples=num, steps=steps, seed=seed + 7, guidance_scale=guidance,
                  return_trajectory=True, progress=False, scheduler=scheduler, timestep_kwargs=timestep_kwargs)


def fp_reference(model: DiffusionModel, num_samples: int, steps: int, seed: int, guidance: float,
                 traj_samples: int = 16) -> tuple[SampleResult, SampleResult]:
    """FP images for num_samples seeds, and a short FP trajectory set for per-step errors."""
    images = sample(model, num_samples=num_samples, steps=steps, seed=seed, guidance_scale=guidance)
    return images, fp_trajectories(model, steps, seed, guidance, traj_samples)


def compare_to_fp(model: DiffusionModel, predict: NoisePredictor, fp_images: SampleResult, fp_traj: SampleResult,
                  steps: int, seed: int, guidance: float) -> tuple[dict, torch.Tensor]:
    """Per-step noise error, image PSNR/SSIM vs FP from the same noise, digit metrics."""
    start = time.perf_counter()
    noise = per_step_noise_error(model, predict, fp_traj)
    res = sample(model, predict, num_samples=len(fp_images.images), steps=steps, seed=seed,
                 labels=fp_images.labels, guidance_scale=guidance)
    out = {"noise_mean_mse": noise["mean_mse"], "noise_mean_mse_before_final": noise["mean_mse_before_final"],
           "noise_mean_sqnr_db": noise["mean_sqnr_db"],
           "noise_per_step": noise["per_step"],
           "image_psnr_db": psnr_db(res.images, fp_images.images), "image_ssim": ssim(res.images, fp_images.images),
           **digit_scores(res.images, requested_digits(model, res.labels)), "eval_s": round(time.perf_counter() - start, 1)}
    return out, res.images
