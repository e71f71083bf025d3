"""dq-verify: is the deployed runtime as accurate as the PyTorch fake-quant model, and how fast is it?

One run, one device, one process, in steps: the runtime check (it loads and runs the graph), accuracy (per-step
noise SQNR on FP trajectories of the calibrated schedule, images with the sampler the model is deployed with,
digit-FID), teacher-forced layer-wise parity, the cost of sampling with other step counts and samplers than the
calibrated schedule (calibrated with X, run with Y), UNet latency and sampler wall time for the runtime and the
PyTorch baselines, and memory. Every ratio is computed from numbers measured in this run. Output: report.json,
README.md and PNG plots in one folder. The hard checks (the runtime runs the graph; layer-wise parity) make the
run fail (`enforce`, dq-verify's exit status) unless only a report is asked for.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..calibrate.checkpoint import QuantCheckpoint, checkpoint_hash, load_checkpoint
from ..core.errors import CheckFailed, UserError
from ..core.evaluation import fp_trajectories, requested_digits
from ..core.metrics import format_digit_fid, psnr_db, reported_digit_scores, sqnr_db, ssim
from ..core.models import DiffusionModel, load_model
from ..core.reporting import ensure_writable_dir, environment, peak_rss_mb, write_json, write_text
from ..core.sampling import SampleResult, SamplingSchedule, default_guidance, sample, sampling_timesteps
from ..core.schedulers import PIPELINE, check_name, describe, resolve_scheduler, same_scheduler
from ..dq_export.export_config import ExportConfig
from ..dq_export.fold import int4_layers, w4a16_reference
from ..dq_export.layer_parity import layer_parity_report
from . import plots
from .base import Runner
from .onnxruntime.runner import OrtRunner
from .pytorch.runner import TorchRunner
from .runners import ENGINE_SUFFIXES, fp_model_of
from .schedule import ScheduleMapper, map_schedule
from .tensorrt.runner import TensorRTRunner
from .timing import gpu_memory, unet_inputs, unet_latency

DIGIT_SHAPE = (1, 32, 32)  # digit-FID needs images the shipped digit classifier reads


@dataclass
class VerifyConfig:
    ckpt: Path
    runtime: Path                              # unet.onnx or unet.plan
    report_dir: Path = Path("dq-verify")
    batches: tuple[int, ...] = (1, 4, 8)
    device: str = "cpu"
    num_samples: int = 16                      # images per runtime
    steps: int | None = None                   # sampling steps for the images (default: the calibrated count)
    scheduler: str = PIPELINE                  # what images run with: the model's own sampler, or a name (ddim, ...)
    mapped_steps: tuple[int, ...] | None = None  # other step counts for the schedule-mapping cost (default T/2, 2T)
    traj_samples: int = 4                      # FP trajectories for the per-step SQNR
    warmup: int = 3
    repeats: int = 20
    seed: int = 0
    guidance: float | None = None  # None: what q.pt was calibrated at (sampling.default_guidance)
    model: str | None = None                   # FP model (default: the one the checkpoint names)
    threads: int = 0                           # ONNX Runtime intra-op threads (0: same as torch)
    compile: bool = True                       # torch.compile baseline on CUDA
    layer_per_step: int = 2                    # calibration inputs per t_index for the layer-wise parity (0: skip)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise UserError(f"--batch must list positive batch sizes, got {list(self.batches)}")
        if self.num_samples < 1 or self.traj_samples < 1:
            raise UserError("--samples must be >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError("--repeats must be >= 1 and --warmup >= 0")
        for s in ([self.steps] if self.steps else []) + list(self.mapped_steps or ()):
            if s < 1:
                raise UserError(f"step counts must be >= 1, got {s}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"unknown device '{self.device}': choose cpu or cuda")
        check_name(self.scheduler)


def open_runtime(path: Path, device: str, threads: int) -> Runner:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtRunner(path, "cpu" if device == "cpu" else "cuda", threads)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(path)
    raise UserError(f"'{path}' is neither an ONNX graph (.onnx) nor a TensorRT engine ({'/'.join(ENGINE_SUFFIXES)}); "
                    "pass --onnx unet.onnx or --engine unet.plan")


def _check_pairing(runtime: Runner, ck, ckpt: Path) -> None:
    if list(runtime.metadata.timesteps) != list(ck.timesteps):
        raise UserError(f"'{runtime.metadata.name}' was exported for timesteps {list(runtime.metadata.timesteps)[:4]}... "
                        f"but '{ckpt}' is calibrated for {ck.timesteps[:4]}...; pass the q.pt it was exported from")
    if runtime.metadata.sample_shape != tuple(ck.model.sample_shape):
        raise UserError(f"runtime sample shape {runtime.metadata.sample_shape} != checkpoint's "
                        f"{tuple(ck.model.sample_shape)}; pass the q.pt it was exported from")


def per_step_errors(fp: Runner, fq: Runner, rt: Runner, traj: SampleResult) -> list[dict]:
    """SQNR of runtime vs fake-quant, runtime vs FP and fake-quant vs FP on the FP trajectory's inputs."""
    tr = traj.trajectory
    rows = []
    for i in range(tr.sample.shape[0]):
        args = (tr.sample[i], tr.timestep[i], tr.t_index[i], tr.step_cond(i))
        ref, q, r = fp(*args), fq(*args), rt(*args)
        rows.append({"t_index": i, "timestep": int(tr.timestep[i][0]),
                     "runtime_vs_fake_quant_sqnr_db": sqnr_db(r, q), "runtime_vs_fp_sqnr_db": sqnr_db(r, ref),
                     "fake_quant_vs_fp_sqnr_db": sqnr_db(q, ref),
                     "runtime_vs_fake_quant_max_abs": (r - q).abs().max().item()})
    return rows


