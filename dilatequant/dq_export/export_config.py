"""What dq-export writes: precision, scales, dtype, shapes, target (torch-free: the CLI reads it for its help)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError

PRECISIONS = ("int8", "int4")
TARGETS = ("tensorrt", "ort")


@dataclass
class ExportConfig:
    precision: str = "int8"         # int8 | int4 (weight-only INT4 blocks for MatMul/Gemm)
    static_scales: bool = False     # one constant scale per activation, no t_index input
    dtype: str = "fp32"             # fp32 | fp16 (FP16 fallback for everything not quantized)
    static_shapes: bool = False
    batch: int = 2                  # example batch for tracing (and the fixed batch with static_shapes)
    int4_block: int = 32
    target: str = "tensorrt"        # tensorrt | ort (ONNX Runtime integer ops: ort_graph.py)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': choose one of {', '.join(PRECISIONS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise UserError(f"unknown dtype '{self.dtype}': choose fp32 or fp16")
        if self.target not in TARGETS:
            raise UserError(f"unknown target '{self.target}': choose one of {', '.join(TARGETS)}")
        if self.target == "ort" and self.dtype != "fp32":
            raise UserError("--target ort runs on ONNX Runtime CPU in fp32: drop --dtype fp16 (or use --target tensorrt)")
