"""The public SD 1.5 and SDXL UNet architectures (configs/*.json, diffusers' own config.json of each) and
narrower variants of them for CPU runs: same blocks, depth, attention layout and text-conditioning shapes,
block_out_channels divided. Random weights only: no weights are downloadable here.

    sd15, sdxl            the public configs (859,520,964 and 2,567,463,684 parameters)
    sd15/2.5, sdxl/4      block_out_channels divided by 2.5 or 4 (any divisor keeping 32 norm groups)
    sd15-tiny, sdxl-tiny  divided by 10: the whole chain runs in minutes on 2 cores

The diffusion transformers (transformer_config): SD3-medium's SD3Transformer2DModel and FLUX.1-dev's
FluxTransformer2DModel (2,028,328,000 and 11,901,408,320 parameters), and narrower ones (`sd3-medium/8`: an
eighth of the attention heads, the 64-wide heads, depth and text shapes kept).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
FILES = {"sd15": "sd15_unet.json", "sdxl": "sdxl_unet.json"}
TRANSFORMER_FILES = {"sd3-medium": "sd3_medium_transformer.json", "flux1-dev": "flux1_dev_transformer.json"}


def is_transformer(name: str) -> bool:
    return name.partition("/")[0] in TRANSFORMER_FILES


def transformer_config(name: str) -> dict:
    """A diffusers transformer config by name: the public one, or `NAME/N` with 1/N of its attention heads."""
    base, _, div = name.partition("/")
    if base not in TRANSFORMER_FILES:
        raise SystemExit(f"unknown transformer '{name}': use {', '.join(TRANSFORMER_FILES)} or NAME/DIVISOR")
    cfg = json.loads((CONFIGS / TRANSFORMER_FILES[base]).read_text())
    if div:
        heads = cfg["num_attention_heads"]
        if heads % int(div):
            raise SystemExit(f"{name}: {heads} attention heads do not divide by {div}")
        cfg["num_attention_heads"] = heads // int(div)
        if "caption_projection_dim" in cfg:  # SD3: must equal heads x head_dim
            cfg["caption_projection_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return cfg
TINY_DIVISOR = 10.0
NORM_GROUPS = 32


def unet_config(name: str) -> dict:
    """A UNet2DConditionModel config by name (see the module docstring)."""
    base, _, div = name.partition("/")
    if base.endswith("-tiny"):
        base, div = base[: -len("-tiny")], str(TINY_DIVISOR)
    if base not in FILES:
        raise SystemExit(f"unknown UNet '{name}': use {', '.join(FILES)}, NAME-tiny or NAME/DIVISOR")
    cfg = json.loads((CONFIGS / FILES[base]).read_text())
    return narrowed(cfg, float(div)) if div else cfg


def narrowed(cfg: dict, divisor: float) -> dict:
    """block_out_channels divided (rounded to a multiple of the 32 norm groups); depth and text shapes kept.

    attention_head_dim is diffusers' name for the number of heads in both configs; SDXL's per-block list
    (5, 10, 20 heads of 64) becomes the largest count that still divides the narrower blocks (gcd).
    """
    out = dict(cfg)
    chans = [max(NORM_GROUPS, round(c / divisor / NORM_GROUPS) * NORM_GROUPS) for c in cfg["block_out_channels"]]
    heads = cfg["attention_head_dim"]
    if isinstance(heads, list):
        out["attention_head_dim"] = [math.gcd(c, h) for c, h in zip(chans, heads)]
    elif any(c % heads for c in chans):
        raise SystemExit(f"divisor {divisor}: channels {chans} do not split into {heads} attention heads")
    out["block_out_channels"] = chans
    return out


def param_count(cfg: dict) -> int:
    """Parameters of the UNet the config builds, counted on the meta device (no memory, no init time)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    return sum(p.numel() for p in unet.parameters())
