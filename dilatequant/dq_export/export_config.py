"""What dq-export writes: precision, scales, dtype, shapes, target (torch-free: the CLI reads it for its help)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.errors import UserError

PRECISIONS = ("int8", "int4", "fp8")
TARGETS = ("tensorrt", "ort")
# FP8 E4M3 convolutions/GEMMs need Ada (8.9) or newer: TensorRT-RTX refuses to build them for 8.6 (Ampere).
# An FP8 graph records it as metadata (`dilatequant.min_compute_capability`) for engine builders to check.
FP8_MIN_COMPUTE_CAPABILITY = "8.9"


@dataclass
class ExportConfig:
    # int8 | int4 (weight-only INT4 blocks for MatMul/Gemm) | fp8; None: what the q.pt holds (int8, or fp8 for an
    # FP8 checkpoint)
    precision: str | None = None
    static_scales: bool = False     # one constant scale per activation, no t_index input
    dtype: str = "fp32"             # fp32 | fp16 (FP16 fallback for everything not quantized)
    static_shapes: bool = False
    batch: int = 2                  # example batch for tracing (and the fixed batch with static_shapes)
    int4_block: int = 64             # TensorRT's INT4 blocks are 64 or 128 wide; 64 divides every SD / SDXL width
    target: str = "tensorrt"        # tensorrt | ort (ONNX Runtime integer ops: ort_graph.py)

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': choose one of {', '.join(PRECISIONS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise UserError(f"unknown dtype '{self.dtype}': choose fp32 or fp16")
        if self.target not in TARGETS:
            raise UserError(f"unknown target '{self.target}': choose one of {', '.join(TARGETS)}")
        if self.target == "ort" and self.dtype != "fp32":
            raise UserError("--target ort runs on ONNX Runtime CPU in fp32: drop --dtype fp16 (or use --target tensorrt)")

    def for_checkpoint(self, fmt: str) -> "ExportConfig":
        """This config with the precision a q.pt of format `fmt` (int | fp8) exports to; a mismatch is one clear line."""
        if fmt == "fp8":
            if self.precision not in (None, "fp8"):
                raise UserError(f"this q.pt is FP8 (E4M3): export it with --precision fp8 (or no --precision), not "
                                f"{self.precision}; for an integer graph calibrate with --format int")
            if self.target == "ort":
                raise UserError("--target ort has no FP8 flavor (its integer ops are INT8): export the FP8 q.pt with "
                                "--target tensorrt, which ONNX Runtime runs too (float8e4m3fn Q/DQ on its CPU provider)")
            return replace(self, precision="fp8")
        if self.precision == "fp8":
            raise UserError("this q.pt is integer: --precision fp8 needs a q.pt calibrated with --format fp8")
        return replace(self, precision=self.precision or "int8")
