"""TPQ initialisation: the batched search gives the per-row loop's tables; static rows see every timestep."""
import math

import pytest
import torch

from dilatequant.calibrate.quantizers import IntRange
from dilatequant.calibrate.timestep_quantizer import StepContext, TimestepActQuantizer


def _loop_reference(q: TimestepActQuantizer, method: str) -> dict:
    """The search as it was written before batching: one row, one candidate at a time, Python floats."""
    out = {}
    r = q.range
    for key, st in q._stats.items():
        v = torch.cat(st.values)
        lo, hi = min(st.lo, 0.0), max(st.hi, 0.0)
        if method == "percentile" and v.numel() > 100:
            lo = min(torch.quantile(v, 1e-4).item(), 0.0)
            hi = max(torch.quantile(v, 1 - 1e-4).item(), 0.0)
        candidates = [1.0] if method != "mse" else torch.linspace(0.3, 1.0, 36).tolist()
        v = torch.cat([v, torch.tensor([st.lo, st.hi])])
        best, best_err = None, math.inf
        for ratio in candidates:
            a, b = lo * ratio, hi * ratio
            if q.symmetric:
                delta, z = max(max(-a, b) / r.qmax, 1e-8), 0.0
            else:
                delta = max((b - a) / r.levels, 1e-8)
                z = float(min(max(round(-a / delta), r.qmin), r.qmax))
            qv = torch.clamp(torch.round(v / delta) + z, r.qmin, r.qmax)
            err = torch.sum(((qv - z) * delta - v) ** 2).item()
            if err < best_err:
                best, best_err = (delta, z), err
        out[key] = best
    return out


def _observe(q: TimestepActQuantizer, ctx: StepContext, steps: int, seed: int = 0, chunk: int = 7):
    """Skewed, step-dependent activations in t-sorted chunks (as build_calibration_set orders them)."""
    gen = torch.Generator().manual_seed(seed)
    t_all = torch.arange(steps).repeat_interleave(6)
    q.mode = "observe"
    for i in range(0, len(t_all), chunk):
        t = t_all[i:i + chunk]
        shape = (len(t), q.heads, 40, 40) if q.heads > 1 else (len(t), 3, 40, 40)
        scale = (1 + t.float()).view(-1, *[1] * (len(shape) - 1))
        x = torch.randn(shape, generator=gen).exp() * scale - 0.3 * scale  # long right tail, a step-dependent range
        x[0].view(-1)[:3] = torch.tensor([0.0, 7.0, -2.0]) * scale[0].item()  # outliers the search clips
        ctx.t_index = t
        q(x)
    ctx.t_index = None


@pytest.mark.parametrize("method", ["mse", "percentile", "minmax"])
@pytest.mark.parametrize("symmetric,heads", [(True, 1), (False, 1), (False, 2)])
def test_batched_search_gives_the_loop_tables(method, symmetric, heads):
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, 5, 8, symmetric, heads=heads)
    _observe(q, ctx, steps=4)  # the 5th step has no data: it borrows its neighbour's row
    assert len({st.count for st in q._stats.values()}) > 1, "rows with different reservoir sizes (padding)"
    ref = _loop_reference(q, method)
    q.init_from_observations(method)
    for (t, h), (delta, z) in ref.items():
        assert q.delta[t, h].item() == torch.tensor(delta, dtype=torch.float32).item()
        if not symmetric:
            assert q.zero_point[t, h].item() == z
    assert torch.equal(q.delta[4], q.delta[3])


def _static(method: str, symmetric: bool, tpq_rows: int, chunk: int = 5):
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, tpq_rows, 8, symmetric)
    _observe(q, ctx, steps=10, chunk=chunk)
    stats = {k: v for k, v in q._stats.items()}
    q.init_from_observations(method)
    return q, stats


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_row_is_the_search_over_every_timestep_pooled(symmetric):
    q, stats = _static("mse", symmetric, tpq_rows=1)
    assert sorted(t for t, _ in stats) == list(range(10)), "a single-row quantizer still observes each step apart"
    # the reference: one reservoir holding an equal share of every step, searched by the loop
    pooled = TimestepActQuantizer(StepContext(), 1, 8, symmetric)
    take = min(st.count for st in stats.values())
    from dilatequant.calibrate.timestep_quantizer import _RowStats

    pooled._stats[(0, 0)] = _RowStats(lo=min(s.lo for s in stats.values()), hi=max(s.hi for s in stats.values()),
                                      values=[torch.cat(stats[(t, 0)].values)[:take] for t in range(10)])
    (delta, z), = _loop_reference(pooled, "mse").values()
    assert q.delta[0, 0].item() == torch.tensor(delta, dtype=torch.float32).item()
    assert torch.equal(q.static_delta, q.delta)
    # before, a single-row reservoir filled up on the first chunks (the earliest steps) and stopped: another row
    first_steps = TimestepActQuantizer(StepContext(), 1, 8, symmetric)
    first_steps._stats[(0, 0)] = _RowStats(lo=pooled._stats[(0, 0)].lo, hi=pooled._stats[(0, 0)].hi,
                                           values=[torch.cat(stats[(t, 0)].values) for t in range(2)])
    (d_first, _), = _loop_reference(first_steps, "mse").values()
    assert abs(q.delta[0, 0].item() / d_first - 1) > 0.01  # 2-6% on this data
    # a TPQ quantizer on the same observations carries the same pooled row beside its tables
    tpq, _ = _static("mse", symmetric, tpq_rows=10)
    assert torch.equal(tpq.static_delta, q.static_delta)
    if not symmetric:
        assert torch.equal(tpq.static_zero_point, q.static_zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
def test_minmean_is_modelopts_rule(symmetric):
    """Per step the mean over samples of each sample's max|x| (min / max), then the narrowest over steps."""
    q, stats = _static("minmean", symmetric, tpq_rows=1)
    r = IntRange.for_activations(8, symmetric)
    lo_t = [torch.cat(stats[(t, 0)].sample_lo).double().mean().item() for t in range(10)]
    hi_t = [torch.cat(stats[(t, 0)].sample_hi).double().mean().item() for t in range(10)]
    if symmetric:
        amax = min(torch.maximum(-torch.cat(stats[(t, 0)].sample_lo), torch.cat(stats[(t, 0)].sample_hi))
                   .double().mean().item() for t in range(10))
        assert q.delta[0, 0].item() == pytest.approx(amax / 127, rel=1e-6)
    else:
        lo, hi = min(max(lo_t), 0.0), max(min(hi_t), 0.0)
        assert q.delta[0, 0].item() == pytest.approx((hi - lo) / 255, rel=1e-6)
        assert q.zero_point[0, 0].item() == round(-lo / ((hi - lo) / 255))
    assert min(hi_t) < 0.5 * max(hi_t), "the rule keeps the narrowest step's range, not the widest"
    tpq, _ = _static("minmean", symmetric, tpq_rows=10)
    assert torch.equal(tpq.static_delta, q.delta) and tpq.delta[9, 0] > 5 * tpq.delta[0, 0]


def test_quantizer_state_from_before_the_static_row_loads():
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, 3, 8, False)
    old = {k: v for k, v in q.state_dict().items() if not k.startswith("static_")}
    fresh = TimestepActQuantizer(ctx, 3, 8, False)
    assert fresh.load_state_dict(old, strict=True) is not None
    assert not fresh.has_static_row()
