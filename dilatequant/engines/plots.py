"""dq-verify's figures (matplotlib, Agg backend): error vs t_index, latency bars, sample grids side by side."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..core.reporting import atomic_write_bytes, image_grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def sqnr_plot(path: Path, per_step: list[dict], series: dict[str, str], title: str, cap_db: float = 120.0) -> Path:
    """Per-step SQNR curves; identical outputs (inf dB) are drawn at cap_db and said so in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = [r["t_index"] for r in per_step]
    capped_any = False
    styles = [dict(marker="o", ls="-"), dict(marker="x", ls="--", ms=7), dict(marker="s", ls=":", ms=4)]
    for k, (key, label) in enumerate(series.items()):
        y = [r[key] for r in per_step]
        capped = [not math.isfinite(v) for v in y]
        capped_any |= any(capped)
        style = {"ms": 4, **styles[k % len(styles)]}
        ax.plot(x, [cap_db if c else v for v, c in zip(y, capped)], label=label, lw=1.6, **style)
    ax.set_xlabel("t_index (timestep)")
    ticks = x if len(x) <= 12 else x[:: max(1, len(x) // 10)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{i}\n({per_step[i]['timestep']})" for i in ticks], fontsize=8)
    ax.set_ylabel("noise-prediction SQNR (dB, higher is better)")
    ax.set_title(title + (f"  [identical outputs drawn at {cap_db:.0f} dB]" if capped_any else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def latency_plot(path: Path, latency: dict[str, dict[str, dict]], title: str) -> Path:
    """Grouped bars: median UNet latency per batch size and runner, p90 as the error bar's top."""
    plt = _pyplot()
    runners = list(latency)
    batches = sorted({int(b) for r in latency.values() for b in r})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(batches) * max(1, len(runners)) / 2), 4))
    width = 0.8 / max(1, len(runners))
    for k, name in enumerate(runners):
        xs, med, err, mins = [], [], [], []
        for j, b in enumerate(batches):
            row = latency[name].get(str(b))
            if not isinstance(row, dict):
                continue
            xs.append(j + (k - (len(runners) - 1) / 2) * width)
            med.append(row["median_ms"])
            err.append(row["p90_ms"] - row["median_ms"])
            mins.append(row["min_ms"])
        bars = ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=3, label=name)
        ax.scatter(xs, mins, marker="_", s=120, color="black", zorder=3, label="min" if k == 0 else None)
        for bar, v in zip(bars, med):
            ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("UNet latency ms: median (bar), p90 (whisker), min (dash)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sample_grid_plot(path: Path, columns: dict[str, torch.Tensor], title: str, nrow: int = 4) -> Path:
    """One panel per runtime (same seeds, same positions), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.9))
    for ax, (label, images) in zip(axes if len(columns) > 1 else [axes], columns.items()):
        grid = image_grid(images, nrow=nrow)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def schedule_plot(path: Path, rows: list[dict], title: str) -> Path:
    """Image PSNR vs FP (same sampler and step count) against the number of inference steps, one line per sampler."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = sorted({r["steps"] for r in rows})
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        ax.plot([r["steps"] for r in mine], [r["runtime_vs_fp"]["image_psnr_db"] for r in mine], marker="o",
                label=f"{sampler}: runtime vs FP (same steps)")
    for r in rows:
        ax.annotate("calibrated schedule" if r["mapping"] == "exact" else
                    f"nearest t_index ({r['distinct_t_index_used']} used)",
                    (r["steps"], r["runtime_vs_fp"]["image_psnr_db"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("steps at inference")
    ax.set_ylabel("image PSNR vs FP (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
