"""Data-free calibration set: UNet inputs recorded along seeded FP sampling trajectories, cached on disk."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..core.conditioning import COND_NAMES, Condition, map_condition
from ..core.errors import UserError
from ..core.models import DiffusionModel
from ..core.reporting import atomic_write_bytes
from ..core.sampling import SamplingSchedule, Trajectory, default_guidance, sample
from ..core.schedulers import PIPELINE
from .distributed import SINGLE, Dist

CACHE_ENV = "DQ_CACHE_DIR"
SAMPLE_BATCH = 250  # trajectories per sampling batch (one process's default; the bits depend on it)


@dataclass
class CalibrationSet:
    sample: torch.Tensor            # [N, C, H, W]
    timestep: torch.Tensor          # [N]
    t_index: torch.Tensor           # [N]
    cond: Condition | None          # encoder_hidden_states [N, L, D] (+ SDXL text_embeds, time_ids)
    fp_output: torch.Tensor | None = None  # [N, C, H, W]: the FP UNet's output, kept from sampling (or None)

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

    def rows(self, r: range) -> "CalibrationSet":
        """The contiguous rows r (a rank's shard)."""
        idx = slice(r.start, r.stop)
        return CalibrationSet(self.sample[idx], self.timestep[idx], self.t_index[idx],
                              map_condition(self.cond, lambda v: v[idx]),
                              None if self.fp_output is None else self.fp_output[idx])

    def chunks(self, batch: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch):
            yield self.inputs(slice(start, start + batch))

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        extra = {} if self.fp_output is None else {"fp_output": self.fp_output}
        torch.save({**self.inputs(slice(None)), **extra}, buf)
        return buf.getvalue()

    @staticmethod
    def load(path: Path) -> "CalibrationSet":
        d = torch.load(path, weights_only=True)
        return CalibrationSet(d["sample"], d["timestep"], d["t_index"], condition_of(d), d.get("fp_output"))


def condition_of(inputs: dict) -> Condition | None:
    """The condition part of a flat UNet-input dict."""
    return {k: inputs[k] for k in COND_NAMES if k in inputs} or None


def model_fingerprint(model: DiffusionModel) -> str:
    if model.pinned_fingerprint is not None:
        return model.pinned_fingerprint
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
                          guidance_scale: float | None = None, use_cache: bool = True,
                          schedule: SamplingSchedule | None = None) -> CalibrationSet:
    """num_samples UNet inputs, an equal share from every one of the `steps` steps (stratified uniform)."""
    return build_calibration_sets(model, num_samples, steps, 0, seed, guidance_scale, use_cache, schedule=schedule)[0]


def validation_size(calib_samples: int, steps: int, floor: int = 32) -> int:
    """Validation inputs for a run: a quarter of the calibration set, at least `floor` and one per step.

    Validation runs one fake-quant pass before and one after training (its FP reference comes from sampling),
    so a quarter costs about half a pass over the calibration set whatever its size; the floor keeps small runs' SQNR from resting on a few
    inputs. (It was a fixed 100 from 50 extra trajectories: 30 minutes of sampling at SD 1.5 size.)
    """
    return max(steps, floor, math.ceil(calib_samples / 4))


def build_calibration_sets(model: DiffusionModel, num_samples: int, steps: int, val_samples: int, seed: int = 0,
                           guidance_scale: float | None = None, use_cache: bool = True,
                           sample_batch: int = SAMPLE_BATCH, dist: Dist = SINGLE,
                           schedule: SamplingSchedule | None = None) -> tuple[CalibrationSet, CalibrationSet | None]:
    """The calibration set and a validation set from the same trajectories' held-out inputs.

    The trajectories come from `schedule` (default: the model's own sampler at `steps` steps); a sampler that
    calls the UNet twice at one timestep (PNDM) gives that timestep's t_index two steps' share.

    The calibration draw leaves at least half of each step's latents unused (trajectories are
    2 * num_samples / steps); the validation set is a stratified draw of up to val_samples from those, so it
    costs no UNet call and shares no latent with the calibration set (small unguided runs hold out fewer
    than the floor of validation_size: 16 of 32 at 16 samples, 4 steps). The calibration set is the same with
    or without it.

    Distributed (`dist`): the trajectories are sampled in batches of sample_batch, each rank a contiguous range
    of batches (of seeds' rows), gathered in rank order; the picks then run on the full set on every rank, so
    the sets equal one process's with the same sample_batch (and threads per process: CPU kernels round
    differently at other batch sizes and thread counts). Rank 0 alone writes the disk cache.
    """
    guidance = _guidance(model, guidance_scale)
    schedule = schedule or SamplingSchedule.build(model, PIPELINE, steps)
    key = hashlib.sha256(calibration_setting(model, num_samples, steps, seed, guidance_scale, sample_batch,
                                             schedule).encode()).hexdigest()[:20]
    paths = [cache_dir() / f"calib-{key}.pt"] + ([cache_dir() / f"calib-{key}-val{val_samples}.pt"]
                                                  if val_samples else [])
    if use_cache and all(dist.all_gather(all(p.is_file() for p in paths))):
        try:
            sets = [CalibrationSet.load(p) for p in paths]
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            sets = None
        if all(dist.all_gather(sets is not None)):
            return sets[0], (sets[1] if val_samples else None)
        if dist.is_main:
            for p in paths:
                p.unlink(missing_ok=True)
    trajectories = trajectory_count(num_samples, steps)
    labels = torch.arange(trajectories) % model.num_labels if model.is_conditional else None
    mine = dist.shard(math.ceil(trajectories / sample_batch)) if dist.enabled else None
    traj = sample(model, num_samples=trajectories, steps=schedule.steps, seed=seed, labels=labels,
                  guidance_scale=guidance, return_trajectory=True, progress=dist.is_main, decode=False,
                  batch_size=sample_batch, batches=mine, scheduler=schedule.scheduler,
                  timestep_kwargs=schedule.timestep_kwargs).trajectory
    if dist.enabled:
        traj = Trajectory.concat([p for p in dist.all_gather(traj) if p is not None])
    steps, per_step = traj.sample.shape[:2]  # UNet calls per trajectory, and inputs per call
    gen = torch.Generator().manual_seed(seed + 1)
    picks = _stratified(num_samples, steps, per_step, gen, taken=None)
    sets = [_pick(traj, picks)]
    if val_samples:
        taken = _taken_with_twins(traj.sample, picks)
        sets.append(_pick(traj, _stratified(min(val_samples, int((~taken).sum())), steps, per_step,
                                            torch.Generator().manual_seed(seed + 2), taken)))
    if use_cache and dist.is_main:
        for p, d in zip(paths, sets):
            try:
                atomic_write_bytes(p, d.to_bytes())
            except UserError:
                pass  # caching is an optimisation; an unwritable cache must not stop calibration
    return sets[0], (sets[1] if val_samples else None)


