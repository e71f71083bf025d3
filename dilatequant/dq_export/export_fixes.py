"""Exporting diffusers transformers with torch.onnx (dynamo): four workarounds, each for a measured failure.

1. Capture: the ONNX exporter runs torch.export with size-oblivious reasoning (backed_size_oblivious), under
   which PixArt's cross-attention mask reshape (`attention_mask.view(B, heads, -1, L_txt)`) cannot prove its -1
   is 1 and the capture fails. A plain non-strict torch.export.export captures it; the ONNX exporter then
   translates that program.
2. No-op squeeze: PixArt calls `hidden_states.squeeze(1)` on [B, L, C] (a no-op in PyTorch); onnxscript emits
   Squeeze(axes=[1]) regardless, which ONNX Runtime refuses to load ("Dimension of input 1 must be 1"). The
   translation below emits Identity when the dimension is known not to be 1.
3. FLUX's rotary embedding asks for float64 frequencies; TensorRT has no FP64 tensors. During the export they
   are computed in float32 (the exported RoPE differs from PyTorch's by about 5e-7 on the tiny models).
4. FLUX splits the joint [text; image] sequence with split_with_sizes at a symbolic image length, which onnxscript
   emits as SplitToSequence + SequenceAt: TensorRT's parser has no sequence ops (tensorrt_rtx 1.7: UNSUPPORTED_NODE).
   The translation below emits one Slice per piece.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def rope_in_float32() -> Iterator[None]:
    """FLUX's FluxPosEmbed with float32 frequencies (TensorRT has no FP64)."""
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.maybe_adjust_dtype_for_device
    transformer_flux.maybe_adjust_dtype_for_device = \
        lambda dtype, device: torch.float32 if dtype == torch.float64 else original(dtype, device)
    try:
        yield
    finally:
        transformer_flux.maybe_adjust_dtype_for_device = original


def _squeeze_dim(self, dim: int):
    """aten.squeeze.dim as ONNX: Identity where the dimension is known not to be 1 (PyTorch's no-op)."""
    from onnxscript import opset18 as op

    shape = self.shape
    if shape is not None and len(shape) > 0 and isinstance(shape[dim], int) and shape[dim] != 1:
        return op.Identity(self)
    return op.Squeeze(self, op.Constant(value_ints=[dim]))


def _split_with_sizes(self, split_sizes, dim: int = 0):
    """aten.split_with_sizes as one Slice per piece (sizes static or symbolic), not a tensor sequence."""
    from onnxscript import opset18 as op

    axis = op.Constant(value_ints=[dim])
    start = op.Constant(value_ints=[0])
    pieces = []
    for size in split_sizes:
        size = op.Constant(value_ints=[size]) if isinstance(size, int) else op.Reshape(size, op.Constant(value_ints=[1]))
        end = op.Add(start, size)
        pieces.append(op.Slice(self, start, end, axis))
        start = end
    return pieces


def transformer_export(wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], names: list[str],
                       dynamic_shapes: dict | None, opset: int, translations: dict | None = None):
    """torch.export (non-strict, keyword inputs) then torch.onnx.export of the program; returns the ONNX program.
    `translations`: the caller's own custom translation table (the FP8 Q/DQ ops), beside the fixes here."""
    with rope_in_float32():
        program = torch.export.export(wrapper, (), kwargs=inputs, dynamic_shapes=dynamic_shapes, strict=False)
    return torch.onnx.export(program, (), kwargs=inputs, input_names=names, output_names=["noise_pred"], dynamo=True,
                             opset_version=opset, verbose=False, optimize=False,
                             custom_translation_table={**(translations or {}), torch.ops.aten.squeeze.dim: _squeeze_dim,
                                                       torch.ops.aten.split_with_sizes.default: _split_with_sizes})
