"""Issue 14's acceptance run: PTQ calibration of an SD 1.5-sized pipeline on 2 cores, each stage timed.

No SD 1.5 weights can be downloaded here, so the pipeline folder is SD 1.5's architecture with weights drawn
from a fixed seed: the UNet from `benchmarks/configs/sd15_unet.json` (859,520,964 parameters), SD 1.5's VAE
and a CLIP text encoder of CLIP ViT-L/14's width and depth (768 x 12 layers). The tokenizer is `sd-digits`'
(a vocabulary of 573 made here, 16 tokens): only the text encoder's embedding table is smaller than SD 1.5's,
which changes nothing the UNet sees but the values of its 768-wide context. Then, as a user would:

    dq-calibrate --model <folder> --bits W8A8 --sym --steps 4 --calib-samples 16 --iters 0 --no-bkd \
        --resolution 512x512 --prompts dilatequant/assets/sd-digits/prompts.txt

(512x512 images, 64x64 latents, guidance 7.5: every UNet call is a batch of 2). Peak RSS is the calibration
process's own (getrusage of the child); stage times come from the q.pt summary. The calibration-data cache
is a fresh empty folder, so sampling is always in the figure. Run it on otherwise idle cores.

    python benchmarks/sd15_calibration.py --out benchmarks/results/real_scale
"""
from __future__ import annotations

import argparse
import json
import resource
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dilatequant.calibrate.calibration_data import CACHE_ENV
from dilatequant.core.reporting import environment, write_json, write_text
from unet_configs import unet_config  # benchmarks/ (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SD_DIGITS = REPO / "dilatequant" / "assets" / "sd-digits"
SD15_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
            "scaling_factor": 0.18215}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "hidden_act": "quick_gelu", "projection_dim": 768}


def build_pipeline(folder: Path, seed: int) -> dict:
    """Write the random-weight SD 1.5-shaped pipeline folder once (under a temporary name, then renamed)."""
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "build.json").read_text())
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(SD_DIGITS / "tokenizer")
    small = json.loads((SD_DIGITS / "text_encoder" / "config.json").read_text())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, vocab_size=small["vocab_size"],
                                                max_position_embeddings=tokenizer.model_max_length,
                                                bos_token_id=small["bos_token_id"], eos_token_id=small["eos_token_id"],
                                                pad_token_id=small["pad_token_id"]))
    unet = UNet2DConditionModel.from_config(unet_config("sd15"))
    vae = AutoencoderKL.from_config(SD15_VAE)
    scheduler = PNDMScheduler.from_pretrained(SD_DIGITS / "scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    info = {"seed": seed, "build_s": round(time.perf_counter() - start, 1),
            "params": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))},
            "unet_bytes": sum(f.stat().st_size for f in (tmp / "unet").glob("*.safetensors"))}
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    tmp.rename(folder)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_scale"))
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/dq-real-scale"),
                   help="where the 3.8 GB pipeline folder and the q.pt go (not the repository)")
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.models_dir.mkdir(parents=True, exist_ok=True)
    folder = a.models_dir / "sd15-random"
    build = build_pipeline(folder, a.seed)
    ckpt = a.models_dir / f"sd15_{a.bits}_ptq.q.pt"
    args = ["--model", str(folder), "--bits", a.bits, "--sym", "--steps", str(a.steps), "--calib-samples",
            str(a.calib_samples), "--iters", "0", "--no-bkd", "--resolution", "512x512", "--prompts",
            str(SD_DIGITS / "prompts.txt"), "--seed", str(a.seed), "--out", str(ckpt)]
    ckpt.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="dq-cache-") as cache:  # cold: sampling is part of the figure
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dilatequant.cli", "calibrate", *args], check=True,
                       env={**os.environ, CACHE_ENV: cache})
        wall = round(time.perf_counter() - start, 1)
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    summary = json.loads(torch.load(ckpt, weights_only=True, mmap=True)["summary"])
    res = {"command": "dq-calibrate " + " ".join(args).replace(str(a.models_dir), "<models-dir>").replace(
               str(REPO) + "/", ""),
           "pipeline": build, "wall_s": wall, "peak_rss_mb": peak_mb, "stages_s": summary["stages"],
           "val_samples": summary.get("val_samples"),
           "val_noise_sqnr_db": summary["val_before_training"]["noise_sqnr_db"],
           "q_pt_bytes": ckpt.stat().st_size, "environment": environment()}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "sd15_calibration.json", res)
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in summary["stages"].items())
    write_text(a.out / "sd15_calibration.md",
               f"SD 1.5-sized pipeline ({build['params']['unet']:,} UNet parameters, random weights, seed {a.seed}), "
               f"`{res['command']}`\n\nwall {wall:.0f} s ({wall / 60:.1f} min), peak RSS {peak_mb:,.0f} MB, "
               f"validation noise SQNR {res['val_noise_sqnr_db']:.2f} dB on {res['val_samples']} inputs, "
               f"q.pt {res['q_pt_bytes'] / 1e9:.2f} GB\n\n| stage | s |\n|---|---|\n{rows}\n")
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
