"""Run under torchrun by test_distributed.py (and alone, WORLD_SIZE unset, for the one-process reference):
calibration sets and TPQ initial tables of a tiny run; rank 0 saves them to argv[1]."""
from __future__ import annotations

import sys

import torch

from dilatequant.calibrate.calibration_data import build_calibration_sets
from dilatequant.calibrate.distributed import init_from_env, shutdown
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.recipe import apply_scaling, init_act_tables, init_weight_scales, observe_activations
from dilatequant.core.models import load_model

MODEL, SAMPLES, STEPS, VAL, SAMPLE_BATCH, OBSERVE_BATCH = "default-cond", 24, 4, 8, 3, 5


def tables(dist, out: str) -> dict:
    torch.manual_seed(0)
    model = load_model(MODEL)
    data, val = build_calibration_sets(model, SAMPLES, STEPS, VAL, seed=0, use_cache=False,
                                       sample_batch=SAMPLE_BATCH, dist=dist)
    qunet = QuantUNet(model.unet, QuantConfig(weight_bits=4, act_bits=8, num_steps=STEPS, attn_matmul=True))
    apply_scaling(qunet, data)
    init_weight_scales(qunet)
    observe_activations(qunet, data, OBSERVE_BATCH, dist=dist)
    init_act_tables(qunet)
    result = {"data": data.inputs(slice(None)), "val": val.inputs(slice(None)), "state": qunet.state_dict()}
    if dist.is_main:
        torch.save(result, out)
    return result


if __name__ == "__main__":
    d = init_from_env()
    try:
        tables(d, sys.argv[1])
    finally:
        shutdown(d)
