"""dq-generate: a prompt through the user's own diffusers pipeline, with the quantized UNet dropped into it."""
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
from ..core.schedulers import describe, resolve_scheduler
from .base import Runner
from .generate_config import GenerateConfig
from .pytorch.diffusers_unet import QuantizedUNet
from .runners import open_runner

def check_pairing(model: DiffusionModel, runner: Runner, source: str) -> None:
    """The runtime must come from this pipeline's UNet and encoders, and take its condition inputs."""
    m = runner.metadata
    if not model.is_text_conditioned:
        raise UserError(f"'{model.source}' is not a Stable Diffusion pipeline folder; dq-generate needs one "
                        "(model_index.json with unet, vae, text encoders, tokenizers, scheduler)")
    if m.pipeline_class and m.pipeline_class != model.pipeline_class:
        raise UserError(f"'{source}' was calibrated on a {m.pipeline_class}, but --model is a {model.pipeline_class}; "
                        "pass the pipeline folder it was calibrated from")
    if tuple(m.cond_inputs) != tuple(model.cond_names) or m.sample_shape[0] != model.unet.config.in_channels:
        raise UserError(f"'{source}' takes {list(m.cond_inputs)} and {m.sample_shape[0]} latent channels; the "
                        f"pipeline's UNet takes {list(model.cond_names)} and {model.unet.config.in_channels}: "
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


def run_pipeline(model: DiffusionModel, unet, cfg: GenerateConfig, prompts: list[str] | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from the pipeline with `unet` in it; the pipeline's UNet is put back.

    cfg.prompt gives one image from cfg.seed; `prompts` give one image each, image i from seed cfg.seed + i
    (whatever the batch). Guidance: cfg.guidance, else the model's own (its folder's dilatequant.json), else
    the pipeline's default."""
    pipe = model.pipeline
    original, original_sched = pipe.unet, pipe.scheduler
    h, w = cfg.size or model.image_size
    guidance = cfg.guidance if cfg.guidance is not None else model.guidance_scale
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    if prompts is None:
        text, gen = cfg.prompt, torch.Generator().manual_seed(cfg.seed)
    else:
        text, gen = list(prompts), [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
    try:
        pipe.unet, pipe.scheduler = unet, resolve_scheduler(model, cfg.scheduler)
        with torch.no_grad():
            out = pipe(text, negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.steps, height=h,
                       width=w, generator=gen, output_type="pt", **kwargs)
    finally:
        pipe.unet, pipe.scheduler = original, original_sched
    return out.images.float()


def generate(cfg: GenerateConfig) -> dict:
    """Write cfg.out (and, with compare_fp, `<out>-fp.png`, `<out>-side-by-side.png`); return the settings and metrics."""
    runner = open_runner(cfg.runtime, device=cfg.device)
    model = load_model(cfg.model)
    check_pairing(model, runner, str(cfg.runtime))
    if cfg.size is not None:
        check_size(model, cfg.size)
    qunet = QuantizedUNet(runner, model.unet.config)
    images = run_pipeline(model, qunet, cfg)
    out = Path(cfg.out)
    atomic_write_bytes(out, _png(images))
    result = {"settings": {**asdict(cfg), "out": str(out), "runtime": str(cfg.runtime), "size": list(cfg.size or model.image_size),
                           "sampler": describe(resolve_scheduler(model, cfg.scheduler))},
              "runner": runner.metadata.to_dict(), "unet_calls": qunet.calls, "images": {"quantized": str(out)}}
    if cfg.compare_fp:
        fp = run_pipeline(model, model.unet, cfg)
        stem = out.with_suffix("")
        atomic_write_bytes(Path(f"{stem}-fp.png"), _png(fp))
        atomic_write_bytes(Path(f"{stem}-side-by-side.png"), _png(torch.cat([fp, images])))
        result["images"].update({"fp": f"{stem}-fp.png", "side_by_side": f"{stem}-side-by-side.png"})
        x, ref = images * 2 - 1, fp * 2 - 1
        result["vs_fp"] = {"image_psnr_db": psnr_db(x, ref),
                           "image_ssim": ssim(x, ref) if min(x.shape[-2:]) >= 11 else None}
    atomic_write_bytes(Path(f"{out}.json"), (json.dumps(result, indent=2, default=str) + "\n").encode())
    return result
