"""CPU speed of the exported graphs on ONNX Runtime (issue 5, deliverable 4), measured side by side.

For each model: ORT FP32 (the FP UNet exported with torch.onnx), ORT on the TensorRT-style QDQ graph,
ORT on the `--target ort` integer graph, and PyTorch FP32 eager, interleaved round by round in one
process (so a busy machine slows all of them alike), at each batch size; median and p90 latency and
the ratios against ORT FP32. Models: the embedded `default` / `default-cond` q.pt files, and an
SD-width UNet2DConditionModel (block_out_channels 320/640/1280, random weights, PTQ only: speed is the
point) at a small latent.

    python -m dilatequant.cli calibrate --model default --bits W8A8 --steps 10 --calib-samples 64 \\
        --iters 5 --sym --out /tmp/q_default.pt        # and the same for default-cond
    python benchmarks/cpu_speed.py --ckpt default=/tmp/q_default.pt --ckpt default-cond=/tmp/q_cond.pt \\
        --work /tmp/cpu_speed --out benchmarks/results
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dilatequant.calibrate.calibration_data import CalibrationSet
from dilatequant.calibrate.checkpoint import load_checkpoint, save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.core.metrics import sqnr_db
from dilatequant.core.models import ClassTokenEncoder, DiffusionModel, default_scheduler, load_model
from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.core.sampling import sampling_timesteps
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.graph_passes import simplify
from dilatequant.dq_export.onnx_files import save_model
from dilatequant.dq_export.ort_graph import convert_file
from dilatequant.dq_export.parity import ORT_DISABLED_OPTIMIZERS
from dilatequant.dq_export.qdq_graph import export_onnx

VARIANTS = ("ort_fp32", "ort_qdq_trt_style", "ort_int_target_ort", "torch_fp32_eager")


def physical_cores() -> int:
    cores = set()
    phys = core = None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("physical id"):
            phys = line.split(":")[1].strip()
        elif line.startswith("core id"):
            core = line.split(":")[1].strip()
            cores.add((phys, core))
    return len(cores) or os.cpu_count() or 1


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            keep = ("avx", "vnni", "amx", "fma", "f16c")
            return sorted(f for f in line.split(":")[1].split() if any(k in f for k in keep))
    return []


def sd_width_model(latent: int, seed: int = 0) -> DiffusionModel:
    """Stable Diffusion's channel widths (320/640/1280, 8 heads, 768-d cross-attention), 3 levels, 1 layer each."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval()
    return DiffusionModel(unet, default_scheduler(), ClassTokenEncoder(dim=768).eval(), source="random:sd-width")


def sd_width_checkpoint(path: Path, latent: int, steps: int, samples: int) -> tuple[Path, DiffusionModel]:
    """PTQ on random inputs with absmax weight scales and no dilation (the MSE scale search takes tens of
    minutes on 316 M weights): the graph's structure is what is timed, not its accuracy."""
    from dilatequant.calibrate import quantizers

    model = sd_width_model(latent)
    fp = copy.deepcopy(model)
    if path.is_file():
        return path, fp
    timesteps = sampling_timesteps(model, steps)
    gen = torch.Generator().manual_seed(1)
    t_index = torch.arange(samples) % steps
    labels = torch.arange(samples) % 10
    with torch.no_grad():
        ehs = model.class_encoder(labels)
    data = CalibrationSet(sample=torch.randn(samples, 4, latent, latent, generator=gen),
                          timestep=torch.tensor(timesteps)[t_index], t_index=t_index,
                          cond={"encoder_hidden_states": ehs})
    cfg = QuantConfig(weight_bits=8, act_bits=8, symmetric=True, num_steps=steps, act_init="minmax", scaling="none")
    absmax = lambda self, w: self.scale.copy_(w.abs().flatten(1).amax(1).clamp_min(1e-8) / self.range.qmax)  # noqa: E731
    cls = quantizers.WeightQuantizer
    original, cls.init_from = cls.init_from, absmax
    try:
        q, _ = prepare(model.unet, cfg, data)
    finally:
        cls.init_from = original
    save_checkpoint(path, q, model, timesteps, "random:sd-width", {"note": "PTQ on random inputs, speed only"})
    return path, fp


class _FPWrapper(torch.nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states=None):
        kw = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        return self.unet(sample, timestep, return_dict=False, **kw)[0]


def export_fp32(model: DiffusionModel, feeds: dict, path: Path) -> None:
    """The FP UNet through the same exporter and clean-up as the quantized graph (no Q/DQ)."""
    if path.is_file():
        return
    names = ["sample", "timestep"] + (["encoder_hidden_states"] if model.is_conditional else [])
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_FPWrapper(model.unet.eval()), tuple(torch.from_numpy(feeds[n]) for n in names),
                                    input_names=names, output_names=["noise_pred"], dynamo=True, opset_version=21,
                                    dynamic_shapes={n: {0: batch} for n in names}, verbose=False, optimize=False)
    save_model(simplify(program.model), path)  # over ~2 GB (SD 1.5's 3.4 GB): external data


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle worker threads must not spin: variants run one after another on the same cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=ORT_DISABLED_OPTIMIZERS)


