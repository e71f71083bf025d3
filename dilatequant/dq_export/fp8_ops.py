"""FP8 E4M3 Q/DQ in the deployment form: one PyTorch op per graph pattern, each with its ONNX translation.

torch's decomposed quantize_per_tensor rounds to integers before casting, so its eager result for float8 is not
ONNX's QuantizeLinear (which rounds to the nearest E4M3 value); these ops compute what the graph computes in
eager mode too, and export as exactly:

    e4m3_qdq(u)     -> QuantizeLinear(u, 1, zp) -> DequantizeLinear(., 1, zp)   (activations, unit scale)
    e4m3_dequant(w) -> DequantizeLinear(w, 1, zp)                                (FP8 weights, unit scale)

with zp a float8e4m3fn zero: ONNX's default zero point is uint8, which would make the Q an INT8 one in TensorRT
(trt_rules.py), and the per-channel weight scale stays a Mul after the op, as for INT8 (fold.py). Both scales
are the constant 1: the per-timestep step size lives in the Mul in front of the Q.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op

from ..calibrate.quantizers import E4M3Grid

_E4M3 = ir.DataType.FLOAT8E4M3FN


@torch.library.custom_op("dilatequant::e4m3_qdq", mutates_args=())
def e4m3_qdq(u: torch.Tensor) -> torch.Tensor:
    """u on the E4M3 grid (saturated to +-448, nearest even): QuantizeLinear then DequantizeLinear, unit scale."""
    return E4M3Grid().round_values(u)


@e4m3_qdq.register_fake
def _(u):
    return torch.empty_like(u)


@torch.library.custom_op("dilatequant::e4m3_dequant", mutates_args=())
def e4m3_dequant(w: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn weights as float32 (exact): DequantizeLinear with unit scale."""
    return w.to(torch.float32)


@e4m3_dequant.register_fake
def _(w):
    return torch.empty_like(w, dtype=torch.float32)


def _unit_scale_and_zero():
    one = op.Constant(value=ir.tensor(np.array(1.0, dtype=np.float32)))
    zero = op.Constant(value=ir.tensor(np.zeros((), dtype=_E4M3.numpy()), dtype=_E4M3))
    return one, zero


def _e4m3_qdq_onnx(u):
    one, zero = _unit_scale_and_zero()
    return op.DequantizeLinear(op.QuantizeLinear(u, one, zero), one, zero)


def _e4m3_dequant_onnx(w):
    one, zero = _unit_scale_and_zero()
    return op.DequantizeLinear(w, one, zero)


TRANSLATIONS = {torch.ops.dilatequant.e4m3_qdq.default: _e4m3_qdq_onnx,
                torch.ops.dilatequant.e4m3_dequant.default: _e4m3_dequant_onnx}
