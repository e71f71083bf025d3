"""A quantized UNet that drops into a diffusers pipeline: `pipe.unet = QuantizedUNet(runner, pipe.unet.config)`.

diffusers' SD and SDXL pipelines read a UNet through a few attributes (`config`, `dtype`, `device`, SDXL's
`add_embedding.linear_1.in_features`) and call it with keyword arguments; this adapter answers those and
sends every call to a runner (ONNX Runtime, TensorRT or PyTorch fake-quant). Each timestep (integer, or float
as Euler passes them) is mapped to the nearest calibrated timestep's t_index (calibrated timesteps may be
floats too), as engines.schedule does for our own samplers; a float timestep is then rounded to the integer the
graph takes.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ...core.conditioning import from_unet_kwargs
from ...core.errors import UserError
from ..base import Runner
from ..schedule import nearest_t_index


class RunnerDenoiser(torch.nn.Module):
    """What every diffusers pipeline reads of its denoiser, answered for a runner: float32 host tensors, and each
    pipeline timestep mapped to its calibrated t_index."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.runner = runner

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the runner's inputs and outputs; what runs inside is the graph's business

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # runners take and return host tensors

    def t_index(self, timestep, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [B], t_index [B]) for a pipeline's timestep (scalar or [B], float or int)."""
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise UserError(f"timestep has {t.numel()} values for a batch of {batch}")
        return t, nearest_t_index(self.runner.metadata.timesteps, t)


class QuantizedUNet(RunnerDenoiser):
    """diffusers' UNet2DConditionModel interface over any runner."""

    def __init__(self, runner: Runner, config) -> None:
        super().__init__(runner)
        self.config = FrozenDict(dict(config))
        cfg = self.config
        if cfg.get("addition_embed_type") == "text_time":  # read by SDXL's _get_add_time_ids
            dim = cfg["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=dim))
        self.calls = 0

    def t_index(self, timestep, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer timesteps [B], t_index [B]) for a pipeline's timestep (scalar or [B], int or float)."""
        t, t_index = super().t_index(timestep, batch)
        return t.double().round().to(torch.int64), t_index

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                class_labels=None, timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                added_cond_kwargs: dict | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, down_intrablock_additional_residuals=None,
                encoder_attention_mask=None, return_dict: bool = True):
        unsupported = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                       "down_block_additional_residuals": down_block_additional_residuals,
                       "mid_block_additional_residual": mid_block_additional_residual,
                       "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                       "encoder_attention_mask": encoder_attention_mask}
        given = [k for k, v in unsupported.items() if v is not None]
        if given or (cross_attention_kwargs or {}).get("scale", 1.0) != 1.0:
            raise UserError(f"the quantized UNet runs the exported graph only: {given or ['a LoRA scale']} cannot be "
                            "applied to it (ControlNet, T2I adapters, LoRA scales and LCM need their own export)")
        timesteps, t_index = self.t_index(timestep, sample.shape[0])
        cond = from_unet_kwargs(encoder_hidden_states, added_cond_kwargs)
        cond = None if cond is None else {k: v.float() for k, v in cond.items()}
        out = self.runner.infer(sample.float(), timesteps, t_index, cond).to(sample.dtype)
        self.calls += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def __repr__(self) -> str:
        return f"QuantizedUNet({self.runner!r})"
