"""The runner interface every backend implements: metadata, input validation, lazy activation.

Shaped like Polygraphy's `backend/base/runner.py`: a runner only runs (comparison lives in verify.py), loads its
model lazily on first use (`activate()`), and describes itself with `RunnerMetadata`. Every runner checks its
inputs before running, because a runtime given a wrong t_index silently uses the wrong activation scales (the
exported graph clamps it) and a wrong shape fails deep inside the engine.

    runner.infer(sample [B,C,H,W] float, timestep [B] int (float: flow matching's 1000 sigma), t_index [B] int, cond)
        -> noise_pred [B,C,H,W] float32 on the CPU

`cond` is None (unconditional), a dict of the graph's condition inputs (`encoder_hidden_states` [B,L,D]; SDXL
adds `text_embeds` [B,P] and `time_ids` [B,6]; SD3 and FLUX `pooled_projections` [B,P], FLUX-dev `guidance` [B],
PixArt `encoder_attention_mask` [B,L]) or a bare encoder_hidden_states tensor.

A runner is also a `sampling.NoisePredictor` (`__call__`), so `sampling.sample(model, runner)` runs
on any of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..core.conditioning import COND_SHAPES, ENCODER_HIDDEN_STATES, as_condition
from ..core.errors import UserError

METADATA_PREFIX = "dilatequant."
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class RunnerMetadata:
    """What a runner runs: t_index i means timesteps[i] of the calibrated schedule."""

    name: str
    runtime: str                      # torch | onnxruntime | tensorrt
    device: str                       # cpu | cuda
    dtype: str                        # fp32 | fp16 (the compute precision of what is not quantized)
    num_steps: int
    timesteps: tuple[int | float, ...]  # floats where the calibration sampler's are (Euler-type schedules)
    conditional: bool
    sample_shape: tuple[int, int, int]
    has_t_index: bool                 # False: static-scale graphs and FP models ignore t_index
    cond_dim: int | None = None       # last dim of encoder_hidden_states, when known
    cond_inputs: tuple[str, ...] = ()  # the condition inputs, in graph order (conditioning.COND_NAMES)
    pipeline_class: str = ""          # StableDiffusionPipeline | StableDiffusionXLPipeline | "" (class-token models)
    spatial_multiple: int = 0         # H and W may be any multiple of this (dynamic graphs); 0: only sample_shape
    fp_fingerprint: str = ""          # the FP model the checkpoint was calibrated from (UNet + encoders), if known

    def __post_init__(self) -> None:
        if self.conditional and not self.cond_inputs:  # class-token graphs written before SDXL inputs existed
            object.__setattr__(self, "cond_inputs", (ENCODER_HIDDEN_STATES,))

    @property
    def float_timesteps(self) -> bool:
        """A diffusion transformer's graph takes its scheduler's float timesteps (flow matching's 1000 sigma); a
        UNet's takes integers (diffusers' pipelines round them before the UNet: QuantizedUNet does)."""
        from ..core.denoisers import transformer_family_of_pipeline

        return bool(self.pipeline_class) and transformer_family_of_pipeline(self.pipeline_class) is not None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["timesteps"], d["sample_shape"] = list(self.timesteps), list(self.sample_shape)
        d["cond_inputs"] = list(self.cond_inputs)
        return d


def metadata_from_props(props: dict[str, str], name: str, runtime: str, device: str, source: str) -> RunnerMetadata:
    """RunnerMetadata from the graph's "dilatequant.*" metadata_props (ONNX, or an engine's sidecar)."""
    try:
        timesteps = tuple(_number(t) for t in json.loads(props[METADATA_PREFIX + "timesteps"]))
        num_steps = int(props.get(METADATA_PREFIX + "num_steps", len(timesteps)))
        return RunnerMetadata(
            name=name, runtime=runtime, device=device, dtype=props.get(METADATA_PREFIX + "dtype", "fp32"),
            num_steps=num_steps, timesteps=timesteps,
            conditional=props[METADATA_PREFIX + "conditional"] == "true",
            sample_shape=tuple(int(v) for v in json.loads(props[METADATA_PREFIX + "sample_shape"])),
            has_t_index=props.get(METADATA_PREFIX + "t_index_input", "true") == "true",
            cond_inputs=tuple(json.loads(props.get(METADATA_PREFIX + "cond_inputs", "[]"))),
            pipeline_class=props.get(METADATA_PREFIX + "pipeline_class", ""),
            spatial_multiple=int(props.get(METADATA_PREFIX + "spatial_multiple", 0)),
            fp_fingerprint=props.get(METADATA_PREFIX + "fp_fingerprint", ""))
    except KeyError as err:
        raise UserError(f"'{source}' has no '{err.args[0]}' metadata: it was not written by dq-export; "
                        "export the checkpoint with dq-export --ckpt q.pt --onnx unet.onnx") from err
    except (ValueError, TypeError) as err:
        raise UserError(f"'{source}' has malformed dilatequant.* metadata ({err}); re-export it with dq-export") from err


def _number(t) -> int | float:
    """A timestep as JSON holds it: an integer, or a float where the sampler's are (never a string or bool)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError(f"timestep {t!r} is not a number")
    return int(t) if float(t).is_integer() else float(t)


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}': choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