def make_feeds(model: DiffusionModel, timesteps: list[int], batch: int) -> dict[str, np.ndarray]:
    c, h, w = model.sample_shape
    gen = torch.Generator().manual_seed(batch)
    t_index = torch.arange(batch) % len(timesteps)
    feeds = {"sample": torch.randn(batch, c, h, w, generator=gen).numpy(),
             "timestep": torch.tensor(timesteps)[t_index].numpy(), "t_index": t_index.numpy()}
    if model.is_conditional:
        with torch.no_grad():
            feeds["encoder_hidden_states"] = model.class_encoder(torch.arange(batch) % 10).numpy()
    return feeds


def measure(runners: dict, rounds: int, warmup: int) -> dict[str, dict]:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):  # interleaved: every round runs every variant once
        for k, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: {"median_ms": 1e3 * float(np.median(v)), "p90_ms": 1e3 * float(np.percentile(v, 90)),
                "min_ms": 1e3 * float(np.min(v)), "runs": len(v)} for k, v in times.items()}


def prepare_graphs(name: str, ckpt: Path, fp: DiffusionModel, work: Path) -> dict:
    """The three graphs of a checkpoint, each written once and reused: QDQ (TensorRT form), ORT integer, FP32."""
    work.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(ckpt)
    paths = {"ort_qdq_trt_style": work / f"{name}_qdq.onnx", "ort_int_target_ort": work / f"{name}_ort.onnx",
             "ort_fp32": work / f"{name}_fp32.onnx"}
    t0 = time.perf_counter()
    if not paths["ort_qdq_trt_style"].is_file():
        export_onnx(ckpt, paths["ort_qdq_trt_style"], ExportConfig())
    rewrite = convert_file(paths["ort_qdq_trt_style"], paths["ort_int_target_ort"])
    export_fp32(fp, make_feeds(fp, ck.timesteps, 2), paths["ort_fp32"])
    print(f"{name}: graphs ready in {time.perf_counter() - t0:.0f} s; rewrite {rewrite}", flush=True)
    return {"paths": paths, "rewrite": rewrite, "timesteps": ck.timesteps, "bits": ck.qunet.config.bits_name,
            "symmetric": ck.qunet.config.symmetric}


def variant_runner(variant: str, graphs: dict, fp: DiffusionModel | None, threads: int):
    """run(feeds) -> output array for one variant; only that variant's session (or model) is loaded (the FP
    model only for PyTorch)."""
    if variant == "torch_fp32_eager":
        torch.set_num_threads(threads)
        fpw = _FPWrapper(fp.unet.eval())

        def run(feeds):
            with torch.inference_mode():
                return fpw(**{k: torch.from_numpy(v) for k, v in feeds.items() if k != "t_index"}).numpy()
        return run
    s = session(graphs["paths"][variant], threads)
    names = [i.name for i in s.get_inputs()]
    return lambda feeds: s.run(None, {n: feeds[n] for n in names})[0]


def _batch_row(lat: dict, outs: dict) -> dict:
    base = lat["ort_fp32"]["median_ms"]
    row = {"latency": lat, "speedup_vs_ort_fp32": {k: base / v["median_ms"] for k, v in lat.items()}}
    if "ort_int_target_ort" in outs and "ort_qdq_trt_style" in outs:
        row["int_vs_qdq_sqnr_db"] = sqnr_db(torch.from_numpy(outs["ort_int_target_ort"]),
                                            torch.from_numpy(outs["ort_qdq_trt_style"]))
    if "ort_qdq_trt_style" in outs and "ort_fp32" in outs:
        row["quant_vs_fp32_sqnr_db"] = sqnr_db(torch.from_numpy(outs["ort_qdq_trt_style"]),
                                               torch.from_numpy(outs["ort_fp32"]))
    return row


def model_info(graphs: dict, fp: DiffusionModel, ckpt: Path) -> dict:
    return {"checkpoint": str(ckpt), "bits": graphs["bits"], "symmetric": graphs["symmetric"],
            "sample_shape": list(fp.sample_shape), "parameters_m": sum(p.numel() for p in fp.unet.parameters()) / 1e6,
            "graph_bytes": {k: p.stat().st_size for k, p in graphs["paths"].items()}, "rewrite": graphs["rewrite"],
            "batches": {}}


def bench_model(name: str, ckpt: Path, fp: DiffusionModel, work: Path, batches: list[int], threads: int,
                rounds: int, warmup: int) -> dict:
    """Every variant in one process, interleaved round by round (a busy machine slows all of them alike)."""
    graphs = prepare_graphs(name, ckpt, fp, work)
    if not batches:
        return {}
    runs = {v: variant_runner(v, graphs, fp, threads) for v in VARIANTS}
    out = model_info(graphs, fp, ckpt)
    for batch in batches:
        feeds = make_feeds(fp, graphs["timesteps"], batch)
        outs = {k: run(feeds) for k, run in runs.items()}
        lat = measure({k: (lambda run=run: run(feeds)) for k, run in runs.items()}, rounds, warmup)
        out["batches"][str(batch)] = row = _batch_row(lat, outs)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in lat.items())
              + f"; target-ort speedup {row['speedup_vs_ort_fp32']['ort_int_target_ort']:.2f}x", flush=True)
    return out


