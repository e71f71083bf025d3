"""Peak RSS of block-wise distillation at two calibration-set sizes (4x apart), on a UNet wide enough that the
block caches dominate: results/bkd_memory.json.

Each measurement is its own process: build the calibration set and the PTQ model, reset the peak-RSS mark
(/proc/self/clear_refs 5), run distill(), read VmHWM. `--tree DIR` runs another checkout's code (e.g. a
`git worktree` of the commit before streaming) for the before/after comparison.

    nice -n 10 python benchmarks/bkd_memory.py --sizes 64 256 [--tree /tmp/wt-old --label in-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bkd_memory.json"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    """A random unconditional UNet, 4x32x32 latents, channels (64, 128, 128): block inputs of up to
    256 KiB a sample, so a few hundred samples' caches outweigh the model (~10 MB)."""
    channels: tuple[int, ...] = (64, 128, 128)
    size: int = 32
    steps: int = 4
    iters: int = 2
    batch: int = 8
    threads: int = 1
    # glibc returns large blocks to the OS at once, so RSS tracks live memory rather than the allocator's
    # retained heap (without it the same run's peak wanders by ~150 MB from arena fragmentation)
    malloc_env: tuple[tuple[str, str], ...] = (("MALLOC_MMAP_THRESHOLD_", "131072"), ("MALLOC_TRIM_THRESHOLD_", "131072"))


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def child(n: int, setup: Setup) -> dict:
    import torch
    from diffusers import UNet2DModel

    from dilatequant.calibrate.calibration_data import build_calibration_set
    from dilatequant.calibrate.distill import distill
    from dilatequant.calibrate.distill_config import DistillConfig
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import prepare
    from dilatequant.core.models import DiffusionModel, default_scheduler

    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    k = len(setup.channels)
    unet = UNet2DModel(sample_size=setup.size, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=setup.channels, norm_num_groups=32,
                       down_block_types=("DownBlock2D",) * k, up_block_types=("UpBlock2D",) * k).eval()
    model = DiffusionModel(unet, default_scheduler(), None, source="bkd-memory-random")
    data = build_calibration_set(model, n, setup.steps, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=setup.steps), data)
    before_mb = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS, so the peak below is distill's own
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "results") as tmp:
        kwargs = {"cache_dir": Path(tmp)} if "cache_dir" in distill.__code__.co_varnames else {}
        report = distill(q, model.unet, data, DistillConfig(iters=setup.iters, batch=setup.batch), **kwargs)
    return {"calib_samples": n, "rss_before_distill_mb": round(before_mb, 1),
            "distill_peak_rss_mb": round(_vm("VmHWM"), 1),
            "distill_growth_mb": round(_vm("VmHWM") - before_mb, 1),
            "distill_wall_s": round(time.perf_counter() - start, 1),
            "largest_block_cache_mb": report.get("largest_block_cache_mb"),
            "unet_params": sum(p.numel() for p in unet.parameters())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 256])
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout whose dilatequant is measured")
    p.add_argument("--label", default="streamed", help="key of this run in the JSON")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    setup = Setup()
    if a.child:
        print(json.dumps(child(a.child, setup)))
        return
    env = dict(os.environ, PYTHONPATH=str(a.tree.resolve()), **dict(setup.malloc_env))
    runs = []
    for n in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], env=env, capture_output=True, text=True,
                             cwd=a.tree)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(a.label, runs[-1], flush=True)
    sys.path.insert(0, str(ROOT))
    from dilatequant.core.reporting import atomic_write_bytes, environment

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[a.label] = {"setup": asdict(setup), "tree": str(a.tree), "runs": runs,
                        "growth_ratio": round(runs[1]["distill_growth_mb"] / max(runs[0]["distill_growth_mb"], 1e-9), 2),
                        "environment": environment()}
    atomic_write_bytes(RESULTS, (json.dumps(results, indent=2) + "\n").encode())
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
