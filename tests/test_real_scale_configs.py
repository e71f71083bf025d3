"""The public SD 1.5 and SDXL UNet architectures the real-scale benchmarks build (benchmarks/configs/): built on the
meta device (shapes only, no memory), their parameter counts are those of the released UNets."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


@pytest.mark.parametrize("name, params, blocks", [
    ("sd15_unet.json", 859_520_964, [320, 640, 1280, 1280]),
    ("sdxl_unet.json", 2_567_463_684, [320, 640, 1280]),
])
def test_public_unet_configs_build_with_their_parameter_counts(name, params, blocks):
    cfg = json.loads((CONFIGS / name).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    assert all(p.is_meta for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == params
    assert list(unet.config.block_out_channels) == blocks and unet.config.in_channels == 4


def test_sdxl_config_takes_text_time_conditioning():
    cfg = json.loads((CONFIGS / "sdxl_unet.json").read_text())
    assert cfg["addition_embed_type"] == "text_time" and cfg["cross_attention_dim"] == 2048
    # pooled text embedding (1280) + six time ids x 256: the add-embedding's input
    assert cfg["projection_class_embeddings_input_dim"] == 1280 + 6 * cfg["addition_time_embed_dim"]


@pytest.mark.parametrize("name, params, blocks", [
    ("sd3_medium_transformer.json", 2_028_328_000, 24),   # SD3-medium: "2B"
    ("flux1_dev_transformer.json", 11_901_408_320, 19 + 38),  # FLUX.1-dev: "12B", double- + single-stream blocks
])
def test_public_transformer_configs_build_with_their_parameter_counts(name, params, blocks):
    import diffusers

    cfg = json.loads((CONFIGS / name).read_text())
    with torch.device("meta"):
        model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.transformer_blocks) + len(getattr(model, "single_transformer_blocks", [])) == blocks
