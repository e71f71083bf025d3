"""dq-verify: is the deployed runtime as accurate as the PyTorch fake-quant model, and how fast is it?

One run, one device, one process: accuracy (per-step noise SQNR on FP trajectories, DDIM images,
digit-FID), the cost of sampling with other step counts than the calibrated schedule, UNet latency
and sampler wall time for the runtime and the PyTorch baselines, and memory. Every ratio is computed
from numbers measured in this run. Output: report.json, README.md and PNG plots in one folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..calibrate.checkpoint import checkpoint_hash, load_checkpoint
from ..core.errors import UserError
from ..core.evaluation import fp_trajectories, requested_digits
from ..core.metrics import format_digit_fid, psnr_db, reported_digit_scores, sqnr_db, ssim
from ..core.models import DiffusionModel, load_model
from ..core.reporting import ensure_writable_dir, environment, peak_rss_mb, write_json, write_text
from ..core.sampling import SampleResult, default_guidance, sample, sampling_timesteps
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
from .timing import gpu_memory, unet_latency

DIGIT_SHAPE = (1, 32, 32)  # digit-FID needs images the shipped digit classifier reads


@dataclass
class VerifyConfig:
    ckpt: Path
    runtime: Path                              # unet.onnx or unet.plan
    report_dir: Path = Path("dq-verify")
    batches: tuple[int, ...] = (1, 4, 8)
    device: str = "cpu"
    num_samples: int = 16                      # DDIM images per runtime
    steps: int | None = None                   # DDIM steps for the images (default: the calibrated T)
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


def _sample(model: DiffusionModel, predict, cfg: VerifyConfig, steps: int, labels=None) -> SampleResult:
    guidance = cfg.guidance if model.is_conditional else 1.0
    return sample(model, predict, num_samples=cfg.num_samples, steps=steps, seed=cfg.seed, labels=labels,
                  guidance_scale=guidance, batch_size=max(cfg.batches), progress=False)


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


def run_verify(cfg: VerifyConfig, fp_model: DiffusionModel | None = None) -> dict:
    """Run every measurement and write the report folder; returns the report dict."""
    cfg.check()
    start = time.perf_counter()
    out = ensure_writable_dir(cfg.report_dir)
    ck = load_checkpoint(cfg.ckpt)
    threads = cfg.threads or torch.get_num_threads()
    rt = open_runtime(Path(cfg.runtime), cfg.device, threads)
    _check_pairing(rt, ck, cfg.ckpt)
    fp_model = fp_model or (load_model(cfg.model) if cfg.model else fp_model_of(ck))
    T = len(ck.timesteps)
    steps = cfg.steps or T
    mapped = list(cfg.mapped_steps if cfg.mapped_steps is not None else sorted({max(1, T // 2), 2 * T}))
    weight_only = _configure_reference(ck, Path(cfg.runtime))  # INT4 graphs: W4A16 layers read float inputs
    fq = TorchRunner.from_checkpoint(ck, cfg.device)
    fp = TorchRunner.fp(fp_model, ck.timesteps, cfg.device)
    guidance = (cfg.guidance if cfg.guidance is not None else default_guidance(ck.model)) if ck.model.is_conditional else 1.0
    cfg = replace(cfg, guidance=guidance)
    # text models sample latents; the FP model's pipeline decodes every runner's latents alike
    img_model = fp_model if ck.model.is_text_conditioned else ck.model
    rt.activate()
    rss_after_load = peak_rss_mb()

    # -- accuracy on the calibrated schedule ------------------------------------------------------
    traj = fp_trajectories(fp_model, T, cfg.seed, guidance, cfg.traj_samples)
    rows = per_step_errors(fp, fq, rt, traj)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    images = {"fp": _sample(fp_model, ScheduleMapper(fp, ck.timesteps), cfg, steps)}
    labels = images["fp"].labels
    images["fake_quant"] = _sample(img_model, ScheduleMapper(fq, ck.timesteps), cfg, steps, labels)
    images["runtime"] = _sample(img_model, ScheduleMapper(rt, ck.timesteps), cfg, steps, labels)
    accuracy = {
        "trajectory_samples": cfg.traj_samples, "image_steps": steps, "num_samples": cfg.num_samples,
        "guidance_scale": guidance, "per_step": rows,
        "noise_sqnr_db": {k: {"mean": mean(k), "min": min(r[k] for r in rows)}
                          for k in ("runtime_vs_fake_quant_sqnr_db", "runtime_vs_fp_sqnr_db", "fake_quant_vs_fp_sqnr_db")},
        "images": {"runtime_vs_fake_quant": _image_metrics(images["runtime"].images, images["fake_quant"].images),
                   "runtime_vs_fp": _image_metrics(images["runtime"].images, images["fp"].images),
                   "fake_quant_vs_fp": _image_metrics(images["fake_quant"].images, images["fp"].images)},
        "digits": {k: _digits(v.images, labels, fp_model) for k, v in images.items()},
        "fp_agreement": fp_agreement(rows),
    }
    layer_parity = _layer_parity(cfg, ck, rt, weight_only, fp_model)

    # -- other step counts: nearest calibrated t_index --------------------------------------------
    schedule_rows = []
    for s in sorted(set(mapped) | {T}):
        inference = sampling_timesteps(fp_model, s)
        t_map = map_schedule(ck.timesteps, inference)
        if s == steps:
            fp_img, rt_img = images["fp"], images["runtime"]
        else:
            fp_img = _sample(fp_model, ScheduleMapper(fp, ck.timesteps), cfg, s)
            rt_img = _sample(img_model, ScheduleMapper(rt, ck.timesteps), cfg, s, fp_img.labels)
        schedule_rows.append({
            "steps": s, "mapping": "exact" if t_map == list(range(T)) and s == T else "nearest",
            "t_index_per_step": t_map, "distinct_t_index_used": len(set(t_map)),
            "max_timestep_gap": max(abs(t - ck.timesteps[i]) for t, i in zip(inference, t_map)),
            "runtime_vs_fp": _image_metrics(rt_img.images, fp_img.images),
            "runtime_digits": _digits(rt_img.images, fp_img.labels, fp_model),
            "fp_digits": _digits(fp_img.images, fp_img.labels, fp_model)})

    # -- speed ------------------------------------------------------------------------------------
    baselines: list[Runner] = [fp, fq]
    if cfg.device == "cuda":
        baselines.append(TorchRunner.fp(fp_model, ck.timesteps, "cuda", "fp16", name="torch-fp16"))
        if cfg.compile:
            baselines.append(TorchRunner.fp(fp_model, ck.timesteps, "cuda", "fp32", compile=True))
    cond = ck.model.condition(torch.zeros(1, dtype=torch.long)) if ck.model.is_conditional else None
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
        model = fp_model if r is fp else ck.model
        predict = ScheduleMapper(r, ck.timesteps)
        t0 = time.perf_counter()
        sample(model, predict, num_samples=sampler_batch, steps=steps, seed=cfg.seed, guidance_scale=guidance,
               batch_size=sampler_batch, progress=False, decode=False)  # the UNet loop alike for every runner
        r.synchronize()
        sampler[r.metadata.name] = round(time.perf_counter() - t0, 4)
    speed = {"unet_latency_ms": latency, "speedup_of_runtime": ratios,
             "speedup_note": "baseline median latency / runtime median latency at the same batch (>1: runtime faster)",
             "sampler": {"steps": steps, "batch": sampler_batch, "wall_s": sampler,
                         "speedup_of_runtime": {k: round(v / sampler[rt.metadata.name], 3)
                                                for k, v in sampler.items() if k != rt.metadata.name}}}

    # -- memory -----------------------------------------------------------------------------------
    memory = {"runtime_weight_bytes": _weight_bytes(Path(cfg.runtime)), "checkpoint_bytes": Path(cfg.ckpt).stat().st_size,
              "fp_parameter_bytes": sum(p.numel() * p.element_size() for p in fp_model.unet.parameters()),
              "fp_parameters": sum(p.numel() for p in fp_model.unet.parameters()),
              "peak_host_rss_mb_after_runtime_load": rss_after_load, "peak_host_rss_mb": peak_rss_mb(),
              "gpu": gpu_memory()}

    # -- output -----------------------------------------------------------------------------------
    name = rt.metadata.name
    figures = {
        "sqnr": plots.sqnr_plot(out / "sqnr_vs_t_index.png", rows, {
            "runtime_vs_fake_quant_sqnr_db": f"{name} vs PyTorch fake-quant",
            "runtime_vs_fp_sqnr_db": f"{name} vs FP", "fake_quant_vs_fp_sqnr_db": "PyTorch fake-quant vs FP"},
            f"Per-step noise SQNR on FP DDIM-{T} trajectories ({cfg.traj_samples} samples)").name,
        "latency": plots.latency_plot(out / "latency.png", latency,
                                      f"UNet latency on {cfg.device} ({environment_device(cfg.device)})").name,
        "samples": plots.sample_grid_plot(out / "samples.png", {
            "FP (PyTorch)": images["fp"].images[:16], "fake-quant (PyTorch)": images["fake_quant"].images[:16],
            f"runtime ({name})": images["runtime"].images[:16]}, f"DDIM-{steps}, same seeds").name,
        "schedule": plots.schedule_plot(out / "schedule_mapping.png", schedule_rows,
                                        f"Sampling with other step counts on a T={T} checkpoint").name,
    }
    report = {
        "environment": environment(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "ort_threads": threads if isinstance(rt, OrtRunner) else None,
                     "torch_threads": torch.get_num_threads(), "mapped_steps": mapped, "steps": steps},
        "checkpoint": {"path": str(cfg.ckpt), "sha256": checkpoint_hash(cfg.ckpt), "source": ck.source,
                       "bits": ck.qunet.config.bits_name, "num_steps": T, "timesteps": list(ck.timesteps)},
        "runtime": {**rt.metadata.to_dict(), "path": str(cfg.runtime)},
        "baselines": [r.metadata.to_dict() for r in baselines],
        "accuracy": accuracy, "layer_parity": layer_parity, "schedule_mapping": schedule_rows, "speed": speed, "memory": memory,
        "figures": figures, "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(out / "report.json", report)
    write_text(out / "README.md", summary_markdown(report))
    return report


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
             "## Accuracy", "",
             f"Per-step noise-prediction SQNR on FP DDIM-{ck['num_steps']} trajectories "
             f"({acc['trajectory_samples']} samples), mean / min over t_index:", "",
             "| pair | mean SQNR (dB) | min SQNR (dB) |", "|---|---|---|"]
    for key, label in (("runtime_vs_fake_quant_sqnr_db", "runtime vs PyTorch fake-quant"),
                       ("runtime_vs_fp_sqnr_db", "runtime vs FP"), ("fake_quant_vs_fp_sqnr_db", "PyTorch fake-quant vs FP")):
        lines.append(f"| {label} | {_f(sq[key]['mean'])} | {_f(sq[key]['min'])} |")
    lines += ["", f"![SQNR vs t_index]({r['figures']['sqnr']})", "",
              f"DDIM-{acc['image_steps']} images from the same seeds ({acc['num_samples']} samples):", "",
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
              "## Other step counts (nearest calibrated t_index)", "",
              "| DDIM steps | mapping | distinct t_index used | max timestep gap | PSNR vs FP (dB) | SSIM vs FP | runtime digit-FID | FP digit-FID |",
              "|---|---|---|---|---|---|---|---|"]
    for s in r["schedule_mapping"]:
        lines.append(f"| {s['steps']} | {s['mapping']} | {s['distinct_t_index_used']} | {s['max_timestep_gap']} | "
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
    lines += ["", f"DDIM-{smp['steps']} sampler wall time, {smp['batch']} images: " +
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
