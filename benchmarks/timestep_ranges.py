"""How much each activation's step size moves over the timesteps, and what TPQ buys at 8 and 4 bits.

TPQ can only beat one static scale where an activation's range changes with t, and only where activation
error matters next to weight error. Per model and bit width this calibrates two PTQ checkpoints (no BKD, so
the MSE-searched initial scales are compared before training blends them): per-timestep tables and one
static scale calibrated on all timesteps pooled (--no-tpq). It reports, per activation quantizer,
max_t delta / min_t delta over the per-timestep table (the worst head of a per-head row), and both
checkpoints' noise SQNR against FP on the held-out validation latents. The ratios are also given per kind of
layer input (`layer_kind`): a diffusion transformer's adaLN modulation linears read only the timestep and pooled
text embedding, its attention and MLP projections read tokens modulated by them.

    python benchmarks/timestep_ranges.py --models sd-digits default --bits W4A8 W4A4 \
        --out benchmarks/results/timestep_ranges
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from dilatequant.core.reporting import environment, write_json, write_text

PROMPTED = {"sd-digits": ["--prompts", "benchmarks/prompts/sd_digits.txt", "--guidance", "3.0"],
            "sd3-digits": ["--prompts", "benchmarks/prompts/sd_digits.txt"]}
# (kind, substrings of the first layer name that reads the quantizer's tensor), first match wins
KINDS = (
    ("adaLN modulation / timestep + text embedding", ("norm1.linear", "norm1_context.linear", "norm.linear",
                                                       "norm_out.linear", "adaln_single", "time_text_embed",
                                                       "time_embedding", "timestep_embedder", "add_embedding")),
    ("text embedding", ("context_embedder", "caption_projection")),
    ("attention q/k/v", ("to_q", "to_k", "add_q_proj", "add_k_proj", "proj_mlp")),
    ("attention out", ("to_out", "to_add_out")),
    ("MLP in", ("ff.net.0", "ff_context.net.0")),
    ("MLP out", ("ff.net.2", "ff_context.net.2", "single_transformer_blocks")),  # single blocks: proj_out
    ("patch embedding / output", ("pos_embed", "x_embedder", "proj_out", "conv_in", "conv_out")),
)


def layer_kind(quantizer: str) -> str:
    """The kind of layer input an activation quantizer (key 'a/b/c+...') feeds, from its first layer's name."""
    name = quantizer.split("+")[0].replace("/", ".")
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)),
                "conv (ResNet, up/down-samplers)" if "resnets" in name or "samplers" in name else "other")


def calibrate(model: str, bits: str, tpq: bool, a, out: Path) -> tuple[Path, list[str]]:
    path = out / f"{model}_{bits}_ptq{'' if tpq else '_static'}.q.pt"
    cmd = ["dq-calibrate", "--model", model, "--bits", bits, "--steps", str(a.steps), "--calib-samples",
           str(a.calib_samples), "--no-bkd", "--seed", str(a.seed), "--out", str(path)] + PROMPTED.get(model, [])
    cmd += [] if tpq else ["--no-tpq"]
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "dilatequant.cli", "calibrate", *cmd[1:]], check=True)
    return path, cmd


def validation_sqnr(path: Path) -> float:
    return round(json.loads(torch.load(path, weights_only=True, mmap=True)["summary"])["val_before_training"]
                 ["noise_sqnr_db"], 3)


def spread(path: Path) -> dict:
    state = torch.load(path, weights_only=True, mmap=True)["state_dict"]
    ratios = {}
    for key, delta in state.items():
        if key.endswith(".delta") and delta.shape[0] > 1:
            d = delta.float().abs().clamp_min(1e-12)
            ratios[key.removeprefix("act_quantizers.").removesuffix(".delta")] = (d.max(0).values / d.min(0).values).max().item()
    vals = sorted(ratios.values())
    widest = sorted(ratios.items(), key=lambda kv: -kv[1])[:5]
    kinds: dict[str, list[float]] = {}
    for key, v in ratios.items():
        kinds.setdefault(layer_kind(key), []).append(v)
    per_kind = {k: {"quantizers": len(v), "median_ratio": round(statistics.median(v), 3), "max_ratio": round(max(v), 3)}
                for k, v in sorted(kinds.items())}
    return {"quantizers": len(vals), "median_ratio": round(statistics.median(vals), 3),
            "p90_ratio": round(vals[int(0.9 * len(vals))], 3), "max_ratio": round(vals[-1], 3),
            "share_above_1.5": round(sum(v > 1.5 for v in vals) / len(vals), 3),
            "share_above_2": round(sum(v > 2 for v in vals) / len(vals), 3),
            "widest": [{"quantizer": k, "ratio": round(v, 3)} for k, v in widest], "per_kind": per_kind}


def markdown(res: dict) -> str:
    lines = ["max_t delta / min_t delta per activation quantizer (PTQ, MSE-searched per-timestep tables), and the",
             "validation noise SQNR vs FP of the per-timestep and the pooled static checkpoint.", "",
             "| model | bits | quantizers | median | p90 | max | share > 2x | widest | SQNR dB, per-timestep | "
             "SQNR dB, static | TPQ gain dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['bits']} | {r['quantizers']} | {r['median_ratio']:.2f} | {r['p90_ratio']:.2f} | "
                     f"{r['max_ratio']:.2f} | {r['share_above_2']:.2f} | {r['widest'][0]['quantizer']} | "
                     f"{r['val_sqnr_db_tpq']:.2f} | {r['val_sqnr_db_static']:.2f} | "
                     f"{r['val_sqnr_db_tpq'] - r['val_sqnr_db_static']:+.2f} |")
    lines += ["", "By kind of layer input (median / max of max_t delta / min_t delta):", "",
              "| model | bits | kind | quantizers | median | max |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for kind, k in r.get("per_kind", {}).items():
            lines.append(f"| {r['model']} | {r['bits']} | {kind} | {k['quantizers']} | {k['median_ratio']:.2f} | "
                         f"{k['max_ratio']:.2f} |")
    lines += ["", "Checkpoints:", ""] + [f"    {' '.join(c)}" for r in res["rows"] for c in r["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd-digits", "default"])
    p.add_argument("--bits", nargs="+", default=["W4A8", "W4A4"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/timestep_ranges"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"settings": vars(a) | {"out": str(a.out)}, "environment": environment(), "rows": []}
    for name in a.models:
        for bits in a.bits:
            tpq, tpq_cmd = calibrate(name, bits, True, a, a.out)
            static, static_cmd = calibrate(name, bits, False, a, a.out)
            row = {"model": name, "bits": bits, "commands": [tpq_cmd, static_cmd], **spread(tpq),
                   "val_sqnr_db_tpq": validation_sqnr(tpq), "val_sqnr_db_static": validation_sqnr(static)}
            res["rows"].append(row)
            print({k: v for k, v in row.items() if k not in ("widest", "commands")}, flush=True)
    write_json(a.out / "timestep_ranges.json", res)
    write_text(a.out / "timestep_ranges.md", markdown(res))


if __name__ == "__main__":
    main()
