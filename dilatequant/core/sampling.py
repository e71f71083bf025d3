"""Sampling over any noise predictor with a diffusers scheduler, with classifier-free guidance and trajectories.

Every runtime (PyTorch FP, fake-quant, ONNX Runtime, TensorRT, Triton) is reduced to a `NoisePredictor`, so the
same sampler produces the images that are compared across them. The loop is a diffusers pipeline's own, over
any scheduler instance: `set_timesteps(steps, **timestep_kwargs)`, the initial noise times `init_noise_sigma`,
then per timestep `scale_model_input`, the prediction (guided: [cond; uncond] in one batch, combined as
classifier-free guidance) and `step`; a step that draws noise (Euler-ancestral, LCM, SDE solvers) gets one
seeded generator per sample (`step_generators`), so sample i depends only on (seed, i) at any batch size.
Which scheduler: core.schedulers (by default the model's own, `own_scheduler`).

t_index is the position of a timestep among the schedule's distinct timesteps: one per step, except where a
sampler calls the UNet twice at one timestep (PNDM's warm-up), and both calls share it. Timesteps are kept as
the scheduler gives them (integers, or floats: Euler with linspace spacing or Karras sigmas); the UNet receives
them rounded to integers, as the exported graph takes them (an int64 `timestep` input; QuantizedUNet rounds the
same way inside diffusers' pipelines); for integer schedules (DDIM, leading/trailing Euler, DPM-Solver) the
two are the same.

Flow matching (diffusion transformers, FlowMatchEulerDiscreteScheduler) slots into the same loop: its
set_timesteps kwargs default to what the model's pipeline passes (`DiffusionModel.timestep_kwargs`: FLUX's
sigmas and the resolution-dependent shift `mu`). Its timesteps are sigma x 1000 floats and t_index is again the
position among them; a transformer takes the timestep as the scheduler gives it (unrounded). A guidance-embedded
transformer (FLUX-dev) gets its scale as an input and no unconditional batch (`DiffusionModel.classifier_free`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from .conditioning import Condition, ConditionLike, cat_conditions, map_condition
from .denoisers import predict as denoiser_predict
from .device import module_device, to_device
from .guidance import DEFAULT_GUIDANCE, TEXT_GUIDANCE
from .models import DiffusionModel
from .schedulers import PIPELINE, config_json, describe, own_scheduler, resolve_scheduler



def default_guidance(model: DiffusionModel) -> float:
    """The guidance scale a model samples with unless told otherwise (1.0: no guidance)."""
    if not model.is_conditional:
        return 1.0
    if model.guidance_scale is not None:  # the pipeline folder's own, or the one q.pt was calibrated at
        return model.guidance_scale
    if model.is_text_conditioned:
        return TEXT_GUIDANCE
    return DEFAULT_GUIDANCE if model.is_conditional else 1.0

# (sample [B,C,H,W], timestep [B] int64, t_index [B] int64, cond) -> noise [B,C,H,W]; cond is None, a dict of
# named condition tensors (conditioning.COND_NAMES: encoder_hidden_states [B,L,D], SDXL text_embeds, time_ids)
# or a bare encoder_hidden_states tensor
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[ConditionLike]], torch.Tensor]


def distinct_timesteps(timesteps) -> list[int | float]:
    """A schedule's distinct timesteps in sampling order (t_index i means the i-th); integers stay integers."""
    out: list[int | float] = []
    for t in timesteps:
        v = timestep_value(t)
        if v not in out:
            out.append(v)
    return out


def timestep_value(t) -> int | float:
    v = float(t)
    return int(v) if v.is_integer() else v


def sampling_timesteps(model: DiffusionModel, steps: int, scheduler: SchedulerMixin | None = None,
                       timestep_kwargs: dict | None = None) -> list[int | float]:
    """The distinct timesteps of a `steps`-step schedule (default: the model's own sampler; timestep_kwargs
    default: what the model's pipeline passes to set_timesteps)."""
    sched = _scheduler_for(model, scheduler, steps)
    if timestep_kwargs is None:
        timestep_kwargs = model.timestep_kwargs(sched, steps)
    sched.set_timesteps(steps, **timestep_kwargs)
    return distinct_timesteps(sched.timesteps)


