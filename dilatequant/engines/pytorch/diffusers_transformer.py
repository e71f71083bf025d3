"""A quantized diffusion transformer that drops into a diffusers pipeline:
`pipe.transformer = QuantizedTransformer(runner, pipe.transformer.config)`.

SD3's, FLUX's and PixArt-Sigma's pipelines read a transformer through a few attributes (`config`, `dtype`,
`device`, FLUX's `cache_context`) and call it with keyword arguments (PixArt passes hidden_states positionally).
This adapter answers those and sends every call to a runner (ONNX Runtime, TensorRT or PyTorch fake-quant) in
the graph's form (core/denoisers.py): FLUX's packed tokens are unpacked into the latent and packed back, its
sigma in (0, 1] becomes the scheduler timestep 1000 sigma, PixArt's token mask becomes float. Each timestep is
mapped to the nearest calibrated timestep's t_index, as engines.schedule does for our own samplers.

PixArt's transformer also predicts a variance its pipeline drops; the graph returns the noise half only, so
this adapter's config says out_channels == in_channels and the pipeline takes the prediction as it is.
"""
from __future__ import annotations

from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ...core.denoisers import null_cache_context, transformer_family_of_pipeline
from ...core.errors import UserError
from ..base import Runner
from .diffusers_unet import RunnerDenoiser


class QuantizedTransformer(RunnerDenoiser):
    """diffusers' SD3 / FLUX / PixArt transformer interface over any runner."""

    def __init__(self, runner: Runner, config, pipeline_class: str) -> None:
        super().__init__(runner)
        self.family = transformer_family_of_pipeline(pipeline_class)
        if self.family is None:
            raise UserError(f"'{pipeline_class}' has no diffusion transformer; use engines.pytorch.diffusers_unet")
        cfg = dict(config)
        if cfg.get("out_channels") == 2 * cfg.get("in_channels", 0):  # PixArt's learned sigma: the graph drops it
            cfg["out_channels"] = cfg["in_channels"]
        self.config = FrozenDict(cfg)
        self.calls = 0
        self.cache_context = null_cache_context  # FluxPipeline wraps each call in it

    def forward(self, *args, return_dict: bool = True, **kwargs):
        sample, timestep, cond, layout = self.family.from_pipeline_call(args, kwargs)
        timesteps, t_index = self.t_index(timestep, sample.shape[0])
        cond = {k: v.float() for k, v in cond.items()}
        out = self.runner.infer(sample.float(), timesteps, t_index, cond)
        out = self.family.to_pipeline_output(out, layout).to(sample.dtype)
        self.calls += 1
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def __repr__(self) -> str:
        return f"QuantizedTransformer({self.runner!r})"
