"""q.pt: everything needed to rebuild the fake-quant model, loadable with weights_only=True.

Layout (a plain dict of str/int/float/list/tensor): format, version, base model (class, config,
source, FP weight fingerprint), quantization config, sampling schedule (the model's scheduler config, and the
sampler the calibration trajectories came from: its class and whole config, the steps it was set to, T and the
timesteps in order - what each t_index means, floats where the sampler's are), the QuantUNet state dict (dilated weights, weight
scales, 1/s vectors, TPQ tables, folded norms), the class encoder or, for Stable Diffusion pipelines,
the pipeline class, resolution and the encoded calibration prompts, and a calibration summary.

Memory (an SD 1.5 UNet is 3.4 GB of float32): save streams torch.save into the file (no in-memory copy of the
payload), load memory-maps it and builds the model on the meta device, so the loaded tensors are the file's
pages rather than a second copy (benchmarks/checkpoint_memory.py).

Version 2 added the sampler's class and config (`schedule.sampler_config`); a version 1 file was calibrated with
DDIMScheduler.from_config(its scheduler_config), which is what it loads as.
"""
from __future__ import annotations

import functools
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..core.denoisers import model_class
from ..core.errors import UserError
from ..core.models import ClassTokenEncoder, DiffusionModel, PromptBank, load_model
from ..core.reporting import atomic_write_stream, own_storage
from ..core.sampling import STEP_NOISE_RULE, SamplingSchedule, timestep_value
from ..core.schedulers import PIPELINE, config_json, from_config_json, scheduler_class
from .quant_config import QuantConfig
from .quant_unet import QuantUNet

FORMAT = "dilatequant.q.pt"
VERSION = 2


@dataclass
class QuantCheckpoint:
    qunet: QuantUNet
    model: DiffusionModel      # the FP architecture with the checkpoint's class encoder and scheduler
    timesteps: list[int | float]  # t_index i <-> timesteps[i]
    source: str
    source_fingerprint: str
    summary: dict
    schedule: SamplingSchedule  # the sampler the calibration trajectories came from
    path: Path | None = None   # the q.pt it was read from

    @functools.cached_property
    def sha256(self) -> str:
        """The q.pt file's SHA-256 (what an exported graph records as its source), read once per object."""
        if self.path is None:
            raise ValueError("this checkpoint was not read from a file: no SHA-256 to give")
        return checkpoint_hash(self.path)


def _config_json(cfg) -> str:
    """A diffusers config as JSON; where it was loaded from is not part of it."""
    data = {k: v for k, v in dict(cfg).items() if k != "_name_or_path"}
    return json.dumps(data, default=lambda o: str(o) if isinstance(o, Path) else list(o), sort_keys=True)


def save_checkpoint(path: str | Path, qunet: QuantUNet, model: DiffusionModel, timesteps: list[int | float],
                    source_fingerprint: str, summary: dict, schedule: SamplingSchedule | None = None,
                    seed: int | None = None) -> Path:
    """schedule: the sampler of the calibration trajectories (default: the model's own at len(timesteps) steps);
    seed: theirs (initial noise, and the step noise of stochastic samplers)."""
    if len(timesteps) != qunet.config.num_steps:
        raise ValueError(f"{len(timesteps)} timesteps for a model calibrated on {qunet.config.num_steps} steps")
    schedule = schedule or SamplingSchedule.build(model, PIPELINE, len(timesteps))
    if [timestep_value(t) for t in timesteps] != schedule.timesteps:
        raise ValueError(f"timesteps {list(timesteps)[:4]}... are not the schedule's {schedule.timesteps[:4]}...")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": {
            "unet_class": type(qunet.unet).__name__,
            "unet_config": _config_json(qunet.unet.config),
            "source": model.source,
            "fp_fingerprint": source_fingerprint,
            "class_encoder_config": _config_json(model.class_encoder.config) if model.class_encoder else "",
            "pipeline_class": model.pipeline_class or "",
            "prediction_type": str(model.scheduler.config.get("prediction_type", "epsilon")),
            "vae_scale_factor": int(model.vae_scale_factor),
            "resolution": list(model.image_size),
            "guidance_scale": model.guidance_scale,
        },
        "prompt_bank": model.prompt_bank.to_dict() if model.prompt_bank is not None else {},
        "quant_config": qunet.config.to_json(),
        "schedule": {"scheduler_config": _config_json(model.scheduler.config), "num_steps": len(timesteps),
                     "timesteps": list(schedule.timesteps), "sampler": type(schedule.scheduler).__name__,
                     "sampler_name": schedule.name, "sampler_config": config_json(schedule.scheduler),
                     "inference_steps": schedule.steps, "timestep_kwargs": json.dumps(schedule.timestep_kwargs or {}),
                     "seed": seed, "step_noise": STEP_NOISE_RULE},
        "state_dict": {k: own_storage(v.detach().cpu()) for k, v in qunet.state_dict().items()},
        # buffers a model computes at init and never saves (PixArt's sin-cos position table): the meta-device
        # rebuild of load_checkpoint has no values for them otherwise
        "computed_buffers": {k: own_storage(v.detach().cpu()) for k, v in _computed_buffers(qunet).items()},
        "class_encoder": {k: own_storage(v) for k, v in model.class_encoder.state_dict().items()} if model.class_encoder else {},
        "summary": json.dumps(summary, default=str),
    }
    return atomic_write_stream(path, lambda f: torch.save(payload, f))


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; create one with dq-calibrate --out {path}")
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise UserError(f"'{path}' holds Python objects other than tensors and plain data; refusing to unpickle "
                            "it (only q.pt files written by dq-calibrate load)") from err
        raise UserError(f"'{path}' is not a readable checkpoint (truncated or corrupt: {str(err).splitlines()[0]}); "
                        "re-run dq-calibrate to write it again") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"'{path}' is not a readable checkpoint (truncated or corrupt: {err}); "
                        "re-run dq-calibrate to write it again") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a DilateQuant checkpoint (no '{FORMAT}' format tag); "
                        "pass a q.pt written by dq-calibrate")
    if payload.get("version", 0) > VERSION:
        raise UserError(f"'{path}' is format version {payload['version']}; this dilatequant reads up to {VERSION}: upgrade it")
    return payload