def _scheduler_for(model: DiffusionModel, scheduler: SchedulerMixin | None, steps: int) -> SchedulerMixin:
    """A private copy of the scheduler (its solver state is per run), checked against the step count."""
    sched = copy.deepcopy(scheduler) if scheduler is not None else own_scheduler(model)
    limit = sched.config.get("num_train_timesteps", 1000)
    if steps < 1 or steps > limit:
        raise ValueError(f"steps must be in 1..{limit}, got {steps}")
    return sched


@dataclass
class SamplingSchedule:
    """The sampler a model is calibrated for: t_index i means timesteps[i] of `steps` steps of `scheduler`."""

    scheduler: SchedulerMixin
    steps: int                   # what set_timesteps is given
    timesteps: list[int | float]  # the distinct timesteps, in sampling order
    name: str = PIPELINE         # what it was asked for: pipeline | a core.schedulers name | "given" (an instance)
    timestep_kwargs: dict[str, Any] | None = None

    @staticmethod
    def build(model: DiffusionModel, scheduler: str | SchedulerMixin, steps: int,
              timestep_kwargs: dict | None = None) -> "SamplingSchedule":
        """`scheduler`: a name (core.schedulers: `pipeline` or a sampler on the model's noise schedule), or a
        scheduler instance used as it is (a flow-matching scheduler, an SDE variant, ...)."""
        given = isinstance(scheduler, SchedulerMixin)
        sched = scheduler if given else resolve_scheduler(model, scheduler)
        if timestep_kwargs is None:
            timestep_kwargs = model.timestep_kwargs(sched, steps) or None
        return SamplingSchedule(sched, steps, sampling_timesteps(model, steps, sched, timestep_kwargs),
                                "given" if given else scheduler, timestep_kwargs)

    @property
    def label(self) -> str:
        return f"{describe(self.scheduler)}-{self.steps}"

    def key(self) -> str:
        """Everything the sampled trajectories depend on, as text."""
        return f"{config_json(self.scheduler)}|{self.steps}|{sorted((self.timestep_kwargs or {}).items())}"


STEP_NOISE_RULE = "sample i: torch.Generator().manual_seed((seed + 1) * 1000003 + i)"


def step_generators(seed: int, rows: range) -> list[torch.Generator]:
    """The noise a stochastic step draws, one generator per sample (STEP_NOISE_RULE)."""
    return [torch.Generator().manual_seed((seed + 1) * 1_000_003 + i) for i in rows]


def fp_predictor(model: DiffusionModel) -> NoisePredictor:
    """The full-precision UNet as a NoisePredictor (it has no use for t_index)."""

    @torch.no_grad()
    def predict(x, timestep, t_index, cond=None):
        dev = module_device(model.denoiser)  # the sampler's tensors stay on the CPU (identity moves there)
        return denoiser_predict(model.denoiser, x.to(dev), timestep.to(dev), to_device(cond, dev)).to(x.device)

    return predict


@dataclass
class Trajectory:
    """The exact UNet inputs at every step: [steps, B, ...] (B doubled under guidance), and what the UNet
    returned for them (before guidance combines the halves): a validation set's FP reference, already paid for."""

    sample: torch.Tensor
    timestep: torch.Tensor
    t_index: torch.Tensor
    cond: Condition | None  # every tensor [steps, B, ...]
    output: torch.Tensor | None = None  # [steps, B, C, H, W]

    @property
    def encoder_hidden_states(self) -> torch.Tensor | None:
        return None if self.cond is None else self.cond.get("encoder_hidden_states")

    def step_cond(self, i: int) -> Condition | None:
        return map_condition(self.cond, lambda v: v[i])

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        return Trajectory(
            torch.cat([p.sample for p in parts], 1), torch.cat([p.timestep for p in parts], 1),
            torch.cat([p.t_index for p in parts], 1), cat_conditions([p.cond for p in parts], 1),
            None if any(p.output is None for p in parts) else torch.cat([p.output for p in parts], 1),
        )


@dataclass
class SampleResult:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1] (latent models: decoded when the VAE is at hand, else latents)
    labels: torch.Tensor | list[str] | None
    trajectory: Trajectory | None