def _guidance(model: DiffusionModel, guidance_scale: float | None) -> float:
    if guidance_scale is None:
        guidance_scale = default_guidance(model)
    return guidance_scale if model.is_conditional else 1.0


def calibration_setting(model: DiffusionModel, num_samples: int, steps: int, seed: int,
                        guidance_scale: float | None, sample_batch: int = SAMPLE_BATCH,
                        schedule: SamplingSchedule | None = None) -> str:
    """Everything the calibration set depends on, as text: its disk-cache key, and part of a BKD run's identity
    (a progress file resumes only on the same set)."""
    schedule = schedule or SamplingSchedule.build(model, PIPELINE, steps)
    setting = (f"{model_fingerprint(model)}|{num_samples}|{steps}|{seed}|{_guidance(model, guidance_scale)}"
               f"|{schedule.key()}")
    if model.is_text_conditioned:
        if model.prompt_bank is None:
            raise UserError("a text-conditioned model needs calibration prompts (dq-calibrate --prompts FILE)")
        bank = model.prompt_bank
        setting += f"|{model.sample_shape}|{bank.prompts}|{bank.negative_prompt}"
    if sample_batch != SAMPLE_BATCH:  # other batches round differently: another set (today's key unchanged)
        setting += f"|batch{sample_batch}"
    return setting


def trajectory_count(num_samples: int, steps: int) -> int:
    """Sampling trajectories behind a calibration set: at least half of each step's latents stay unused."""
    return max(8, 2 * math.ceil(num_samples / steps))


def _taken_with_twins(samples: torch.Tensor, picks: list[tuple[int, int]]) -> torch.Tensor:
    """[steps, per_step] cells the calibration set uses, with every cell holding the same sample as one
    (a guided batch runs each latent twice, conditional and unconditional): validation shares no latent."""
    taken = torch.zeros(samples.shape[:2], dtype=torch.bool)
    for s, c in picks:
        taken[s, c] = True
    for s in range(samples.shape[0]):
        _, group = torch.unique(samples[s].flatten(1), dim=0, return_inverse=True)
        taken[s] = torch.isin(group, group[taken[s]])
    return taken


def _stratified(num: int, steps: int, per_step: int, gen: torch.Generator,
                taken: torch.Tensor | None) -> list[tuple[int, int]]:
    """(step, column) cells: an equal share per step (the remainder to random steps), random columns.

    With `taken` (validation): only cells not taken, a step's shortfall moved to steps with cells left."""
    counts = torch.full((steps,), num // steps)
    counts[torch.randperm(steps, generator=gen)[: num % steps]] += 1
    if taken is None:
        picks = []
        for s in range(steps):
            cols = torch.randperm(per_step, generator=gen)[: counts[s]]
            if counts[s] > per_step:
                cols = torch.randint(0, per_step, (int(counts[s]),), generator=gen)
            picks += [(s, int(c)) for c in cols]
        return picks
    free = [torch.nonzero(~taken[s]).flatten() for s in range(steps)]
    spill = 0
    for s in range(steps):
        counts[s] += spill
        spill = max(0, int(counts[s]) - len(free[s]))
        counts[s] -= spill
    for s in reversed(range(steps)):  # whatever is still over goes to earlier steps
        extra = min(spill, len(free[s]) - int(counts[s]))
        counts[s] += extra
        spill -= extra
    picks = []
    for s in range(steps):
        cols = free[s][torch.randperm(len(free[s]), generator=gen)[: counts[s]]]
        picks += [(s, int(c)) for c in cols]
    return picks


def _pick(traj, picks: list[tuple[int, int]]) -> CalibrationSet:
    si = torch.tensor([p[0] for p in picks])
    ci = torch.tensor([p[1] for p in picks])
    cond = map_condition(traj.cond, lambda v: v[si, ci])
    return CalibrationSet(traj.sample[si, ci], traj.timestep[si, ci], traj.t_index[si, ci], cond,
                          None if traj.output is None else traj.output[si, ci])
