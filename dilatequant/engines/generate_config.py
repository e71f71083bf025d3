"""dq-generate's settings (torch-free: the CLI reads them for its help)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.schedulers import CHOICES, PIPELINE, check_name

SCHEDULERS = CHOICES


@dataclass
class GenerateConfig:
    model: str                           # the pipeline folder the runtime was calibrated from
    runtime: Path                        # unet.onnx | unet.plan | q.pt
    prompt: str
    out: Path = Path("img.png")
    negative_prompt: str | None = None
    steps: int = 20
    scheduler: str = PIPELINE            # pipeline (the folder's own) | a core.schedulers name
    guidance: float | None = None        # None: the model's own (dilatequant.json), else the pipeline's (7.5)
    seed: int = 0
    size: tuple[int, int] | None = None  # (H, W) pixels; None: the calibrated size
    compare_fp: bool = False             # also the FP pipeline from the same seed, side by side, with PSNR/SSIM
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_name(self.scheduler)
        if not self.prompt.strip():
            raise UserError("--prompt is empty; pass the text to generate from")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
