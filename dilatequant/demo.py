"""`dq-demo`, the main job: the whole chain on the embedded models, ending in a report folder.

FP samples of every embedded model; then the Stable Diffusion pipeline `sd-digits` calibrated on its digit
prompts, exported, checked (TensorRT rules, parity), verified on ONNX Runtime, and put back into diffusers'
pipeline for a prompt grid, FP beside quantized."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .calibrate.checkpoint import load_checkpoint
from .calibrate.checkpoint import source_model
from .calibrate.distill_config import DistillConfig
from .calibrate.quant_config import QuantConfig
from .calibrate.recipe import CalibrationJob, run_calibration
from .core.errors import UserError
from .demo_config import DemoConfig
from .core.evaluation import compare_to_fp, fp_reference, fp_trajectories, requested_digits
from .core.metrics import digit_scores, fid_omitted_note, fid_shown, format_digit_fid, format_sqnr, with_fid_floor
from .core.models import DiffusionModel, load_model
from .core.reporting import environment, ensure_writable_dir, save_grid, write_json, write_text
from .core.sampling import SampleResult, default_guidance, sample
from .dq_export.export_config import ExportConfig
from .dq_export.pipeline import export_and_verify


def guidance_of(cfg: DemoConfig, model: DiffusionModel) -> float:
    return cfg.guidance_scale if cfg.guidance_scale is not None and model.is_conditional else default_guidance(model)


def demo_prompts(model: DiffusionModel, n: int) -> list[str] | None:
    """Text models: sample i asks for digit i % 10 in phrasing i // 10 (the model's calibration prompts cycled)."""
    if not model.is_text_conditioned:
        return None
    from .core.prompts import calibration_prompts

    bank = calibration_prompts(model)
    return [bank[i % len(bank)] for i in range(n)]


def fp_section(name: str, model: DiffusionModel, cfg: DemoConfig) -> tuple[dict, SampleResult]:
    """FP samples from seeded noise and their digit metrics: the reference every later stage compares to."""
    start = time.perf_counter()
    guidance = guidance_of(cfg, model)
    result = sample(model, num_samples=cfg.num_samples, steps=cfg.steps, seed=cfg.seed, guidance_scale=guidance,
                    labels=demo_prompts(model, cfg.num_samples))
    scores = with_fid_floor(digit_scores(result.images, requested_digits(model, result.labels)))
    grid = save_grid(cfg.report_dir / f"{name}_fp_samples.png", result.images[:40])
    return {
        "model": name, "source": model.source, "steps": cfg.steps, "guidance_scale": guidance,
        "seed": cfg.seed, "sampling_s": round(time.perf_counter() - start, 2),
        "parameters": sum(p.numel() for p in model.unet.parameters()), "grid": grid.name, **scores,
    }, result


def quant_section(cfg: DemoConfig, fp_images: SampleResult | None) -> dict:
    """calibrate -> q.pt -> export -> parity -> fake-quant vs FP images, for cfg.quant_model."""
    w_bits, a_bits = QuantConfig.parse_bits(cfg.bits)
    qcfg = QuantConfig(weight_bits=w_bits, act_bits=a_bits, symmetric=cfg.symmetric, num_steps=cfg.steps)
    ckpt = cfg.report_dir / f"{cfg.quant_model}_{cfg.bits.lower()}.q.pt"
    job = CalibrationJob(model=cfg.quant_model, config=qcfg, distill=DistillConfig(iters=cfg.iters, seed=cfg.seed),
                         calib_samples=cfg.calib_samples, guidance_scale=cfg.guidance_scale, out=ckpt)
    calib = run_calibration(job)
    onnx_path = ckpt.with_suffix("").with_suffix(".onnx")
    export = export_and_verify(ckpt, onnx_path, ExportConfig(), torch_floor=True)
    ck = load_checkpoint(ckpt)
    model = source_model(ck)  # with the calibration prompts and guidance q.pt records
    guidance = guidance_of(cfg, model)
    if fp_images is None:
        fp_images, fp_traj = fp_reference(model, cfg.num_samples, cfg.steps, cfg.seed, guidance)
    else:
        fp_traj = fp_trajectories(model, cfg.steps, cfg.seed, guidance)
    fq, images = compare_to_fp(model, ck.qunet.predictor(), fp_images, fp_traj, cfg.steps, cfg.seed, guidance)
    save_grid(cfg.report_dir / "quantized_samples.png", torch.cat([fp_images.images[:20], images[:20]]))
    verify = verify_section(cfg, ckpt, onnx_path)
    generated = generate_section(cfg, model, onnx_path) if model.is_text_conditioned else None
    return {"verify": verify, "generate": generated, "model": cfg.quant_model, "bits": cfg.bits,
            "symmetric": cfg.symmetric, "checkpoint": ckpt.name, "guidance_scale": guidance,
            "calibration": {k: calib[k] for k in ("wall_s", "peak_rss_mb", "val_before_training", "val_after_training")},
            "export": {k: export[k] for k in ("onnx", "bytes", "export_s", "trt_rules")},
            "parity": {k: export["parity"][k] for k in ("min_sqnr_db", "median_sqnr_db", "min_median_sample_sqnr_db",
                                                        "samples_below", "samples", "max_abs_error",
                                                        "torch_self_min_sqnr_db")},
            "fake_quant_vs_fp": with_fid_floor({k: v for k, v in fq.items() if k != "noise_per_step"}),
            "grid": "quantized_samples.png"}


