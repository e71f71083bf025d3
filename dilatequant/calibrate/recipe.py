"""DilateQuant end to end: wrap -> scale (WD / SmoothQuant) -> initialise quantizers -> distill."""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from ..core.device import AUTOCAST, resolve_device
from ..core.errors import UserError
from ..core.metrics import mse, sqnr_db
from ..core.models import load_model, make_prompt_bank
from ..core.prompts import calibration_prompts
from ..core.reporting import ensure_writable_dir, environment, peak_gpu_mb, peak_rss_mb, return_free_memory
from ..core.sampling import SamplingSchedule, default_guidance
from ..core.schedulers import PIPELINE, check_name, config_json, describe
from .calibration_data import (SAMPLE_BATCH, CalibrationSet, build_calibration_sets, calibration_setting,
                               model_fingerprint, trajectory_count, validation_size)
from .checkpoint import save_checkpoint
from .distill import distill, fp_runner, quant_runner, remove_progress
from .distill_config import DistillConfig
from .distributed import SINGLE, AgreedError, Dist
from .quant_config import QuantConfig
from .quant_unet import QuantUNet
from .weight_dilation import dilate, dilation_scales, scale_weight, smoothquant_scales


@torch.no_grad()
def input_channel_absmax(qunet: QuantUNet, data: CalibrationSet, batch: int = 64) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every input group over the calibration set (for SmoothQuant)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    layers = qunet.layers()
    for g in qunet.groups:
        q = qunet.act_quantizers[g.key]

        def pre(mod, args, key=g.key, dim=q.channel_dim):
            x = args[0].detach().abs()
            x = x.movedim(dim, -1).reshape(-1, x.shape[dim]).amax(0)
            out[key] = torch.maximum(out[key], x) if key in out else x

        hooks.append(layers[g.layers[0]].register_forward_pre_hook(pre))
    qunet.set_quant(weights=False, acts="off")
    try:
        for chunk in tqdm(data.chunks(batch), desc="channel ranges", total=-(-len(data) // batch), leave=False,
                          mininterval=2):
            quant_runner(qunet)(chunk)
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def apply_scaling(qunet: QuantUNet, data: CalibrationSet | None = None) -> dict:
    """Multiply weights by s per input channel; put 1/s into the norm before (exact) or the input quantizer."""
    cfg = qunet.config
    if cfg.scaling == "none":
        return {"scaling": "none"}
    absmax = input_channel_absmax(qunet, data) if cfg.scaling == "smoothquant" else {}
    layers, modules = qunet.layers(), dict(qunet.unet.named_modules())
    folded, stats = 0, []
    for g in qunet.groups:
        weights = [layers[n].weight for n in g.layers]
        if cfg.scaling == "dilation":
            s = dilation_scales(weights, cap=cfg.cap)
            for n in g.layers:
                layers[n].weight.copy_(dilate(layers[n].weight, s))
        else:
            s = smoothquant_scales(weights, absmax[g.key], cfg.smoothquant_alpha)
            for n in g.layers:
                layers[n].weight.copy_(scale_weight(layers[n].weight, s))
        stats.append(s.mean().item())
        if g.fold_norm is not None:
            norm = modules[g.fold_norm]
            norm.weight.div_(s)
            norm.bias.div_(s)
            folded += 1
        else:
            qunet.act_quantizers[g.key].inv_scale.copy_(1.0 / s)
    return {"scaling": cfg.scaling, "groups": len(qunet.groups), "folded_into_norms": folded,
            "mean_scale": sum(stats) / len(stats)}


@torch.no_grad()
def init_weight_scales(qunet: QuantUNet) -> None:
    """Weight scales by MSE search, layer by layer."""
    for layer in tqdm(qunet.layers().values(), desc="weight scales", leave=False, mininterval=2):
        layer.weight_quantizer.init_from(layer.weight)


@torch.no_grad()
def observe_activations(qunet: QuantUNet, data: CalibrationSet, batch: int = 64, dist: Dist = SINGLE) -> None:
    """Run the calibration set through the model; every activation quantizer keeps per-timestep samples.

    Distributed: each rank runs a contiguous range of the chunks and steps its quantizers' reservoir draws
    past the others' (skip_chunk), then the statistics of all ranks merge in chunk order: the same
    statistics, hence the same TPQ tables, as one process."""
    if not dist.enabled:
        qunet.set_quant(weights=True, acts="observe")
        for chunk in tqdm(data.chunks(batch), desc="observe activations", total=-(-len(data) // batch), leave=False,
                          mininterval=2):
            quant_runner(qunet)(chunk)
        return
    qunet.set_quant(weights=True, acts="probe")  # each quantizer's calls and per-sample shapes, from one row
    for q in qunet.act_quantizers.values():
        q.probed = []
    quant_runner(qunet)(data.inputs(slice(0, 1)))
    qunet.set_quant(weights=True, acts="observe")
    mine = dist.shard(-(-len(data) // batch))
    for c, chunk in enumerate(tqdm(data.chunks(batch), desc="observe activations", total=-(-len(data) // batch),
                                   leave=False, mininterval=2, disable=not dist.is_main)):
        for q in qunet.act_quantizers.values():
            q.chunk = c
            if c not in mine:
                q.skip_chunk(chunk["t_index"])
        if c in mine:
            quant_runner(qunet)(chunk)
    gathered = dist.all_gather({k: q.export_stats() for k, q in qunet.act_quantizers.items()})
    for k, q in qunet.act_quantizers.items():
        q.merge_stats([g[k] for g in gathered])


@torch.no_grad()
def init_act_tables(qunet: QuantUNet) -> None:
    """TPQ initialisation: every quantizer's per-timestep table from what it observed (search vectorised
    per quantizer, timestep_quantizer.choose_ranges), then fake-quant on."""
    for q in tqdm(qunet.act_quantizers.values(), desc="TPQ init", leave=False, mininterval=2):
        q.init_from_observations(qunet.config.act_init)
    qunet.set_quant(weights=True, acts="quant")


def init_quantizers(qunet: QuantUNet, data: CalibrationSet, batch: int = 64) -> None:
    """Weight scales by MSE search; activation tables per timestep from that step's activations."""
    init_weight_scales(qunet)
    observe_activations(qunet, data, batch)
    init_act_tables(qunet)


def init_ptq(qunet: QuantUNet, data: CalibrationSet) -> dict:
    """Scaling (WD / SmoothQuant) and quantizer initialisation of a fresh QuantUNet: the PTQ baselines alone."""
    info = apply_scaling(qunet, data)
    init_quantizers(qunet, data)
    return info


def prepare(unet: torch.nn.Module, config: QuantConfig, data: CalibrationSet) -> tuple[QuantUNet, dict]:
    """A calibrated-but-untrained fake-quant model."""
    qunet = QuantUNet(unet, config)
    return qunet, init_ptq(qunet, data)


def run_fingerprint(source_fingerprint: str, config: QuantConfig, distill_cfg: DistillConfig, data_key: str) -> str:
    """Identifies one calibration run, so --resume refuses a progress file from different settings."""
    text = f"{source_fingerprint}|{config.to_json()}|{sorted(asdict(distill_cfg).items())}|{data_key}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CalibrationJob:
    model: str = "default"
    config: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    calib_samples: int = 512
    bkd: bool = True
    guidance_scale: float | None = None  # None: the model's default (sampling.default_guidance)
    out: Path = Path("q.pt")
    resume: bool = False
    # Stable Diffusion pipelines: calibration prompts (None: the package's default set), negative prompt
    # (the unconditional half of every guided batch) and the image size (H, W) to calibrate at
    prompts: list[str] | None = None
    negative_prompt: str = ""
    resolution: tuple[int, int] | None = None
    # trajectories per sampling batch; None: 250 in one process, an equal share per rank under torchrun (the
    # calibration set is bit-identical to one process's run with the same sample_batch and threads)
    sample_batch: int | None = None
    device: str = "cpu"          # cpu | cuda (under torchrun: each rank's LOCAL_RANK GPU)
    autocast: str = "none"       # none | bf16: BKD's captures and training forwards under bfloat16 autocast
    # fp32 | bf16: the FP teacher of BKD (its block targets) held in bfloat16 and the quantized model wrapped in
    # place: one float32 copy of the UNet instead of two (SDXL: 10.3 + 5.2 GB, not 2 x 10.3). The calibration
    # data and the validation reference still come from the float32 model, before the teacher is made
    teacher_dtype: str = "fp32"
    # the sampler of the calibration trajectories: the one the model is deployed with (core.schedulers: `pipeline`,
    # the folder's own), a name (ddim, euler, euler-a, dpm, ...) or a scheduler instance, with its set_timesteps
    # kwargs (flow matching: sigmas, mu)
    scheduler: str | SchedulerMixin = PIPELINE
    timestep_kwargs: dict | None = None


def check_distributed(job: CalibrationJob, dist: Dist) -> None:
    """Bad distributed input fails on every rank before any work: other settings on some rank, more ranks
    than calibration samples, full-model QAT (not data-parallel)."""
    if not dist.enabled:
        return
    dist.check_same("settings", json.dumps(asdict(job), default=str, sort_keys=True))
    if dist.world > job.calib_samples:
        raise AgreedError(f"world size {dist.world} is larger than the calibration set ({job.calib_samples} samples): "
                        "use fewer processes or more --calib-samples")
    if job.bkd and job.distill.full_model:
        raise AgreedError("--full-qat runs in one process; launch it without torchrun (or drop --full-qat)")


def sample_batch_for(job: CalibrationJob, dist: Dist) -> int:
    if job.sample_batch is not None:
        if job.sample_batch < 1:
            raise UserError(f"--sample-batch must be at least 1, got {job.sample_batch}")
        return job.sample_batch
    if not dist.enabled:
        return SAMPLE_BATCH
    return -(-trajectory_count(job.calib_samples, job.config.num_steps) // dist.world)


def load_calibration_model(job: CalibrationJob):
    """The FP model at the job's resolution, with its calibration prompts encoded (text-conditioned models)."""
    model = load_model(job.model, job.resolution)
    if model.is_text_conditioned:
        model.prompt_bank = make_prompt_bank(model, job.prompts or calibration_prompts(model), job.negative_prompt)
    elif job.prompts is not None:
        raise UserError(f"--prompts needs a Stable Diffusion pipeline folder; '{job.model}' is conditioned on "
                        + ("class labels" if model.is_conditional else "nothing (unconditional)"))
    return model


TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def release_text_encoders(model) -> None:
    """Calibration reads the encoded prompts (model.prompt_bank) only: drop the text encoders (3.3 GB at SDXL)."""
    if model.pipeline is not None:
        for part in ("text_encoder", "text_encoder_2"):
            if getattr(model.pipeline, part, None) is not None:
                setattr(model.pipeline, part, None)


def check_quantizable(unet: torch.nn.Module, config: QuantConfig) -> None:
    """QuantUNet's own checks (unsupported layers, --float-layers) on a meta-device twin: no weights, no time."""
    with torch.device("meta"):
        QuantUNet(type(unet).from_config(unet.config), config, copy_weights=False)


def teacher_copy(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The FP UNet in `dtype`, built tensor by tensor (a deepcopy then .to() would hold a second float32 copy)."""
    with torch.device("meta"):
        teacher = type(unet).from_config(unet.config)
    teacher.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in unet.state_dict().items()},
                            assign=True)
    left = [n for n, t in (*teacher.named_parameters(), *teacher.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"the {dtype} teacher lacks {left[:3]} (not in the UNet's state dict): use --teacher-dtype fp32")
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def noise_error(qunet: QuantUNet, fp_unet: torch.nn.Module, data: CalibrationSet, batch: int = 64,
                dist: Dist = SINGLE) -> dict:
    """Noise-prediction MSE and SQNR of the fake-quant model against FP on the given inputs (distributed: each
    rank a range of the same chunks, gathered in order, so the figures equal one process's).

    The FP reference is the set's fp_output, the UNet's own output for these inputs kept by the sampler, when
    it has one: a validation pass then costs one fake-quant pass, not two (SD 1.5 PTQ: 375 -> 241 s)."""
    def fp_of(i: int, chunk: dict) -> torch.Tensor:
        if data.fp_output is not None:
            return data.fp_output[i * batch:(i + 1) * batch]
        return fp_runner(fp_unet)(chunk).float().cpu()

    total = -(-len(data) // batch)
    mine = dist.shard(total)
    part = [(quant_runner(qunet)(c).cpu(), fp_of(i, c))
            for i, c in enumerate(tqdm(data.chunks(batch), desc="validation", total=total, leave=False,
                                       mininterval=2, disable=not dist.is_main)) if i in mine]
    pairs = [pair for p in dist.all_gather(part) for pair in p] if dist.enabled else part
    q, f = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return {"noise_mse": mse(q, f), "noise_sqnr_db": sqnr_db(q, f)}


class StageTimer:
    """Wall seconds of each named stage, in run order: the summary's `stages` (what a long run spent where)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def run_calibration(job: CalibrationJob, dist: Dist = SINGLE) -> dict:
    """Calibration data -> WD/TPQ init -> BKD (resumable) -> q.pt; returns the run summary.

    Under torchrun (dist) every rank runs this: sampling, observation, validation and BKD are split across
    ranks; rank 0 alone writes q.pt and the progress file."""
    start = time.perf_counter()
    stage = StageTimer()
    torch.manual_seed(job.distill.seed)
    check_distributed(job, dist)
    if isinstance(job.scheduler, str):
        check_name(job.scheduler)
    sample_batch = sample_batch_for(job, dist)
    device = resolve_device(job.device, dist.local_rank)
    if job.autocast not in AUTOCAST:
        raise UserError(f"unknown autocast '{job.autocast}': choose from {', '.join(AUTOCAST)}")
    dist.on_main(lambda: ensure_writable_dir(job.out.parent if str(job.out.parent) else Path(".")))
    if job.teacher_dtype not in TEACHER_DTYPES:
        raise UserError(f"unknown teacher dtype '{job.teacher_dtype}': choose from {', '.join(TEACHER_DTYPES)}")
    with stage("load"):
        model = load_calibration_model(job)
        fingerprint = model.pinned_fingerprint = model_fingerprint(model)
        release_text_encoders(model)
        return_free_memory()
        steps = job.config.num_steps
        schedule = SamplingSchedule.build(model, job.scheduler, steps, job.timestep_kwargs)
        config = job.config
        if len(schedule.timesteps) != steps:  # a sampler that repeats a timestep: one table row per distinct one
            config = replace(config, num_steps=len(schedule.timesteps))
        if job.teacher_dtype == "fp32":
            qunet = QuantUNet(model.unet, config)  # unsupported layers or bad --float-layers fail here, before sampling
            qunet.to(device)
        else:
            check_quantizable(model.unet, config)  # the same failures, on a meta-device copy
        model.unet.to(device)  # the identity on the CPU
    guidance = job.guidance_scale if job.guidance_scale is not None else default_guidance(model)
    if model.is_conditional:
        model.guidance_scale = guidance  # recorded in q.pt: what verify, parity and generate sample with by default
    val_samples = validation_size(job.calib_samples, steps)
    with stage("calibration_data"):  # the validation set is held-out inputs of the same trajectories
        data, val = build_calibration_sets(model, job.calib_samples, steps, val_samples, seed=job.distill.seed,
                                           guidance_scale=guidance, sample_batch=sample_batch, dist=dist,
                                           schedule=schedule)
    if job.teacher_dtype != "fp32":
        with stage("teacher"):
            teacher = teacher_copy(model.unet, TEACHER_DTYPES[job.teacher_dtype])
            qunet = QuantUNet(model.unet, config, copy_weights=False).to(device)
            model.unet = teacher
            return_free_memory()
    with stage("scaling"):
        scaling = apply_scaling(qunet, data)
    with stage("weight_scales"):
        init_weight_scales(qunet)
    with stage("observe_activations"):
        observe_activations(qunet, data, dist=dist)
    with stage("tpq_init"):
        init_act_tables(qunet)
    with stage("validation"):
        before = noise_error(qunet, model.unet, val, dist=dist)
    distilled = {"mode": "none (PTQ)"}
    progress = Path(f"{job.out}.progress")
    if job.bkd:
        data_key = calibration_setting(model, job.calib_samples, steps, job.distill.seed, guidance, sample_batch,
                                       schedule)
        teacher_key = "" if job.teacher_dtype == "fp32" else f"|teacher {job.teacher_dtype}"
        key = run_fingerprint(fingerprint + teacher_key, config, job.distill, data_key)
        with stage("bkd"):
            distilled = distill(qunet, model.unet, data, job.distill, progress_path=progress, resume=job.resume,
                                fingerprint=key, dist=dist, amp=job.autocast)
    after = before  # PTQ: nothing changed since (at SD 1.5 size a pass costs minutes)
    if job.bkd:
        with stage("validation"):
            after = noise_error(qunet, model.unet, val, dist=dist)
    summary = {
        "model": job.model, "bits": config.bits_name, "format": config.format,
        "quant_config": json.loads(config.to_json()),
        "scheduler": {"name": schedule.name, "sampler": describe(schedule.scheduler), "steps": schedule.steps,
                      "timesteps": schedule.timesteps, "config": json.loads(config_json(schedule.scheduler))},
        "calib_samples": job.calib_samples, "guidance": guidance, "bkd": job.bkd, "scaling": scaling,
        "distill": distilled, "pipeline_class": model.pipeline_class, "resolution": list(model.image_size),
        "prompts": model.prompt_bank.prompts if model.prompt_bank else None,
        "val_samples": len(val), "val_before_training": before, "val_after_training": after,
        "stages": stage.seconds, "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": peak_gpu_mb(device), "environment": environment(),
        "world_size": dist.world, "sample_batch": sample_batch, "device": str(device), "autocast": job.autocast,
        "teacher_dtype": job.teacher_dtype,
    }
    with stage("save"):  # its own time lands in the returned summary; q.pt records every stage before it
        dist.on_main(lambda: save_checkpoint(job.out, qunet, model, schedule.timesteps, fingerprint, summary,
                                             schedule, seed=job.distill.seed))
    summary["wall_s"] = round(time.perf_counter() - start, 1)  # the returned wall includes the save, as its stages do
    if dist.is_main:
        remove_progress(progress)
    return summary
