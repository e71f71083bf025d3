"""The whole chain on an SD-1.5-architecture UNet (benchmarks/unet_configs.py): wall time, peak RSS and file sizes
per stage, in results/real_scale/<unet>.{json,md}.

Every stage is the user's own command in a fresh process, timed by /usr/bin/time (wall, max RSS):

    model        the UNet from its config, random weights from seed 0, saved as a class-token model folder
                 (unet/ + class_encoder/: 77 tokens x cross_attention_dim, SD 1.5's text-conditioning shape)
    calibrate    dq-calibrate W4A8 --sym, T=4, 16 samples, a few BKD iterations per block, at a reduced latent
                 (its own per-stage times - load, calibration data, TPQ init, BKD - come from q.pt's summary)
    export_int8  dq-export (TensorRT rules, layer-wise and end-to-end ORT parity inside it)
    export_int4  dq-export --precision int4 (weight-only INT4 GEMMs)
    fp16         dq-export --fp16-from (the FP16 fallback pass) + its rules check
    rules        dq-export --check on the int8 graph
    build_rtx    dq-build-engine --backend tensorrt-rtx on the int8 graph: NVIDIA's parser and builder, CPU-only ahead of
                 time for TensorRT-RTX's default targets, batch 1/2/8 at the UNet's sample_size (64x64 latents for
                 SD 1.5); peak RSS includes the builder's child process (/usr/bin/time reports the largest of the
                 process and its waited-for children)
    verify_ort   dq-verify of the int8 graph on ONNX Runtime (2 images, batch 1, 3 timed calls: bounded at SD size)
    triton_repository  dq-triton --kind cpu on the int8 graph
    speed_*      benchmarks/cpu_speed.py's ORT FP32 / ORT QDQ / ORT integer / PyTorch FP32 at the UNet's own
                 sample_size (64x64 latents for SD 1.5), batch 1 and 2: the graphs first (speed_graphs), then each
                 variant in its own process (at SD 1.5 width four sessions do not fit one process), on the same feeds

SDXL's UNet gets an SDXL pipeline folder (its text towers at full size, pooled text embeddings and time ids).

Diffusion transformers (`--unet sd3-medium`, or a narrower `sd3-medium/8`): an SD3 pipeline folder around
SD3-medium's transformer (public config, random weights from seed 0), CLIP-L and CLIP-G text towers at full
depth and width with projections, SD3's 16-channel VAE, FlowMatchEuler (shift 3). The T5-XXL slot is empty
(SD3's documented no-T5 mode: the pipeline appends `max_sequence_length` zero tokens, --t5-tokens, written to
the folder's dilatequant.json), so the transformer sees [B, 77 + t5_tokens, 4096] prompts and [B, 2048] pooled
embeddings from the pipeline's own encode_prompt. Its stages: model, calibrate (bf16 teacher), export_int8
(external data, rules, layer-wise parity), export_int4, fp16_fallback, rules_check and build_rtx (dq-build-engine --backend tensorrt-rtx: an engine
built ahead of time on the CPU, no GPU needed).

    nice -n 19 python benchmarks/real_scale.py --unet sd15-tiny
    flock /tmp/dq-heavy.lock python benchmarks/real_scale.py --unet sd3-medium --teacher-dtype bf16 --calib-latent 16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "real_scale"
HERE = Path(__file__).resolve().parent
TOKENS = 77  # CLIP's sequence length: encoder_hidden_states [B, 77, cross_attention_dim]
STAGES = ("model", "calibrate", "export_int8", "export_int4", "fp16_fallback", "rules_check", "build_rtx",
          "verify_ort", "triton_repository", "speed")
# a transformer's chain: dq-verify, the Triton SD repository and cpu_speed are UNet-only here
TRANSFORMER_STAGES = ("model", "calibrate", "export_int8", "export_int4", "fp16_fallback", "rules_check", "build_rtx")


def build_model(unet_name: str, folder: Path, t5_tokens: int = 0) -> dict:
    """The folder dq-calibrate loads: SD 1.5's UNet with class-token conditioning (core/models.py: unet/ +
    class_encoder/ + scheduler), SDXL's (text_time conditioning) in an SDXL pipeline folder (sdxl_pipeline), a
    transformer in an SD3 pipeline folder (sd3_pipeline)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dilatequant.core.models import ClassTokenEncoder, default_scheduler
    from unet_configs import is_transformer, transformer_config, unet_config

    torch.manual_seed(0)
    if is_transformer(unet_name):
        import diffusers

        cfg = transformer_config(unet_name)
        transformer = getattr(diffusers, cfg["_class_name"]).from_config(cfg).eval()
        info = {"unet_params": sum(p.numel() for p in transformer.parameters()), "sample_size": cfg["sample_size"]}
        return {**info, **sd3_pipeline(transformer, folder, t5_tokens)}
    unet = UNet2DConditionModel.from_config(unet_config(unet_name)).eval()
    info = {"unet_params": sum(p.numel() for p in unet.parameters()), "sample_size": unet.config.sample_size,
            "vae_scale_factor": 1}
    if unet.config.addition_embed_type == "text_time":
        return {**info, **sdxl_pipeline(unet, folder)}
    enc = ClassTokenEncoder(num_tokens=TOKENS, dim=unet.config.cross_attention_dim).eval()
    unet.save_pretrained(folder / "unet", max_shard_size=SHARD)
    enc.save_pretrained(folder / "class_encoder")
    default_scheduler().save_pretrained(folder / "scheduler")
    return info