def _image_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR, and SSIM where the images are at least its 11x11 window (None below)."""
    return {"image_psnr_db": psnr_db(x, ref), "image_ssim": ssim(x, ref) if min(x.shape[-2:]) >= 11 else None}


def _digits(images: torch.Tensor, labels, model: DiffusionModel | None = None) -> dict:
    """Digit metrics with their sample count; digit-FID only from metrics.FID_MIN_SAMPLES images, with its spread."""
    shape = tuple(images.shape[1:])
    if shape != DIGIT_SHAPE:
        return {"skipped": f"digit-FID needs {DIGIT_SHAPE} images, model makes {shape}"}
    if model is not None:
        labels = requested_digits(model, labels)  # prompts: the digit each asked for
    s = reported_digit_scores(images, labels)
    keys = ("num_samples", "digit_fid", "digit_fid_spread", "digit_fid_note", "classifier_mean_confidence",
            "class_accuracy")
    return {k: s[k] for k in keys if k in s}


def _weight_bytes(path: Path) -> int:
    """Bytes on disk of a graph or engine, external ONNX data files included."""
    total = path.stat().st_size
    if path.suffix.lower() == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return total


FP_AGREEMENT_DB = 0.1  # runtime and fake-quant: the same per-step SQNR against FP, to this much at every step


def fp_agreement(rows: list[dict]) -> dict:
    """End to end, what can hold: runtime and fake-quant are equally far from FP at every step (their per-step
    SQNR against FP within FP_AGREEMENT_DB), even where a flipped rounding tie separates the two outputs."""
    gaps = [abs(r["runtime_vs_fp_sqnr_db"] - r["fake_quant_vs_fp_sqnr_db"]) for r in rows]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    return {"max_sqnr_gap_db": gaps[worst], "worst_t_index": rows[worst]["t_index"], "threshold_db": FP_AGREEMENT_DB,
            "within": gaps[worst] <= FP_AGREEMENT_DB}


def _runtime_props(path: Path) -> dict[str, str]:
    """The graph's dilatequant.* metadata (an engine's sidecar holds its ONNX's verbatim)."""
    import onnx

    if path.suffix.lower() == ".onnx":
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    side = Path(f"{path}.json")
    return json.loads(side.read_text()).get("metadata", {}) if side.is_file() else {}


def _configure_reference(ck, runtime: Path) -> list[str]:
    """An INT4 graph runs its 4-bit GEMMs weight-only: the fake-quant reference passes their inputs through too."""
    props = _runtime_props(runtime)
    if props.get("dilatequant.precision") != "int4":
        return []
    recorded = props.get("dilatequant.int4_layers")  # graphs exported before it was recorded: the default blocks
    names = json.loads(recorded) if recorded else int4_layers(ck.qunet, ExportConfig().int4_block)
    w4a16_reference(ck.qunet, names)
    return names


