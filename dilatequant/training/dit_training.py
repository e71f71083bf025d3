"""Train the shipped text-to-image diffusion transformer (`sd3-digits`) on captioned MNIST digits.

A Stable Diffusion 3 pipeline folder small enough for CPUs: an `SD3Transformer2DModel` (joint text/image
attention, adaLN-Zero modulation from the timestep and the pooled text embedding) trained here with SD3's
rectified-flow objective, on the latents of `sd-digits`' VAE and the prompts of `sd-digits`' tokenizer and
text encoder, reused as they are (frozen): both CLIP slots of the SD3 pipeline hold that encoder, its pooled
projection the identity, and the T5 slot is empty. An SD3 pipeline without T5 appends `max_sequence_length`
zero tokens to the prompt (256 by default); this model was trained with none (--t5-tokens 0, recorded in the
folder's dilatequant.json as a pipeline keyword), so its context is the 16 CLIP tokens. The transformer
checkpoints every --ckpt-every steps into --work and resumes from there when rerun.

    python -m dilatequant.training.dit_training --iters 5000 --seed 0 --out /tmp/sd3-digits
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.digits import CAPTION_TEMPLATES, captions_for, load_digits
from ..core.errors import UserError
from ..core.models import DEFAULTS_FILE, embedded_model_dir
from ..core.reporting import write_json
from .sd_training import CAPTION_DROPOUT, Checkpoint, _cosine, _loop, _versions, encode_all, phase_record

@dataclass(frozen=True)
class DiTTrainConfig:
    """Everything that determines the result; a resumed run must match the checkpoint's config."""

    seed: int = 0
    iters: int = 5000
    batch: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.999
    layers: int = 4
    heads: int = 3
    head_dim: int = 32
    patch_size: int = 2     # SD3's: an 8x8 latent is 16 image tokens
    shift: float = 1.0      # FlowMatchEulerDiscreteScheduler's sigma shift (SD3 at 1024 px: 3.0)
    t5_tokens: int = 0      # zero tokens in place of T5 (the pipeline's max_sequence_length; SD3's default: 256)


def sd_digits_parts():
    """sd-digits' VAE, tokenizer and text encoder, the encoder as the CLIPTextModelWithProjection SD3 expects.

    SD3 reads the penultimate hidden state of each CLIP and the EOS feature through `text_projection`; that
    projection is the identity here, so the pooled embedding is the encoder's own final EOS feature."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = embedded_model_dir("sd-digits")
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds it when decoding; sd-digits has none (0)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    config = CLIPTextConfig(**{**clip.config.to_dict(), "projection_dim": clip.config.hidden_size})
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(clip.state_dict())  # transformers 5: CLIPTextModel is the text transformer itself
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return vae, tokenizer, encoder.eval().requires_grad_(False)


def new_transformer(cfg: DiTTrainConfig, text_hidden: int, latent_channels: int, latent_size: int):
    """SD3-medium's layout shrunk; adaLN-Zero initialisation (DiT): every block starts as the identity."""
    from diffusers import SD3Transformer2DModel

    inner = cfg.heads * cfg.head_dim
    model = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * text_hidden, caption_projection_dim=inner,
        pooled_projection_dim=2 * text_hidden, pos_embed_max_size=latent_size // cfg.patch_size)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
                module.weight.zero_()
                module.bias.zero_()
    return model


def flow_scheduler(cfg: DiTTrainConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def make_pipeline(transformer, cfg: DiTTrainConfig, parts):
    from diffusers import StableDiffusion3Pipeline

    vae, tokenizer, encoder = parts
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(cfg), vae=vae,
                                    text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(encoder),
                                    tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(pipe, t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (digit, phrasing) caption and "" through the pipeline's own encode_prompt, as sampling encodes them."""
    captions = [c for d in range(10) for c in captions_for(d)]
    emb, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=t5_tokens, device=torch.device("cpu"))
    empty, _, empty_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=t5_tokens, device=torch.device("cpu"))
    per = len(CAPTION_TEMPLATES)
    return emb.view(10, per, *emb.shape[1:]), pooled.view(10, per, -1), empty[0], empty_pooled[0]


