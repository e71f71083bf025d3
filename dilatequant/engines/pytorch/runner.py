"""PyTorch runners: the FP UNet and the fake-quant QuantUNet of a q.pt, on cpu/cuda in fp32/fp16."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from ...core.conditioning import map_condition
from ...core.denoisers import family_of
from ...core.errors import UserError
from ...core.models import DiffusionModel
from ..base import TORCH_DTYPES, Runner, RunnerMetadata, _check_device


class TorchRunner(Runner):
    """A PyTorch module (FP UNet or fake-quant QuantUNet) on cpu/cuda in fp32/fp16.

    `build` is called once, lazily, and returns fn(sample, timestep, t_index, cond) -> noise.
    fp16 casts the whole module, tables included, the way a user would run `.half()`.
    """

    def __init__(self, metadata: RunnerMetadata, build: Callable[[], Callable], compile: bool = False):
        super().__init__(metadata)
        self._build, self._compile, self._fn = build, compile, None

    def _load(self) -> None:
        self._fn = self._build()

    def _run(self, sample, timestep, t_index, cond):
        m = self.metadata
        dt = TORCH_DTYPES[m.dtype]
        sample = sample.to(m.device, dt)
        timestep, t_index = timestep.to(m.device), t_index.to(m.device)
        cond = map_condition(cond, lambda v: v.to(m.device, dt))
        with torch.no_grad():
            return self._fn(sample, timestep, t_index, cond)

    @classmethod
    def fp(cls, model: DiffusionModel, timesteps: list[int | float], device: str = "cpu", dtype: str = "fp32",
           compile: bool = False, name: str = "torch-fp") -> "TorchRunner":
        """The FP model; `timesteps` is the calibrated schedule its t_index inputs refer to (it ignores them)."""
        _check_device(device)
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose fp32 or fp16")
        meta = RunnerMetadata(name=name + ("-compile" if compile else ""), runtime="torch", device=device, dtype=dtype,
                              num_steps=len(timesteps), timesteps=tuple(timesteps),
                              has_t_index=False, **_model_fields(model))

        def build():
            denoiser = _placed(model.denoiser, device, dtype)
            call, family = (torch.compile(denoiser) if compile else denoiser), family_of(denoiser)

            def fn(x, t, ti, c):
                return family.predict(call, x, t, c)
            return fn

        return cls(meta, build, compile)

    @classmethod
    def fake_quant(cls, ckpt: str | Path, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                   name: str = "torch-fakequant") -> "TorchRunner":
        """The PyTorch fake-quant model of a q.pt. Reads the schedule now; builds the model on first use."""
        from ...calibrate.checkpoint import load_checkpoint

        _check_device(device)
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose fp32 or fp16")
        ck = load_checkpoint(ckpt)  # validates the file up front; the module moves to the device lazily
        return cls.from_checkpoint(ck, device, dtype, compile, name)

    @classmethod
    def from_checkpoint(cls, ck, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                        name: str = "torch-fakequant") -> "TorchRunner":
        meta = RunnerMetadata(name=name + ("-compile" if compile else ""), runtime="torch", device=device, dtype=dtype,
                              num_steps=len(ck.timesteps), timesteps=tuple(ck.timesteps),
                              has_t_index=bool(ck.qunet.config.tpq), fp_fingerprint=ck.source_fingerprint,
                              **_model_fields(ck.model))

        def build():
            qunet = _placed(ck.qunet, device, dtype)
            call = torch.compile(qunet) if compile else qunet
            return lambda x, t, ti, c: call(x, t, ti, c)

        return cls(meta, build, compile)


def _model_fields(model: DiffusionModel) -> dict:
    """RunnerMetadata fields that come from the model: conditioning and sample shape."""
    cond = model.family.example_condition(model.denoiser, 1) if model.is_conditional else None
    return {"conditional": model.is_conditional, "sample_shape": tuple(model.sample_shape),
            "cond_dim": cond["encoder_hidden_states"].shape[-1] if cond else None,
            "cond_inputs": tuple(model.cond_names), "pipeline_class": model.pipeline_class or "",
            "spatial_multiple": model.patch_multiple}


def _placed(module: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """The module on device/dtype; a copy unless that is where it already is (others may share it)."""
    if (device, dtype) != ("cpu", "fp32"):
        module = copy.deepcopy(module).to(device, TORCH_DTYPES[dtype])
    return module.eval()
