"""What conditions a denoiser besides (sample, timestep): named tensors, one per extra graph input.

A class-token model and an SD 1.x/2.x UNet take `encoder_hidden_states` [B, L, D]; an SDXL UNet also
takes `text_embeds` [B, 1280] (the pooled second-encoder embedding) and `time_ids` [B, 6] (original size,
crop, target size) through diffusers' `added_cond_kwargs`. Diffusion transformers (denoisers.py) take
`encoder_hidden_states` with SD3's and FLUX's pooled text embedding `pooled_projections` [B, P], FLUX-dev's
embedded guidance scale `guidance` [B], or PixArt's token mask `encoder_attention_mask` [B, L] (1 keeps a
token, as float). Every runtime, the calibration set and the exported graph carry them as one ordered dict
under these names, so nothing downstream special-cases an architecture.
A bare tensor is accepted wherever a condition is: it means `encoder_hidden_states`.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch

ENCODER_HIDDEN_STATES = "encoder_hidden_states"
ADDED_COND = ("text_embeds", "time_ids")
DIT_COND = ("pooled_projections", "guidance", "encoder_attention_mask")
COND_NAMES = (ENCODER_HIDDEN_STATES, *ADDED_COND, *DIT_COND)
# the shape of each condition input, as error messages name it
COND_SHAPES = {ENCODER_HIDDEN_STATES: "[B, L, D]", "text_embeds": "[B, P]", "time_ids": "[B, 6]",
               "pooled_projections": "[B, P]", "guidance": "[B]", "encoder_attention_mask": "[B, L]"}

Condition = dict[str, torch.Tensor]
ConditionLike = Union[Condition, Mapping[str, torch.Tensor], torch.Tensor, None]


def unet_cond_names(unet: torch.nn.Module) -> tuple[str, ...]:
    """The condition inputs a diffusers UNet takes, in graph order."""
    cfg = unet.config
    if getattr(cfg, "cross_attention_dim", None) is None or not hasattr(cfg, "addition_embed_type"):
        return ()  # UNet2DModel: unconditional
    if cfg.addition_embed_type == "text_time":
        return (ENCODER_HIDDEN_STATES, *ADDED_COND)
    if cfg.addition_embed_type is not None:
        from .errors import UserError

        raise UserError(f"UNet addition_embed_type '{cfg.addition_embed_type}' is not supported; supported: "
                        "none (SD 1.x/2.x) and 'text_time' (SDXL)")
    return (ENCODER_HIDDEN_STATES,)


def as_condition(cond: ConditionLike) -> Condition | None:
    """A condition as an ordered dict (a bare tensor is encoder_hidden_states); None stays None."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return {ENCODER_HIDDEN_STATES: cond}
    if not isinstance(cond, Mapping):
        from .errors import UserError

        raise UserError(f"a condition is a tensor (encoder_hidden_states) or a dict of {', '.join(COND_NAMES)}; "
                        f"got {type(cond).__name__}")
    unknown = [k for k in cond if k not in COND_NAMES]
    if unknown:
        from .errors import UserError

        raise UserError(f"unknown condition input(s) {unknown}: a condition holds {', '.join(COND_NAMES)}")
    return {k: cond[k] for k in COND_NAMES if k in cond and cond[k] is not None} or None


def unet_kwargs(cond: ConditionLike) -> dict:
    """Keyword arguments of a diffusers UNet forward for this condition."""
    cond = as_condition(cond)
    if cond is None:
        return {}
    kw: dict = {}
    if ENCODER_HIDDEN_STATES in cond:
        kw[ENCODER_HIDDEN_STATES] = cond[ENCODER_HIDDEN_STATES]
    added = {k: cond[k] for k in ADDED_COND if k in cond}
    if added:
        kw["added_cond_kwargs"] = added
    return kw


def from_unet_kwargs(encoder_hidden_states: torch.Tensor | None, added_cond_kwargs: Mapping | None) -> Condition | None:
    """The inverse of unet_kwargs: what a pipeline passes to `unet(...)` as one condition."""
    cond: Condition = {}
    if encoder_hidden_states is not None:
        cond[ENCODER_HIDDEN_STATES] = encoder_hidden_states
    for k in ADDED_COND:
        if added_cond_kwargs and added_cond_kwargs.get(k) is not None:
            cond[k] = added_cond_kwargs[k]
    return cond or None


def map_condition(cond: Condition | None, fn) -> Condition | None:
    """fn applied to every tensor of the condition (indexing, device moves, casts)."""
    return None if cond is None else {k: fn(v) for k, v in cond.items()}


def cat_conditions(parts: list[Condition | None], dim: int = 0) -> Condition | None:
    if not parts or parts[0] is None:
        return None
    return {k: torch.cat([p[k] for p in parts], dim) for k in parts[0]}