def train_transformer(cfg: DiTTrainConfig, transformer, captions, latents, labels, ckpt: Checkpoint):
    """Rectified flow as SD3 trains it: x_t = (1 - s) x_0 + s e, target e - x_0, s logit-normal(0, 1),
    timestep 1000 s; 10% empty captions for classifier-free guidance."""
    emb, pooled, empty, empty_pooled = captions
    mean, std = latents
    ema = copy.deepcopy(transformer).requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.iters))

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(labels), (cfg.batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        phrasing = torch.randint(0, emb.shape[1], (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < CAPTION_DROPOUT
        cond = torch.where(drop[:, None, None], empty[None], emb[labels[idx], phrasing])
        pool = torch.where(drop[:, None], empty_pooled[None], pooled[labels[idx], phrasing])
        noise = torch.randn(z0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(cfg.batch, generator=gen))
        zt = (1 - s[:, None, None, None]) * z0 + s[:, None, None, None] * noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = transformer(zt, timestep=s * 1000, encoder_hidden_states=cond, pooled_projections=pool).sample
        return torch.nn.functional.mse_loss(pred.float(), noise - z0)

    log = _loop("transformer", cfg.iters, ckpt, transformer, opt, sched, gen, step, ema, cfg.ema_decay)
    return ema.eval(), log


def save_pipeline(out: Path, pipe, guidance: float, t5_tokens: int) -> None:
    """save_pretrained into a temporary folder with the dilatequant defaults beside it, then renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.copyfile(embedded_model_dir("sd-digits") / "prompts.txt", tmp / "prompts.txt")
    (tmp / DEFAULTS_FILE).write_text(json.dumps({
        "guidance_scale": guidance, "calibration_prompts": "prompts.txt",
        "pipeline_kwargs": {"max_sequence_length": t5_tokens},
        "note": "read by dilatequant (models.pipeline_defaults), not by diffusers: pass max_sequence_length="
                f"{t5_tokens} to the pipeline yourself (the transformer was trained with {t5_tokens} T5 zero tokens; "
                "load with text_encoder_3=None, tokenizer_3=None)",
    }, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def train(cfg: DiTTrainConfig, out: Path, work: Path, threads: int, ckpt_every: int, guidance: float) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    parts = sd_digits_parts()
    vae = parts[0]
    scale = vae.config.scaling_factor
    mean, std = encode_all(vae, data.train_images)
    torch.manual_seed(cfg.seed)
    transformer = new_transformer(cfg, parts[2].config.hidden_size, mean.shape[1], mean.shape[-1])
    pipe = make_pipeline(transformer, cfg, parts)
    captions = encode_captions(pipe, cfg.t5_tokens)
    ema, log = train_transformer(cfg, transformer, captions, (mean * scale, std * scale), data.train_labels,
                                 Checkpoint(work, "transformer", asdict(cfg), ckpt_every))
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    save_pipeline(out, pipe, guidance, cfg.t5_tokens)
    record = {
        "command": "python -m dilatequant.training.dit_training " + " ".join(sys.argv[1:]),
        "config": asdict(cfg), "threads": threads, "train_images": len(data.train_labels),
        "seeds": {"torch.manual_seed (init)": cfg.seed, "data/noise generator": cfg.seed + 1},
        "objective": "rectified flow (SD3): target noise - x0, sigma ~ sigmoid(N(0, 1)), timestep 1000 sigma; "
                     f"{CAPTION_DROPOUT:.0%} empty captions; adaLN-Zero init; EMA weights shipped",
        "reused_from_sd_digits": "VAE (shift_factor 0 added to its config), tokenizer, text encoder (frozen; "
                                 "CLIPTextModelWithProjection with an identity projection, in both CLIP slots)",
        "guidance_scale": guidance,
        "transformer": phase_record(cfg.iters, log, ema),
        "versions": _versions(),
    }
    write_json(out / "training.json", record)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DiTTrainConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--shift", type=float, default=d.shift)
    p.add_argument("--t5-tokens", type=int, default=d.t5_tokens, help="zero tokens in place of T5 (SD3 default: 256)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale recorded as the folder's default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between resumable checkpoints")
    p.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    p.add_argument("--work", type=Path, default=None, help="checkpoints (default: <out>.work)")
    a = p.parse_args()
    for name in ("iters", "batch", "ckpt_every", "layers", "heads"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1 (got {getattr(a, name)})")
    cfg = DiTTrainConfig(seed=a.seed, iters=a.iters, batch=a.batch, lr=a.lr, ema_decay=a.ema_decay, layers=a.layers,
                         heads=a.heads, head_dim=a.head_dim, patch_size=a.patch_size, shift=a.shift,
                         t5_tokens=a.t5_tokens)
    try:
        rec = train(cfg, a.out, a.work or a.out.with_name(a.out.name + ".work"), a.threads, a.ckpt_every, a.guidance)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({k: v for k, v in rec.items() if k != "transformer"} |
                     {"transformer": {k: v for k, v in rec["transformer"].items() if k != "loss_every_100"}}, indent=2))


if __name__ == "__main__":
    main()
