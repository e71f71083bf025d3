"""The denoiser of a diffusion model, UNet or diffusion transformer (DiT), as the rest of the toolchain sees it.

A denoiser maps (noisy sample, timestep, condition) to the prediction its sampler steps with (noise, velocity
or v). Everything downstream (calibration, BKD, export, runtimes) calls it through its family here, so none of
them special-cases an architecture:

- `sample`: the latent the sampler holds, [B, C, H, W] for every family. FLUX's transformer reads 2x2 latent
  patches packed into tokens ([B, H/2 * W/2, 4C]) with their positions (`img_ids`, `txt_ids`); its family packs
  and unpacks inside the call and derives the positions from the shapes, as FluxPipeline does.
- `timestep`: the scheduler's timestep, as the sampler steps with it (DDPM integers; flow matching's
  1000 * sigma floats). FLUX's transformer takes sigma itself: its family divides by 1000, as FluxPipeline does.
- condition inputs, by name and in graph order (conditioning.py): the prompt's encoded tokens
  (`encoder_hidden_states`) and per family SDXL's `text_embeds`/`time_ids`, SD3/FLUX's pooled text embedding
  (`pooled_projections`), FLUX-dev's embedded guidance scale (`guidance`), PixArt's token mask
  (`encoder_attention_mask`, 1 keeps a token).
- the prediction: PixArt's transformer also predicts a variance ("learned sigma", out_channels = 2C) that its
  sampler never reads; its family returns the first C channels, as PixArtSigmaPipeline does.
- `patch_multiple`: latent heights and widths the denoiser takes (a UNet: 2^downsamplings; a DiT: its patch).
- `block_types`: the units block-wise distillation trains one at a time; `input_layer` reads the noisy sample
  itself (kept in float by default, as a UNet's conv_in), `output_layer` writes the prediction.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from .conditioning import Condition, ConditionLike, as_condition, unet_cond_names, unet_kwargs
from .errors import UserError

POOLED = "pooled_projections"
GUIDANCE = "guidance"
MASK = "encoder_attention_mask"


class DenoiserFamily:
    """One family of diffusers denoisers (see the module docstring); `family_of` picks it from a module."""

    name = ""
    model_classes: tuple[str, ...] = ()   # diffusers class names
    pipeline_classes: tuple[str, ...] = ()
    input_layer = ""
    output_layer = ""

    @property
    def block_types(self) -> tuple[type, ...]:
        raise NotImplementedError

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.model_classes

    def cond_names(self, module: nn.Module) -> tuple[str, ...]:
        raise NotImplementedError

    def latent_channels(self, module: nn.Module) -> int:
        return int(module.config.in_channels)

    def latent_size(self, module: nn.Module) -> int:
        """The latent height/width the model was made for (its pipeline's default)."""
        size = module.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def patch_multiple(self, module: nn.Module) -> int:
        return int(module.config.patch_size)

    def guidance_embedded(self, module: nn.Module) -> bool:
        """True when guidance is an input of the denoiser (FLUX-dev) rather than a second, unconditional batch."""
        return False

    def predict(self, module: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: ConditionLike) -> torch.Tensor:
        raise NotImplementedError

    def example_condition(self, module: nn.Module, batch: int, tokens: int = 4,
                          generator: torch.Generator | None = None) -> Condition | None:
        """Random condition tensors of the shapes the denoiser takes (a trace needs them to reach every layer)."""
        raise NotImplementedError

    def example_timestep(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), 500)

    def from_pipeline_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Condition | None, Any]:
        """(sample, timestep, condition, layout) from what a diffusers pipeline passes to pipe.transformer."""
        raise NotImplementedError

    def to_pipeline_output(self, prediction: torch.Tensor, layout: Any) -> torch.Tensor:
        """The prediction in the layout the pipeline expects back (FLUX: packed tokens)."""
        return prediction

    def set_timesteps_kwargs(self, module: nn.Module, scheduler, steps: int, latent_hw: tuple[int, int]) -> dict:
        """What the family's pipeline passes to scheduler.set_timesteps besides the step count (flow matching: the
        sigmas and the resolution-dependent shift mu), so calibration samples on the pipeline's own schedule."""
        return {}