def load_checkpoint(path: str | Path) -> QuantCheckpoint:
    path = Path(path)
    p = _read(path)
    base = p["base_model"]
    try:
        cls = model_class(base["unet_class"])
    except UserError as err:
        raise UserError(f"'{path}' was made from a {base['unet_class']}, which this version cannot rebuild") from err
    config = QuantConfig.from_json(p["quant_config"])
    with torch.device("meta"):  # shapes only: the tensors come from the file, not from a random init
        qunet = QuantUNet(cls.from_config(json.loads(base["unet_config"])), config)
    missing, unexpected = qunet.load_state_dict(p["state_dict"], strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"'{path}' does not match the model it names (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); it was written by an incompatible version")
    _assign_buffers(qunet, p.get("computed_buffers", {}))
    _check_materialized(qunet, path)
    qunet.eval()
    qunet.set_quant(weights=True, acts="quant")
    encoder = None
    if base["class_encoder_config"]:
        encoder = ClassTokenEncoder.from_config(json.loads(base["class_encoder_config"]))
        encoder.load_state_dict(p["class_encoder"])
        encoder.eval()
    sched_config = json.loads(p["schedule"]["scheduler_config"])
    scheduler = (scheduler_class(sched_config.get("_class_name")) or DDPMScheduler).from_config(sched_config)
    model = DiffusionModel(qunet.unet, scheduler, encoder, source=base["source"],
                           pipeline_class=base.get("pipeline_class") or None,
                           vae_scale_factor=int(base.get("vae_scale_factor", 1)),
                           prompt_bank=PromptBank.from_dict(p["prompt_bank"]) if p.get("prompt_bank") else None)
    if base.get("resolution"):
        model.resolution = tuple(int(v) for v in base["resolution"])
    if base.get("guidance_scale") is not None:
        model.guidance_scale = float(base["guidance_scale"])
    return QuantCheckpoint(qunet, model, list(p["schedule"]["timesteps"]), base["source"], base["fp_fingerprint"],
                           json.loads(p["summary"]), _schedule(p["schedule"], sched_config), path)


def _schedule(rec: dict, model_scheduler_config: dict) -> SamplingSchedule:
    """The calibration sampler a q.pt records; version 1 sampled DDIMScheduler.from_config(the model's config)."""
    timesteps = [timestep_value(t) for t in rec["timesteps"]]
    if "sampler_config" not in rec:
        return SamplingSchedule(DDIMScheduler.from_config(model_scheduler_config), len(timesteps), timesteps, "ddim")
    return SamplingSchedule(from_config_json(rec["sampler_config"]), int(rec["inference_steps"]), timesteps,
                            rec.get("sampler_name", PIPELINE), json.loads(rec.get("timestep_kwargs") or "{}") or None)


def _computed_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers: left out of state_dict() by their module."""
    saved = module.state_dict(keep_vars=True)
    return {k: v for k, v in module.named_buffers() if k not in saved}


def _assign_buffers(module: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        target._buffers[attr] = value  # keeps the buffer non-persistent, as the model declared it


def _check_materialized(module: torch.nn.Module, path: Path) -> None:
    """Every tensor came from the file: a meta tensor left over would fail later, far from its cause."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"'{path}' does not hold {left[:3]} ({len(left)} tensors), which this version needs; "
                        "it was written by an incompatible version: re-run dq-calibrate")


def source_model(ck: QuantCheckpoint) -> DiffusionModel:
    """The FP model a checkpoint was calibrated from, conditioned and sized as in calibration.

    A pipeline folder is loaded with its text encoders and VAE; the checkpoint's encoded calibration prompts
    and resolution come along, so FP and fake-quant runs see the same conditions.
    """
    model = load_model(ck.source)
    if ck.model.prompt_bank is not None:
        model.prompt_bank = ck.model.prompt_bank
    if ck.model.resolution is not None:
        model.resolution = ck.model.resolution
    if ck.model.guidance_scale is not None:
        model.guidance_scale = ck.model.guidance_scale
    return model


def checkpoint_hash(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