class Runner:
    """Base: input validation, lazy activation, NoisePredictor protocol. Subclasses implement `_run`."""

    def __init__(self, metadata: RunnerMetadata):
        self.metadata = metadata
        self._active = False

    # -- lifecycle -------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self._active:
            self._load()
            self._active = True
        return self

    def _load(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        pass

    # -- inference -------------------------------------------------------------------------------
    def validate(self, sample, timestep, t_index, cond=None):
        """Checked, normalised inputs: sample float [B,C,H,W], timestep int64 or float32 [B], t_index int64 [B],
        cond dict | None."""
        m = self.metadata
        sample, timestep, t_index = (_as_tensor(sample, "sample"), _as_tensor(timestep, "timestep"),
                                     _as_tensor(t_index, "t_index"))
        if not sample.is_floating_point():
            raise UserError(f"sample must be a float tensor, got {sample.dtype}")
        if sample.dim() != 4 or not self._takes_size(tuple(sample.shape[1:])):
            other = f" (or H, W multiples of {m.spatial_multiple})" if m.spatial_multiple else ""
            raise UserError(f"sample must have shape [B, {', '.join(map(str, m.sample_shape))}]{other} for {m.name}, "
                            f"got {list(sample.shape)}")
        batch = sample.shape[0]
        timestep = self._batch_vector(timestep, "timestep", batch, floats=m.float_timesteps)
        t_index = self._batch_vector(t_index, "t_index", batch)
        if timestep.numel() and timestep.min() < 0:
            raise UserError(f"timestep must be >= 0, got {timestep.tolist()}")
        if t_index.numel() and (t_index.min() < 0 or t_index.max() >= m.num_steps):
            raise UserError(f"t_index out of range: got {t_index.tolist()}, {m.name} is calibrated for "
                            f"t_index in [0, {m.num_steps}) ({m.num_steps} steps; map other schedules with "
                            "engines.schedule.ScheduleMapper)")
        cond = as_condition(cond if cond is None or isinstance(cond, dict) else _as_tensor(cond, "cond"))
        if m.conditional and cond is None:
            raise UserError(f"{m.name} is conditional: pass cond ({', '.join(m.cond_inputs)})")
        if not m.conditional and cond is not None:
            raise UserError(f"{m.name} is unconditional: pass cond=None")
        if cond is not None:
            if tuple(cond) != tuple(m.cond_inputs):
                raise UserError(f"{m.name} takes the condition inputs {list(m.cond_inputs)}, got {list(cond)}")
            cond = {k: self._cond_tensor(k, _as_tensor(v, k), batch) for k, v in cond.items()}
        return sample, timestep, t_index, cond

    def _takes_size(self, chw: tuple[int, ...]) -> bool:
        m = self.metadata
        if chw == tuple(m.sample_shape):
            return True
        return (bool(m.spatial_multiple) and chw[0] == m.sample_shape[0]
                and all(v > 0 and v % m.spatial_multiple == 0 for v in chw[1:]))

    def _cond_tensor(self, name: str, v: torch.Tensor, batch: int) -> torch.Tensor:
        doc = COND_SHAPES[name]
        if not v.is_floating_point() or v.dim() != doc.count(",") + 1:
            raise UserError(f"{name} must be a float tensor {doc}, got {v.dtype} {list(v.shape)}")
        if v.shape[0] != batch:
            raise UserError(f"batch mismatch: sample has batch {batch}, {name} has {v.shape[0]}")
        if name == ENCODER_HIDDEN_STATES and self.metadata.cond_dim is not None and v.shape[2] != self.metadata.cond_dim:
            raise UserError(f"{name} must have last dimension {self.metadata.cond_dim} for {self.metadata.name}, "
                            f"got {list(v.shape)}")
        if name == "time_ids" and v.shape[1] != 6:
            raise UserError(f"time_ids must be [B, 6] (original size, crop, target size), got {list(v.shape)}")
        return v

    @staticmethod
    def _batch_vector(x: torch.Tensor, name: str, batch: int, floats: bool = False) -> torch.Tensor:
        """floats: a float vector stays float (flow matching's timesteps are 1000 sigma); else int64."""
        if x.is_complex() or x.dtype == torch.bool or (x.is_floating_point() and not floats):
            raise UserError(f"{name} must be an integer tensor (int64), got {x.dtype}")
        if x.dim() == 0 or (x.dim() == 1 and x.shape[0] == 1):
            x = x.reshape(1).expand(batch)
        if x.dim() != 1:
            raise UserError(f"{name} must have shape [B], got {list(x.shape)}")
        if x.shape[0] != batch:
            raise UserError(f"batch mismatch: sample has batch {batch}, {name} has {x.shape[0]}")
        return (x.to(torch.float32) if x.is_floating_point() else x.to(torch.int64)).contiguous()

    def infer(self, sample, timestep, t_index, cond=None) -> torch.Tensor:
        args = self.validate(sample, timestep, t_index, cond)
        self.activate()
        out = self._run(*args)
        return out.detach().to("cpu", torch.float32)

    def _run(self, sample, timestep, t_index, cond) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample, timestep, t_index, cond=None) -> torch.Tensor:
        return self.infer(sample, timestep, t_index, cond)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.metadata.device == "cuda":
            torch.cuda.synchronize()

    def __repr__(self) -> str:
        m = self.metadata
        return f"{type(self).__name__}({m.name}: {m.runtime} {m.device} {m.dtype}, T={m.num_steps})"
