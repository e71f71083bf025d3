"""Console entry points: parse arguments, call the library, turn bad input into one clear line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .core.errors import CheckFailed, UserError


def _run(fn: Callable[[], object]) -> None:
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckFailed as err:
        print(str(err), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -- arguments shared by several commands (one definition each; help texts say what they mean there) --------------
def _add_seed(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def _add_steps(p: argparse.ArgumentParser, help: str, default: int | None = None) -> None:
    p.add_argument("--steps", type=int, default=default, help=help)


def _add_model(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--model", required=required, default=default, help=help)


def _add_runtime(p: argparse.ArgumentParser, onnx_help: str, engine_help: str = "TensorRT engine written by "
                 "dq-build-engine", ckpt_help: str | None = None) -> None:
    """The runtime to load, one of --onnx / --engine (/ --ckpt for fake-quant)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", type=Path, help=onnx_help)
    src.add_argument("--engine", type=Path, help=engine_help)
    if ckpt_help:
        src.add_argument("--ckpt", type=Path, help=ckpt_help)


def _add_device(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--device", default="cpu", help=help)


def demo_main(argv: list[str] | None = None) -> None:
    from .demo_config import DemoConfig

    p = argparse.ArgumentParser(prog="dq-demo", description="End-to-end demo on the embedded default models.")
    p.add_argument("--report", type=Path, default=DemoConfig.report_dir, help="report folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DemoConfig.num_samples, help="images per model")
    _add_steps(p, "DDIM steps", DemoConfig.steps)
    _add_seed(p)
    p.add_argument("--models", nargs="+", default=list(DemoConfig.models))
    p.add_argument("--quant-model", default=DemoConfig.quant_model, help="model to calibrate, export and verify")
    p.add_argument("--bits", default=DemoConfig.bits)
    p.add_argument("--iters", type=int, default=DemoConfig.iters, help="BKD iterations per block")
    p.add_argument("--no-quant", action="store_true", help="FP sampling and metrics only")
    a = p.parse_args(argv)

    def go() -> None:
        from .demo import run_demo

        out = run_demo(DemoConfig(report_dir=a.report, models=tuple(a.models), num_samples=a.samples,
                                  steps=a.steps, seed=a.seed, quant_model="" if a.no_quant else a.quant_model,
                                  bits=a.bits, iters=a.iters))
        print(f"report written to {out}/README.md")

    _run(go)


def calibrate_main(argv: list[str] | None = None) -> None:
    from .calibrate.distill_config import DistillConfig
    from .calibrate.quant_config import FORMATS, INIT_METHODS, SCALING_METHODS, QuantConfig
    from .core.guidance import DEFAULT_GUIDANCE, TEXT_GUIDANCE

    d, q = DistillConfig(), QuantConfig()
    p = argparse.ArgumentParser(prog="dq-calibrate", description="DilateQuant QAT (WD + TPQ + BKD) -> q.pt")
    _add_model(p, "default | default-cond | sd-digits | sd3-digits | a diffusers UNet folder | a pipeline folder: "
               "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline, "
               "PixArtSigmaPipeline", default="default")
    p.add_argument("--bits", help="weight and activation bits, e.g. W8A8, W4A8, W4A4 (default: W4A8; fp8: W8A8)")
    p.add_argument("--format", choices=FORMATS, default=q.format, help="int: integer levels; fp8: FP8 E4M3 (W8A8, "
                   "symmetric, per-timestep scales; FP8 GEMM/conv needs compute capability 8.9+). The static FP8 "
                   "baseline (ModelOpt's recipe: one amax per tensor over all timesteps) is --no-tpq --act-init minmax")
    _add_steps(p, "sampling steps to calibrate for (T)", q.num_steps)
    p.add_argument("--scheduler", default="pipeline", help="sampler of the calibration trajectories: pipeline (the "
                   "folder's own scheduler, what it is deployed with; DDIM for the embedded models) | ddim | euler | "
                   "euler-a | dpm (DPM-Solver++) | lcm | unipc | pndm, on the folder's noise schedule")
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
    p.add_argument("--act-init", choices=INIT_METHODS, default=q.act_init, help="activation range rule (minmean: ModelOpt's diffusers calibrator)")
    p.add_argument("--first-last-bits", type=int, default=q.first_last_bits, help="0: same as the rest")
    p.add_argument("--float-layers", nargs="+", metavar="LAYER",
                   help="layers left unquantized, weights and input: module names or shell patterns such as "
                        "'*norm1*.linear' (default: the layer whose input is x_t: conv_in of a UNet, pos_embed.proj "
                        "of SD3/PixArt, x_embedder of FLUX; 'none': quantize every layer)")
    p.add_argument("--guidance", type=float, help="guidance scale of the calibration trajectories (default: "
                   f"{DEFAULT_GUIDANCE} for class-token models, the folder's dilatequant.json, else {TEXT_GUIDANCE} "
                   "for SD 1.x/2.x/SDXL and the pipeline's own default for SD3, FLUX (its embedded guidance) and "
                   "PixArt)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="pipeline folders: calibration prompts, one "
                   "per line (default: a small general set shipped with the package)")
    p.add_argument("--negative-prompt", default="", help="the unconditional half of every guided batch (default: '')")
    p.add_argument("--resolution", metavar="HxW", help="image size to calibrate at (default: the denoiser's "
                   "sample_size x the VAE factor; FLUX: 1024x1024)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run at its next unfinished block")
    _add_seed(p)
    p.add_argument("--sample-batch", type=int, help="trajectories per sampling batch (default: 250 in one process, "
                   "an equal share per rank under torchrun; one process with the same value reproduces the set)")
    _add_device(p, "cpu | cuda (under torchrun: one GPU per local rank, NCCL)")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16: BKD's forward passes under bfloat16 autocast (the loss in float32)")
    p.add_argument("--teacher-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: BKD's FP teacher held in bfloat16 and the UNet quantized in place - one float32 copy "
                   "of the UNet, not two (what lets SDXL calibrate in 24 GB); calibration data stays float32")
    a = p.parse_args(argv)

    def go() -> None:
        from .calibrate.distributed import run_on_ranks

        run_on_ranks(lambda dist: _calibrate(a, dist), a.device, a.out)

    _run(go)


def _calibrate(a: argparse.Namespace, dist) -> None:
    from .calibrate.distill_config import DistillConfig
    from .calibrate.quant_config import QuantConfig
    from .calibrate.recipe import CalibrationJob, run_calibration
    from .core.prompts import read_prompts
    from .core.sizes import parse_size

    w_bits, a_bits = QuantConfig.parse_bits(a.bits or ("W8A8" if a.format == "fp8" else "W4A8"))
    config = QuantConfig(weight_bits=w_bits, act_bits=a_bits, symmetric=a.sym or a.format == "fp8",
                         scaling=a.scaling, smoothquant_alpha=a.smoothquant_alpha, tpq=not a.no_tpq,
                         num_steps=a.steps, attn_matmul=a.attn_matmul, act_init=a.act_init,
                         first_last_bits=a.first_last_bits or None,
                         float_layers=None if a.float_layers is None else tuple(n for n in a.float_layers if n != "none"),
                         format=a.format)
    distill = DistillConfig(iters=a.iters, batch=a.batch, lr_weight=a.lr_weight, lr_weight_scale=a.lr_quant,
                            lr_act=a.lr_quant, full_model=a.full_qat, seed=a.seed)
    job = CalibrationJob(model=a.model, config=config, distill=distill, calib_samples=a.calib_samples,
                         bkd=not a.no_bkd, guidance_scale=a.guidance, out=a.out, resume=a.resume,
                         prompts=read_prompts(a.prompts) if a.prompts else None,
                         negative_prompt=a.negative_prompt,
                         resolution=parse_size(a.resolution, "--resolution") if a.resolution else None,
                         sample_batch=a.sample_batch, device=a.device, autocast=a.autocast,
                         teacher_dtype=a.teacher_dtype, scheduler=a.scheduler)
    s = run_calibration(job, dist)
    if not dist.is_main:
        return
    print(f"wrote {a.out}: {config.format_name} {s['distill']['mode']}, {s['wall_s']} s, peak RSS {s['peak_rss_mb']} MB")
    ts = s["scheduler"]["timesteps"]
    print(f"  calibrated for {s['scheduler']['sampler']}, {s['scheduler']['steps']} steps (--scheduler "
          f"{s['scheduler']['name']}): {len(ts)} timesteps {ts[0]} .. {ts[-1]}")
    print("  stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items()))
    print(f"  noise SQNR vs FP on validation inputs: {s['val_before_training']['noise_sqnr_db']:.2f} dB before "
          f"training -> {s['val_after_training']['noise_sqnr_db']:.2f} dB after")
    for block, (first, last) in s["distill"].get("block_losses", {}).items():
        print(f"  {block:<48} loss {first:.3g} -> {last:.3g}")


def export_main(argv: list[str] | None = None) -> None:
    from .dq_export.export_config import PRECISIONS, ExportConfig

    p = argparse.ArgumentParser(prog="dq-export", description="q.pt -> QDQ ONNX with a t_index input "
                                "(TensorRT-legal per-timestep scales), checked and verified")
    p.add_argument("--ckpt", type=Path, help="q.pt written by dq-calibrate")
    p.add_argument("--onnx", type=Path, help="output graph")
    p.add_argument("--precision", help=f"{' | '.join(PRECISIONS)} (int4: weight-only INT4 GEMMs; default: the q.pt's "
                   "format, int8 or fp8)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 (FP16 for everything not quantized)")
    p.add_argument("--static-scales", action="store_true", help="one scale per activation, no t_index (the ModelOpt-style twin)")
    p.add_argument("--static-shapes", action="store_true", help="fix batch and spatial sizes")
    p.add_argument("--batch", type=int, default=2, help="example batch (the fixed one with --static-shapes)")
    p.add_argument("--target", default="tensorrt", help="tensorrt | ort (ONNX Runtime CPU: exact int8 GEMMs "
                   "for wide convs/matmuls, same per-timestep scales; not a TensorRT graph)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity checks (layer-wise, which fails the "
                   "export when a layer does not match the fake-quant model, and end to end)")
    p.add_argument("--torch-floor", action="store_true",
                   help="also run PyTorch against itself at batch 1 (the float-order floor of the parity check)")
    p.add_argument("--check", type=Path, metavar="FILE", help="only check FILE against the TensorRT rules")
    p.add_argument("--fp16-from", type=Path, metavar="FILE", help="only run the FP16 fallback pass on an FP32 QDQ "
                   "ONNX FILE, writing --onnx")
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
        if a.fp16_from:
            from .dq_export.fp16 import convert_file
            from .dq_export.trt_rules import enforce

            if not a.onnx:
                raise UserError("pass --onnx OUT.onnx for the FP16 graph")
            s = convert_file(a.fp16_from, a.onnx)
            enforce(a.onnx)
            print(f"wrote {a.onnx} ({s['bytes'] / 1e6:.2f} MB): {s['fp32_nodes']} of {s['nodes']} nodes kept in FP32, "
                  f"{s['cast_nodes']} casts; TensorRT rules: passed")
            return
        if not a.ckpt or not a.onnx:
            raise UserError("pass --ckpt q.pt --onnx out.onnx (or --check FILE)")
        from .core.metrics import format_sqnr
        from .dq_export.pipeline import export_and_verify

        cfg = ExportConfig(precision=a.precision, dtype=a.dtype, static_scales=a.static_scales,
                           static_shapes=a.static_shapes, batch=a.batch, target=a.target)
        s = export_and_verify(a.ckpt, a.onnx, cfg, verify=not a.no_verify, torch_floor=a.torch_floor)
        print(f"wrote {a.onnx} ({s['bytes'] / 1e6:.2f} MB, {s['precision']}, {s['dtype']}, inputs "
              f"{', '.join(s['inputs'])}) in {s['export_s']} s; TensorRT rules: {s['trt_rules']}")
        lp = s.get("layer_parity")
        if isinstance(lp, dict) and "skipped" not in lp:
            sq = lp["min_layer_sqnr_db"]
            print(f"  layer-wise parity (teacher-forced, {lp['layers']} layers x {lp['t_index_values']} t_index, "
                  f"{lp['samples']} inputs): max level diff {lp['max_level_diff']:.0f}, {lp['differing_levels']} "
                  f"of {lp['levels_compared']} levels differ, min layer SQNR "
                  f"{format_sqnr(sq)}"
                  + (f", FP8 sums at most {lp['max_error_over_bound']:.3g}x their float32 bound"
                     if lp.get("max_error_over_bound") is not None else "") + ": "
                  f"{'passed' if lp['passed'] else 'not enforced (' + lp.get('note', '') + ')'}")
        par = s.get("parity")
        if isinstance(par, dict):
            print(f"  ORT vs PyTorch fake-quant over {len(par['per_t_index'])} t_index values: min SQNR "
                  f"{par['min_sqnr_db']:.1f} dB (median-sample {par['min_median_sample_sqnr_db']:.1f} dB), median "
                  f"{format_sqnr(par['median_sqnr_db'])}, max |err| {par['max_abs_error']:.2e}; {par['samples_below']} of "
                  f"{par['samples']} samples below {par['threshold_db']:.0f} dB")
            if "torch_self_min_sqnr_db" in par:
                print(f"  (PyTorch vs itself at batch 1, the float-order floor: min {par['torch_self_min_sqnr_db']:.1f} "
                      f"dB, median {par['torch_self_median_sqnr_db']:.1f} dB)")
        og = s.get("ort_graph")
        if isinstance(og, dict):
            print(f"  --target ort: {og['integer_convs']} convs and {og['integer_matmuls']} matmuls integer, "
                  f"{og['float_kept']} layers float; {len(og['unmatched'])} quantized layers left as exported"
                  + (f" (e.g. {next(iter(og['unmatched'].items()))}; all in the report)" if og["unmatched"] else ""))
        print(f"  report: {a.onnx}.export.json")

    _run(go)


def build_engine_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dq-build-engine", description="QDQ ONNX -> TensorRT engine (strongly typed: "
                                "precision comes from the graph) + <engine>.json sidecar; TensorRT 11 on a GPU, or "
                                "TensorRT-RTX, which builds without one")
    p.add_argument("--onnx", type=Path, help="graph written by dq-export")
    p.add_argument("--engine", type=Path, help="plan to write, e.g. unet.plan")
    p.add_argument("--backend", default="auto", help="auto | tensorrt | tensorrt-rtx (auto: TensorRT 11 when it and a "
                   "GPU are here, else TensorRT-RTX; default: %(default)s)")
    p.add_argument("--compute-capability", metavar="CC,...", help="TensorRT-RTX targets, e.g. 8.6,8.9,12.0 "
                   "(default: TensorRT-RTX's portable set)")
    p.add_argument("--fp16-fallback", action="store_true", help="run the Q/DQ-aware FP16 pass first: everything "
                   "not quantized runs in FP16 (the graph built is kept as <engine>.fp16.onnx)")
    for level in ("min", "opt", "max"):
        p.add_argument(f"--{level}-shapes", metavar="NAME:BxCxHxW,...", help=f"{level} shapes of the optimization "
                       "profile; inputs sharing a dimension (batch) follow; default batch 1/4/16, rest from the graph")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="tactic timing cache: loaded if present, saved (merged) after the build (TensorRT 11)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default: %(default)s)")
    p.add_argument("--workspace-gb", type=float, help="workspace memory pool limit in GiB (default: TensorRT's)")
    p.add_argument("--inspect", action="store_true", help="detailed profiling verbosity and the engine inspector's "
                   "layer table as <engine>.layers.json (TensorRT 11)")
    a = p.parse_args(argv)

    def go() -> None:
        if not a.onnx or not a.engine:
            raise UserError("pass --onnx unet.onnx --engine unet.plan")
        from .engines.tensorrt.build import BuildConfig, build_engine, describe

        cfg = BuildConfig(onnx=a.onnx, engine=a.engine, fp16_fallback=a.fp16_fallback, min_shapes=a.min_shapes,
                          opt_shapes=a.opt_shapes, max_shapes=a.max_shapes, timing_cache=a.timing_cache,
                          opt_level=a.opt_level, workspace_gb=a.workspace_gb, inspect=a.inspect, backend=a.backend,
                          compute_capabilities=a.compute_capability)
        print("\n".join(describe(build_engine(cfg))))

    _run(go)


def triton_main(argv: list[str] | None = None) -> None:
    from .engines.triton.repository_config import KINDS, RepositoryConfig

    d = RepositoryConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="dq-triton", description="Write a Triton model repository: the UNet "
                                "(TensorRT plan, ONNX Runtime, or Python+ORT for CPU) and a `pipeline` model (DDIM "
                                "over class labels; for Stable Diffusion graphs, prompts through text_encoder and "
                                "vae_decoder models)")
    _add_runtime(p, "QDQ ONNX graph written by dq-export", engine_help="TensorRT plan (with its <plan>.json sidecar)")
    p.add_argument("--repo", type=Path, required=True, help="repository folder to write")
    p.add_argument("--ckpt", type=Path, help="q.pt the graph came from (class tokens, scheduler); "
                   "default: the base model named in the graph's metadata")
    _add_model(p, "prompted graphs: the pipeline folder it was calibrated from (StableDiffusionPipeline, "
               "StableDiffusionXLPipeline or StableDiffusion3Pipeline: text encoders, VAE, tokenizers; default: the "
               "base model named in the graph's metadata)")
    p.add_argument("--max-batch", type=int, default=d["max_batch"].default, help="unet max_batch_size (%(default)s)")
    p.add_argument("--instances", type=int, default=d["instances"].default, help="unet instances (%(default)s)")
    p.add_argument("--pipeline-instances", type=int, default=d["pipeline_instances"].default,
                   help="concurrent pipeline instances (%(default)s)")
    p.add_argument("--kind", choices=KINDS, default="gpu", help="gpu: tensorrt_plan/onnxruntime_onnx on GPUs; "
                   "cpu: Python backend running ONNX Runtime (pytriton's bundled server)")
    p.add_argument("--name", default="unet", help="name of the UNet model (%(default)s)")
    p.add_argument("--max-queue-delay-us", type=int, default=d["max_queue_delay_us"].default,
                   help="dynamic batching delay (%(default)s)")
    p.add_argument("--threads", type=int, default=0, help="--kind cpu: ORT threads per unet instance (0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.add_argument("--serving-tensorrt", metavar="VERSION", help="TensorRT release of the Triton container that will "
                   "serve --engine (e.g. 11.4.0); a plan built by another release is refused")
    a = p.parse_args(argv)

    def go() -> None:
        from .engines.triton.repository import write_repository

        s = write_repository(RepositoryConfig(
            repo=a.repo, onnx=a.onnx, engine=a.engine, ckpt=a.ckpt, model=a.model, kind=a.kind, name=a.name, max_batch=a.max_batch,
            instances=a.instances, pipeline_instances=a.pipeline_instances, max_queue_delay_us=a.max_queue_delay_us,
            intra_op_threads=a.threads, overwrite=a.overwrite, serving_tensorrt=a.serving_tensorrt))
        encoders = " + ".join(m for m in s["models"] if m.startswith("text_encoder"))
        kind = (f"prompts: {encoders} -> unet -> vae_decoder" if s["prompts"] else
                "class-conditional" if s["conditional"] else "unconditional")
        print(f"wrote {s['repo']}: '{a.name}' ({s['unet_backend']}, max batch {s['max_batch']}, inputs "
              f"{', '.join(s['inputs'])}) + 'pipeline' ({len(s['timesteps'])} calibrated timesteps, {kind}); "
              "configs validated")
        print(f"  serve it: dq-serve --repo {s['repo']}")

    _run(go)


def serve_main(argv: list[str] | None = None) -> None:
    from .engines.triton.health import PROBES

    p = argparse.ArgumentParser(prog="dq-serve", description="Start Triton on a repository (127.0.0.1 only) and keep "
                                "it serving: crashed backends are reloaded, a dead server is restarted")
    p.add_argument("--repo", type=Path, help="the model repository (dq-triton --repo)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--health-port", type=int, default=8003, help="dq-serve's health endpoint: /v2/health/ready and "
                   "/live answer whether the models can serve (%(default)s)")
    p.add_argument("--log", type=Path, help="write the server log here")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    p.add_argument("--drain-timeout", type=int, default=30, help="seconds Triton waits for requests in flight when "
                   "stopped (%(default)s)")
    p.add_argument("--probe", choices=PROBES, help="ask a running dq-serve (on --health-port) whether it is live or "
                   "ready: one line, exit 0 (yes) or 1 (no); for orchestrators' exec probes")
    a = p.parse_args(argv)

    def go() -> None:
        if a.probe:
            from .engines.triton.health import probe

            ok, line = probe(a.health_port, a.probe)
            print(line, flush=True)
            sys.exit(0 if ok else 1)
        if a.repo is None:
            raise UserError("pass --repo DIR (a repository written by dq-triton), or --probe live|ready")
        from .engines.triton.serving import serve

        serve(a.repo, a.http_port, a.grpc_port, a.health_port, a.log, a.timeout, a.drain_timeout)

    _run(go)


def client_main(argv: list[str] | None = None) -> None:
    from .engines.triton.retry import RetryPolicy

    p = argparse.ArgumentParser(prog="dq-client", description="Generate images with a served `pipeline` model")
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port (HTTP 8000, gRPC 8001 by default)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--label", type=int, nargs="+", help="class label(s), one image each (conditional models)")
    p.add_argument("--prompt", help="text to generate from (Stable Diffusion repositories)")
    p.add_argument("--negative-prompt", help="with --prompt: the unconditional half under guidance (default '')")
    p.add_argument("--size", metavar="HxW", help="with --prompt: image size in pixels (default: the calibrated size)")
    p.add_argument("--scheduler", choices=("pipeline", "ddim", "euler", "dpm"), help="with --prompt: sampler (default: "
                   "pipeline, the folder's own, as dq-generate)")
    p.add_argument("--num-images", type=int, help="unconditional models and prompts: images to generate (default 1)")
    _add_steps(p, "sampling steps (default: the server's; the calibrated count for class models, 20 for prompts as "
               "dq-generate)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the server's)")
    _add_seed(p)
    p.add_argument("--model", default="pipeline")
    p.add_argument("--timeout", type=float, default=RetryPolicy.deadline_s,
                   help="seconds for the whole call, retries included (%(default)s)")
    p.add_argument("--retries", type=int, default=RetryPolicy.retries,
                   help="attempts after the first when the server is restarting, recovering a model or timed out; "
                   "waits 0.5 s, 1 s, 2 s ... (at most 8 s) between them (%(default)s)")
    p.add_argument("--out", type=Path, default=Path("img.png"))
    a = p.parse_args(argv)

    def go() -> None:
        from .engines.triton.client import fetch_images, pipeline_inputs, prompt_inputs, save_png

        policy = RetryPolicy(retries=a.retries, deadline_s=a.timeout)
        if a.prompt is not None:
            if a.label:
                raise UserError("pass --prompt (Stable Diffusion repositories) or --label (class models), not both")
            from .core.sizes import parse_size  # torch-free, as the client is

            arrays = prompt_inputs(a.prompt, a.seed, steps=a.steps, guidance=a.guidance,
                                   negative_prompt=a.negative_prompt, num_images=a.num_images, scheduler=a.scheduler,
                                   size=parse_size(a.size) if a.size else None)
        else:
            for flag, v in (("--negative-prompt", a.negative_prompt), ("--size", a.size), ("--scheduler", a.scheduler)):
                if v is not None:
                    raise UserError(f"{flag} goes with --prompt (Stable Diffusion repositories)")
            arrays = pipeline_inputs(a.label, a.seed, a.steps, a.guidance, a.num_images or 1)
        images, attempts = fetch_images(a.url, arrays, a.protocol, a.model, policy)
        save_png(images, a.out)
        print(f"wrote {a.out}: {len(images)} image(s) {images.shape[1]}x{images.shape[2]} (seed {a.seed}; "
              f"{attempts.summary()})")

    _run(go)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers like 1,4,8, got '{text}'") from None
    if not values:
        raise UserError(f"{flag} takes comma-separated integers like 1,4,8, got '{text}'")
    return values


def verify_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dq-verify", description="Accuracy, speed and memory of an exported runtime "
                                "(ONNX Runtime or TensorRT) against the PyTorch fake-quant and FP models")
    p.add_argument("--ckpt", type=Path, required=True, help="q.pt the runtime was exported from")
    _add_runtime(p, "graph written by dq-export (runs in ONNX Runtime)")
    p.add_argument("--report", type=Path, required=True, help="report folder")
    p.add_argument("--batch", default="1,4,8", help="batch sizes for UNet latency (default: %(default)s)")
    _add_device(p, "cpu | cuda (ONNX Runtime CUDA EP, PyTorch baselines on cuda)")
    p.add_argument("--samples", type=int, default=16, help="images per runtime")
    _add_steps(p, "sampling steps for the images (default: the calibrated count T)")
    p.add_argument("--scheduler", default="pipeline", help="sampler of the images, the step-count table and the "
                   "sampler timing: pipeline (the model's own, what it is deployed with) | ddim | euler | euler-a | dpm "
                   "| lcm | unipc | pndm (default: %(default)s); the per-step SQNR always runs the calibrated sampler")
    p.add_argument("--mapped-steps", help="other step counts to measure schedule mapping at (default: T/2,2T)")
    p.add_argument("--traj-samples", type=int, default=4, help="FP trajectories for per-step SQNR")
    p.add_argument("--repeats", type=int, default=20, help="timed UNet calls per batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: torch's)")
    _add_model(p, "FP model (default: the one the checkpoint was calibrated from)")
    _add_seed(p)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline on CUDA")
    p.add_argument("--layer-per-step", type=int, default=2, help="calibration inputs per t_index for the teacher-forced "
                   "layer-wise parity (0: skip; default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="report a failed layer-wise parity and exit 0 (default: "
                   "exit 1 with one line naming the failed check; a runtime that cannot run the graph always fails)")
    a = p.parse_args(argv)

    def go() -> None:
        # cheap checks first: no torch import for a typo
        batches = _int_list(a.batch, "--batch")
        mapped = _int_list(a.mapped_steps, "--mapped-steps") if a.mapped_steps else None
        if a.device not in ("cpu", "cuda"):
            raise UserError(f"unknown device '{a.device}': choose cpu or cuda")
        from .engines.verify import VerifyConfig, enforce, run_verify

        cfg = VerifyConfig(ckpt=a.ckpt, runtime=a.onnx or a.engine, report_dir=a.report, batches=batches,
                           device=a.device, num_samples=a.samples, steps=a.steps, traj_samples=a.traj_samples,
                           repeats=a.repeats, warmup=a.warmup, mapped_steps=mapped, threads=a.threads,
                           model=a.model, seed=a.seed, compile=not a.no_compile, layer_per_step=a.layer_per_step,
                           scheduler=a.scheduler)
        r = run_verify(cfg)
        sq, img = r["accuracy"]["noise_sqnr_db"], r["accuracy"]["images"]
        print(f"{r['runtime']['name']}: per-step noise SQNR vs fake-quant mean "
              f"{sq['runtime_vs_fake_quant_sqnr_db']['mean']:.1f} dB (min {sq['runtime_vs_fake_quant_sqnr_db']['min']:.1f}), "
              f"vs FP {sq['runtime_vs_fp_sqnr_db']['mean']:.1f} dB; images PSNR vs fake-quant "
              f"{img['runtime_vs_fake_quant']['image_psnr_db']:.1f} dB, vs FP {img['runtime_vs_fp']['image_psnr_db']:.1f} dB")
        lp = r.get("layer_parity") or {}
        if "passed" in lp and "skipped" not in lp:
            print(f"  layer-wise parity: {'passed' if lp['passed'] else 'FAILED'}"
                  + (f" (max level diff {lp['max_level_diff']:.0f}, min layer SQNR {lp['min_layer_sqnr_db']:.1f} dB)"
                     if "max_level_diff" in lp else f": {lp.get('error', '')}"))
        for name, per_b in r["speed"]["speedup_of_runtime"].items():
            print(f"  speedup vs {name}: " + ", ".join(f"batch {b} {v:.2f}x" for b, v in per_b.items()))
        print(f"report written to {a.report}/README.md")
        if not a.report_only:
            enforce(r)

    _run(go)


def generate_main(argv: list[str] | None = None) -> None:
    from .core.sizes import parse_size
    from .engines.generate_config import SCHEDULERS, GenerateConfig

    p = argparse.ArgumentParser(prog="dq-generate", description="a prompt through the model's own diffusers pipeline "
                                "with the quantized denoiser dropped into it (pipe.unet, or pipe.transformer for "
                                "SD3, FLUX.1 and PixArt-Sigma)")
    _add_model(p, "the pipeline folder the runtime was calibrated from", required=True)
    _add_runtime(p, "graph written by dq-export (ONNX Runtime)", ckpt_help="q.pt (PyTorch fake-quant)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    _add_steps(p, "sampling steps (other counts than the calibrated one use the nearest calibrated timestep's "
               "scales; default: %(default)s)", GenerateConfig.steps)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="pipeline", help="sampler: pipeline (the folder's own "
                   "scheduler; DDIM for sd-digits) or one on its noise schedule; dpm: DPM-Solver++ (default: "
                   "%(default)s; diffusion transformers: only their own)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's own from its folder's dilatequant.json, e.g. 3.0 for sd-digits; else the pipeline's, 7.5)")
    _add_seed(p)
    p.add_argument("--size", metavar="HxW", help="image size in pixels (default: the calibrated size)")
    _add_device(p, "cpu | cuda (ONNX Runtime CUDA EP, fake-quant on cuda)")
    p.add_argument("--compare-fp", action="store_true", help="also the FP pipeline from the same seed: <out>-fp.png, "
                   "<out>-side-by-side.png, PSNR/SSIM in <out>.json")
    p.add_argument("--out", type=Path, default=Path("img.png"))
    a = p.parse_args(argv)

    def go() -> None:
        from .engines.generate import generate

        cfg = GenerateConfig(model=a.model, runtime=a.onnx or a.engine or a.ckpt, prompt=a.prompt, out=a.out,
                             negative_prompt=a.negative_prompt, steps=a.steps, scheduler=a.scheduler,
                             guidance=a.guidance, seed=a.seed, size=parse_size(a.size) if a.size else None,
                             compare_fp=a.compare_fp, device=a.device)
        r = generate(cfg)
        print(f"wrote {a.out} ({r['settings']['size'][0]}x{r['settings']['size'][1]}, {r['settings']['sampler']} {a.steps} "
              f"steps, {r['denoiser_calls']} denoiser calls on {r['runner']['name']})")
        if "vs_fp" in r:
            v = r["vs_fp"]
            ssim_text = "n/a" if v["image_ssim"] is None else f"{v['image_ssim']:.4f}"
            print(f"  vs FP pipeline, same seed: PSNR {v['image_psnr_db']:.2f} dB, SSIM {ssim_text}; "
                  f"{r['images']['side_by_side']}")

    _run(go)


def main() -> None:
    """`python -m dilatequant.cli <command> ...` for environments without the console scripts."""
    commands = {"demo": demo_main, "calibrate": calibrate_main, "export": export_main, "verify": verify_main,
                "generate": generate_main,
                "build-engine": build_engine_main, "triton": triton_main, "serve": serve_main, "client": client_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m dilatequant.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
