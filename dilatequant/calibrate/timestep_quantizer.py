"""Temporal Parallel Quantizer (TPQ): one activation step size (and zero point) per timestep.

Each sample of a batch gathers its own row by its `t_index`, so a batch that mixes steps trains all
rows at once. Tables are [T, H]: H = 1 for per-tensor activations, the head count for attention-matmul
inputs laid out [B, H, N, d]. A per-channel `inv_scale` (1/s of Weight Dilation or SmoothQuant)
multiplies the input first; in the exported graph it merges into the per-timestep multiply.

Observation keeps what each timestep's activations looked like (a reservoir of values, the range, each
sample's range), whatever the table size. Initialisation then sets every row from its own timestep, and
one static row from all timesteps pooled (`static_delta`): the single row of a --no-tpq model and the
scale of the --static-scales export twin, calibrated on the data rather than derived from the tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .quant_config import INIT_METHODS
from .quantizers import IntRange, lsq_factor, round_clamp, round_ste, scale_grad

# mse: MSE search over clipping ranges; percentile: the 1e-4 / 1 - 1e-4 quantiles; minmax: the full range;
# minmean: ModelOpt's diffusers percentile calibrator with collect_method "min-mean" (percentile 1.0): per
# timestep the mean over samples of each sample's max|x| (min and max when asymmetric), then the narrowest of
# those over the timesteps pooled (a per-timestep row: its own timestep's mean).
_RESERVOIR = 4096  # values kept per (t_index, head) row for initialisation
_MSE_RATIOS = (0.3, 1.0, 36)  # clipping ratios of the observed range tried by the MSE search (linspace)
_SEARCH_ELEMENTS = 1 << 23  # bound on one batched search tensor (candidates x rows x values), ~32 MB float32


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
    sample_lo: list[torch.Tensor] = field(default_factory=list)  # per sample min (for minmean)
    sample_hi: list[torch.Tensor] = field(default_factory=list)  # per sample max
    # the calibration chunk each entry of values / sample_lo (and _hi) came from: ranks' shares merge in order
    value_chunks: list[int] = field(default_factory=list)
    sample_chunks: list[int] = field(default_factory=list)

    def update(self, v: torch.Tensor, gen: torch.Generator, chunk: int = 0) -> None:
        self.lo = min(self.lo, v.min().item())
        self.hi = max(self.hi, v.max().item())
        flat = v.reshape(v.shape[0], -1)
        self.sample_lo.append(flat.amin(1).float().cpu())  # statistics live on the CPU (identity there)
        self.sample_hi.append(flat.amax(1).float().cpu())
        self.sample_chunks.append(chunk)
        if self.count < 4 * _RESERVOIR:
            take = min(v.numel(), _RESERVOIR)
            idx = torch.randint(0, v.numel(), (take,), generator=gen)
            self.values.append(v.flatten()[idx.to(v.device)].float().cpu())
            self.value_chunks.append(chunk)
            self.count += take

    def skip(self, numel: int, gen: torch.Generator) -> None:
        """What update draws from gen for `numel` values, without the values (another rank's chunk)."""
        if self.count < 4 * _RESERVOIR:
            take = min(numel, _RESERVOIR)
            torch.randint(0, numel, (take,), generator=gen)
            self.count += take

    @staticmethod
    def merged(parts: list["_RowStats"]) -> "_RowStats":
        """Several ranks' statistics of one row as one process would have gathered them (entries in chunk
        order; a stable sort keeps a chunk's several calls in their call order)."""
        out = _RowStats(lo=min(p.lo for p in parts), hi=max(p.hi for p in parts))
        vals = sorted(((c, v) for p in parts for c, v in zip(p.value_chunks, p.values)), key=lambda e: e[0])
        samples = sorted(((c, lo, hi) for p in parts for c, lo, hi in zip(p.sample_chunks, p.sample_lo, p.sample_hi)),
                         key=lambda e: e[0])
        out.values, out.value_chunks = [v for _, v in vals], [c for c, _ in vals]
        out.sample_lo, out.sample_hi = [e[1] for e in samples], [e[2] for e in samples]
        out.sample_chunks = [e[0] for e in samples]
        out.count = sum(len(v) for v in out.values)
        return out


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
        # one row for all timesteps from their pooled activations (NaN: not calibrated, e.g. a q.pt from before)
        self.register_buffer("static_delta", torch.full((1, heads), math.nan))
        if not symmetric:
            self.register_buffer("static_zero_point", torch.full((1, heads), math.nan))
        self.mode = "off"  # off | observe | probe | quant
        self._stats: dict[tuple[int, int], _RowStats] = {}
        self._gen = torch.Generator().manual_seed(0)
        self.chunk = 0  # the calibration chunk being observed (distributed observation tags entries with it)
        self.probed: list[tuple[int, ...]] = []  # per-sample input shape of each call of one forward pass

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
            return torch.zeros(batch, dtype=torch.long, device=self.delta.device)
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
        if self.mode == "probe":
            self.probed.append(tuple(x.shape[1:]))
            return Levels(self._scaled(x), None, None)
        rows = self.rows(x.shape[0])
        if self.mode == "observe":
            x = self._scaled(x)
            self._observe(x.detach(), rows)
            return Levels(x, None, None)
        delta = self._per_sample(scale_grad(self.delta, lsq_factor(x[0].numel() // self.heads, self.range)), rows, x)
        u = x * self._multiplier(delta, x)
        if self.zero_point is None:
            return Levels(round_clamp(u, self.range.qmin, self.range.qmax), delta, None)
        half = 2 ** (self.bits - 1)
        z = round_ste(self._per_sample(self.zero_point, rows, x))
        return Levels(round_clamp(u + (z - half), -half, half - 1), delta, half - z)

    def _multiplier(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(1/s) / delta as one factor: the exported graph multiplies by exactly this table."""
        if self.inv_scale.numel() == 0:
            return 1.0 / delta
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return self.inv_scale.view(shape) / delta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("static_delta", "static_zero_point"):  # q.pt written before the pooled static row existed
            if name in self._buffers and prefix + name not in state_dict:  # NaN: not calibrated (built on meta
                state_dict[prefix + name] = torch.full(self._buffers[name].shape, math.nan)  # by load_checkpoint)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def has_static_row(self) -> bool:
        return not bool(torch.isnan(self.static_delta).any())

    def _observe(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if self.num_steps == 1 and self.ctx.t_index is not None and len(self.ctx.t_index) == len(rows):
            rows = self.ctx.t_index  # a single static row still sees every timestep apart, to pool them evenly
        for r in rows.unique().tolist():
            xs = x[rows == r]
            for h in range(self.heads):
                v = xs if self.heads == 1 else xs[:, h]
                self._stats.setdefault((r, h), _RowStats()).update(v, self._gen, self.chunk)

    def skip_chunk(self, t_index: torch.Tensor) -> None:
        """Advance the reservoir draws past a chunk another rank observes, as _observe would have drawn them
        (the draws depend only on sizes: each call's probed per-sample shape and the chunk's t_index)."""
        rows = t_index  # what _observe keys by, a single static row included (it pools the timesteps apart)
        for shape in self.probed:
            per_sample = math.prod(shape) // (self.heads if self.heads > 1 else 1)
            for r in rows.unique().tolist():
                n = int((rows == r).sum())
                for h in range(self.heads):
                    self._stats.setdefault((r, h), _RowStats()).skip(n * per_sample, self._gen)

    def export_stats(self) -> dict[tuple[int, int], _RowStats]:
        return dict(self._stats)

    def merge_stats(self, parts: list[dict[tuple[int, int], _RowStats]]) -> None:
        """All ranks' observations as one process's (key order: every rank visits every chunk in order, so
        each rank's keys arrive in the same order as one process's)."""
        self._stats = {k: _RowStats.merged([p[k] for p in parts if k in p]) for k in parts[0]}

    @torch.no_grad()
    def init_from_observations(self, method: str = "mse") -> None:
        """Set every row's step size (and zero point) from what that timestep's activations looked like,
        and the static row from every timestep's activations pooled (all rows and candidates searched at once).
        """
        if method not in INIT_METHODS:
            raise ValueError(f"unknown activation init '{method}', choose from {INIT_METHODS}")
        if not self._stats:
            raise RuntimeError("no activations observed: run calibration data through the model in observe mode")
        steps = sorted({t for t, _ in self._stats})
        by_head = [[self._stats[(t, h)] for t in steps if (t, h) in self._stats] for h in range(self.heads)]
        static = torch.stack([_pooled_row(stats, self.range, self.symmetric, method) for stats in by_head], 1)
        self.static_delta.copy_(static[0:1])
        if self.zero_point is not None:
            self.static_zero_point.copy_(static[1:2])
        if self.num_steps == 1:
            self.delta.copy_(static[0:1])
            if self.zero_point is not None:
                self.zero_point.copy_(static[1:2])
            self._stats.clear()
            return
        keys = list(self._stats)
        delta, z = choose_ranges([self._stats[k] for k in keys], self.range, self.symmetric, method)
        rows, heads = torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys])
        self.delta[rows, heads] = delta.float().to(self.delta.device)  # the statistics live on the CPU
        if self.zero_point is not None:
            self.zero_point[rows, heads] = z.float().to(self.zero_point.device)
        observed = set(steps)
        missing = [r for r in range(self.num_steps) if r not in observed]
        if missing:  # steps with no data borrow their nearest observed neighbour's row
            obs = torch.tensor(steps)
            for r in missing:
                src = obs[(obs - r).abs().argmin()].item()
                self.delta[r] = self.delta[src]
                if self.zero_point is not None:
                    self.zero_point[r] = self.zero_point[src]
        self._stats.clear()


def _padded(stats: list[_RowStats], pad: float) -> torch.Tensor:
    """Each row's reservoir plus its exact min and max, as one [R, N] tensor (short rows padded)."""
    rows = [torch.cat(st.values + [torch.tensor([st.lo, st.hi])]) for st in stats]
    out = torch.full((len(rows), max(len(r) for r in rows)), pad)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def choose_ranges(stats: list[_RowStats], r: IntRange, symmetric: bool, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [R], z [R]) in float64, one per row of statistics: every row and candidate at once.

    Per row: the clipping range [lo, hi] (zero always inside, so padding and ReLU-like zeros stay exact)
    from the observed range (minmax, mse), its 1e-4 quantiles (percentile) or the mean per-sample range
    (minmean); mse then tries 36 ratios 0.3..1.0 of it and keeps the first with the least squared error.
    """
    lo = torch.tensor([min(st.lo, 0.0) for st in stats], dtype=torch.float64)
    hi = torch.tensor([max(st.hi, 0.0) for st in stats], dtype=torch.float64)
    if method == "percentile":
        nan = torch.full((len(stats), max(sum(len(v) for v in st.values) for st in stats)), math.nan)
        for i, st in enumerate(stats):
            v = torch.cat(st.values)
            nan[i, : len(v)] = v
        big = torch.tensor([sum(len(v) for v in st.values) > 100 for st in stats])
        if big.any():
            qlo = torch.nanquantile(nan[big], 1e-4, dim=1).double().clamp(max=0.0)
            qhi = torch.nanquantile(nan[big], 1 - 1e-4, dim=1).double().clamp(min=0.0)
            lo[big], hi[big] = qlo, qhi
    elif method == "minmean":
        lo, hi = _mean_ranges(stats, symmetric)
    if method != "mse":
        return _params(lo, hi, r, symmetric)
    ratios = torch.linspace(*_MSE_RATIOS).double()
    delta, z = _params(lo[:, None] * ratios, hi[:, None] * ratios, r, symmetric)  # [R, K]
    return _mse_search(_padded(stats, 0.0), delta, z, r)


def _mse_search(v: torch.Tensor, delta: torch.Tensor, z: torch.Tensor, r: IntRange) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate (column of delta, z: [R, K]) with the least squared quantization error of each row of v.

    Zero padding adds no error: zero is always on the grid (z lies in [qmin, qmax]). Errors are computed in
    float32 as the graph would quantize, and summed in float64; ties keep the first (smallest) candidate.
    """
    rows, k = delta.shape
    err = torch.empty(rows, k, dtype=torch.float64)
    d32, z32 = delta.float(), z.float()
    per_row = max(1, _SEARCH_ELEMENTS // max(1, k * v.shape[1]))
    for i in range(0, rows, per_row):
        x = v[i:i + per_row, None, :]
        d, zz = d32[i:i + per_row, :, None], z32[i:i + per_row, :, None]
        if k * v.shape[1] <= _SEARCH_ELEMENTS:
            q = torch.clamp(torch.round(x / d) + zz, r.qmin, r.qmax)
            err[i:i + per_row] = (((q - zz) * d - x) ** 2).sum(-1, dtype=torch.float64)
            continue
        step = max(1, _SEARCH_ELEMENTS // v.shape[1])  # one row too wide for all candidates at once (pooled data)
        for j in range(0, k, step):
            dj, zj = d[:, j:j + step], zz[:, j:j + step]
            q = torch.clamp(torch.round(x / dj) + zj, r.qmin, r.qmax)
            err[i:i + per_row, j:j + step] = (((q - zj) * dj - x) ** 2).sum(-1, dtype=torch.float64)
    best = err.argmin(1, keepdim=True)
    return delta.gather(1, best)[:, 0], z.gather(1, best)[:, 0]


def _pooled_row(stats: list[_RowStats], r: IntRange, symmetric: bool, method: str) -> torch.Tensor:
    """(delta, z) of one row for all timesteps: the same rule over every timestep's activations pooled.

    Each timestep contributes the same number of reservoir values (the calibration set is stratified over
    the steps); minmean keeps ModelOpt's rule, the narrowest of the per-timestep mean ranges.
    """
    if method == "minmean":
        lo, hi = _mean_ranges(stats, symmetric)
        d, zz = _params(lo.max()[None], hi.min()[None], r, symmetric)
        return torch.stack([d[0], zz[0]]).float()
    take = min(sum(len(v) for v in st.values) for st in stats)
    pooled = _RowStats(lo=min(st.lo for st in stats), hi=max(st.hi for st in stats),
                       values=[torch.cat(st.values)[:take] for st in stats])
    delta, z = choose_ranges([pooled], r, symmetric, method)
    return torch.stack([delta[0], z[0]]).float()


def _mean_ranges(stats: list[_RowStats], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the mean over samples of each sample's min and max (symmetric: of its max |x|), float64."""
    lo = torch.stack([torch.cat(st.sample_lo).double().mean() for st in stats]).clamp(max=0.0)
    hi = torch.stack([torch.cat(st.sample_hi).double().mean() for st in stats]).clamp(min=0.0)
    if symmetric:  # ModelOpt's amax
        amax = torch.stack([torch.maximum(-torch.cat(st.sample_lo), torch.cat(st.sample_hi)).double().mean()
                            for st in stats])
        return -amax, amax
    return lo, hi


def _params(lo: torch.Tensor, hi: torch.Tensor, r: IntRange, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point of the range [lo, hi] (float64, any shape; lo <= 0 <= hi)."""
    if symmetric:
        return (torch.maximum(-lo, hi) / r.qmax).clamp_min(1e-8), torch.zeros_like(lo)
    delta = ((hi - lo) / r.levels).clamp_min(1e-8)
    return delta, torch.round(-lo / delta).clamp(r.qmin, r.qmax)