def _layer_parity(cfg: VerifyConfig, ck, rt: Runner, weight_only: list[str], fp_model) -> dict:
    """Teacher-forced layer-wise parity of the runtime (dq_export/layer_parity.py); reported, not enforced here."""
    if cfg.layer_per_step < 1:
        return {"skipped": "--layer-per-step 0"}
    graph, factory = Path(cfg.runtime), None
    if isinstance(rt, TensorRTRunner):  # the engine's own source graph, run as per-layer subgraphs on TensorRT
        from .tensorrt.layer_runner import trt_layer_runner

        graph = Path(json.loads(Path(f"{cfg.runtime}.json").read_text()).get("built_onnx", ""))
        if not graph.is_file():
            return {"skipped": f"the engine's source graph '{graph}' is not here (the sidecar's built_onnx)"}
        factory = trt_layer_runner
    kw = {"runner_factory": factory} if factory else {}
    try:
        return layer_parity_report(graph, ck, per_step=cfg.layer_per_step, weight_only=tuple(weight_only),
                                   fp_model=fp_model, **kw)
    except UserError as err:
        return {"error": str(err), "passed": False}


@dataclass
class VerifySession:
    """What every step of a dq-verify run reads: the checkpoint, the opened runtime, the models and runners, and
    the samplers (calibrated with X, run with Y)."""

    cfg: VerifyConfig
    ck: QuantCheckpoint
    rt: Runner
    fp_model: DiffusionModel
    img_model: DiffusionModel      # text models sample latents; the FP model's pipeline decodes every runner's alike
    fp: TorchRunner
    fq: TorchRunner
    run_scheduler: SchedulerMixin  # Y: what the images, the step-count table and the sampler timing run with
    steps: int                     # image steps (default: the calibrated count)
    mapped: list[int]              # other step counts of the schedule table
    threads: int
    weight_only: list[str]
    rss_after_load: float = 0.0

    @property
    def calibrated(self) -> SamplingSchedule:
        return self.ck.schedule

    def mapped_predictor(self, runner: Runner) -> ScheduleMapper:
        return ScheduleMapper(runner, self.ck.timesteps)

    def sample(self, runner: Runner, steps: int, labels=None, scheduler: SchedulerMixin | None = None) -> SampleResult:
        model = self.fp_model if runner is self.fp else self.img_model
        guidance = self.cfg.guidance if model.is_conditional else 1.0
        return sample(model, self.mapped_predictor(runner), num_samples=self.cfg.num_samples, steps=steps,
                      seed=self.cfg.seed, labels=labels, guidance_scale=guidance, batch_size=max(self.cfg.batches),
                      progress=False, scheduler=scheduler or self.run_scheduler)