SHARD = "2GB"  # safetensors serializes a shard in memory: 10 GB shards would hold a second copy of SDXL's UNet


def sdxl_pipeline(unet, folder: Path) -> dict:
    """An SDXL pipeline folder around `unet`: SDXL's two text towers (CLIP ViT-L/14: 768 wide, 12 layers; OpenCLIP
    ViT-bigG/14: 1280 wide, 32 layers, projected pooled output), its VAE and Euler scheduler, random weights.

    The towers have the public depths and widths, so encoder_hidden_states [B, 77, 2048], text_embeds [B, 1280]
    and time_ids [B, 6] come from the pipeline's own encode_prompt; their vocabulary is the embedded sd-digits
    model's tokenizer (573 tokens, no downloads), so the token embeddings are smaller than CLIP's 49,408 rows.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer()
    te1 = CLIPTextModel(clip_tower(tok, 768, 12, 12, "quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(clip_tower(tok, 1280, 32, 20, "gelu")).eval()
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=1024, scaling_factor=0.13025).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(folder, max_shard_size=SHARD)
    return {"text_encoder_params": sum(p.numel() for m in (te1, te2) for p in m.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()), "vae_scale_factor": int(pipe.vae_scale_factor)}


def clip_tokenizer():
    """The embedded sd-digits model's CLIP tokenizer (573 tokens, no downloads), padding to CLIP's 77."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ROOT / "dilatequant" / "assets" / "sd-digits" / "tokenizer",
                                         model_max_length=TOKENS)


