"""Export evidence on the default models (a benchmark, never a test): parity, sizes, static vs t_index, FP16.

For each model x {W8A8, W4A8} x {symmetric, asymmetric}: calibrate a q.pt, export it (int8; int4 too for W4),
run the TensorRT-rules check and the ONNX Runtime parity proof at every t_index. For the W4A8 symmetric
checkpoint (what TensorRT runs) also: per-step noise SQNR vs FP of the t_index graph, its --static-scales twin
and its FP16-fallback graph, and digit-FID of DDIM samples from the FP32 and FP16 graphs.

    python benchmarks/export_matrix.py --out benchmarks/results/export_matrix
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
from dilatequant.core.evaluation import fp_trajectories, per_step_noise_error
from dilatequant.core.guidance import DEFAULT_GUIDANCE
from dilatequant.core.metrics import digit_scores
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.core.sampling import sample
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.parity import ort_session
from dilatequant.dq_export.pipeline import export_and_verify


def ort_predictor(path: Path):
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]

    def predict(x, timestep, t_index, ehs=None):
        feeds = {"sample": x, "timestep": timestep, "t_index": t_index, "encoder_hidden_states": ehs}
        return torch.from_numpy(sess.run(None, {k: feeds[k].numpy() for k in names})[0])

    return predict


def checkpoint(model: str, bits: str, sym: bool, a, out: Path, act_init: str = "mse") -> Path:
    suffix = "" if act_init == "mse" else f"_{act_init}"
    path = out / f"{model}_{bits}_{'sym' if sym else 'asym'}{suffix}.q.pt"
    if not path.is_file():
        w, act = QuantConfig.parse_bits(bits)
        run_calibration(CalibrationJob(model=model, config=QuantConfig(weight_bits=w, act_bits=act, symmetric=sym,
                                                                       num_steps=a.steps, act_init=act_init),
                                       distill=DistillConfig(iters=a.iters, seed=a.seed), bkd=a.iters > 0,
                                       calib_samples=a.calib_samples, out=path))
    return path


def parity_row(s: dict) -> dict:
    p = s["parity"]
    return {"export_s": s["export_s"], "bytes": s["bytes"], "trt_rules": s["trt_rules"],
            "min_sqnr_db": p["min_sqnr_db"], "median_sqnr_db": p["median_sqnr_db"],
            "min_median_sample_sqnr_db": p["min_median_sample_sqnr_db"], "samples_below_50db": p["samples_below"],
            "samples": p["samples"], "max_abs_error": p["max_abs_error"],
            "torch_self_min_sqnr_db": p["torch_self_min_sqnr_db"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "default-cond"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--iters", type=int, default=0, help="BKD iterations per block (0: PTQ; parity does not depend on it)")
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-parity", action="store_true", help="only the static/t_index/FP16 comparison")
    p.add_argument("--act-inits", nargs="+", default=["mse"], choices=["mse", "minmean", "percentile", "minmax"],
                   help="activation initialisations compared in the static/t_index comparison (each its own q.pt; "
                        "the static twin's one row is calibrated by the same rule on all timesteps pooled)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export_matrix"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {k: str(v) for k, v in vars(a).items()}, "environment": environment(), "parity": [],
           "timestep_scales": []}
    for name in a.models:
        for bits in () if a.skip_parity else ("W8A8", "W4A8"):
            for sym in (True, False):
                ck = checkpoint(name, bits, sym, a, a.out)
                stem = a.out / ck.name.replace(".q.pt", "")
                for precision in ("int8", "int4") if bits.startswith("W4") else ("int8",):
                    s = export_and_verify(ck, Path(f"{stem}.{precision}.onnx"), ExportConfig(precision=precision),
                                          torch_floor=True)
                    res["parity"].append({"model": name, "bits": bits, "symmetric": sym, "precision": precision,
                                          **parity_row(s)})
                    print(res["parity"][-1], flush=True)
                    write_json(a.out / "export_matrix.json", res)
        for act_init in a.act_inits:
            res["timestep_scales"].append(scale_comparison(name, a, act_init))
            write_json(a.out / "export_matrix.json", res)
        write_json(a.out / "export_matrix.json", res)
    write_text(a.out / "export_matrix.md", markdown(res))


def scale_comparison(name: str, a, act_init: str = "mse") -> dict:
    """t_index graph vs static-scale twin vs FP16 fallback, on the W4A8 symmetric checkpoint.

    The twin's single row is calibrated on every timestep's activations pooled (the same rule as the tables), so
    it is the static scale a ModelOpt-style tool would pick from the same data, not a union of our tables."""
    model = load_model(name)
    guidance = DEFAULT_GUIDANCE if model.is_conditional else 1.0
    ck_path = checkpoint(name, "W4A8", True, a, a.out, act_init)
    stem = a.out / ck_path.name.replace(".q.pt", "")
    graphs = {"t_index (fp32)": Path(f"{stem}.int8.onnx"), "static scales (fp32)": Path(f"{stem}.static.onnx"),
              "t_index (fp16 fallback)": Path(f"{stem}.fp16.onnx")}
    if not graphs["t_index (fp32)"].is_file():  # written by the parity rows unless --skip-parity
        export_and_verify(ck_path, graphs["t_index (fp32)"], ExportConfig(), verify=False)
    export_and_verify(ck_path, graphs["static scales (fp32)"], ExportConfig(static_scales=True), verify=False)
    start = time.perf_counter()
    fp16 = export_and_verify(ck_path, graphs["t_index (fp16 fallback)"], ExportConfig(dtype="fp16"), verify=False)
    traj = fp_trajectories(model, a.steps, a.seed, guidance)
    ck = load_checkpoint(ck_path)
    out = {"model": name, "act_init": act_init, "checkpoint": ck_path.name, "fp16_export_s": round(time.perf_counter() - start, 1),
           "fp16_bytes": fp16["bytes"], "graphs": {}}
    predictors = {"PyTorch fake-quant": ck.qunet.predictor(), **{k: ort_predictor(v) for k, v in graphs.items()}}
    for label, pred in predictors.items():
        err = per_step_noise_error(model, pred, traj)
        row = {"noise_mean_sqnr_db": err["mean_sqnr_db"], "noise_mean_mse": err["mean_mse"],
               "noise_min_step_sqnr_db": min(r["sqnr_db"] for r in err["per_step"])}
        if label != "PyTorch fake-quant":
            t0 = time.perf_counter()
            imgs = sample(model, pred, num_samples=a.fid_samples, steps=a.steps, seed=a.seed, guidance_scale=guidance,
                          batch_size=100)
            row.update({k: v for k, v in digit_scores(imgs.images, imgs.labels).items() if k != "class_share"},
                       sampling_s=round(time.perf_counter() - t0, 1))
        out["graphs"][label] = row
        print(name, label, row, flush=True)
    return out


def markdown(res: dict) -> str:
    lines = ["| model | bits | activations | precision | min SQNR dB (pooled) | min median-sample SQNR dB | "
             "samples < 50 dB | export s | MB |", "|---|---|---|---|---|---|---|---|---|"] if res["parity"] else []
    for r in res["parity"]:
        lines.append(f"| {r['model']} | {r['bits']} | {'sym' if r['symmetric'] else 'asym'} | {r['precision']} | "
                     f"{r['min_sqnr_db']:.1f} | {r['min_median_sample_sqnr_db']:.1f} | {r['samples_below_50db']}/"
                     f"{r['samples']} | {r['export_s']:.1f} | {r['bytes'] / 1e6:.2f} |")
    lines += [""] if lines else []
    lines += ["| model | activation init | graph | per-step noise SQNR vs FP (mean) | worst step | noise MSE | "
              "digit-FID | class acc |", "|---|---|---|---|---|---|---|---|"]
    for c in res["timestep_scales"]:
        for label, r in c["graphs"].items():
            fid = f"{r['digit_fid']:.2f}" if "digit_fid" in r else "-"
            acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
            lines.append(f"| {c['model']} | {c.get('act_init', 'mse')} | {label} | {r['noise_mean_sqnr_db']:.2f} | "
                         f"{r['noise_min_step_sqnr_db']:.2f} | {r['noise_mean_mse']:.5f} | {fid} | {acc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