def generate_section(cfg: DemoConfig, model: DiffusionModel, onnx_path: Path) -> dict:
    """One prompt per digit through diffusers' own pipeline, the ONNX graph as pipe.unet, beside the FP UNet
    from the same seeds: what dq-generate does, for a few samplers with other step counts than calibrated."""
    from .core.digits import captions_for
    from .core.metrics import psnr_db, ssim
    from .engines.generate import run_pipeline
    from .engines.generate_config import GenerateConfig
    from .engines.onnxruntime.runner import OrtRunner
    from .engines.pytorch.diffusers_unet import QuantizedUNet

    prompts = [captions_for(d)[0] for d in range(10)]
    qunet = QuantizedUNet(OrtRunner(onnx_path), model.unet.config)
    rows, grids = [], []
    for name in cfg.generate_schedulers:
        gcfg = GenerateConfig(model=cfg.quant_model, runtime=onnx_path, prompt=prompts[0], steps=cfg.generate_steps,
                              scheduler=name, seed=cfg.seed)
        fp = run_pipeline(model, model.unet, gcfg, prompts) * 2 - 1
        q = run_pipeline(model, qunet, gcfg, prompts) * 2 - 1
        scores = digit_scores(q[:, :1], torch.arange(10))
        rows.append({"scheduler": name, "steps": cfg.generate_steps, "prompts": len(prompts),
                     "image_psnr_db": psnr_db(q, fp), "image_ssim": ssim(q, fp),
                     "class_accuracy_fp": digit_scores(fp[:, :1], torch.arange(10))["class_accuracy"],
                     "class_accuracy_quantized": scores["class_accuracy"]})
        grids += [fp[:, :1], q[:, :1]]
    grid = save_grid(cfg.report_dir / "generate_grid.png", torch.cat(grids), nrow=10)
    return {"prompts": prompts, "seeds": f"{cfg.seed} + i", "guidance_scale": model.guidance_scale, "rows": rows,
            "grid": grid.name}


