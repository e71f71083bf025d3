"""Data-free calibration set: UNet inputs recorded along seeded FP sampling trajectories, cached on disk."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from .conditioning import COND_NAMES, Condition, map_condition
from .models import DiffusionModel
from .reporting import atomic_write_bytes
from .sampling import default_guidance, sample

CACHE_ENV = "DQ_CACHE_DIR"


@dataclass
class CalibrationSet:
    sample: torch.Tensor            # [N, C, H, W]
    timestep: torch.Tensor          # [N]
    t_index: torch.Tensor           # [N]
    cond: Condition | None          # encoder_hidden_states [N, L, D] (+ SDXL text_embeds, time_ids)

    def __len__(self) -> int:
        return len(self.t_index)

    @property
    def encoder_hidden_states(self) -> torch.Tensor | None:
        return None if self.cond is None else self.cond.get("encoder_hidden_states")

    def inputs(self, idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """One flat dict of UNet inputs: sample, timestep, t_index and the condition's named tensors."""
        out = {"sample": self.sample[idx], "timestep": self.timestep[idx], "t_index": self.t_index[idx]}
        out.update(map_condition(self.cond, lambda v: v[idx]) or {})
        return out

    def chunks(self, batch: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch):
            yield self.inputs(slice(start, start + batch))

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        torch.save({k: v for k, v in self.inputs(slice(None)).items()}, buf)
        return buf.getvalue()

    @staticmethod
    def load(path: Path) -> "CalibrationSet":
        d = torch.load(path, weights_only=True)
        return CalibrationSet(d["sample"], d["timestep"], d["t_index"], condition_of(d))


def condition_of(inputs: dict) -> Condition | None:
    """The condition part of a flat UNet-input dict."""
    return {k: inputs[k] for k in COND_NAMES if k in inputs} or None


def model_fingerprint(model: DiffusionModel) -> str:
    h = hashlib.sha256()
    modules = [model.unet] + ([model.class_encoder] if model.class_encoder is not None else [])
    if model.pipeline is not None:  # the text encoders decide the conditions the UNet is calibrated on
        modules += [m for m in (getattr(model.pipeline, "text_encoder", None),
                                getattr(model.pipeline, "text_encoder_2", None)) if m is not None]
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dilatequant"))


def build_calibration_set(model: DiffusionModel, num_samples: int, steps: int, seed: int = 0,
                          guidance_scale: float | None = None, use_cache: bool = True) -> CalibrationSet:
    """num_samples UNet inputs, an equal share from every one of the `steps` steps (stratified uniform)."""
    if guidance_scale is None:
        guidance_scale = default_guidance(model)
    guidance = guidance_scale if model.is_conditional else 1.0
    setting = f"{model_fingerprint(model)}|{num_samples}|{steps}|{seed}|{guidance}"
    if model.is_text_conditioned:
        if model.prompt_bank is None:
            raise UserError("a text-conditioned model needs calibration prompts (dq-calibrate --prompts FILE)")
        bank = model.prompt_bank
        setting += f"|{model.sample_shape}|{bank.prompts}|{bank.negative_prompt}"
    key = hashlib.sha256(setting.encode()).hexdigest()[:20]
    path = cache_dir() / f"calib-{key}.pt"
    if use_cache and path.is_file():
        try:
            return CalibrationSet.load(path)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    trajectories = max(8, 2 * math.ceil(num_samples / steps))
    labels = torch.arange(trajectories) % model.num_labels if model.is_conditional else None
    traj = sample(model, num_samples=trajectories, steps=steps, seed=seed, labels=labels,
                  guidance_scale=guidance, return_trajectory=True, progress=True, decode=False).trajectory
    per_step = traj.sample.shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    counts = torch.full((steps,), num_samples // steps)
    counts[torch.randperm(steps, generator=gen)[: num_samples % steps]] += 1
    picks = []  # (step, column)
    for s in range(steps):
        cols = torch.randperm(per_step, generator=gen)[: counts[s]]
        if counts[s] > per_step:
            cols = torch.randint(0, per_step, (int(counts[s]),), generator=gen)
        picks += [(s, int(c)) for c in cols]
    si = torch.tensor([p[0] for p in picks])
    ci = torch.tensor([p[1] for p in picks])
    cond = map_condition(traj.cond, lambda v: v[si, ci])
    data = CalibrationSet(traj.sample[si, ci], traj.timestep[si, ci], traj.t_index[si, ci], cond)
    if use_cache:
        try:
            atomic_write_bytes(path, data.to_bytes())
        except UserError:
            pass  # caching is an optimisation; an unwritable cache must not stop calibration
    return data
