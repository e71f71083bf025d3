"""DDIM sampling over any noise predictor, with classifier-free guidance and trajectories.

Every runtime (PyTorch FP, fake-quant, ONNX Runtime, TensorRT, Triton) is reduced to a
`NoisePredictor`, so the same sampler produces the images that are compared across them.
`t_index` is the position of a timestep in the sampling schedule the model was calibrated for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from .conditioning import Condition, ConditionLike, cat_conditions, map_condition
from .denoisers import predict as denoiser_predict
from .device import module_device, to_device
from .guidance import DEFAULT_GUIDANCE, TEXT_GUIDANCE
from .models import DiffusionModel



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


def ddim_scheduler(model: DiffusionModel, steps: int) -> DDIMScheduler:
    if steps < 1 or steps > model.scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{model.scheduler.config.num_train_timesteps}, got {steps}")
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    return sched


def sampling_timesteps(model: DiffusionModel, steps: int) -> list[int]:
    """The timesteps of a DDIM schedule in sampling order: t_index i means timesteps[i]."""
    return [int(t) for t in ddim_scheduler(model, steps).timesteps]


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
) -> SampleResult:
    """DDIM (eta 0) from seeded noise. Conditional models get labels: class labels, prompt-bank labels or
    prompt strings (default: the labels cycling). Latent models are decoded by the VAE when `decode` and the
    pipeline is loaded; otherwise `images` are the final latents. `batches`: only these batches of batch_size
    (one rank's share of a distributed run; the samples of batch b are rows b*batch_size.. of the full run)."""
    predict = predict or fp_predictor(model)
    if model.is_conditional and labels is None:
        labels = torch.arange(num_samples) % model.num_labels
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"got {len(labels)} labels for {num_samples} samples")
    noise = initial_noise(model, num_samples, seed)
    images, parts = [], []
    bar = tqdm(total=num_samples * steps, desc=f"DDIM-{steps}", unit="unet", disable=not progress, mininterval=2)
    for start in range(0, num_samples, batch_size):
        if batches is not None and start // batch_size not in batches:
            continue
        x = noise[start:start + batch_size].clone()
        cond = None
        if model.is_conditional:
            cond = model.condition(labels[start:start + batch_size], guidance_scale)
        img, traj = _ddim_loop(model, predict, x, cond, steps, guidance_scale, return_trajectory, bar)
        if model.is_text_conditioned and decode and model.pipeline is not None:
            img = model.decode(img)
        images.append(img)
        if traj is not None:
            parts.append(traj)
    bar.close()
    return SampleResult(torch.cat(images) if images else torch.empty(0, *model.sample_shape), labels,
                        Trajectory.concat(parts) if parts else None)


def _ddim_loop(model, predict, x, cond, steps, guidance_scale, keep, bar):
    sched = ddim_scheduler(model, steps)
    guided = cond is not None and model.classifier_free(guidance_scale)
    record = []
    for t_index, t in enumerate(sched.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        n = len(x_in)
        timestep = torch.full((n,), int(t), dtype=torch.int64)
        t_idx = torch.full((n,), t_index, dtype=torch.int64)
        kept_in = x_in.clone() if keep else None
        eps = predict(x_in, timestep, t_idx, cond)
        if keep:  # copies: a runtime runner may hand back (and later reuse) its own buffers
            record.append((kept_in, timestep, t_idx, eps.clone()))
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = sched.step(eps, t, x).prev_sample
        bar.update(len(x))
    traj = None
    if keep:
        traj = Trajectory(
            torch.stack([r[0] for r in record]), torch.stack([r[1] for r in record]),
            torch.stack([r[2] for r in record]),
            map_condition(cond, lambda v: v.unsqueeze(0).expand(len(record), *v.shape).clone()),
            torch.stack([r[3] for r in record]),
        )
    return (x if model.is_text_conditioned else x.clamp(-1, 1)), traj