def verify_section(cfg: DemoConfig, ckpt: Path, onnx_path: Path) -> dict:
    """dq-verify on ONNX Runtime (CPU), and on a TensorRT engine where TensorRT 11 and a GPU exist."""
    from .engines.tensorrt.env import require_trt_and_gpu
    from .engines.verify import VerifyConfig, run_verify

    light = dict(batches=(1, 8), num_samples=16, repeats=10, mapped_steps=(cfg.steps // 2,), seed=cfg.seed)
    reports = {}
    r = run_verify(VerifyConfig(ckpt=ckpt, runtime=onnx_path, report_dir=cfg.report_dir / "verify-ort", **light))
    reports["onnxruntime"] = _verify_summary(r, "verify-ort")
    try:
        require_trt_and_gpu()
    except UserError as err:
        reports["tensorrt"] = {"skipped": str(err)}
        return reports
    from .engines.tensorrt.build import BuildConfig, build_engine

    plan = onnx_path.with_suffix(".plan")
    build_engine(BuildConfig(onnx=onnx_path, engine=plan, fp16_fallback=True, inspect=True))
    r = run_verify(VerifyConfig(ckpt=ckpt, runtime=plan, device="cuda", report_dir=cfg.report_dir / "verify-trt", **light))
    reports["tensorrt"] = _verify_summary(r, "verify-trt")
    return reports


def _verify_summary(r: dict, folder: str) -> dict:
    sq = r["accuracy"]["noise_sqnr_db"]
    per_step = sorted(row["runtime_vs_fake_quant_sqnr_db"] for row in r["accuracy"]["per_step"])
    return {"report": f"{folder}/README.md", "runtime": r["runtime"]["name"],
            "vs_fake_quant_sqnr_db": {"median": per_step[len(per_step) // 2], "min": per_step[0]},
            "vs_fp_sqnr_db": sq["runtime_vs_fp_sqnr_db"],
            "images_vs_fake_quant": r["accuracy"]["images"]["runtime_vs_fake_quant"],
            "speedup_of_runtime": r["speed"]["speedup_of_runtime"]}


def run_demo(cfg: DemoConfig) -> Path:
    torch.manual_seed(cfg.seed)
    ensure_writable_dir(cfg.report_dir)
    start = time.perf_counter()
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "environment": environment(), "models": {}}
    fp_results = {}
    for name in cfg.models:
        section, fp_results[name] = fp_section(name, load_model(name), cfg)
        report["models"][name] = {"fp": section}
    if cfg.quant_model:
        report["quantized"] = quant_section(cfg, fp_results.get(cfg.quant_model))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(cfg.report_dir / "report.json", report)
    write_text(cfg.report_dir / "README.md", summary_markdown(report))
    return cfg.report_dir


def summary_markdown(report: dict) -> str:
    lines = ["# DilateQuant demo report", "", f"Wall time {report['wall_s']} s on {report['environment']['cpu']} "
             f"({report['environment']['cpu_count']} cores), torch {report['environment']['torch']}.", ""]
    fps = [sec["fp"] for sec in report["models"].values()]
    q = report.get("quantized")
    with_fid = fid_shown(fps + ([q["fake_quant_vs_fp"]] if q else []))
    fid_head = " digit-FID |" if with_fid else ""
    lines += ["## Full-precision models (DDIM, seeded)", "",
              f"| model | samples | steps | guidance |{fid_head} classifier confidence | class accuracy | grid |",
              "|---|---|---|---|" + ("---|" if with_fid else "") + "---|---|---|"]
    for name, fp in zip(report["models"], fps):
        acc = f"{fp['class_accuracy']:.3f}" if "class_accuracy" in fp else "-"
        fid = f" {format_digit_fid(fp)} |" if with_fid else ""
        lines.append(f"| {name} | {fp['num_samples']} | {fp['steps']} | {fp['guidance_scale']} |{fid} "
                     f"{fp['classifier_mean_confidence']:.3f} | {acc} | ![]({fp['grid']}) |")
    lines += ["", "Digit-FID: Frechet distance of the shipped digit classifier's features, generated samples vs "
              "1,000 held-out real MNIST digits. Lower is better." if with_fid else
              fid_omitted_note(min(fp["num_samples"] for fp in fps)), ""]
    if q:
        fq, par, cal = q["fake_quant_vs_fp"], q["parity"], q["calibration"]
        lines += [f"## DilateQuant {q['bits']} ({'symmetric' if q['symmetric'] else 'asymmetric'}) on `{q['model']}`", "",
                  f"- calibration: {cal['wall_s']} s, peak RSS {cal['peak_rss_mb']} MB; validation noise SQNR "
                  f"{cal['val_before_training']['noise_sqnr_db']:.2f} dB before BKD -> "
                  f"{cal['val_after_training']['noise_sqnr_db']:.2f} dB after",
                  f"- fake-quant vs FP: per-step noise SQNR {fq['noise_mean_sqnr_db']:.2f} dB, image PSNR "
                  f"{fq['image_psnr_db']:.2f} dB, SSIM {fq['image_ssim']:.3f}, "
                  + (f"digit-FID {format_digit_fid(fq)}, " if with_fid else "")
                  + f"classifier confidence {fq['classifier_mean_confidence']:.3f}",
                  f"- export: `{Path(q['export']['onnx']).name}` ({q['export']['bytes'] / 1e6:.2f} MB) in "
                  f"{q['export']['export_s']} s, TensorRT rules {q['export']['trt_rules']}",
                  f"- ONNX Runtime vs PyTorch fake-quant at every t_index: min SQNR {par['min_sqnr_db']:.1f} dB, "
                  f"median {format_sqnr(par['median_sqnr_db'])}, max abs error {par['max_abs_error']:.2e}; "
                  f"{par['samples_below']} of {par['samples']} samples below 50 dB; PyTorch against itself at batch "
                  f"1 (float-order floor): min {par['torch_self_min_sqnr_db']:.1f} dB",
                  "", f"FP (top two rows) and fake-quant from the same noise (bottom two): ![]({q['grid']})", ""]
        for runtime, v in q.get("verify", {}).items():
            if "skipped" in v:
                lines += [f"- dq-verify on {runtime}: skipped ({v['skipped']})"]
                continue
            vq, im = v["vs_fake_quant_sqnr_db"], v["images_vs_fake_quant"]
            lines += [f"- dq-verify on {runtime} ([report]({v['report']})): per-step noise SQNR vs PyTorch fake-quant "
                      f"median over steps {vq['median']:.1f} dB (min {vq['min']:.1f}); vs FP mean {v['vs_fp_sqnr_db']['mean']:.2f} dB; "
                      f"images vs fake-quant PSNR {im['image_psnr_db']:.1f} dB; UNet median latency vs "
                      + ", ".join(f"{base} x{r:.2f} (batch {b})" for base, per_b in v["speedup_of_runtime"].items()
                                  for b, r in per_b.items()) + " (>1: runtime faster)"]
        g = q.get("generate")
        if g:
            lines += ["", f"### The graph inside diffusers' pipeline (`dq-generate`), {len(g['prompts'])} prompts "
                      f"(one per digit), seeds {g['seeds']}, guidance {g['guidance_scale']}", "",
                      "| sampler | steps | image PSNR vs FP (dB) | SSIM | class accuracy FP | class accuracy quantized |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['scheduler']} | {r['steps']} | {r['image_psnr_db']:.2f} | {r['image_ssim']:.3f} | "
                      f"{r['class_accuracy_fp']:.1f} | {r['class_accuracy_quantized']:.1f} |" for r in g["rows"]]
            lines += ["", f"Rows: FP then quantized, per sampler in the order above: ![]({g['grid']})"]
        lines.append("")
    return "\n".join(lines)
