"""Tiny calibrated checkpoints exported to ONNX, shared by all engines tests.

Exporting is the slow part (dynamo), so each kind is built once per test process and cached here.
"""
import tempfile
from functools import cache
from pathlib import Path

import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.checkpoint import save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.core.sampling import sampling_timesteps
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.qdq_graph import export_onnx

from conftest import tiny_cond, tiny_uncond

STEPS = 4


def build(tmp: Path, model, seed: int = 0, export: bool = True) -> tuple[Path, Path | None]:
    """(q.pt, unet.onnx) of a W8A8 symmetric tiny model calibrated for STEPS steps; `model` stays FP."""
    torch.manual_seed(seed)
    data = build_calibration_set(model, 4, STEPS, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8, symmetric=True), data)
    ck = save_checkpoint(tmp / "q.pt", q, model, sampling_timesteps(model, STEPS), "fp", {})
    if not export:
        return ck, None
    export_onnx(ck, tmp / "unet.onnx", ExportConfig())
    return ck, tmp / "unet.onnx"


@cache
def get(kind: str):
    """(FP model, q.pt, unet.onnx) for kind 'uncond' or 'cond', built once per process.

    Only the unconditional model is exported (one dynamo export is most of these tests' time); ONNX
    parity of conditional graphs is tested in tests/dq_export.
    """
    torch.manual_seed(0)
    model = tiny_uncond() if kind == "uncond" else tiny_cond()
    ck, onnx_path = build(Path(tempfile.mkdtemp(prefix=f"dq-engines-{kind}-")), model, export=kind == "uncond")
    return model, ck, onnx_path
