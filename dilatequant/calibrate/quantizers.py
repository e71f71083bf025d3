"""Fake-quantization primitives: straight-through rounding, LSQ step-size gradients, the grids levels live on.

Two grids: `IntRange` (uniform integer levels) and `E4M3Grid` (FP8 E4M3, the non-uniform grid of
torch.float8_e4m3fn). Weights are always symmetric per-out-channel (int: a narrow signed range
[-(2^(b-1)-1), 2^(b-1)-1]), which TensorRT runs natively; activations use `activation_grid`
(see timestep_quantizer.py). Code that rounds goes through the grid (`quantize`, `round_values`), so one
quantizer serves both formats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


E4M3_MAX = 448.0  # largest finite float8_e4m3fn (S.1111.110); the format has no inf, S.1111.111 is NaN


@dataclass(frozen=True)
class IntRange:
    qmin: int
    qmax: int
    integer = True  # integer levels: uniform, and float32 sums of their products are exact within 2^24

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """round + clamp with a straight-through gradient (in place on u when no gradient is needed)."""
        return round_clamp(u, self.qmin, self.qmax)

    def round_values(self, u: torch.Tensor) -> torch.Tensor:
        """The levels alone, no gradient path (a new tensor)."""
        return torch.clamp(torch.round(u), self.qmin, self.qmax)

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


@dataclass(frozen=True)
class E4M3Grid:
    """FP8 E4M3 levels (torch.float8_e4m3fn): saturate to +-448, round to nearest even, no inf/NaN out.

    What ONNX QuantizeLinear (saturate=1) and TensorRT's FP8 Q compute for a unit scale. 8-bit, symmetric,
    zero point 0 by construction; products of two E4M3 values are exact in float32 (4-bit significands).
    """

    qmin: float = -E4M3_MAX
    qmax: float = E4M3_MAX
    integer = False  # E4M3 values: their products' float32 sums round, in each runtime's order (layer_parity.py)

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """E4M3 rounding with a straight-through gradient inside +-448 and none outside (clamp's)."""
        c = torch.clamp(u, self.qmin, self.qmax)
        return c + (round_e4m3(c.detach()) - c).detach() if c.requires_grad else round_e4m3(c)

    def round_values(self, u: torch.Tensor) -> torch.Tensor:
        return round_e4m3(torch.clamp(u, self.qmin, self.qmax))

    # scale candidates of the MSE search, as multiples of amax / 448: E4M3's grid repeats every octave, so
    # eight positions per octave over the top two octaves (clipping at most the largest quarter of the range)
    search_ratios = tuple(2.0 ** (-k / 8) for k in range(17))


def round_e4m3(u: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value (ties to even), in u's dtype. u must lie within +-448 already."""
    return u.to(torch.float8_e4m3fn).to(u.dtype)


def weight_grid(fmt: str, bits: int) -> IntRange | E4M3Grid:
    return E4M3Grid() if fmt == "fp8" else IntRange.for_weights(bits)


def activation_grid(fmt: str, bits: int, symmetric: bool) -> IntRange | E4M3Grid:
    return E4M3Grid() if fmt == "fp8" else IntRange.for_activations(bits, symmetric)


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


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               r: IntRange | E4M3Grid) -> torch.Tensor:
    """scale * (clamp(round(x / scale) + z, qmin, qmax) - z); scale and z broadcast against x (E4M3: z is None)."""
    if zero_point is not None:
        z = round_ste(zero_point)
        return (torch.clamp(round_ste(x / scale) + z, r.qmin, r.qmax) - z) * scale
    return r.quantize(x / scale) * scale


def lsq_factor(numel_per_scale: int, r: IntRange | E4M3Grid) -> float:
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, r.qmax))


def mse_search_symmetric(x: torch.Tensor, r: IntRange | E4M3Grid, dim: int = 0, grid: int = 40) -> torch.Tensor:
    """Per-slice (along dim) scale minimising ||Q(x) - x||^2 over clipping ratios 0.3..1.0 of max|x|
    (E4M3: `E4M3Grid.search_ratios`, starting at max|x| / 448).

    In place in one buffer: the same operations per element as the out-of-place loop (bit-identical scales)
    without allocating six weight-sized temporaries per candidate, which dominated at SD 1.5 size. (Row
    chunks that fit in cache were measured too, and were slower: per-op overhead on 2 threads.)
    """
    xf = x.transpose(0, dim).reshape(x.shape[dim], -1).float()
    absmax = xf.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full_like(absmax, math.inf)
    best = absmax / r.qmax
    buf = torch.empty_like(xf)
    ratios = torch.linspace(0.3, 1.0, grid) if r.integer else torch.tensor(r.search_ratios)
    for ratio in ratios:
        s = (absmax * ratio / r.qmax)[:, None]
        torch.div(xf, s, out=buf)
        if r.integer:
            buf.round_().clamp_(r.qmin, r.qmax)
        else:
            buf.copy_(r.round_values(buf))
        err = buf.mul_(s).sub_(xf).square_().sum(1)
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

    def __init__(self, out_channels: int, bits: int, fmt: str = "int") -> None:
        super().__init__()
        self.bits, self.format = bits, fmt
        self.range = weight_grid(fmt, bits)
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
        """(levels as float with STE, per-channel scale with LSQ gradient), for ops on the levels themselves.

        Levels are integers (exact integer sums) or, for fp8, E4M3 values (exact products)."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        s = scale_grad(self.scale, lsq_factor(weight[0].numel(), self.range))
        return self.range.quantize(weight / s.view(shape)), s

    @torch.no_grad()
    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The levels a deployed graph stores (int8 container for any integer bit width; E4M3 values for fp8)."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return self.range.round_values(weight / self.scale.view(shape))

    @property
    def storage_dtype(self) -> torch.dtype:
        """The container of `integer_weight` in a deployed graph."""
        return torch.float8_e4m3fn if self.format == "fp8" else torch.int8

    def extra_repr(self) -> str:
        return f"{'fp8 e4m3' if self.format == 'fp8' else f'bits={self.bits}'}, channels={self.scale.numel()}"
