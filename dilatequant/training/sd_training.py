"""Train the shipped text-to-image Stable Diffusion pipeline (`sd-digits`) on captioned MNIST digits.

Everything a real SD 1.x folder holds, made here and small enough for CPUs: a CLIP BPE vocabulary learned
from the captions, a small CLIPTextModel, an AutoencoderKL (1x32x32 image <-> 4x8x8 latents), an SD-shaped
UNet2DConditionModel with cross-attention transformers, and SD's scaled-linear scheduler. The VAE trains
first (its latent std gives `scaling_factor`, as in SD), then UNet and text encoder jointly on the scaled
latents. Each phase checkpoints every --ckpt-every steps into --work and resumes from there when rerun.

    python -m dilatequant.training.sd_training --vae-iters 1500 --unet-iters 4000 --seed 0 --out /tmp/sd-digits
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from ..core.digits import CAPTION_TEMPLATES, IMAGE_SIZE, captions_for, load_digits
from ..core.errors import UserError
from ..core.reporting import atomic_write_bytes, write_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # longest caption is 8 tokens with BOS/EOS; the pipeline pads every prompt to this
CAPTION_DROPOUT = 0.1  # share of empty captions "", the prompt diffusers encodes as the unconditional one
# CLIP's pre-tokenizer: letter runs, single digits, punctuation runs (specials kept whole)
_WORD_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map (the tokenizer's ByteLevel pre-tokenizer uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (CLIP style, "</w>" ends a word) until every given word is one token.

    Ties break on the pair itself, so the same words always give the same merges.
    """
    byte_map = bytes_to_unicode()
    freq = Counter("".join(byte_map[b] for b in w.encode()) for w in words)
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in freq}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for w, s in seqs.items():
            for pair in zip(s, s[1:]):
                counts[pair] += freq[w]
        if not counts:
            return merges
        pair = max(counts, key=lambda p: (counts[p], p))
        merges.append(pair)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out