class UNetFamily(DenoiserFamily):
    name = "UNet"
    model_classes = ("UNet2DModel", "UNet2DConditionModel")
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    input_layer, output_layer = "conv_in", "conv_out"

    @property
    def block_types(self) -> tuple[type, ...]:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return (ResnetBlock2D, Transformer2DModel, Attention, Downsample2D, Upsample2D, TimestepEmbedding)

    def cond_names(self, module: nn.Module) -> tuple[str, ...]:
        return unet_cond_names(module)

    def patch_multiple(self, module: nn.Module) -> int:
        return 2 ** (len(module.config.block_out_channels) - 1)

    def predict(self, module, sample, timestep, cond):
        return module(sample, timestep, return_dict=False, **unet_kwargs(cond))[0]

    def example_condition(self, module, batch, tokens=4, generator=None):
        names = self.cond_names(module)
        if not names:
            return None
        cfg = module.config
        cond = {"encoder_hidden_states": torch.randn(batch, tokens, cfg.cross_attention_dim, generator=generator)}
        if "text_embeds" in names:
            time_dims = 6 * cfg.addition_time_embed_dim
            pooled = cfg.projection_class_embeddings_input_dim - time_dims
            cond["text_embeds"] = torch.randn(batch, pooled, generator=generator)
            cond["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)
        return cond


class SD3Family(DenoiserFamily):
    """SD3 / SD3.5 MMDiT: joint attention over [image tokens; text tokens], adaLN-Zero from timestep + pooled text."""

    name = "SD3 transformer"
    model_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    input_layer, output_layer = "pos_embed.proj", "proj_out"

    @property
    def block_types(self) -> tuple[type, ...]:
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings

        return (JointTransformerBlock, CombinedTimestepTextProjEmbeddings)

    def cond_names(self, module):
        return ("encoder_hidden_states", POOLED)

    def predict(self, module, sample, timestep, cond):
        cond = as_condition(cond)
        return module(hidden_states=sample, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                      pooled_projections=cond[POOLED], return_dict=False)[0]

    def example_condition(self, module, batch, tokens=4, generator=None):
        cfg = module.config
        return {"encoder_hidden_states": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=generator),
                POOLED: torch.randn(batch, cfg.pooled_projection_dim, generator=generator)}

    def example_timestep(self, batch):
        return torch.full((batch,), 500.0)

    def set_timesteps_kwargs(self, module, scheduler, steps, latent_hw):
        """StableDiffusion3Pipeline's schedule: mu from the image token count when the scheduler shifts dynamically."""
        if not scheduler.config.get("use_dynamic_shifting", False):
            return {}
        patch = self.patch_multiple(module)
        return {"mu": flow_shift_mu(scheduler.config, (latent_hw[0] // patch) * (latent_hw[1] // patch))}

    def from_pipeline_call(self, args, kwargs):
        _refuse(kwargs, ("block_controlnet_hidden_states", "skip_layers"), "ControlNets and skip-layer guidance")
        _refuse_attention_kwargs(kwargs.get("joint_attention_kwargs"))
        sample = args[0] if args else kwargs["hidden_states"]
        cond = {"encoder_hidden_states": kwargs["encoder_hidden_states"], POOLED: kwargs["pooled_projections"]}
        return sample, kwargs["timestep"], cond, None


class FluxFamily(DenoiserFamily):
    """FLUX.1: double-stream blocks, then single-stream blocks over [text; image] tokens, rotary positions."""

    name = "FLUX transformer"
    model_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    input_layer, output_layer = "x_embedder", "proj_out"
    PIPELINE_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px

    @property
    def block_types(self) -> tuple[type, ...]:
        from diffusers.models.embeddings import (CombinedTimestepGuidanceTextProjEmbeddings,
                                                 CombinedTimestepTextProjEmbeddings)
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return (FluxTransformerBlock, FluxSingleTransformerBlock, CombinedTimestepTextProjEmbeddings,
                CombinedTimestepGuidanceTextProjEmbeddings)

    def cond_names(self, module):
        return ("encoder_hidden_states", POOLED) + ((GUIDANCE,) if self.guidance_embedded(module) else ())

    def guidance_embedded(self, module):
        return bool(module.config.guidance_embeds)

    def latent_channels(self, module):
        return int(module.config.in_channels) // 4

    def latent_size(self, module):
        return self.PIPELINE_SAMPLE_SIZE

    def patch_multiple(self, module):
        return 2

    def predict(self, module, sample, timestep, cond):
        cond = as_condition(cond)
        b, c, h, w = sample.shape
        tokens = sample.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        text = cond["encoder_hidden_states"]
        out = module(hidden_states=tokens, timestep=timestep / 1000, guidance=cond.get(GUIDANCE),
                     pooled_projections=cond[POOLED], encoder_hidden_states=text,
                     txt_ids=text.new_zeros(text.shape[1], 3), img_ids=image_ids(h // 2, w // 2, sample.dtype,
                                                                                 sample.device),
                     return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def example_condition(self, module, batch, tokens=4, generator=None):
        cfg = module.config
        cond = {"encoder_hidden_states": torch.randn(batch, tokens, cfg.joint_attention_dim, generator=generator),
                POOLED: torch.randn(batch, cfg.pooled_projection_dim, generator=generator)}
        if self.guidance_embedded(module):
            cond[GUIDANCE] = torch.full((batch,), 3.5)
        return cond

    def example_timestep(self, batch):
        return torch.full((batch,), 500.0)

    def from_pipeline_call(self, args, kwargs):
        _refuse(kwargs, ("controlnet_block_samples", "controlnet_single_block_samples"), "ControlNets")
        _refuse_attention_kwargs(kwargs.get("joint_attention_kwargs"))
        tokens, img_ids = (args[0] if args else kwargs["hidden_states"]), kwargs["img_ids"]
        if img_ids.ndim == 3:  # the deprecated batched form
            img_ids = img_ids[0]
        h2, w2 = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
        b, n, c4 = tokens.shape
        if n != h2 * w2:
            raise UserError(f"FLUX call with {n} image tokens but img_ids for a {h2}x{w2} grid; the quantized "
                            "transformer takes the image tokens FluxPipeline packs (no extra conditioning tokens)")
        sample = tokens.reshape(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 2 * h2, 2 * w2)
        cond = {"encoder_hidden_states": kwargs["encoder_hidden_states"], POOLED: kwargs["pooled_projections"]}
        if kwargs.get("guidance") is not None:
            cond[GUIDANCE] = kwargs["guidance"]
        return sample, kwargs["timestep"] * 1000, cond, None

    def to_pipeline_output(self, prediction, layout):
        b, c, h, w = prediction.shape
        return prediction.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)

    def set_timesteps_kwargs(self, module, scheduler, steps, latent_hw):
        """FluxPipeline's schedule: sigmas linspace(1, 1/steps), and mu from the packed image length."""
        import numpy as np

        cfg = scheduler.config
        kwargs: dict = {}
        if not cfg.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()  # JSON: q.pt records it
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = flow_shift_mu(cfg, (latent_hw[0] // 2) * (latent_hw[1] // 2))
        return kwargs


class PixArtFamily(DenoiserFamily):
    """PixArt-Sigma: self-attention, cross-attention to T5 tokens, adaLN-single shared by every block."""

    name = "PixArt transformer"
    model_classes = ("PixArtTransformer2DModel",)
    pipeline_classes = ("PixArtSigmaPipeline",)
    input_layer, output_layer = "pos_embed.proj", "proj_out"
    NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}  # what PixArtSigmaPipeline passes

    @property
    def block_types(self) -> tuple[type, ...]:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.embeddings import PixArtAlphaTextProjection
        from diffusers.models.normalization import AdaLayerNormSingle

        return (BasicTransformerBlock, AdaLayerNormSingle, PixArtAlphaTextProjection)

    def cond_names(self, module):
        return ("encoder_hidden_states", MASK)

    def predict(self, module, sample, timestep, cond):
        cond = as_condition(cond)
        out = module(sample, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                     added_cond_kwargs=self.NO_MICRO_CONDITIONS, encoder_attention_mask=cond[MASK],
                     return_dict=False)[0]
        channels = sample.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # learned sigma: the noise half

    def example_condition(self, module, batch, tokens=4, generator=None):
        cfg = module.config
        mask = torch.ones(batch, tokens)
        mask[:, tokens // 2 + 1:] = 0.0  # padded tokens, as a short prompt has
        return {"encoder_hidden_states": torch.randn(batch, tokens, cfg.caption_channels, generator=generator),
                MASK: mask}

    def from_pipeline_call(self, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            raise UserError("the quantized transformer takes no image attention_mask (PixArtSigmaPipeline passes none)")
        added = kwargs.get("added_cond_kwargs") or {}
        if any(v is not None for v in added.values()):
            raise UserError("the quantized transformer takes no resolution/aspect-ratio micro-conditions (PixArt-Alpha); "
                            "PixArt-Sigma passes none")
        _refuse_attention_kwargs(kwargs.get("cross_attention_kwargs"))
        sample = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get(MASK)
        if mask is None:
            mask = torch.ones(kwargs["encoder_hidden_states"].shape[:2])
        return sample, kwargs["timestep"], {"encoder_hidden_states": kwargs["encoder_hidden_states"],
                                            MASK: mask.float()}, None


FAMILIES: tuple[DenoiserFamily, ...] = (UNetFamily(), SD3Family(), FluxFamily(), PixArtFamily())
DIT_PIPELINES = tuple(p for f in FAMILIES[1:] for p in f.pipeline_classes)
PIPELINE_CLASSES = tuple(p for f in FAMILIES for p in f.pipeline_classes)


def family_of(module: nn.Module) -> DenoiserFamily:
    for family in FAMILIES:
        if family.matches(module):
            return family
    supported = ", ".join(c for f in FAMILIES for c in f.model_classes)
    raise UserError(f"unsupported denoiser {type(module).__name__}: supported are {supported}")


def family_of_pipeline(class_name: str) -> DenoiserFamily | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_classes), None)


def transformer_family_of_pipeline(class_name: str) -> DenoiserFamily | None:
    """The diffusion-transformer family of a pipeline class; None for a UNet pipeline or an unknown class."""
    family = family_of_pipeline(class_name)
    return None if family is None or isinstance(family, UNetFamily) else family


def model_class(name: str) -> type[nn.Module]:
    """A supported diffusers denoiser class by name (q.pt records it)."""
    import diffusers

    if not any(name in f.model_classes for f in FAMILIES):
        raise UserError(f"'{name}' is not a denoiser this version can rebuild")
    return getattr(diffusers, name)


def cond_names(denoiser: nn.Module) -> tuple[str, ...]:
    """The condition inputs a diffusers denoiser (UNet or transformer) takes, in graph order."""
    return family_of(denoiser).cond_names(denoiser)


def predict(module: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: ConditionLike) -> torch.Tensor:
    """The denoiser's prediction in sample space: every caller goes through its family."""
    return family_of(module).predict(module, sample, timestep, cond)


def image_ids(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """FLUX's position ids of a rows x cols token grid: (0, row, col) per token, row-major (FluxPipeline's)."""
    r = torch.arange(rows, device=device, dtype=dtype)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=device, dtype=dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)  # broadcasts: TensorRT's shapes


def flow_shift_mu(scheduler_config: Mapping, image_seq_len: int) -> float:
    """diffusers' calculate_shift: the exponential time shift of dynamic-shifting flow matching, linear in the
    number of image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    base_shift, max_shift = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + base_shift - m * base_len


def _refuse(kwargs: dict, names: tuple[str, ...], what: str) -> None:
    given = [k for k in names if kwargs.get(k) is not None]
    if given:
        raise UserError(f"the quantized transformer runs the exported graph only: {what} ({', '.join(given)}) need "
                        "their own export")


def _refuse_attention_kwargs(kwargs: dict | None) -> None:
    if kwargs and (set(kwargs) - {"scale"} or kwargs.get("scale", 1.0) != 1.0):
        raise UserError(f"the quantized transformer runs the exported graph only: attention kwargs {sorted(kwargs)} "
                        "(IP-adapters, LoRA scales) cannot be applied to it")


def null_cache_context(name: str):
    """FluxPipeline wraps each call in transformer.cache_context(...): a drop-in without caches answers this."""
    return contextlib.nullcontext()
