"""Fake-quantization primitives: straight-through rounding, LSQ step-size gradients, integer ranges.

Weights are always symmetric per-out-channel with a narrow signed range ([-(2^(b-1)-1), 2^(b-1)-1]),
which TensorRT runs natively; activations use `IntRange.for_activations` (see timestep_quantizer.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class IntRange:
    qmin: int
    qmax: int

    @staticmethod
    def for_weights(bits: int) -> "IntRange":
        _check_bits(bits)
        return IntRange(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)

    @staticmethod
    def for_activations(bits: int, symmetric: bool) -> "IntRange":
        _check_bits(bits)
        return IntRange(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else IntRange(0, 2**bits - 1)

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bit width must be in 2..8, got {bits}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return (x.round() - x).detach() + x


def round_clamp(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(round_ste(u), lo, hi) for a temporary u the caller owns.

    With no gradient to carry it rounds and clamps u in place: two passes instead of five and no new tensor
    (at SD 1.5 size the fake-quant overhead of PTQ's observation and validation passes). The same values:
    round(u) - u is exact in float32 (|round(u) - u| <= 1/2; Sterbenz), so (round(u) - u) + u is round(u);
    only an exact zero's sign may differ, which no later op can see.
    """
    if torch.is_grad_enabled() and u.requires_grad:
        return torch.clamp(round_ste(u), lo, hi)
    return u.round_().clamp_(lo, hi)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward (bit-exact), gradient multiplied by factor backward (LSQ's step-size gradient scaling).

    The usual (x - x*f).detach() + x*f changes x by an ulp, enough to flip roundings against the
    exported graph, which uses the exact table values; x + (y - y.detach()) adds an exact zero.
    """
    y = x * factor
    return x.detach() + (y - y.detach())


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, r: IntRange) -> torch.Tensor:
    """scale * (clamp(round(x / scale) + z, qmin, qmax) - z); scale and z broadcast against x."""
    q = round_ste(x / scale)
    if zero_point is not None:
        z = round_ste(zero_point)
        return (torch.clamp(q + z, r.qmin, r.qmax) - z) * scale
    return torch.clamp(q, r.qmin, r.qmax) * scale


def lsq_factor(numel_per_scale: int, r: IntRange) -> float:
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, r.qmax))


def mse_search_symmetric(x: torch.Tensor, r: IntRange, dim: int = 0, grid: int = 40) -> torch.Tensor:
    """Per-slice (along dim) scale minimising ||Q(x) - x||^2 over clipping ratios 0.3..1.0 of max|x|.

    In place in one buffer: the same operations per element as the out-of-place loop (bit-identical scales)
    without allocating six weight-sized temporaries per candidate, which dominated at SD 1.5 size. (Row
    chunks that fit in cache were measured too, and were slower: per-op overhead on 2 threads.)
    """
    xf = x.transpose(0, dim).reshape(x.shape[dim], -1).float()
    absmax = xf.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax / r.qmax
    buf = torch.empty_like(xf)
    for ratio in torch.linspace(0.3, 1.0, grid):
        s = (absmax * ratio / r.qmax)[:, None]
        torch.div(xf, s, out=buf)
        err = buf.round_().clamp_(r.qmin, r.qmax).mul_(s).sub_(xf).square_().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


def _mse_search_reference(x: torch.Tensor, r: IntRange, dim: int = 0, grid: int = 40) -> torch.Tensor:
    """The whole-tensor loop mse_search_symmetric must reproduce bit for bit (tests and benchmark)."""
    xf = x.transpose(0, dim).reshape(x.shape[dim], -1).float()
    absmax = xf.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax / r.qmax
    for ratio in torch.linspace(0.3, 1.0, grid):
        s = (absmax * ratio / r.qmax)[:, None]
        err = ((torch.clamp(torch.round(xf / s), r.qmin, r.qmax) * s - xf) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


class WeightQuantizer(nn.Module):
    """Symmetric per-out-channel weight fake-quantizer with a learnable step size per channel."""

    def __init__(self, out_channels: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.range = IntRange.for_weights(bits)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.enabled = True

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        self.scale.copy_(mse_search_symmetric(weight, self.range, dim=0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        s = scale_grad(self.scale, lsq_factor(weight[0].numel(), self.range)).view(shape)
        return fake_quant(weight, s, None, self.range)

    def integer_ste(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer levels as float with STE, per-channel scale with LSQ gradient), for exact integer ops."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        s = scale_grad(self.scale, lsq_factor(weight[0].numel(), self.range))
        return round_clamp(weight / s.view(shape), self.range.qmin, self.range.qmax), s

    @torch.no_grad()
    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer levels a deployed graph stores (int8 container, any bit width)."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return torch.clamp(torch.round(weight / self.scale.view(shape)), self.range.qmin, self.range.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"