def clip_tower(tok, hidden: int, layers: int, heads: int, act: str):
    """A CLIP text tower of the public width and depth (CLIP ViT-L/14: 768 x 12; OpenCLIP bigG/14: 1280 x 32)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=TOKENS,
                          projection_dim=hidden, hidden_act=act, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def sd3_pipeline(transformer, folder: Path, t5_tokens: int) -> dict:
    """An SD3 pipeline folder around `transformer`: CLIP-L and CLIP-G with projections (pooled 768 + 1280 = 2048,
    hidden states 768 + 1280 zero-padded to 4096 by the pipeline), no T5 (t5_tokens zero tokens instead, in the
    folder's dilatequant.json), SD3's VAE (16 latent channels, scaling 1.5305, shift 0.0609), FlowMatchEuler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tok = clip_tokenizer()
    te1 = CLIPTextModelWithProjection(clip_tower(tok, 768, 12, 12, "quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(clip_tower(tok, 1280, 32, 20, "gelu")).eval()
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, max_shard_size=SHARD)
    (folder / "dilatequant.json").write_text(json.dumps({"pipeline_kwargs": {"max_sequence_length": t5_tokens}}))
    return {"text_encoder_params": sum(p.numel() for m in (te1, te2) for p in m.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()), "vae_scale_factor": int(pipe.vae_scale_factor),
            "t5_tokens": t5_tokens}


def conditioning(info: dict) -> str:
    if "t5_tokens" in info:
        return (f"an SD3 pipeline folder: CLIP-L and CLIP-G at full depth and width ({info['text_encoder_params'] / 1e6:.0f} "
                f"M parameters, a 573-token vocabulary), no T5 ({info['t5_tokens']} zero tokens): prompts {TOKENS} + "
                f"{info['t5_tokens']} x 4096, pooled 2048; VAE {info['vae_params'] / 1e6:.0f} M")
    if "text_encoder_params" in info:
        return (f"an SDXL pipeline folder: SDXL's two text towers at full depth and width "
                f"({info['text_encoder_params'] / 1e6:.0f} M parameters, a 573-token vocabulary), encoder_hidden_states "
                f"{TOKENS} x 2048, pooled text_embeds 1280, time_ids 6; VAE {info['vae_params'] / 1e6:.0f} M")
    return f"class-token conditioning of SD 1.5's text shape ({TOKENS} tokens)"


def graphs_child(ckpt: Path, model_dir: Path, work: Path, batches: list[int]) -> None:
    """The speed stage's three graphs (cpu_speed.prepare_graphs) and the feeds every variant runs on."""
    import numpy as np

    import cpu_speed
    from dilatequant.core.models import load_model

    fp = load_model(model_dir)
    graphs = cpu_speed.prepare_graphs("unet", ckpt, fp, work)
    for b in batches:
        np.savez(work / f"feeds-b{b}.npz", **cpu_speed.make_feeds(fp, graphs["timesteps"], b))
    info = cpu_speed.model_info(graphs, fp, ckpt)
    (work / "graphs.json").write_text(json.dumps({**graphs, "paths": {k: str(v) for k, v in graphs["paths"].items()},
                                                  "info": info}, default=str))


def speed_child(variant: str, model_dir: Path, work: Path, batches: list[int], rounds: int) -> None:
    """One variant in its own process: at SD 1.5 width the four cannot share one process's memory."""
    import numpy as np

    import cpu_speed
    from dilatequant.core.models import load_model

    graphs = json.loads((work / "graphs.json").read_text())
    graphs["paths"] = {k: Path(v) for k, v in graphs["paths"].items()}
    feeds = {b: dict(np.load(work / f"feeds-b{b}.npz")) for b in batches}
    fp = load_model(model_dir) if variant == "torch_fp32_eager" else None
    res = cpu_speed.bench_variant(variant, graphs, feeds, fp, cpu_speed.physical_cores(), rounds, 1, work)
    (work / f"speed-{variant}.json").write_text(json.dumps(res))


def combine_speed(work: Path) -> dict | None:
    import cpu_speed

    per = {v: json.loads((work / f"speed-{v}.json").read_text()) for v in cpu_speed.VARIANTS
           if (work / f"speed-{v}.json").is_file()}
    if "ort_fp32" not in per or not (work / "graphs.json").is_file():
        return None
    info = json.loads((work / "graphs.json").read_text())["info"]
    return {**cpu_speed.combine_variants(info, per, work), "threads": cpu_speed.physical_cores()}


def verify_summary(report: Path) -> dict | None:
    """dq-verify's headline figures (the whole report stays in the work folder)."""
    if not report.is_file():
        return None
    r = json.loads(report.read_text())
    acc, lp = r["accuracy"], r.get("layer_parity") or {}
    return {"runtime": r["runtime"]["name"], "noise_sqnr_db": acc["noise_sqnr_db"],
            "image_psnr_db": {k: v["image_psnr_db"] for k, v in acc["images"].items()},
            "layer_parity_passed": lp.get("passed"), "layer_parity_max_level_diff": lp.get("max_level_diff"),
            "peak_host_rss_mb": r["memory"]["peak_host_rss_mb"], "wall_s": r["wall_s"]}


def _bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _graph_bytes(graph: Path) -> int:
    return _bytes(graph, Path(f"{graph}.data"))


def run_stage(name: str, cmd: list[str], log: Path) -> dict:
    """cmd in a fresh process under /usr/bin/time: wall seconds and max RSS; its output goes to log as it runs
    (tail it to watch a long stage's progress bars)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    with open(log, "w") as f:
        out = subprocess.run(["/usr/bin/time", "-f", "DQTIME %e %M", *cmd], env=env, stdout=f,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    text = log.read_text(errors="replace")
    m = re.findall(r"DQTIME ([\d.]+) (\d+)", text)
    row = {"stage": name, "command": " ".join(cmd).replace(str(ROOT) + "/", ""), "exit": out.returncode,
           "wall_s": float(m[-1][0]) if m else None, "peak_rss_mb": round(int(m[-1][1]) / 1024, 1) if m else None}
    print(f"{name}: exit {out.returncode}, {row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)
    if out.returncode:
        print(text[-3000:], flush=True)
    return row


def _markdown(r: dict) -> str:
    lines = [f"# Real scale: {r['unet']} ({r['unet_params'] / 1e6:.1f} M parameters), the whole chain on 2 CPU cores",
             "", f"`{r['command']}`", "",
             f"Random weights (seed 0), {r.get('conditioning') or 'class-token conditioning'}. Calibration W4A8 "
             f"symmetric, T={r['steps']}, {r['calib_samples']} samples, {r['iters']} BKD iterations per block, "
             f"teacher {r.get('teacher_dtype', 'fp32')}, at {r['calib_resolution']} latents; export and speed at "
             f"{r['sample_size']}x{r['sample_size']}. Each stage a fresh process (wall, max RSS by /usr/bin/time).", "",
             "| stage | wall | peak RSS | files | exit |", "|---|---:|---:|---:|---:|"]
    for s in r["stages"]:
        files = ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in s.get("files", {}).items())
        lines.append(f"| {s['stage']} | {s['wall_s']} s | {s['peak_rss_mb']:,} MB | {files} | {s['exit']} |")
    cal = r.get("calibration_stages_s") or {}
    if cal:
        lines += ["", "Inside dq-calibrate (q.pt summary, s): " + ", ".join(f"{k} {v:.1f}" for k, v in cal.items())]
    for key in ("int8_export", "int4_export"):
        e = r.get(key) or {}
        lp, par = e.get("layer_parity") or {}, e.get("parity") or {}
        if lp or par:
            db = par.get("min_median_sample_sqnr_db")
            db = "exact" if db in (float("inf"), "inf") else f"{db:.1f} dB" if isinstance(db, float) else db
            lines.append(f"- {key}: TensorRT rules {e.get('trt_rules')}; layer-wise parity "
                         f"{'passed' if lp.get('passed') else lp.get('skipped') or 'FAILED'} "
                         f"({lp.get('layers')} layers, max level diff {lp.get('max_level_diff')}); end to end, ORT vs "
                         f"fake-quant min median-sample SQNR {db} ({par.get('samples_below')} of {par.get('samples')} "
                         f"samples below {par.get('threshold_db')} dB; not enforced)")
    v = r.get("verify")
    if v:
        sq = v["noise_sqnr_db"]
        lines.append(f"- verify_ort ({v['runtime']}): per-step noise SQNR vs fake-quant mean "
                     f"{sq['runtime_vs_fake_quant_sqnr_db']['mean']:.1f} dB, vs FP {sq['runtime_vs_fp_sqnr_db']['mean']:.1f} dB "
                     f"(fake-quant vs FP {sq['fake_quant_vs_fp_sqnr_db']['mean']:.1f} dB); image PSNR "
                     + ", ".join(f"{k} {x:.1f} dB" for k, x in v["image_psnr_db"].items())
                     + f"; layer-wise parity {'passed' if v['layer_parity_passed'] else v['layer_parity_passed']}")
    sp = r.get("speed") or {}
    if sp.get("batches"):
        lines += ["", "| batch | ORT FP32 | ORT QDQ (TensorRT form) | ORT integer (--target ort) | PyTorch FP32 |",
                  "|---:|---:|---:|---:|---:|"]
        for b, row in sp["batches"].items():
            lat = row["latency"]
            cells = [f"{lat[k]['median_ms']:.0f} ms ({row['speedup_vs_ort_fp32'][k]:.2f}x)" for k in
                     ("ort_fp32", "ort_qdq_trt_style", "ort_int_target_ort", "torch_fp32_eager")]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Median latency (speed-up against ORT FP32), each variant in its own process one after another "
                     f"(memory), {sp.get('threads', '')} threads.")
    env = r["environment"]
    lines += ["", f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['cpu']} ({env['cpu_count']} cores, "
              "shared with other jobs), " + env["platform"], ""]
    lines += [f"- {n}" for n in r.get("notes", [])]  # what a reading of this run found (added by hand)
    return "\n".join(lines) + "\n"


def on_paper(target: str, measured: str) -> dict:
    """A transformer too large to run here, estimated from a measured one's stages: each stage's peak RSS scaled by
    the parameter ratio (its weights dominate every stage's memory), the files likewise; wall times are not
    estimated (they depend on the device). Labelled as an estimate wherever it is written."""
    from unet_configs import transformer_config

    def params(name: str) -> int:
        import diffusers
        import torch

        cfg = transformer_config(name)
        with torch.device("meta"):
            model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        return sum(p.numel() for p in model.parameters())

    src = json.loads((OUT / f"{measured.replace('/', '_div')}.json").read_text())
    n_src, n_dst = params(measured), params(target)
    ratio = n_dst / n_src
    stages = [{"stage": r["stage"], "measured_peak_rss_mb": r["peak_rss_mb"],
               "estimated_peak_rss_gb": round(r["peak_rss_mb"] * ratio / 1024, 1),
               "estimated_files_gb": {k: round(v * ratio / 1e9, 2) for k, v in r.get("files", {}).items()}}
              for r in src["stages"] if r.get("peak_rss_mb")]
    return {"target": target, "estimated_from": measured, "target_params": n_dst, "measured_params": n_src,
            "param_ratio": round(ratio, 3), "stages": stages,
            "weights_gb": {"fp32": round(4 * n_dst / 1e9, 1), "bf16": round(2 * n_dst / 1e9, 1),
                           "int8": round(n_dst / 1e9, 1), "int4": round(n_dst / 2e9, 1)},
            "measured_command": src["command"], "measured_environment": src["environment"]}


def _paper_markdown(r: dict) -> str:
    lines = [f"# {r['target']} on paper: an estimate from the measured {r['estimated_from']} chain", "",
             f"Not run: {r['target_params'] / 1e9:.2f} B parameters, {r['param_ratio']}x {r['estimated_from']}'s "
             f"{r['measured_params'] / 1e9:.3f} B. Each stage's peak RSS is the measured one scaled by that ratio "
             "(weights dominate every stage), so read these as the memory a machine needs, not as measurements.", "",
             "| stage | measured peak RSS | estimated peak RSS | estimated files |", "|---|---:|---:|---|"]
    for s in r["stages"]:
        files = ", ".join(f"{k} {v} GB" for k, v in s["estimated_files_gb"].items())
        lines.append(f"| {s['stage']} | {s['measured_peak_rss_mb']:,.0f} MB | {s['estimated_peak_rss_gb']} GB | {files} |")
    w = r["weights_gb"]
    lines += ["", f"The weights alone: {w['fp32']} GB in FP32, {w['bf16']} GB in BF16, {w['int8']} GB as int8, "
              f"{w['int4']} GB as int4. Measured with: `{r['measured_command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default="sd15-tiny", help="a name of benchmarks/unet_configs.py (UNets and transformers)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--iters", type=int, default=2, help="BKD iterations per block (0: PTQ, dq-calibrate --no-bkd)")
    p.add_argument("--calib-latent", type=int, default=16, help="latent size to calibrate at (CPU)")
    p.add_argument("--teacher-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dq-calibrate --teacher-dtype (bf16: one float32 UNet copy; SDXL needs it in 24 GB)")
    p.add_argument("--t5-tokens", type=int, default=0, help="transformers: zero tokens in place of T5 (SD3's "
                   "max_sequence_length; its default 256 adds compute, not weights)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", type=Path, help="scratch folder (default: results/real_scale/.work-<unet>)")
    p.add_argument("--resume", action="store_true", help="skip the stages an earlier run of this work folder finished")
    p.add_argument("--stages", nargs="*", help=f"run only these stages (of {', '.join(STAGES)}; speed = every speed_*)")
    p.add_argument("--name", help="results file name (default: the UNet's); a partial run (--stages) writes its own")
    p.add_argument("--on-paper", metavar="TRANSFORMER", help="estimate TRANSFORMER (e.g. flux1-dev) from the measured "
                   "--unet run's results instead of running anything")
    p.add_argument("--child", choices=("model", "graphs", "speed"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    tag = a.unet.replace("/", "_div")
    if a.on_paper:
        sys.path.insert(0, str(ROOT))
        from dilatequant.core.reporting import write_json, write_text

        est = on_paper(a.on_paper, a.unet)
        write_json(OUT / f"{a.on_paper}-on-paper.json", est)
        write_text(OUT / f"{a.on_paper}-on-paper.md", _paper_markdown(est))
        print(_paper_markdown(est))
        return
    work = (a.work or OUT / f".work-{tag}").resolve()
    if a.child == "model":
        print(json.dumps(build_model(a.unet, work / "model", a.t5_tokens)))
        return
    if a.child == "graphs":
        graphs_child(work / "q.pt", work / "model", work, a.batches)
        return
    if a.child == "speed":
        speed_child(a.variant, work / "model", work, a.batches, a.rounds)
        return
    work.mkdir(parents=True, exist_ok=True)
    py, me, cli = sys.executable, str(Path(__file__).resolve()), [sys.executable, "-m", "dilatequant.cli"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    stages = []

    done_file = work / "stages.json"  # every finished stage, so --resume skips them after an interruption
    done = {r["stage"]: r for r in json.loads(done_file.read_text())} if a.resume and done_file.is_file() else {}

    from unet_configs import is_transformer

    dit = is_transformer(a.unet)
    wanted = set(a.stages or (TRANSFORMER_STAGES if dit else STAGES))
    unknown = wanted - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")

    def stage(name, cmd, files=()):
        if name.split("_")[0] == "speed" and "speed" not in wanted or name.split("_")[0] != "speed" and name not in wanted:
            return None
        if done.get(name, {}).get("exit") == 0:
            row = done[name]
            print(f"{name}: done in an earlier run ({row['wall_s']} s), skipped", flush=True)
        else:
            row = run_stage(name, cmd, logs / f"{name}.log")
            row["files"] = {Path(f).name: _graph_bytes(Path(f)) if str(f).endswith(".onnx") else _bytes(Path(f))
                            for f in files}
        stages.append(row)
        tmp = done_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stages, indent=1))
        tmp.replace(done_file)
        return row

    common = [me, "--unet", a.unet, "--work", str(work)]
    stage("model", [py, *common, "--child", "model", "--t5-tokens", str(a.t5_tokens)])
    info = json.loads(next(line for line in (logs / "model.log").read_text().splitlines() if line.startswith("{")))
    pixels = a.calib_latent * info.get("vae_scale_factor", 1)  # --resolution is in pixels (8 per latent for SDXL)
    res = f"{pixels}x{pixels}"
    q = work / "q.pt"
    stage("calibrate", [*cli, "calibrate", "--model", str(work / "model"), "--bits", "W4A8", "--sym", "--steps",
                        str(a.steps), "--calib-samples", str(a.calib_samples), "--iters", str(a.iters), "--batch", "4",
                        "--resolution", res, "--teacher-dtype", a.teacher_dtype, "--out", str(q),
                        *([] if a.iters else ["--no-bkd"])], [q])
    g8, g4, g16 = work / "unet_qdq.onnx", work / "unet_int4.onnx", work / "unet_fp16.onnx"
    stage("export_int8", [*cli, "export", "--ckpt", str(q), "--onnx", str(g8)], [g8])
    stage("export_int4", [*cli, "export", "--ckpt", str(q), "--onnx", str(g4), "--precision", "int4"], [g4])
    stage("fp16_fallback", [*cli, "export", "--fp16-from", str(g8), "--onnx", str(g16)], [g16])
    stage("rules_check", [*cli, "export", "--check", str(g8)])
    from unet_configs import transformer_config, unet_config

    plan = work / "unet_qdq.plan"
    channels = (transformer_config(a.unet) if dit else unet_config(a.unet))["in_channels"]
    side = f"{channels}x{info['sample_size']}x{info['sample_size']}"  # the denoiser's own latent size
    stage("build_rtx", [*cli, "build-engine", "--onnx", str(g8), "--engine", str(plan), "--backend", "tensorrt-rtx",
                        "--min-shapes", f"sample:1x{side}", "--opt-shapes", f"sample:2x{side}",
                        "--max-shapes", f"sample:8x{side}"], [plan])
    stage("verify_ort", [*cli, "verify", "--ckpt", str(q), "--onnx", str(g8), "--report", str(work / "verify"),
                         "--batch", "1", "--samples", "2", "--traj-samples", "1", "--repeats", "3", "--warmup", "1",
                         "--mapped-steps", str(a.steps), "--layer-per-step", "1"], [work / "verify" / "report.json"])
    stage("triton_repository", [*cli, "triton", "--onnx", str(g8), "--ckpt", str(q), "--repo", str(work / "triton"),
                                "--kind", "cpu", "--overwrite"])
    batches = ["--batches", *map(str, a.batches)]
    if "speed" in wanted:
        stage("speed_graphs", [py, *common, "--child", "graphs", *batches],
              [work / "unet_fp32.onnx", work / "unet_ort.onnx"])
        import cpu_speed
        for v in cpu_speed.VARIANTS:  # one process each, one after another (not interleaved: memory)
            stage(f"speed_{v}", [py, *common, "--child", "speed", "--variant", v, *batches, "--rounds", str(a.rounds)])

    sys.path.insert(0, str(ROOT))
    import torch

    from dilatequant.core.reporting import environment, write_json, write_text

    summary = torch.load(q, weights_only=True, mmap=True)["summary"] if q.is_file() else "{}"
    summary = json.loads(summary)
    def read(f: Path) -> dict | None:
        """A stage's JSON report, less its per-layer rows (they stay in the work folder's .export.json)."""
        if not f.is_file():
            return None
        d = json.loads(f.read_text())
        for part in (d, d.get("layer_parity") or {}):
            for key in ("per_layer", "int4_layers", "weight_only_int4_layers"):
                if isinstance(part.get(key), (list, dict)) and len(part[key]) > 20:
                    part[key] = f"{len(part[key])} entries (see the .export.json)"
        return d
    report = {"unet": a.unet, "command": "python benchmarks/real_scale.py " + " ".join(sys.argv[1:]),
              "unet_params": info["unet_params"], "sample_size": info["sample_size"],
              "cross_attention_dim": (transformer_config(a.unet)["joint_attention_dim"] if dit
                                      else unet_config(a.unet)["cross_attention_dim"]), "steps": a.steps,
              "calib_samples": a.calib_samples, "iters": a.iters, "calib_resolution": f"{a.calib_latent}x{a.calib_latent}",
              "calib_pixels": res, "teacher_dtype": a.teacher_dtype, "conditioning": conditioning(info), "stages": stages,
              "calibration_stages_s": summary.get("stages"), "calibration_peak_rss_mb": summary.get("peak_rss_mb"),
              "val_after_training": summary.get("val_after_training"),
              "int8_export": read(Path(f"{g8}.export.json")), "int4_export": read(Path(f"{g4}.export.json")),
              "verify": verify_summary(work / "verify" / "report.json"), "speed": combine_speed(work),
              "environment": environment()}
    OUT.mkdir(parents=True, exist_ok=True)
    name = a.name or tag
    write_json(OUT / f"{name}.json", report)
    write_text(OUT / f"{name}.md", _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
