"""How much Weight Dilation actually scales each model (a benchmark, never a test).

WD's factor s per input channel is capped by the most constraining out-channel (dilatequant.md); with
Cout x k x k weights per input channel, some row usually has its extreme there and s stays near 1.
This prints and writes the distribution of s over every quantized layer group of the given models.

    python benchmarks/dilation_stats.py --models default default-cond --bits W4A8 \
        --out benchmarks/results/dilation_stats.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.weight_dilation import dilation_scales
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, write_json


def summarize(s: torch.Tensor) -> dict:
    return {"channels": s.numel(), "mean": round(s.mean().item(), 4), "median": round(s.median().item(), 4),
            "share_above_1.05": round((s > 1.05).float().mean().item(), 4),
            "share_above_1.5": round((s > 1.5).float().mean().item(), 4),
            "share_above_2": round((s > 2).float().mean().item(), 4), "max": round(s.max().item(), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "default-cond"])
    p.add_argument("--bits", default="W4A8", help="the weight bits set the cap 2^bits")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dilation_stats.json"))
    a = p.parse_args()
    w_bits, a_bits = QuantConfig.parse_bits(a.bits)
    result = {"settings": vars(a) | {"out": str(a.out)}, "environment": environment(), "models": {}}
    for name in a.models:
        config = QuantConfig(weight_bits=w_bits, act_bits=a_bits, float_layers=())
        q = QuantUNet(load_model(name).unet, config)
        layers = q.layers()
        by_kind: dict[str, list[torch.Tensor]] = {"conv": [], "linear": []}
        for g in q.groups:  # the same call apply_scaling makes, on the FP weights
            weights = [layers[n].weight for n in g.layers]
            by_kind["conv" if weights[0].dim() == 4 else "linear"].append(dilation_scales(weights, cap=config.cap))
        every = torch.cat(by_kind["conv"] + by_kind["linear"])
        result["models"][name] = {"cap": config.cap, "all": summarize(every),
                                  **{k: summarize(torch.cat(v)) for k, v in by_kind.items() if v}}
        print(name, json.dumps(result["models"][name]))
    write_json(a.out, result)


if __name__ == "__main__":
    main()
