"""Which builder `dq-build-engine` uses: TensorRT 11 on a GPU, or TensorRT-RTX with or without one.

    auto          TensorRT 11 when it imports and a GPU is here, else TensorRT-RTX when it imports, else one line
                  naming how to install either
    tensorrt      TensorRT 11 (and its CUDA build against the driver, Polygraphy, a GPU): env.require_trt_and_gpu
    tensorrt-rtx  TensorRT-RTX >= 1.7: builds CPU-only ahead of time for the compute capabilities it is given
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ...core.errors import UserError
from .env import GpuInfo, require_trt_and_gpu
from .rtx import require_tensorrt_rtx

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt-rtx"
LABELS = {TENSORRT: "TensorRT", TENSORRT_RTX: "TensorRT-RTX"}


@dataclass(frozen=True)
class Backend:
    name: str                 # "tensorrt" | "tensorrt-rtx"
    module: ModuleType        # tensorrt | tensorrt_rtx
    gpu: GpuInfo | None       # the GPU a TensorRT 11 build targets; None for TensorRT-RTX (it builds without one)
    chosen: str               # why this one: the flag, or what `auto` found

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", ""))

    @property
    def label(self) -> str:
        return LABELS[self.name]


def choose_backend(name: str) -> Backend:
    """The builder `name` asks for, checked usable here before any work; `auto` as the module docstring says."""
    if name not in BACKENDS:
        raise UserError(f"unknown --backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name == TENSORRT:
        trt, gpu = require_trt_and_gpu()
        return Backend(TENSORRT, trt, gpu, "--backend tensorrt")
    if name == TENSORRT_RTX:
        return Backend(TENSORRT_RTX, require_tensorrt_rtx(), None, "--backend tensorrt-rtx")
    try:
        trt, gpu = require_trt_and_gpu()
        return Backend(TENSORRT, trt, gpu, "auto: TensorRT 11 and a GPU are here")
    except UserError as no_trt:
        try:
            rtx = require_tensorrt_rtx()
        except UserError as no_rtx:
            raise UserError(f"no engine builder is usable here. {no_trt}; or build without a GPU: {no_rtx}") from no_rtx
        return Backend(TENSORRT_RTX, rtx, None, f"auto: TensorRT 11 cannot build here ({no_trt})")
