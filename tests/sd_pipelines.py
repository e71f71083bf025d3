"""Tiny random Stable Diffusion pipelines built from configs (no downloads): SD 2.x-style and SDXL.

The CLIP tokenizer comes from a character vocabulary made here; everything is seeded, so a folder saved by
these builders is the same on every machine.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 16


def tiny_tokenizer() -> CLIPTokenizer:
    """Characters and end-of-word characters as the whole vocabulary; no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = string.ascii_lowercase + string.digits + ",.'-!?"
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def _text_config(hidden: int, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tiny_tokenizer().get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=32)


def _scheduler(prediction_type: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)


def tiny_sd2(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x-shaped: v-prediction, Euler, one CLIP text encoder, cross-attention with linear projections."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32)), tokenizer=tiny_tokenizer(),
                                   unet=unet, scheduler=_scheduler("v_prediction"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe


def tiny_sdxl(seed: int = 0, channels: tuple[int, int] = (16, 32), sample_size: int = 8) -> StableDiffusionXLPipeline:
    """SDXL-shaped: two text encoders (the second with projection -> pooled text_embeds) and time_ids; its scheduler
    is SDXL's EulerDiscreteScheduler config (leading spacing, steps offset 1), saved without clip_sample."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        norm_num_groups=8, attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
        transformer_layers_per_block=(1, 1), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(32)), tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection=32)), tokenizer_2=tiny_tokenizer(),
        unet=unet, scheduler=_scheduler("epsilon"))


def save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    return folder
