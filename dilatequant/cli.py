"""Console entry points: parse arguments, call the library, turn bad input into one clear line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError


def _run(fn: Callable[[], object]) -> None:
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def demo_main(argv: list[str] | None = None) -> None:
    from .demo import DemoConfig, run_demo

    p = argparse.ArgumentParser(prog="dq-demo", description="End-to-end demo on the embedded default models.")
    p.add_argument("--report", type=Path, default=DemoConfig.report_dir, help="report folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DemoConfig.num_samples, help="images per model")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="DDIM steps")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--models", nargs="+", default=list(DemoConfig.models))
    p.add_argument("--quant-model", default=DemoConfig.quant_model, help="model to calibrate, export and verify")
    p.add_argument("--bits", default=DemoConfig.bits)
    p.add_argument("--iters", type=int, default=DemoConfig.iters, help="BKD iterations per block")
    p.add_argument("--no-quant", action="store_true", help="FP sampling and metrics only")
    a = p.parse_args(argv)

    def go() -> None:
        out = run_demo(DemoConfig(report_dir=a.report, models=tuple(a.models), num_samples=a.samples,
                                  steps=a.steps, seed=a.seed, quant_model="" if a.no_quant else a.quant_model,
                                  bits=a.bits, iters=a.iters))
        print(f"report written to {out}/README.md")

    _run(go)


def calibrate_main(argv: list[str] | None = None) -> None:
    from .calibrate.distill import DistillConfig
    from .calibrate.quant_config import QuantConfig
    from .calibrate.recipe import CalibrationJob, run_calibration
    from .calibrate.sampling import DEFAULT_GUIDANCE
    from .calibrate.weight_dilation import SCALING_METHODS

    d, q = DistillConfig(), QuantConfig()
    p = argparse.ArgumentParser(prog="dq-calibrate", description="DilateQuant QAT (WD + TPQ + BKD) -> q.pt")
    p.add_argument("--model", default="default", help="default | default-cond | a diffusers folder")
    p.add_argument("--bits", default="W4A8", help="weight and activation bits, e.g. W8A8, W4A8, W4A4")
    p.add_argument("--steps", type=int, default=q.num_steps, help="DDIM steps to calibrate for (T)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--iters", type=int, default=d.iters, help="BKD iterations per block (full QAT: in total)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr-weight", type=float, default=d.lr_weight)
    p.add_argument("--lr-quant", type=float, default=d.lr_act, help="relative learning rate of step sizes (fraction of their size per step)")
    p.add_argument("--out", type=Path, default=Path("q.pt"))
    p.add_argument("--sym", action="store_true", help="symmetric activations (zero point 0, what TensorRT runs)")
    p.add_argument("--scaling", choices=SCALING_METHODS, default=q.scaling)
    p.add_argument("--smoothquant-alpha", type=float, default=q.smoothquant_alpha)
    p.add_argument("--no-tpq", action="store_true", help="one activation scale for all timesteps")
    p.add_argument("--no-bkd", action="store_true", help="post-training quantization only")
    p.add_argument("--full-qat", action="store_true", help="train all blocks at once (cost comparison)")
    p.add_argument("--attn-matmul", action="store_true", help="also quantize q, k, v and softmax output per head")
    p.add_argument("--act-init", choices=("mse", "percentile", "minmax"), default=q.act_init)
    p.add_argument("--first-last-bits", type=int, default=q.first_last_bits, help="0: same as the rest")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale of the calibration trajectories")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run at its next unfinished block")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    def go() -> None:
        w_bits, a_bits = QuantConfig.parse_bits(a.bits)
        config = QuantConfig(weight_bits=w_bits, act_bits=a_bits, symmetric=a.sym, scaling=a.scaling,
                             smoothquant_alpha=a.smoothquant_alpha, tpq=not a.no_tpq, num_steps=a.steps,
                             attn_matmul=a.attn_matmul, act_init=a.act_init, first_last_bits=a.first_last_bits or None)
        distill = DistillConfig(iters=a.iters, batch=a.batch, lr_weight=a.lr_weight, lr_weight_scale=a.lr_quant,
                                lr_act=a.lr_quant, full_model=a.full_qat, seed=a.seed)
        job = CalibrationJob(model=a.model, config=config, distill=distill, calib_samples=a.calib_samples,
                             bkd=not a.no_bkd, guidance_scale=a.guidance, out=a.out, resume=a.resume)
        s = run_calibration(job)
        print(f"wrote {a.out}: {s['bits']} {s['distill']['mode']}, {s['wall_s']} s, peak RSS {s['peak_rss_mb']} MB")
        print(f"  noise SQNR vs FP on validation inputs: {s['val_before_training']['noise_sqnr_db']:.2f} dB before "
              f"training -> {s['val_after_training']['noise_sqnr_db']:.2f} dB after")
        for block, (first, last) in s["distill"].get("block_losses", {}).items():
            print(f"  {block:<48} loss {first:.3g} -> {last:.3g}")

    _run(go)


def export_main(argv: list[str] | None = None) -> None:
    from .dq_export.qdq_graph import PRECISIONS, ExportConfig

    p = argparse.ArgumentParser(prog="dq-export", description="q.pt -> QDQ ONNX with a t_index input "
                                "(TensorRT-legal per-timestep scales), checked and verified")
    p.add_argument("--ckpt", type=Path, help="q.pt written by dq-calibrate")
    p.add_argument("--onnx", type=Path, help="output graph")
    p.add_argument("--precision", default="int8", help=f"{' | '.join(PRECISIONS)} (int4: weight-only INT4 GEMMs)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 (FP16 for everything not quantized)")
    p.add_argument("--static-scales", action="store_true", help="one scale per activation, no t_index (the ModelOpt-style twin)")
    p.add_argument("--static-shapes", action="store_true", help="fix batch and spatial sizes")
    p.add_argument("--batch", type=int, default=2, help="example batch (the fixed one with --static-shapes)")
    p.add_argument("--target", default="tensorrt", help="tensorrt | ort (ONNX Runtime CPU: exact int8 GEMMs "
                   "for wide convs/matmuls, same per-timestep scales; not a TensorRT graph)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--check", type=Path, metavar="FILE", help="only check FILE against the TensorRT rules")
    a = p.parse_args(argv)

    def go() -> None:
        from .dq_export.trt_rules import check_file

        if a.check:
            violations = check_file(a.check)
            for v in violations:
                print(v)
            if violations:
                raise UserError(f"{len(violations)} TensorRT rule violation(s) in {a.check}")
            print(f"{a.check}: passes every TensorRT rule")
            return
        if not a.ckpt or not a.onnx:
            raise UserError("pass --ckpt q.pt --onnx out.onnx (or --check FILE)")
        from .dq_export.pipeline import export_and_verify

        cfg = ExportConfig(precision=a.precision, dtype=a.dtype, static_scales=a.static_scales,
                           static_shapes=a.static_shapes, batch=a.batch, target=a.target)
        s = export_and_verify(a.ckpt, a.onnx, cfg, verify=not a.no_verify)
        print(f"wrote {a.onnx} ({s['bytes'] / 1e6:.2f} MB, {s['precision']}, {s['dtype']}, inputs "
              f"{', '.join(s['inputs'])}) in {s['export_s']} s; TensorRT rules: {s['trt_rules']}")
        par = s.get("parity")
        if isinstance(par, dict):
            print(f"  ORT vs PyTorch fake-quant over {len(par['per_t_index'])} t_index values: min SQNR "
                  f"{par['min_sqnr_db']:.1f} dB, median {par['median_sqnr_db']:.1f} dB, max |err| {par['max_abs_error']:.2e}")
            print(f"  (PyTorch vs itself at batch 1, the float-order floor: min {par['torch_self_min_sqnr_db']:.1f} dB, "
                  f"median {par['torch_self_median_sqnr_db']:.1f} dB)")
        print(f"  report: {a.onnx}.export.json")

    _run(go)


def main() -> None:
    """`python -m dilatequant.cli <command> ...` for environments without the console scripts."""
    commands = {"demo": demo_main, "calibrate": calibrate_main, "export": export_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m dilatequant.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
