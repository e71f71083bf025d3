"""Weight Dilation (WD) and the SmoothQuant-style scaling it is compared with.

Both pick a positive factor s per input channel, so X.W = (X / s).(s.W). WD picks the largest s that
keeps every out-channel's weight min and max where they were, so per-out-channel weight scales are
unchanged; SmoothQuant balances activation and weight ranges and widens the weight range.
"""
from __future__ import annotations

import torch



def _as_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """Weights of the layers that share one input, stacked as [sum Cout, Cin, positions]."""
    return torch.cat([w.detach().reshape(w.shape[0], w.shape[1], -1) for w in weights], 0).double()


def dilation_scales(weights: list[torch.Tensor], cap: float, eps: float = 1e-8) -> torch.Tensor:
    """s per input channel (>= 1, <= cap), exactly as dilatequant.md section 1 specifies."""
    w = _as_rows(weights)
    w_max = w.amax(dim=(1, 2), keepdim=True)
    w_min = w.amin(dim=(1, 2), keepdim=True)
    saturated = ((w == w_max) | (w == w_min)).any(dim=2).any(dim=0)
    inf = torch.full_like(w, torch.inf)
    ratio = torch.where(w > eps, w_max / w, torch.where(w < -eps, w_min / w, inf))
    s = ratio.amin(dim=(0, 2))
    s = torch.where(saturated | ~torch.isfinite(s), torch.ones_like(s), s)
    return _inside_in_float(weights, s.clamp(1.0, cap).float())


def _inside_in_float(weights: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """Step s down by one float ulp where W.s, rounded to the weights' dtype, leaves its row's range.

    The ratio w_max / w is exact in float64, but s and the product are rounded to float32, and the
    product lands one ulp outside the row's max or min for about one random layer in six. Clamping
    the product (instead of s) would make the dilated weight differ from W.s, i.e. X.W != (X/s).(sW).
    """
    for _ in range(8):  # one step fixes it in practice; the bound is a guard
        over = torch.zeros_like(s, dtype=torch.bool)
        for w in weights:
            w = w.detach()
            out = scale_weight(w, s)
            rows, rows_d = w.reshape(w.shape[0], w.shape[1], -1), out.reshape(w.shape[0], w.shape[1], -1)
            hi = rows.amax(dim=(1, 2), keepdim=True)
            lo = rows.amin(dim=(1, 2), keepdim=True)
            over |= ((rows_d > hi) | (rows_d < lo)).any(dim=2).any(dim=0)
        if not over.any():
            return s
        s = torch.where(over & (s > 1), torch.nextafter(s, torch.ones_like(s)), s)
    raise AssertionError("dilation_scales: W.s still leaves the row range after 8 one-ulp steps (a bug)")


def smoothquant_scales(weights: list[torch.Tensor], act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_k = max|X_k|^alpha / max|W_:,k|^(1 - alpha) (SmoothQuant, Xiao et al. 2023)."""
    w_absmax = _as_rows(weights).abs().amax(dim=(0, 2)).clamp_min(1e-5)
    s = act_absmax.double().clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)
    return s.clamp(1e-4, 1e4).float()


def dilate(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W.s per input channel, exactly (no clamp: a clamp would hide a wrong s and break X.W = (X/s).(sW)).

    dilation_scales picks s so that W.s stays inside every out-channel's range in float32 as well.
    """
    return scale_weight(weight, s)


def scale_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W.s per input channel (dimension 1)."""
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight * s.view(shape).to(weight)
