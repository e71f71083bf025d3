"""Where calibration computes: the device of the models and an optional bfloat16 autocast for BKD.

Data (calibration sets, block caches, quantizer statistics) stays on the CPU and moves to the model's device
per chunk; on the CPU every move is the identity, so the CPU path computes exactly what it did before.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch.utils import _pytree as pytree

from .errors import UserError

AUTOCAST = ("none", "bf16")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """cpu, cuda or cuda:N; under torchrun plain `cuda` means this rank's GPU (LOCAL_RANK)."""
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}': choose cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA build of PyTorch and a visible GPU (torch.cuda.is_available() "
                        "is False); install your CUDA build of torch or use --device cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def to_device(obj: Any, device: torch.device) -> Any:
    """obj with every tensor on device (the same tensors when they are there already)."""
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, obj)


def module_device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast(device: torch.device, mode: str) -> ContextManager:
    """bfloat16 autocast on device for mode 'bf16' (conv/matmul in bf16, losses and reductions in fp32)."""
    if mode == "none":
        return nullcontext()
    if mode != "bf16":
        raise UserError(f"unknown autocast '{mode}': choose from {', '.join(AUTOCAST)}")
    return torch.autocast(device.type, dtype=torch.bfloat16)