def initial_noise(model: DiffusionModel, num_samples: int, seed: int) -> torch.Tensor:
    """The starting noise of sample i depends only on (seed, i), never on the batch size."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_samples, *model.sample_shape), generator=gen)


def sample(
    model: DiffusionModel,
    predict: NoisePredictor | None = None,
    num_samples: int = 16,
    steps: int = 50,
    seed: int = 0,
    labels: torch.Tensor | list[str] | None = None,
    guidance_scale: float = 1.0,
    batch_size: int = 250,
    return_trajectory: bool = False,
    progress: bool = True,
    decode: bool = True,
    batches: range | None = None,
    scheduler: SchedulerMixin | None = None,
    timestep_kwargs: dict[str, Any] | None = None,
) -> SampleResult:
    """`steps` steps of `scheduler` (default: the model's own, core.schedulers.own_scheduler; it is copied, never
    changed) from seeded noise; timestep_kwargs go to its set_timesteps (default: what the model's pipeline passes,
    DiffusionModel.timestep_kwargs). Conditional models get labels: class
    labels, prompt-bank labels or prompt strings (default: the labels cycling). Latent models are decoded by the
    VAE when `decode` and the pipeline is loaded; otherwise `images` are the final latents. `batches`: only these
    batches of batch_size (one rank's share of a distributed run; the samples of batch b are rows b*batch_size..
    of the full run)."""
    predict = predict or fp_predictor(model)
    sched = _scheduler_for(model, scheduler, steps)
    if timestep_kwargs is None:
        timestep_kwargs = model.timestep_kwargs(sched, steps)
    if model.is_conditional and labels is None:
        labels = torch.arange(num_samples) % model.num_labels
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
    noise = initial_noise(model, num_samples, seed)
    images, parts = [], []
    bar = tqdm(total=num_samples * steps, desc=f"{describe(sched)}-{steps}", unit="unet", disable=not progress,
               mininterval=2)
    for start in range(0, num_samples, batch_size):
        if batches is not None and start // batch_size not in batches:
            continue
        x = noise[start:start + batch_size].clone()
        cond = None
        if model.is_conditional:
            cond = model.condition(labels[start:start + batch_size], guidance_scale)
        gens = step_generators(seed, range(start, start + len(x)))
        img, traj = _sampling_loop(copy.deepcopy(sched), steps, timestep_kwargs, predict, x, cond,
                                   guidance_scale, gens, return_trajectory, bar,
                                   guided=cond is not None and model.classifier_free(guidance_scale),
                                   exact_timesteps=model.is_transformer)
        if model.is_text_conditioned and decode and model.pipeline is not None:
            img = model.decode(img)
        else:
            img = img if model.is_text_conditioned else img.clamp(-1, 1)
        images.append(img)
        if traj is not None:
            parts.append(traj)
    bar.close()
    return SampleResult(torch.cat(images) if images else torch.empty(0, *model.sample_shape), labels,
                        Trajectory.concat(parts) if parts else None)


def _sampling_loop(sched: SchedulerMixin, steps: int, timestep_kwargs: dict, predict: NoisePredictor,
                   x: torch.Tensor, cond, guidance_scale: float, generators: list[torch.Generator], keep: bool, bar,
                   guided: bool, exact_timesteps: bool = False):
    """One batch through a diffusers pipeline's denoising loop; returns (final sample, trajectory or None).

    guided: [cond; uncond] in one batch; exact_timesteps: the predictor gets the scheduler's timestep as it is
    (a transformer's float), else rounded to int64 (a UNet graph's input)."""
    sched.set_timesteps(steps, **timestep_kwargs)
    schedule = distinct_timesteps(sched.timesteps)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # flow matching has neither: its noise is unscaled
    scale = getattr(sched, "scale_model_input", lambda sample, t: sample)
    record = []
    for t in sched.timesteps:
        x_in = scale(torch.cat([x, x]) if guided else x, t)
        n = len(x_in)
        timestep = (torch.full((n,), t.item(), dtype=sched.timesteps.dtype) if exact_timesteps
                    else torch.full((n,), round(float(t)), dtype=torch.int64))
        t_idx = torch.full((n,), schedule.index(timestep_value(t)), dtype=torch.int64)
        kept_in = x_in.clone() if keep else None
        eps = predict(x_in, timestep, t_idx, cond)
        if keep:  # copies: a runtime runner may hand back (and later reuse) its own buffers
            record.append((kept_in, timestep, t_idx, eps.clone()))
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
        bar.update(len(x))
    traj = None
    if keep:
        traj = Trajectory(
            torch.stack([r[0] for r in record]), torch.stack([r[1] for r in record]),
            torch.stack([r[2] for r in record]),
            map_condition(cond, lambda v: v.unsqueeze(0).expand(len(record), *v.shape).clone()),
            torch.stack([r[3] for r in record]),
        )
    return x, traj
