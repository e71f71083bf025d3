"""dq-generate: a prompt through the user's own diffusers pipeline, with the quantized denoiser dropped into it
(`pipe.unet` for Stable Diffusion 1.x/2.x and SDXL, `pipe.transformer` for SD3, FLUX.1 and PixArt-Sigma)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..calibrate.calibration_data import model_fingerprint
from ..core.errors import UserError
from ..core.metrics import psnr_db, ssim
from ..core.models import DiffusionModel, check_size, load_model
from ..core.reporting import atomic_write_bytes
from ..core.schedulers import PIPELINE, describe, resolve_scheduler
from .base import Runner
from .generate_config import GenerateConfig
from .pytorch.diffusers_transformer import QuantizedTransformer
from .pytorch.diffusers_unet import QuantizedUNet
from .runners import open_runner



def check_pairing(model: DiffusionModel, runner: Runner, source: str) -> None:
    """The runtime must come from this pipeline's UNet and encoders, and take its condition inputs."""
    m = runner.metadata
    if not model.is_text_conditioned:
        raise UserError(f"'{model.source}' is not a pipeline folder; dq-generate needs one "
                        "(model_index.json with its denoiser, vae, text encoders, tokenizers, scheduler)")
    if m.pipeline_class and m.pipeline_class != model.pipeline_class:
        raise UserError(f"'{source}' was calibrated on a {m.pipeline_class}, but --model is a {model.pipeline_class}; "
                        "pass the pipeline folder it was calibrated from")
    if tuple(m.cond_inputs) != tuple(model.cond_names) or m.sample_shape[0] != model.sample_shape[0]:
        raise UserError(f"'{source}' takes {list(m.cond_inputs)} and {m.sample_shape[0]} latent channels; the "
                        f"pipeline's {model.family.name} takes {list(model.cond_names)} and {model.sample_shape[0]}: "
                        "pass the pipeline folder it was calibrated from")
    if m.fp_fingerprint and m.fp_fingerprint != model_fingerprint(model):
        raise UserError(f"'{source}' was calibrated on another pipeline's weights than '{model.source}' (FP "
                        "fingerprints differ); pass the pipeline folder it was calibrated from, or calibrate this one")


def _png(images: torch.Tensor) -> bytes:
    """[N, 3, H, W] in [0, 1] -> one PNG, images side by side."""
    import io

    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    strip = np.concatenate(list(arr), axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip if strip.shape[2] == 3 else strip[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def quantized_denoiser(model: DiffusionModel, runner: Runner) -> torch.nn.Module:
    """The runner as the pipeline's own denoiser: pipe.unet or pipe.transformer."""
    if model.is_transformer:
        return QuantizedTransformer(runner, model.denoiser.config, model.pipeline_class)
    return QuantizedUNet(runner, model.denoiser.config)


def pipeline_call_kwargs(model: DiffusionModel) -> dict:
    """What a call of this pipeline needs besides prompts and sizes: the folder's own keywords (SD3's
    max_sequence_length), and PixArt's size as asked (no resolution binning) with captions as written."""
    kwargs = dict(model.pipeline_kwargs)
    if model.pipeline_class == "PixArtSigmaPipeline":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return kwargs


def run_pipeline(model: DiffusionModel, unet, cfg: GenerateConfig, prompts: list[str] | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from the pipeline with `unet` (the denoiser: a UNet or a transformer) in it;
    the pipeline's own is put back. Diffusion transformers sample with their pipeline's own scheduler.

    cfg.prompt gives one image from cfg.seed; `prompts` give one image each, image i from seed cfg.seed + i
    (whatever the batch). Guidance: cfg.guidance, else the model's own (its folder's dilatequant.json), else
    the pipeline's default."""
    pipe = model.pipeline
    slot = "transformer" if model.is_transformer else "unet"
    original, original_sched = getattr(pipe, slot), pipe.scheduler
    h, w = cfg.size or model.image_size
    guidance = cfg.guidance if cfg.guidance is not None else model.guidance_scale
    kwargs = pipeline_call_kwargs(model) | ({} if guidance is None else {"guidance_scale": guidance})
    if prompts is None:
        text, gen = cfg.prompt, torch.Generator().manual_seed(cfg.seed)
    else:
        text, gen = list(prompts), [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
    if model.is_transformer and cfg.scheduler != PIPELINE:
        raise UserError(f"--scheduler {cfg.scheduler}: a {model.pipeline_class} samples with its own scheduler "
                        f"({type(original_sched).__name__}); leave --scheduler out")
    try:
        setattr(pipe, slot, unet)
        pipe.scheduler = resolve_scheduler(model, cfg.scheduler)
        with torch.no_grad():
            if cfg.negative_prompt is not None:  # else the pipeline's own default (PixArt refuses None)
                kwargs["negative_prompt"] = cfg.negative_prompt
            out = pipe(text, num_inference_steps=cfg.steps, height=h, width=w, generator=gen, output_type="pt",
                       **kwargs)
    finally:
        setattr(pipe, slot, original)
        pipe.scheduler = original_sched
    return out.images.float()


def generate(cfg: GenerateConfig) -> dict:
    """Write cfg.out (and, with compare_fp, `<out>-fp.png`, `<out>-side-by-side.png`); return the settings and metrics."""
    runner = open_runner(cfg.runtime, device=cfg.device)
    model = load_model(cfg.model)
    check_pairing(model, runner, str(cfg.runtime))
    if cfg.size is not None:
        check_size(model, cfg.size)
    qunet = quantized_denoiser(model, runner)
    images = run_pipeline(model, qunet, cfg)
    out = Path(cfg.out)
    atomic_write_bytes(out, _png(images))
    result = {"settings": {**asdict(cfg), "out": str(out), "runtime": str(cfg.runtime), "size": list(cfg.size or model.image_size),
                           "sampler": describe(resolve_scheduler(model, cfg.scheduler))},
              "runner": runner.metadata.to_dict(), "denoiser_calls": qunet.calls, "images": {"quantized": str(out)}}
    if cfg.compare_fp:
        fp = run_pipeline(model, model.denoiser, cfg)
        stem = out.with_suffix("")
        atomic_write_bytes(Path(f"{stem}-fp.png"), _png(fp))
        atomic_write_bytes(Path(f"{stem}-side-by-side.png"), _png(torch.cat([fp, images])))
        result["images"].update({"fp": f"{stem}-fp.png", "side_by_side": f"{stem}-side-by-side.png"})
        x, ref = images * 2 - 1, fp * 2 - 1
        result["vs_fp"] = {"image_psnr_db": psnr_db(x, ref),
                           "image_ssim": ssim(x, ref) if min(x.shape[-2:]) >= 11 else None}
    atomic_write_bytes(Path(f"{out}.json"), (json.dumps(result, indent=2, default=str) + "\n").encode())
    return result
