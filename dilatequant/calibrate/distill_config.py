"""BKD's training settings, torch-free (the CLI reads the defaults for its help)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    iters: int = 200              # per block (BKD) or in total (full-model QAT)
    batch: int = 32
    lr_weight: float = 1e-5
    lr_weight_scale: float = 5e-3   # relative: each step-size tensor moves ~this fraction of its size per step
    lr_act: float = 5e-3            # relative, for activation step sizes; zero points use lr_zero_point
    lr_zero_point: float = 1e-2
    full_model: bool = False
    seed: int = 0
