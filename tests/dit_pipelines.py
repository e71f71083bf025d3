"""Tiny random diffusion-transformer pipelines built from configs (no downloads): SD3, FLUX.1-dev, PixArt-Sigma.

Each has the public model's structure at toy width: SD3 (joint attention, two CLIP towers with projection, a T5
encoder), FLUX.1-dev (double- and single-stream blocks, guidance embedding, dynamic-shift flow matching, CLIP +
T5), PixArt-Sigma (adaLN-single, cross-attention to T5 with a token mask, learned sigma, DPM-Solver++). The VAE
has two levels (factor 2): a 16x16 image is an 8x8 latent, 16 image tokens for every family. The CLIP tokenizer
is tests/sd_pipelines' character vocabulary; the T5 tokenizer a character Unigram vocabulary made in memory.
Every folder carries a dilatequant.json with max_sequence_length 8 (T5 tokens), so prompts stay short.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PixArtSigmaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from sd_pipelines import _text_config, tiny_tokenizer

T5_TOKENS = 8
IMAGE_SIZE = 16  # pixels; VAE factor 2 -> 8x8 latents


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram vocabulary of characters (with and without the word-start mark), in memory."""
    chars = string.ascii_letters + string.digits + ",.'-!?"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_encoder(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
        num_heads=d_model // 8, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _vae(latent_channels: int, scaling: float, shift: float | None) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=shift is None,
                         use_post_quant_conv=shift is None)


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3-medium's structure: patch 2, CLIP-L || CLIP-G hidden states zero-padded to the T5 width."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(4, 1.5305, 0.0609), text_encoder=CLIPTextModelWithProjection(_text_config(16, projection=16)),
        tokenizer=tiny_tokenizer(), text_encoder_2=CLIPTextModelWithProjection(_text_config(16, projection=16)),
        tokenizer_2=tiny_tokenizer(), text_encoder_3=t5_encoder(32), tokenizer_3=t5_tokenizer())


def tiny_flux(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev's structure: one double- and one single-stream block, guidance embedding, dynamic shifting."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(4, 0.3611, 0.1159),
                        text_encoder=CLIPTextModel(_text_config(16)), tokenizer=tiny_tokenizer(),
                        text_encoder_2=t5_encoder(32), tokenizer_2=t5_tokenizer())


def tiny_pixart(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Sigma's structure: adaLN-single, cross-attention with a token mask, learned sigma, DPM-Solver++."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=32, sample_size=IMAGE_SIZE // 2, patch_size=2, norm_num_groups=4,
        use_additional_conditions=False, interpolation_scale=None)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(32), vae=_vae(4, 0.13025, None),
                               transformer=transformer, scheduler=scheduler)


BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "pixart": tiny_pixart}
GUIDANCE = {"sd3": 4.0, "flux": 3.5, "pixart": 4.5}


def save(pipe, folder: Path, guidance: float) -> Path:
    pipe.save_pretrained(folder)
    (folder / "dilatequant.json").write_text(json.dumps(
        {"guidance_scale": guidance, "pipeline_kwargs": {"max_sequence_length": T5_TOKENS}}))
    return folder


def make(name: str, folder: Path) -> Path:
    return save(BUILDERS[name](), folder, GUIDANCE[name])
