"""Teacher-forced layer-wise parity on the embedded models (a benchmark, never a test).

For each model x bits x {symmetric, asymmetric}: a short calibration (the same settings as
`dq-calibrate --model M --bits B [--sym] --steps 10 --calib-samples 64 --iters 5`), then dq-export (int8, and
int4 for 4-bit weights) with its layer-wise parity: every quantized layer fed the fake-quant model's own input,
at every t_index, on real calibration inputs. One JSON per export under --out, plus summary.json.

    nice -n 10 python benchmarks/layer_parity.py --out benchmarks/results/layer_parity
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
from dilatequant.core.reporting import environment, write_json
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.layer_parity import LayerParityError
from dilatequant.dq_export.pipeline import export_and_verify


def checkpoint(model: str, bits: str, sym: bool, a, work: Path) -> Path:
    path = work / f"{model}_{bits}_{'sym' if sym else 'asym'}.q.pt"
    if not path.is_file():
        w, act = QuantConfig.parse_bits(bits)
        run_calibration(CalibrationJob(model=model, config=QuantConfig(weight_bits=w, act_bits=act, symmetric=sym,
                                                                       num_steps=a.steps),
                                       distill=DistillConfig(iters=a.iters, seed=0), bkd=a.iters > 0,
                                       calib_samples=a.calib_samples, out=path))
    return path


def row(s: dict) -> dict:
    lp = s["layer_parity"]
    worst = sorted(lp["per_layer"], key=lambda e: e["min_sqnr_db"])[:3]
    return {"passed": lp["passed"], "failures": lp["failures"], "layers": lp["layers"],
            "t_index_values": lp["t_index_values"], "inputs": lp["inputs"], "samples": lp["samples"],
            "max_level_diff": lp["max_level_diff"], "differing_levels": lp["differing_levels"],
            "levels_compared": lp["levels_compared"], "differing_share": lp["differing_share"],
            "min_layer_sqnr_db": lp["min_layer_sqnr_db"], "worst_layers": [
                {"layer": e["layer"], "mode": e["mode"], "min_sqnr_db": e["min_sqnr_db"]} for e in worst],
            "weight_only_int4_layers": len(lp["weight_only_int4_layers"]),
            "end_to_end_ort_vs_fake_quant": {k: s["parity"][k] for k in (
                "min_sqnr_db", "median_sqnr_db", "min_median_sample_sqnr_db", "samples_below", "samples")},
            "export_s": s["export_s"], "trt_rules": s["trt_rules"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_parity"))
    p.add_argument("--work", type=Path, default=Path("/tmp/dq-layer-parity"), help="q.pt and graphs (not committed)")
    p.add_argument("--models", nargs="+", default=["default", "default-cond"])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--sym", nargs="+", default=["asym", "sym"], choices=["asym", "sym"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="BKD iterations per block (0: PTQ only, no BKD)")
    p.add_argument("--per-step", type=int, default=2, help="calibration inputs per t_index for the layer check")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    for model in a.models:
        for bits in a.bits:
            for sym in a.sym:
                t0 = time.perf_counter()
                ck = checkpoint(model, bits, sym == "sym", a, a.work)
                calib_s = round(time.perf_counter() - t0, 1)
                for precision in ["int8"] + (["int4"] if bits.startswith("W4") else []):
                    name = f"{model}_{bits}_{sym}_{precision}"
                    onnx = a.work / f"{name}.onnx"
                    try:
                        s = export_and_verify(ck, onnx, ExportConfig(precision=precision), per_step=a.per_step)
                        result = row(s)
                    except LayerParityError as err:  # the report was written before the error
                        import json

                        result = {"passed": False, "error": str(err)}
                        s = json.loads(Path(f"{onnx}.export.json").read_text())
                        result.update(row(s))
                    result.update({"model": model, "bits": bits, "activations": sym, "precision": precision,
                                   "calibration": {"steps": a.steps, "calib_samples": a.calib_samples,
                                                   "iters": a.iters, "wall_s": calib_s},
                                   "command": f"dq-calibrate --model {model} --bits {bits}"
                                              f"{' --sym' if sym == 'sym' else ''} --steps {a.steps} --calib-samples "
                                              f"{a.calib_samples} "
                                              f"{f'--iters {a.iters}' if a.iters else '--no-bkd'} --out q.pt && "
                                              f"dq-export --ckpt q.pt --onnx unet.onnx --precision {precision}",
                                   "environment": environment()})
                    write_json(a.out / f"{name}.json", result)
                    print(f"{name}: passed={result['passed']} max level diff {result['max_level_diff']} "
                          f"share {result['differing_share']:.2e} min SQNR {result['min_layer_sqnr_db']}", flush=True)


if __name__ == "__main__":
    main()
