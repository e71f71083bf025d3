"""Temporal Parallel Quantizer (TPQ): one activation step size (and zero point) per timestep.

Each sample of a batch gathers its own row by its `t_index`, so a batch that mixes steps trains all
rows at once. Tables are [T, H]: H = 1 for per-tensor activations, the head count for attention-matmul
inputs laid out [B, H, N, d]. A per-channel `inv_scale` (1/s of Weight Dilation or SmoothQuant)
multiplies the input first; in the exported graph it merges into the per-timestep multiply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .quantizers import IntRange, lsq_factor, round_ste, scale_grad

INIT_METHODS = ("mse", "percentile", "minmax")
_RESERVOIR = 4096  # values kept per (t_index, head) row for initialisation


@dataclass
class Levels:
    v: torch.Tensor
    delta: torch.Tensor | None
    correction: torch.Tensor | None


class StepContext:
    """The per-sample t_index of the forward pass in flight, shared by every quantizer of one model."""

    def __init__(self) -> None:
        self.t_index: torch.Tensor | None = None


@dataclass
class _RowStats:
    lo: float = math.inf
    hi: float = -math.inf
    values: list[torch.Tensor] = field(default_factory=list)
    count: int = 0

    def update(self, v: torch.Tensor, gen: torch.Generator) -> None:
        self.lo = min(self.lo, v.min().item())
        self.hi = max(self.hi, v.max().item())
        if self.count < 4 * _RESERVOIR:
            take = min(v.numel(), _RESERVOIR)
            idx = torch.randint(0, v.numel(), (take,), generator=gen)
            self.values.append(v.flatten()[idx].float())
            self.count += take


class TimestepActQuantizer(nn.Module):
    def __init__(self, ctx: StepContext, num_steps: int, bits: int, symmetric: bool,
                 channels: int = 0, channel_dim: int = -1, heads: int = 1) -> None:
        super().__init__()
        self.ctx = ctx
        self.bits, self.symmetric, self.channel_dim, self.heads = bits, symmetric, channel_dim, heads
        self.range = IntRange.for_activations(bits, symmetric)
        self.delta = nn.Parameter(torch.ones(num_steps, heads))
        self.zero_point = None if symmetric else nn.Parameter(torch.zeros(num_steps, heads))
        self.register_buffer("inv_scale", torch.ones(channels) if channels else torch.ones(0))
        self.mode = "off"  # off | observe | quant
        self._stats: dict[tuple[int, int], _RowStats] = {}
        self._gen = torch.Generator().manual_seed(0)

    @property
    def num_steps(self) -> int:
        return self.delta.shape[0]

    def extra_repr(self) -> str:
        zp = "symmetric" if self.symmetric else "asymmetric"
        return f"T={self.num_steps}, heads={self.heads}, bits={self.bits}, {zp}, channels={self.inv_scale.numel()}"

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale.numel() == 0:
            return x
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.inv_scale.view(shape)

    def rows(self, batch: int) -> torch.Tensor:
        """Row index of each sample: its t_index (always 0 for a single static row)."""
        if self.num_steps == 1:
            return torch.zeros(batch, dtype=torch.long)
        t = self.ctx.t_index
        if t is None:
            raise RuntimeError("no t_index set: call the model through QuantUNet.forward(sample, timestep, t_index)")
        if len(t) != batch:
            raise ValueError(f"t_index has {len(t)} entries for a batch of {batch}")
        return t

    def _per_sample(self, table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = table[rows.to(table.device)]  # [B, H]
        if self.heads == 1:
            return g.view(-1, *([1] * (x.dim() - 1)))
        return g.view(g.shape[0], self.heads, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lv = self.levels(x)
        if lv.delta is None:
            return lv.v
        v = lv.v if lv.correction is None else lv.v + lv.correction
        return v * lv.delta

    def levels(self, x: torch.Tensor) -> "Levels":
        """The input on the integer grid, in the exact float order of the deployed graph.

        Quant mode: v = clamp(round(x * (1/s) / delta + z - 2^(b-1))) (int8-range integers, as the graph's
        unit-scale Q/DQ produces them), the per-sample step delta, and the correction c = 2^(b-1) - z that
        turns v back into the level minus zero point (None when symmetric). Layers apply delta and c after
        their conv/matmul, as the graph does, so PyTorch and every runtime round the same float values.
        Other modes: v is the (scaled) input and delta is None.
        """
        if self.mode == "off":
            return Levels(self._scaled(x), None, None)
        rows = self.rows(x.shape[0])
        if self.mode == "observe":
            x = self._scaled(x)
            self._observe(x.detach(), rows)
            return Levels(x, None, None)
        delta = self._per_sample(scale_grad(self.delta, lsq_factor(x[0].numel() // self.heads, self.range)), rows, x)
        u = x * self._multiplier(delta, x)
        if self.zero_point is None:
            return Levels(torch.clamp(round_ste(u), self.range.qmin, self.range.qmax), delta, None)
        half = 2 ** (self.bits - 1)
        z = round_ste(self._per_sample(self.zero_point, rows, x))
        return Levels(torch.clamp(round_ste(u + (z - half)), -half, half - 1), delta, half - z)

    def _multiplier(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(1/s) / delta as one factor: the exported graph multiplies by exactly this table."""
        if self.inv_scale.numel() == 0:
            return 1.0 / delta
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return self.inv_scale.view(shape) / delta

    def _observe(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        for r in rows.unique().tolist():
            xs = x[rows == r]
            for h in range(self.heads):
                v = xs if self.heads == 1 else xs[:, h]
                self._stats.setdefault((r, h), _RowStats()).update(v, self._gen)

    @torch.no_grad()
    def init_from_observations(self, method: str = "mse") -> None:
        """Set every row's step size (and zero point) from what that timestep's activations looked like."""
        if method not in INIT_METHODS:
            raise ValueError(f"unknown activation init '{method}', choose from {INIT_METHODS}")
        if not self._stats:
            raise RuntimeError("no activations observed: run calibration data through the model in observe mode")
        for (r, h), st in self._stats.items():
            delta, z = _choose_range(st, self.range, self.symmetric, method)
            self.delta[r, h] = delta
            if self.zero_point is not None:
                self.zero_point[r, h] = z
        observed = {r for r, _ in self._stats}
        missing = [r for r in range(self.num_steps) if r not in observed]
        if missing:  # steps with no data borrow their nearest observed neighbour's row
            obs = torch.tensor(sorted(observed))
            for r in missing:
                src = obs[(obs - r).abs().argmin()].item()
                self.delta[r] = self.delta[src]
                if self.zero_point is not None:
                    self.zero_point[r] = self.zero_point[src]
        self._stats.clear()


def _choose_range(st: _RowStats, r: IntRange, symmetric: bool, method: str) -> tuple[float, float]:
    v = torch.cat(st.values)
    lo, hi = min(st.lo, 0.0), max(st.hi, 0.0)  # zero stays exactly representable (padding, ReLU-like zeros)
    if method == "percentile" and v.numel() > 100:
        lo = min(torch.quantile(v, 1e-4).item(), 0.0)
        hi = max(torch.quantile(v, 1 - 1e-4).item(), 0.0)
    candidates = [1.0] if method != "mse" else torch.linspace(0.3, 1.0, 36).tolist()
    v = torch.cat([v, torch.tensor([st.lo, st.hi])])
    best, best_err = None, math.inf
    for ratio in candidates:
        delta, z = _params(lo * ratio, hi * ratio, r, symmetric)
        q = torch.clamp(torch.round(v / delta) + z, r.qmin, r.qmax)
        err = torch.sum(((q - z) * delta - v) ** 2).item()
        if err < best_err:
            best, best_err = (delta, z), err
    return best


def _params(lo: float, hi: float, r: IntRange, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        return max(max(-lo, hi) / r.qmax, 1e-8), 0.0
    delta = max((hi - lo) / r.levels, 1e-8)
    return delta, float(min(max(round(-lo / delta), r.qmin), r.qmax))
