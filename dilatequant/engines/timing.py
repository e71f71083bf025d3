"""Latency and memory probes for dq-verify: warmup + repeats, medians and p90, peak RSS / GPU memory.

Numbers are only compared when measured in the same process on the same device, one after another.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .base import Runner


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def unet_inputs(runner: Runner, batch: int, cond_len: int = 4, seed: int = 0, cond: dict | None = None):
    """Representative inputs: mid-schedule timestep, matching t_index, and the given batch-1 condition repeated
    (default: random encoder_hidden_states of cond_len tokens) when conditional."""
    m = runner.metadata
    gen = torch.Generator().manual_seed(seed)
    i = m.num_steps // 2
    sample = torch.randn((batch, *m.sample_shape), generator=gen)
    timestep = torch.full((batch,), round(m.timesteps[i]), dtype=torch.int64)
    t_index = torch.full((batch,), i, dtype=torch.int64)
    if cond is not None:
        cond = {k: v[:1].expand(batch, *v.shape[1:]).contiguous() for k, v in cond.items()}
    elif m.conditional:
        cond = torch.randn((batch, cond_len, m.cond_dim or 64), generator=gen)
    return sample, timestep, t_index, cond if m.conditional else None


def measure(fn, sync, warmup: int, repeats: int) -> Latency:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    return Latency(float(np.median(t)), float(np.percentile(t, 90)), float(t.min()), repeats)


def unet_latency(runner: Runner, batch: int, warmup: int = 3, repeats: int = 20, cond_len: int = 4,
                 cond: dict | None = None) -> Latency:
    """One UNet call through the runner's full infer() (validation and host copies included)."""
    args = unet_inputs(runner, batch, cond_len, cond=cond)
    runner.activate()
    return measure(lambda: runner.infer(*args), runner.synchronize, warmup, repeats)


def gpu_memory() -> dict | None:
    """Peak memory PyTorch allocated, and what the whole device has in use now (TensorRT/ORT included)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"torch_peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "device_used_mb": round((total - free) / 2**20, 1), "device_total_mb": round(total / 2**20, 1)}
