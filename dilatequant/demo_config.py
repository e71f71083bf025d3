"""dq-demo's settings (torch-free: the CLI reads them for its help)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    report_dir: Path = Path("dq-report")
    models: tuple[str, ...] = ("default", "default-cond", "sd-digits")
    num_samples: int = 100
    steps: int = 50
    guidance_scale: float | None = None  # None: each model's own (default-cond 1.1, sd-digits 3.0)
    seed: int = 0
    quant_model: str = "sd-digits"  # the model the demo calibrates, exports and verifies
    bits: str = "W4A8"
    symmetric: bool = True         # what TensorRT runs
    calib_samples: int = 128
    iters: int = 20                # BKD iterations per block: a short demo run (benchmarks train longer)
    generate_steps: int = 20       # the prompt grid: diffusers' pipeline with the graph as pipe.unet
    generate_schedulers: tuple[str, ...] = ("euler", "dpm")