def build_vocabulary(texts: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary: 256 byte characters, the same with "</w>", the merged pieces, BOS, EOS.

    The byte characters keep every prompt encodable (unknown words split into letters).
    """
    words = [w for t in texts for w in _WORD_RE.findall(t.lower())]
    merges = learn_bpe(words)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def write_vocabulary(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    """vocab.json + merges.txt in the format CLIPTokenizer reads (merges.txt starts with a version line)."""
    vocab_file = atomic_write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    merges_file = atomic_write_bytes(folder / "merges.txt", merges_text.encode())
    return vocab_file, merges_file


def make_tokenizer(folder: Path):
    """A CLIPTokenizer over a vocabulary learned from all captions, its files written to `folder`."""
    from transformers import CLIPTokenizer

    texts = [c for d in range(10) for c in captions_for(d)]
    vocab_file, merges_file = write_vocabulary(folder, *build_vocabulary(texts))
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Exactly what StableDiffusionPipeline.encode_prompt does with a prompt (and with "" for the negative)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@dataclass(frozen=True)
class SDTrainConfig:
    """Everything that determines the result; a resumed run must match the checkpoint's config."""

    seed: int = 0
    vae_iters: int = 1500
    unet_iters: int = 4000
    batch: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    kl_weight: float = 1e-4
    ema_decay: float = 0.999
    text_hidden: int = 64
    unet_channels: tuple[int, ...] = (32, 64, 64)

    def vae_settings(self) -> dict:
        """What the VAE phase depends on (changing only UNet settings keeps a finished VAE)."""
        return {k: getattr(self, k) for k in ("seed", "vae_iters", "batch", "vae_lr", "kl_weight")}


def new_text_encoder(cfg: SDTrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def new_vae():
    """1x32x32 in [-1, 1] <-> 4x8x8 latents (three encoder blocks: two downsamplings), 0.57 M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=IMAGE_SIZE, layers_per_block=1,
        block_out_channels=(32, 48, 48), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def new_unet(cfg: SDTrainConfig):
    """SD 1.x's layout shrunk: cross-attention at 8x8 and 4x4, plain ResNets at 2x2, a cross-attention mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, norm_num_groups=16, attention_head_dim=4,
        cross_attention_dim=cfg.text_hidden,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def sd_scheduler_config() -> dict:
    """SD 1.x's noise schedule: 1000 scaled-linear betas 0.00085..0.012, epsilon prediction."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                skip_prk_steps=True)


_DDPM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample")


def _cosine(iters: int, warmup: int = 100) -> Callable[[int], float]:
    return lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))


class Checkpoint:
    """One phase's training state in `work/<phase>.pt`, written atomically every `every` steps."""

    def __init__(self, work: Path, phase: str, settings: dict, every: int):
        self.path, self.settings, self.every = work / f"{phase}.pt", json.dumps(settings, sort_keys=True), every

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        if state["config"] != self.settings:
            raise UserError(f"checkpoint {self.path} was made with other settings ({state['config']}); "
                            "rerun with those settings or pass a new --work folder")
        return state

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save({**state, "config": self.settings}, buf)
        atomic_write_bytes(self.path, buf.getvalue())


def _loop(name: str, iters: int, ckpt: Checkpoint, modules: torch.nn.Module, opt, sched, gen: torch.Generator,
          step_fn: Callable[[], torch.Tensor], ema: torch.nn.Module | None, ema_decay: float) -> dict:
    """A resumable training loop: restore, step, checkpoint; returns losses and wall time."""
    state = ckpt.load()
    step, losses, wall = 0, [], 0.0
    if state is not None:
        modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, losses, wall = state["step"], state["losses"], state["wall_s"]
        print(f"{name}: resumed at step {step}/{iters}", flush=True)

    def snapshot() -> dict:
        s = {"modules": modules.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "gen": gen.get_state(), "step": step, "losses": losses, "wall_s": wall + time.time() - start}
        return s | ({"ema": ema.state_dict()} if ema is not None else {})

    start = time.time()
    bar = tqdm(range(step, iters), desc=name, initial=step, total=iters, mininterval=10)
    for step in bar:
        loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(modules.parameters()), 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % ckpt.every == 0 or step + 1 == iters:
            step += 1  # the state after this step
            ckpt.save(snapshot())
    if state is not None and state["step"] >= iters:
        print(f"{name}: already complete in {ckpt.path}", flush=True)
    return {"losses": losses, "wall_s": round(wall + time.time() - start, 1)}


def train_vae(cfg: SDTrainConfig, images: torch.Tensor, ckpt: Checkpoint):
    """Reconstruction (MSE) + a small KL, as SD's VAE without the perceptual and GAN terms."""
    vae = new_vae()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.vae_iters))

    def step() -> torch.Tensor:
        x = images[torch.randint(0, len(images), (cfg.batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        return torch.nn.functional.mse_loss(rec.float(), x) + cfg.kl_weight * kl

    log = _loop("vae", cfg.vae_iters, ckpt, vae, opt, sched, gen, step, None, 0.0)
    return vae.eval().requires_grad_(False), log


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (UNet training samples latents from them, as SD does)."""
    means, stds = [], []
    for chunk in images.split(batch):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_quality(vae, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Reconstruction PSNR and classifier accuracy on held-out digits: the ceiling for generated samples."""
    from ..core.digit_classifier import classify
    from ..core.metrics import psnr_db

    rec = torch.cat([vae.decode(m).sample for m in encode_all(vae, images)[0].split(500)]).clamp(-1, 1)
    acc = (classify(rec)[1].argmax(-1) == labels).double().mean().item()
    return {"held_out_reconstruction_psnr_db": round(psnr_db(rec, images), 2),
            "held_out_reconstruction_classifier_accuracy": round(acc, 4)}


def train_unet(cfg: SDTrainConfig, latents: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
               tokenizer, ckpt: Checkpoint):
    """UNet and text encoder together on scaled VAE latents; 10% empty captions for classifier-free guidance.

    The text encoder trains jointly because there is no pretrained one to freeze: a frozen random encoder
    would hand the UNet unrelated vectors for "seven" and "7" and leave it all the work of equating them.
    """
    from diffusers import DDPMScheduler

    mean, std = latents
    unet, text_encoder = new_unet(cfg), new_text_encoder(cfg, tokenizer)
    noise_sched = DDPMScheduler(**{k: sd_scheduler_config()[k] for k in _DDPM_KEYS})
    # token ids of every (digit, phrasing) pair, and of the empty prompt
    caption_ids = torch.stack([tokenize(tokenizer, captions_for(d)) for d in range(10)])
    empty_ids = tokenize(tokenizer, [""])[0]
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(modules).requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.unet_iters))
    num_t = noise_sched.config.num_train_timesteps

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(labels), (cfg.batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        phrasing = torch.randint(0, caption_ids.shape[1], (cfg.batch,), generator=gen)
        ids = caption_ids[labels[idx], phrasing]
        drop = torch.rand(cfg.batch, generator=gen) < CAPTION_DROPOUT
        ids = torch.where(drop[:, None], empty_ids[None], ids)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, num_t, (cfg.batch,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cond = text_encoder(ids)[0]
            pred = unet(zt, t, encoder_hidden_states=cond).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)

    log = _loop("unet", cfg.unet_iters, ckpt, modules, opt, sched, gen, step, ema, cfg.ema_decay)
    return ema[0].eval(), ema[1].eval(), log


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, vocabulary: Path) -> None:
    """StableDiffusionPipeline.save_pretrained into a temporary folder, then renamed into place.

    The tokenizer folder also gets vocab.json + merges.txt, as SD 1.x ships them, for tools that read those.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocabulary / name, tmp / "tokenizer" / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _versions() -> dict:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.platform()}


def _loss_curve(losses: list[float], every: int = 100) -> list[float]:
    return [round(sum(losses[i:i + every]) / len(losses[i:i + every]), 5) for i in range(0, len(losses), every)]


def phase_record(iters: int, log: dict, module: torch.nn.Module) -> dict:
    """What training.json records of one phase: iterations, wall time, final loss, loss curve, parameters."""
    return {"iters": iters, "wall_s": log["wall_s"],
            "final_loss_mean_last_200": sum(log["losses"][-200:]) / max(1, len(log["losses"][-200:])),
            "loss_every_100": _loss_curve(log["losses"]), "parameters": sum(p.numel() for p in module.parameters())}


def train(cfg: SDTrainConfig, out: Path, work: Path, threads: int, ckpt_every: int) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    tokenizer = make_tokenizer(work / "vocabulary")

    torch.manual_seed(cfg.seed)
    vae, vae_log = train_vae(cfg, data.train_images, Checkpoint(work, "vae", cfg.vae_settings(), ckpt_every))
    mean, std = encode_all(vae, data.train_images)
    # SD's scaling_factor: unit-variance latents for the diffusion model
    latent_std = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))).std().item()
    vae.register_to_config(scaling_factor=1.0 / latent_std)
    scale = vae.config.scaling_factor
    vae_scores = vae_quality(vae, data.test_images, data.test_labels)
    print("vae:", vae_scores, "scaling_factor", round(scale, 5), flush=True)

    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder, unet_log = train_unet(cfg, (mean * scale, std * scale), data.train_labels, tokenizer,
                                              Checkpoint(work, "unet", asdict(cfg), ckpt_every))
    save_pipeline(out, vae, text_encoder, tokenizer, unet, work / "vocabulary")
    record = {
        "command": "python -m dilatequant.training.sd_training " + " ".join(sys.argv[1:]),
        "config": asdict(cfg), "threads": threads, "train_images": len(data.train_labels),
        "seeds": {"torch.manual_seed (init)": cfg.seed, "vae data/noise generator": cfg.seed,
                  "unet init": cfg.seed + 1, "unet data/noise generator": cfg.seed + 1},
        "captions": {"templates": list(CAPTION_TEMPLATES), "dropout_to_empty": CAPTION_DROPOUT,
                     "model_max_length": MODEL_MAX_LENGTH, "vocab_size": len(tokenizer)},
        "text_encoder": "trained jointly with the UNet (no pretrained encoder exists to freeze); EMA weights shipped",
        "vae": {**phase_record(cfg.vae_iters, vae_log, vae), "scaling_factor": scale, **vae_scores},
        "unet": {**phase_record(cfg.unet_iters, unet_log, unet),
                 "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters())},
        "versions": _versions(),
    }
    write_json(out / "training.json", record)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SDTrainConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-iters", type=int, default=d.vae_iters)
    p.add_argument("--unet-iters", type=int, default=d.unet_iters)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--unet-lr", type=float, default=d.unet_lr)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--unet-channels", type=int, nargs=3, default=list(d.unet_channels))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between resumable checkpoints")
    p.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and vocabulary (default: <out>.work)")
    a = p.parse_args()
    for name in ("vae_iters", "unet_iters", "batch", "ckpt_every"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1 (got {getattr(a, name)})")
    cfg = SDTrainConfig(seed=a.seed, vae_iters=a.vae_iters, unet_iters=a.unet_iters, batch=a.batch, vae_lr=a.vae_lr,
                        unet_lr=a.unet_lr, kl_weight=a.kl_weight, ema_decay=a.ema_decay,
                        unet_channels=tuple(a.unet_channels))
    try:
        rec = train(cfg, a.out, a.work or a.out.with_name(a.out.name + ".work"), a.threads, a.ckpt_every)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({k: v for k, v in rec.items() if k not in ("vae", "unet")} |
                     {p: {k: v for k, v in rec[p].items() if k != "loss_every_100"} for p in ("vae", "unet")}, indent=2))


if __name__ == "__main__":
    main()