def bench_variant(variant: str, graphs: dict, feeds_of: dict[int, dict], fp: DiffusionModel | None, threads: int,
                  rounds: int, warmup: int, outputs: Path) -> dict:
    """One variant alone (its own process, for models whose sessions do not fit in memory together): latency
    per batch on the same feeds as the others (make_feeds, saved once), and its outputs saved as
    outputs/<variant>-b<batch>.npy for combine_variants' SQNRs."""
    run = variant_runner(variant, graphs, fp, threads)
    res = {}
    for batch, feeds in feeds_of.items():
        np.save(outputs / f"{variant}-b{batch}.npy", run(feeds))
        res[str(batch)] = measure({variant: lambda: run(feeds)}, rounds, warmup)[variant]
        print(f"  {variant} batch {batch}: {res[str(batch)]['median_ms']:.1f} ms", flush=True)
    return res


def combine_variants(info: dict, per_variant: dict[str, dict], outputs: Path) -> dict:
    """bench_model's result from variants measured one after another (bench_variant)."""
    out = dict(info, batches={})
    for batch in next(iter(per_variant.values())):
        lat = {v: per_variant[v][batch] for v in VARIANTS if v in per_variant}
        outs = {v: np.load(outputs / f"{v}-b{batch}.npy") for v in lat}
        out["batches"][batch] = _batch_row(lat, outs)
    return out


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"# CPU speed: ONNX Runtime {res['environment']['onnxruntime']} on {res['environment']['cpu']}",
             "", f"{s['threads']} threads (physical cores; ORT thread spinning off), {s['rounds']} interleaved rounds after {s['warmup']} "
             f"warm-up runs; load average at start {s['loadavg_start']}, end {res['loadavg_end']}. "
             f"CPU flags: {' '.join(res['cpu_flags'])}.", "",
             "Latency median / p90 in ms; speedup = ORT FP32 median / variant median.", "",
             "| model | batch | ORT FP32 | ORT QDQ (TensorRT-style) | ORT `--target ort` | PyTorch FP32 eager | "
             "target-ort speedup | QDQ speedup | PyTorch speedup | int vs QDQ SQNR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for b, row in m["batches"].items():
            lat, sp = row["latency"], row["speedup_vs_ort_fp32"]
            cell = lambda k: f"{lat[k]['median_ms']:.1f} / {lat[k]['p90_ms']:.1f}"  # noqa: E731
            lines.append(f"| {name} | {b} | {cell('ort_fp32')} | {cell('ort_qdq_trt_style')} | "
                         f"{cell('ort_int_target_ort')} | {cell('torch_fp32_eager')} | "
                         f"**{sp['ort_int_target_ort']:.2f}x** | {sp['ort_qdq_trt_style']:.2f}x | "
                         f"{sp['torch_fp32_eager']:.2f}x | {row['int_vs_qdq_sqnr_db']:.0f} dB |")
    lines += ["", "Models: " + "; ".join(
        f"{n}: {m['bits']} {'sym' if m['symmetric'] else 'asym'}, sample {m['sample_shape']}, "
        f"{m['parameters_m']:.1f} M parameters, {m['rewrite']['integer_convs']} integer convs + "
        f"{m['rewrite']['integer_matmuls']} integer matmuls ({m['rewrite']['float_kept']} kept float)"
        for n, m in res["models"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=q.pt",
                   help="a default model's checkpoint (repeat): default=..., default-cond=...")
    p.add_argument("--sd-latent", type=int, default=16, help="SD-width latent size (4 x N x N); 0 skips it")
    p.add_argument("--sd-steps", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="none: only build the graphs")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: physical cores")
    p.add_argument("--work", type=Path, default=Path("/tmp/dq_cpu_speed"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    threads = a.threads or physical_cores()
    settings = {"threads": threads, "rounds": a.rounds, "warmup": a.warmup, "batches": a.batches,
                "sd_latent": a.sd_latent, "loadavg_start": list(os.getloadavg())}
    res = {"settings": settings, "environment": environment(), "cpu_flags": cpu_flags(), "models": {}}
    for spec in a.ckpt:
        name, _, path = spec.partition("=")
        res["models"][name] = bench_model(name, Path(path), load_model(name), a.work, a.batches, threads,
                                          a.rounds, a.warmup)
    if a.sd_latent:
        ckpt, fp = sd_width_checkpoint(a.work / f"sd_width_{a.sd_latent}.pt", a.sd_latent, a.sd_steps, 8)
        res["models"][f"sd-width-{a.sd_latent}"] = bench_model(f"sd_width_{a.sd_latent}", ckpt, fp, a.work,
                                                               a.batches, threads, a.rounds, a.warmup)
    res["loadavg_end"] = list(os.getloadavg())
    if not a.batches:
        return
    write_json(a.out / "cpu_speed.json", res)
    write_text(a.out / "cpu_speed.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
