"""Weight Dilation (WD) and the SmoothQuant-style scaling it is compared with.

Both pick a positive factor s per input channel, so X.W = (X / s).(s.W). WD picks the largest s that
keeps every out-channel's weight min and max where they were, so per-out-channel weight scales are
unchanged; SmoothQuant balances activation and weight ranges and widens the weight range.
"""
from __future__ import annotations

import torch

SCALING_METHODS = ("none", "smoothquant", "dilation")


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
    return s.clamp(1.0, cap).float()


def smoothquant_scales(weights: list[torch.Tensor], act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_k = max|X_k|^alpha / max|W_:,k|^(1 - alpha) (SmoothQuant, Xiao et al. 2023)."""
    w_absmax = _as_rows(weights).abs().amax(dim=(0, 2)).clamp_min(1e-5)
    s = act_absmax.double().clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)
    return s.clamp(1e-4, 1e4).float()


def dilate(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W.s per input channel; clamped to the original row range so float rounding cannot widen it."""
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    out = weight * s.view(shape).to(weight)
    rows = weight.reshape(weight.shape[0], -1)
    bound = (-1,) + (1,) * (weight.dim() - 1)
    return torch.minimum(torch.maximum(out, rows.amin(1).view(bound)), rows.amax(1).view(bound))


def scale_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight * s.view(shape).to(weight)
