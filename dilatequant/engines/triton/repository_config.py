"""dq-triton's settings (light: the CLI reads them for its help without loading tritonclient or onnx)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...core.errors import UserError

KINDS = ("gpu", "cpu")
PIPELINE = "pipeline"


@dataclass
class RepositoryConfig:
    repo: Path
    onnx: Path | None = None
    engine: Path | None = None
    ckpt: Path | None = None           # q.pt: class encoder + scheduler (default: the base model the graph names)
    model: str | Path | None = None    # SD graphs: the pipeline folder (default: the base model the graph names)
    kind: str = "gpu"
    name: str = "unet"
    max_batch: int = 16
    instances: int = 1
    pipeline_instances: int = 2
    max_queue_delay_us: int = 2000
    max_images: int = 64
    intra_op_threads: int = 0          # --kind cpu: ORT threads per unet instance (0: ORT's default)
    overwrite: bool = False
    serving_tensorrt: str | None = None  # the serving container's TensorRT release: a plan built by another is refused

    def __post_init__(self) -> None:
        self.repo = Path(self.repo)
        if (self.onnx is None) == (self.engine is None):
            raise UserError("pass exactly one of --onnx unet.onnx or --engine unet.plan")
        if self.kind not in KINDS:
            raise UserError(f"unknown --kind '{self.kind}': choose gpu (TensorRT/ORT backends) or cpu (Python backend)")
        if self.kind == "cpu" and self.engine is not None:
            raise UserError("--kind cpu runs ONNX Runtime in the Python backend: pass --onnx (a plan needs a GPU)")
        if self.name == PIPELINE or not self.name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"--name '{self.name}' must be letters, digits, '-' or '_' and not '{PIPELINE}'")
        for n, v in (("--max-batch", self.max_batch), ("--instances", self.instances),
                     ("pipeline instances", self.pipeline_instances), ("max images", self.max_images)):
            if v < 1:
                raise UserError(f"{n} must be >= 1, got {v}")