def open_session(cfg: VerifyConfig, fp_model: DiffusionModel | None = None) -> VerifySession:
    cfg.check()
    ensure_writable_dir(cfg.report_dir)
    ck = load_checkpoint(cfg.ckpt)
    threads = cfg.threads or torch.get_num_threads()
    rt = open_runtime(Path(cfg.runtime), cfg.device, threads)
    _check_pairing(rt, ck, cfg.ckpt)
    fp_model = fp_model or (load_model(cfg.model) if cfg.model else fp_model_of(ck))
    S = ck.schedule.steps
    mapped = list(cfg.mapped_steps if cfg.mapped_steps is not None else sorted({max(1, S // 2), 2 * S}))
    weight_only = _configure_reference(ck, Path(cfg.runtime))  # INT4 graphs: W4A16 layers read float inputs
    fq = TorchRunner.from_checkpoint(ck, cfg.device)
    fp = TorchRunner.fp(fp_model, ck.timesteps, cfg.device)
    guidance = (cfg.guidance if cfg.guidance is not None else default_guidance(ck.model)) if ck.model.is_conditional else 1.0
    return VerifySession(replace(cfg, guidance=guidance), ck, rt, fp_model,
                         fp_model if ck.model.is_text_conditioned else ck.model, fp, fq,
                         resolve_scheduler(fp_model, cfg.scheduler), cfg.steps or S, mapped, threads, weight_only)


def check_runtime_runs(s: VerifySession) -> None:
    """Hard check: the runtime loads the graph and runs one call. It fails the run in every mode (--report-only
    too): nothing else can be measured."""
    cond = s.ck.model.condition(torch.zeros(1, dtype=torch.long)) if s.ck.model.is_conditional else None
    try:
        s.rt.activate()
        s.rt(*unet_inputs(s.rt, 1, cond=cond))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the runtime raises is the finding
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckFailed(f"runtime check FAILED: {s.rt.metadata.name} cannot run '{s.cfg.runtime}' "
                          f"({type(err).__name__}: {first})") from err


def accuracy_step(s: VerifySession) -> tuple[dict, dict[str, SampleResult]]:
    """Per-step noise SQNR on FP trajectories of the calibrated schedule (exact t_index), and images with Y."""
    cal = s.calibrated
    traj = fp_trajectories(s.fp_model, cal.steps, s.cfg.seed, s.cfg.guidance, s.cfg.traj_samples,
                           scheduler=cal.scheduler, timestep_kwargs=cal.timestep_kwargs)
    rows = per_step_errors(s.fp, s.fq, s.rt, traj)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    images = {"fp": s.sample(s.fp, s.steps)}
    labels = images["fp"].labels
    images["fake_quant"] = s.sample(s.fq, s.steps, labels)
    images["runtime"] = s.sample(s.rt, s.steps, labels)
    accuracy = {
        "trajectory_samples": s.cfg.traj_samples, "image_steps": s.steps, "num_samples": s.cfg.num_samples,
        "guidance_scale": s.cfg.guidance, "per_step": rows,
        "noise_sqnr_db": {k: {"mean": mean(k), "min": min(r[k] for r in rows)}
                          for k in ("runtime_vs_fake_quant_sqnr_db", "runtime_vs_fp_sqnr_db", "fake_quant_vs_fp_sqnr_db")},
        "images": {"runtime_vs_fake_quant": _image_metrics(images["runtime"].images, images["fake_quant"].images),
                   "runtime_vs_fp": _image_metrics(images["runtime"].images, images["fp"].images),
                   "fake_quant_vs_fp": _image_metrics(images["fake_quant"].images, images["fp"].images)},
        "digits": {k: _digits(v.images, labels, s.fp_model) for k, v in images.items()},
        "fp_agreement": fp_agreement(rows),
        "calibrated_with": cal.label, "trajectory_sampler": cal.label,
        "image_sampler": f"{describe(s.run_scheduler)}-{s.steps}",
    }
    return accuracy, images


def samplers_to_compare(s: VerifySession) -> list[tuple[str, SchedulerMixin]]:
    """The schedule table's samplers: the calibrated one (X) and the one the run uses (Y), once each."""
    out = [(describe(s.calibrated.scheduler), s.calibrated.scheduler)]
    if not same_scheduler(s.run_scheduler, s.calibrated.scheduler):
        out.append((describe(s.run_scheduler), s.run_scheduler))
    return out


def schedule_step(s: VerifySession, images: dict[str, SampleResult]) -> list[dict]:
    """Other step counts and samplers: every call at the nearest calibrated t_index."""
    cal, rows = s.calibrated, []
    for name, sched in samplers_to_compare(s):
        for steps in sorted(set(s.mapped) | {cal.steps}):
            inference = sampling_timesteps(s.fp_model, steps, sched)
            t_map = map_schedule(s.ck.timesteps, inference)
            if steps == s.steps and same_scheduler(sched, s.run_scheduler):
                fp_img, rt_img = images["fp"], images["runtime"]
            else:
                fp_img = s.sample(s.fp, steps, scheduler=sched)
                rt_img = s.sample(s.rt, steps, fp_img.labels, scheduler=sched)
            exact = steps == cal.steps and same_scheduler(sched, cal.scheduler)
            rows.append({
                "sampler": name, "calibrated_with": cal.label, "steps": steps,
                "mapping": "exact" if exact and t_map == list(range(len(s.ck.timesteps))) else "nearest",
                "t_index_per_step": t_map, "distinct_t_index_used": len(set(t_map)),
                "max_timestep_gap": max(abs(t - s.ck.timesteps[i]) for t, i in zip(inference, t_map)),
                "runtime_vs_fp": _image_metrics(rt_img.images, fp_img.images),
                "runtime_digits": _digits(rt_img.images, fp_img.labels, s.fp_model),
                "fp_digits": _digits(fp_img.images, fp_img.labels, s.fp_model)})
    return rows


def speed_step(s: VerifySession) -> tuple[dict, list[Runner]]:
    """UNet latency of the runtime and the PyTorch baselines per batch, and the sampler's wall time (Y)."""
    cfg, rt, fp, fq = s.cfg, s.rt, s.fp, s.fq
    baselines: list[Runner] = [fp, fq]
    if cfg.device == "cuda":
        baselines.append(TorchRunner.fp(s.fp_model, s.ck.timesteps, "cuda", "fp16", name="torch-fp16"))
        if cfg.compile:
            baselines.append(TorchRunner.fp(s.fp_model, s.ck.timesteps, "cuda", "fp32", compile=True))
    cond = s.ck.model.condition(torch.zeros(1, dtype=torch.long)) if s.ck.model.is_conditional else None
    latency: dict[str, dict[str, dict]] = {}
    for r in [rt, *baselines]:
        latency[r.metadata.name] = {}
        for b in cfg.batches:
            try:
                latency[r.metadata.name][str(b)] = unet_latency(r, b, cfg.warmup, cfg.repeats, cond=cond).to_dict()
            except Exception as err:  # noqa: BLE001 - e.g. torch.compile failing: record it, keep the rest
                latency[r.metadata.name][str(b)] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    ratios = {}
    rt_lat = latency[rt.metadata.name]
    for name, per_b in latency.items():
        if name == rt.metadata.name:
            continue
        ratios[name] = {b: round(per_b[b]["median_ms"] / rt_lat[b]["median_ms"], 3)
                        for b in per_b if "median_ms" in per_b[b] and "median_ms" in rt_lat.get(b, {})}
    sampler_batch = max(cfg.batches)
    sampler = {}
    for r in (rt, fp, fq):
        model = s.fp_model if r is fp else s.ck.model
        t0 = time.perf_counter()
        sample(model, s.mapped_predictor(r), num_samples=sampler_batch, steps=s.steps, seed=cfg.seed,
               guidance_scale=cfg.guidance, batch_size=sampler_batch, progress=False, decode=False,
               scheduler=s.run_scheduler)  # the UNet loop alike for every runner
        r.synchronize()
        sampler[r.metadata.name] = round(time.perf_counter() - t0, 4)
    speed = {"unet_latency_ms": latency, "speedup_of_runtime": ratios,
             "speedup_note": "baseline median latency / runtime median latency at the same batch (>1: runtime faster)",
             "sampler": {"steps": s.steps, "batch": sampler_batch, "wall_s": sampler,
                         "sampler": describe(s.run_scheduler),
                         "speedup_of_runtime": {k: round(v / sampler[rt.metadata.name], 3)
                                                for k, v in sampler.items() if k != rt.metadata.name}}}
    return speed, baselines


def memory_step(s: VerifySession) -> dict:
    params = list(s.fp_model.unet.parameters())
    return {"runtime_weight_bytes": _weight_bytes(Path(s.cfg.runtime)), "checkpoint_bytes": Path(s.cfg.ckpt).stat().st_size,
            "fp_parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "fp_parameters": sum(p.numel() for p in params),
            "peak_host_rss_mb_after_runtime_load": s.rss_after_load, "peak_host_rss_mb": peak_rss_mb(),
            "gpu": gpu_memory()}


def hard_checks(layer_parity: dict) -> dict:
    """dq-verify's gate: what must hold for the runtime to ship. `failed`: one line per failed check."""
    lp = layer_parity or {}
    if "skipped" in lp:
        state = "skipped"
    else:
        state = "passed" if lp.get("passed") else "FAILED"
    failed = []
    if state == "FAILED":
        detail = (f"max level diff {lp['max_level_diff']:.0f}, min layer SQNR {lp['min_layer_sqnr_db']:.1f} dB, worst "
                  f"layer {lp.get('worst_layer')}" if "max_level_diff" in lp else lp.get("error", "no detail"))
        failed.append(f"layer-wise parity FAILED ({detail})")
    return {"runtime_runs": "passed", "layer_parity": state, "failed": failed}


def run_verify(cfg: VerifyConfig, fp_model: DiffusionModel | None = None) -> dict:
    """Run every measurement and write the report folder; returns the report dict. A runtime that cannot run the
    graph raises CheckFailed; the other hard checks are reported in report["checks"] (see enforce)."""
    start = time.perf_counter()
    s = open_session(cfg, fp_model)
    check_runtime_runs(s)
    s.rss_after_load = peak_rss_mb()
    accuracy, images = accuracy_step(s)
    layer_parity = _layer_parity(s.cfg, s.ck, s.rt, s.weight_only, s.fp_model)
    schedule_rows = schedule_step(s, images)
    speed, baselines = speed_step(s)
    memory = memory_step(s)
    return write_report(s, accuracy, images, layer_parity, schedule_rows, speed, baselines, memory,
                        time.perf_counter() - start)


def write_report(s: VerifySession, accuracy: dict, images: dict[str, SampleResult], layer_parity: dict,
                 schedule_rows: list[dict], speed: dict, baselines: list[Runner], memory: dict, wall_s: float) -> dict:
    cfg, rt, ck, out = s.cfg, s.rt, s.ck, Path(s.cfg.report_dir)
    name, T = rt.metadata.name, len(ck.timesteps)
    run = describe(s.run_scheduler)
    figures = {
        "sqnr": plots.sqnr_plot(out / "sqnr_vs_t_index.png", accuracy["per_step"], {
            "runtime_vs_fake_quant_sqnr_db": f"{name} vs PyTorch fake-quant",
            "runtime_vs_fp_sqnr_db": f"{name} vs FP", "fake_quant_vs_fp_sqnr_db": "PyTorch fake-quant vs FP"},
            f"Per-step noise SQNR on FP {s.calibrated.label} trajectories ({cfg.traj_samples} samples)").name,
        "latency": plots.latency_plot(out / "latency.png", speed["unet_latency_ms"],
                                      f"UNet latency on {cfg.device} ({environment_device(cfg.device)})").name,
        "samples": plots.sample_grid_plot(out / "samples.png", {
            "FP (PyTorch)": images["fp"].images[:16], "fake-quant (PyTorch)": images["fake_quant"].images[:16],
            f"runtime ({name})": images["runtime"].images[:16]}, f"{run}-{s.steps}, same seeds").name,
        "schedule": plots.schedule_plot(out / "schedule_mapping.png", schedule_rows,
                                        f"Other step counts and samplers on a {s.calibrated.label} checkpoint").name,
    }
    report = {
        "environment": environment(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "ort_threads": s.threads if isinstance(rt, OrtRunner) else None,
                     "torch_threads": torch.get_num_threads(), "mapped_steps": s.mapped, "steps": s.steps},
        "checkpoint": {"path": str(cfg.ckpt), "sha256": checkpoint_hash(cfg.ckpt), "source": ck.source,
                       "bits": ck.qunet.config.bits_name, "num_steps": T, "timesteps": list(ck.timesteps),
                       "calibrated_with": s.calibrated.label},
        "runtime": {**rt.metadata.to_dict(), "path": str(cfg.runtime)},
        "baselines": [r.metadata.to_dict() for r in baselines],
        "accuracy": accuracy, "layer_parity": layer_parity, "schedule_mapping": schedule_rows, "speed": speed,
        "memory": memory, "checks": hard_checks(layer_parity), "figures": figures, "wall_s": round(wall_s, 1),
    }
    write_json(out / "report.json", report)
    write_text(out / "README.md", summary_markdown(report))
    return report


def enforce(report: dict) -> None:
    """Raise CheckFailed (one line) when a hard check of the report failed: dq-verify as a deployment gate."""
    failed = report.get("checks", {}).get("failed", [])
    if failed:
        raise CheckFailed(f"{failed[0]}; report: {Path(report['settings']['report_dir']) / 'README.md'}")


def environment_device(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from ..core.reporting import _cpu_name

    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


def _f(v, nd=2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else ("-" if v is None else str(v))


def layer_parity_markdown(lp: dict | None, agree: dict | None) -> list[str]:
    """The layer-wise parity section: what can hold between two runtimes of a quantized UNet, and whether it did."""
    out = ["", "## Layer-wise parity (teacher-forced)", ""]
    if agree:
        out += [f"End to end, runtime and fake-quant are equally close to FP: per-step SQNR against FP differs by at "
                f"most {_f(agree['max_sqnr_gap_db'], 3)} dB (t_index {agree['worst_t_index']}; "
                f"{'within' if agree['within'] else 'NOT within'} {agree['threshold_db']} dB).", ""]
    if not lp or "skipped" in lp or "error" in lp:
        reason = (lp or {}).get("skipped") or (lp or {}).get("error") or "not run"
        return out + [f"Layer-wise parity: {reason}"]
    sq = lp["min_layer_sqnr_db"]
    out += [f"Every quantized layer of the {lp['runtime']} graph fed the fake-quant model's own input to it, at all "
            f"{lp['t_index_values']} t_index values ({lp['inputs']}): {lp['layers']} layers, max level difference "
            f"{_f(lp['max_level_diff'], 0)}, {lp['differing_levels']} of {lp['levels_compared']:,} levels differ "
            f"({lp['differing_share']:.1e}), min layer output SQNR "
            f"{'exact' if sq == float('inf') else _f(sq, 1) + ' dB'} (worst: `{lp['worst_layer']}`): "
            f"**{'passed' if lp['passed'] else 'FAILED'}** (no level off by more than "
            f"{lp['thresholds']['max_level_diff']}, under {lp['thresholds']['max_differing_share']:.0e} differing, "
            f">= {lp['thresholds']['min_sqnr_db']:.0f} dB per layer and t_index)."]
    out += [f"- {f}" for f in lp["failures"][:10]]
    return out


def summary_markdown(r: dict) -> str:
    rt, acc, sp, mem, ck = r["runtime"], r["accuracy"], r["speed"], r["memory"], r["checkpoint"]
    env = r["environment"]
    sq = acc["noise_sqnr_db"]
    lines = [f"# dq-verify: {rt['name']} vs PyTorch", "",
             f"Checkpoint `{Path(ck['path']).name}` ({ck['bits']}, T={ck['num_steps']}, base `{ck['source']}`), "
             f"runtime `{Path(rt['path']).name}` ({rt['runtime']}, {rt['device']}, {rt['dtype']}). "
             f"Wall time {r['wall_s']} s on {env['cpu']} ({env['cpu_count']} cores"
             f"{', ' + env['cuda'] if env.get('cuda') else ''}), torch {env['torch']}, onnxruntime {env['onnxruntime']}.", "",
             f"Hard checks: the runtime runs the graph: {r['checks']['runtime_runs']}; layer-wise parity: "
             f"**{r['checks']['layer_parity']}**. Calibrated with {ck['calibrated_with']}; images with "
             f"{acc['image_sampler']}.", "",
             "## Accuracy", "",
             f"Per-step noise-prediction SQNR on FP {acc['trajectory_sampler']} trajectories "
             f"({acc['trajectory_samples']} samples), mean / min over t_index:", "",
             "| pair | mean SQNR (dB) | min SQNR (dB) |", "|---|---|---|"]
    for key, label in (("runtime_vs_fake_quant_sqnr_db", "runtime vs PyTorch fake-quant"),
                       ("runtime_vs_fp_sqnr_db", "runtime vs FP"), ("fake_quant_vs_fp_sqnr_db", "PyTorch fake-quant vs FP")):
        lines.append(f"| {label} | {_f(sq[key]['mean'])} | {_f(sq[key]['min'])} |")
    lines += ["", f"![SQNR vs t_index]({r['figures']['sqnr']})", "",
              f"{acc['image_sampler']} images from the same seeds "
              f"({acc['num_samples']} samples):", "",
              "| pair | PSNR (dB) | SSIM |", "|---|---|---|"]
    for key, label in (("runtime_vs_fake_quant", "runtime vs PyTorch fake-quant"), ("runtime_vs_fp", "runtime vs FP"),
                       ("fake_quant_vs_fp", "PyTorch fake-quant vs FP")):
        m = acc["images"][key]
        lines.append(f"| {label} | {_f(m['image_psnr_db'])} | {_f(m['image_ssim'], 4)} |")
    d = acc["digits"]
    if "skipped" not in d["fp"]:
        lines += ["", "| images | samples | digit-FID (lower is better; ± seed-to-seed std at this count) | "
                  "classifier confidence | class accuracy |", "|---|---|---|---|---|"]
        for k in ("fp", "fake_quant", "runtime"):
            lines.append(f"| {k} | {d[k].get('num_samples', '-')} | {format_digit_fid(d[k])} | "
                         f"{_f(d[k]['classifier_mean_confidence'], 3)} | "
                         f"{_f(d[k]['class_accuracy'], 3) if 'class_accuracy' in d[k] else '-'} |")
        if d["fp"].get("digit_fid") is not None:
            lines += ["", "Digit-FID differences smaller than the ± spread are draw-to-draw noise, not results "
                      "(benchmarks/digit_fid_spread.py)."]
    else:
        lines += ["", f"Digit metrics: {d['fp'].get('skipped')}"]
    lines += layer_parity_markdown(r.get("layer_parity"), acc.get("fp_agreement"))
    lines += ["", f"![samples]({r['figures']['samples']})", "",
              "## Other step counts and samplers (nearest calibrated t_index)", "",
              f"Calibrated with {ck['calibrated_with']}; each row runs the runtime and FP with the sampler and step "
              "count named, every call at the nearest calibrated timestep's t_index.", "",
              "| sampler | steps | mapping | distinct t_index used | max timestep gap | PSNR vs FP (dB) | SSIM vs FP | "
              "runtime digit-FID | FP digit-FID |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in r["schedule_mapping"]:
        gap = s["max_timestep_gap"]
        lines.append(f"| {s['sampler']} | {s['steps']} | {s['mapping']} | {s['distinct_t_index_used']} | "
                     f"{_f(gap, 1) if isinstance(gap, float) else gap} | "
                     f"{_f(s['runtime_vs_fp']['image_psnr_db'])} | {_f(s['runtime_vs_fp']['image_ssim'], 4)} | "
                     f"{format_digit_fid(s['runtime_digits'])} | {format_digit_fid(s['fp_digits'])} |")
    lines += ["", f"![schedule mapping]({r['figures']['schedule']})", "", "## Speed", "",
              f"UNet latency in ms (median / p90 / min, {r['settings']['repeats']} repeats after {r['settings']['warmup']} "
              "warmup calls), full `infer()` including input checks and host copies:", ""]
    lat = sp["unet_latency_ms"]
    batches = [str(b) for b in r["settings"]["batches"]]
    lines += ["| runner | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for name, per_b in lat.items():
        cells = [f"{_f(per_b[b]['median_ms'])} / {_f(per_b[b]['p90_ms'])} / {_f(per_b[b]['min_ms'])}" if "median_ms" in per_b.get(b, {})
                 else per_b.get(b, {}).get("error", "-") for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Runtime speedup (baseline median / runtime median, same run):", "",
              "| baseline | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for name, per_b in sp["speedup_of_runtime"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_b[b]:.2f}x" if b in per_b else "-" for b in batches) + " |")
    smp = sp["sampler"]
    lines += ["", f"{smp['sampler']}-{smp['steps']} sampler wall time, {smp['batch']} images: " +
              ", ".join(f"{k} {v:.2f} s" for k, v in smp["wall_s"].items()) + " (runtime speedup: " +
              ", ".join(f"{v:.2f}x vs {k}" for k, v in smp["speedup_of_runtime"].items()) + ").", "",
              f"![latency]({r['figures']['latency']})", "", "## Memory", "",
              f"- runtime weights on disk: {mem['runtime_weight_bytes'] / 1e6:.3f} MB; q.pt "
              f"{mem['checkpoint_bytes'] / 1e6:.3f} MB; FP parameters {mem['fp_parameter_bytes'] / 1e6:.3f} MB "
              f"({mem['fp_parameters']:,} parameters)",
              f"- peak host RSS: {mem['peak_host_rss_mb_after_runtime_load']} MB after loading the runtime, "
              f"{mem['peak_host_rss_mb']} MB for the whole run (PyTorch baselines included)"]
    if mem.get("gpu"):
        g = mem["gpu"]
        lines.append(f"- GPU: PyTorch peak allocated {g['torch_peak_allocated_mb']} MB, device in use "
                     f"{g['device_used_mb']} / {g['device_total_mb']} MB at the end")
    return "\n".join(lines) + "\n"
