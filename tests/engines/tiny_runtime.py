"""Tiny calibrated checkpoints exported to ONNX, shared by the engines tests (built once per module)."""
from pathlib import Path

import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.checkpoint import save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.calibrate.sampling import sampling_timesteps
from dilatequant.dq_export.qdq_graph import ExportConfig, export_onnx

STEPS = 4


def build(tmp: Path, model, seed: int = 0, **cfg) -> tuple[Path, Path]:
    """(q.pt, unet.onnx) of a W8A8 symmetric tiny model calibrated for STEPS steps; `model` stays FP."""
    torch.manual_seed(seed)
    data = build_calibration_set(model, 16, STEPS, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8, symmetric=True, **cfg), data)
    ck = save_checkpoint(tmp / "q.pt", q, model, sampling_timesteps(model, STEPS), "fp", {})
    export_onnx(ck, tmp / "unet.onnx", ExportConfig())
    return ck, tmp / "unet.onnx"
