import subprocess
from pathlib import Path
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from dilatequant.core.models import ClassTokenEncoder, DiffusionModel, default_scheduler


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_uncond() -> DiffusionModel:
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    return DiffusionModel(unet, default_scheduler(), None, source="tiny-random")


def tiny_cond(channels: tuple[int, int] = (8, 16), in_channels: int = 1, groups: int = 4, heads: int = 2,
              dim: int = 16, source: str = "tiny-random") -> DiffusionModel:
    """A class-token conditional UNet with one cross-attention block each way, at the width asked for."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=groups, attention_head_dim=heads, cross_attention_dim=dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
    return DiffusionModel(unet, default_scheduler(), ClassTokenEncoder(num_tokens=2, dim=dim).eval(), source=source)


@pytest.fixture
def uncond_model() -> DiffusionModel:
    return tiny_uncond()


@pytest.fixture
def cond_model() -> DiffusionModel:
    return tiny_cond()


def run_cli(*args, timeout=300):
    """`python -m dilatequant.cli ARGS` in a subprocess: what a user sees, exit code and all."""
    return subprocess.run([sys.executable, "-m", "dilatequant.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def call_cli(main, *args) -> int:
    """An entry point in-process, its exit code; bad input must exit 2 (the caller checks the message via capsys)."""
    try:
        main([str(a) for a in args])
    except SystemExit as err:
        return err.code
    return 0


def assert_clean_error(proc, *needles):
    """Bad input: exit 2, exactly one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def assert_parity(par: dict) -> None:
    """ORT vs PyTorch fake-quant (dq_export.parity): the median sample of every t_index matches to float precision.

    Float ops outside the integer sums (GroupNorm, SiLU, softmax; ORT's own fusions) differ in the last bit between
    runtimes, which can move a rounding tie and flip a single sample; a wrong scale, zero point or table row
    flips every sample of its t_index.
    """
    assert par["min_median_sample_sqnr_db"] >= 80, par
    assert par["samples_below"] <= par["samples"] // 5, par


def tiny_checkpoint(tmp, model, steps: int = 4, **cfg):
    """A PTQ q.pt of a tiny model (no training: exports and runtimes only need a valid checkpoint)."""
    from dilatequant.calibrate.calibration_data import build_calibration_set
    from dilatequant.calibrate.checkpoint import save_checkpoint
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import prepare
    from dilatequant.core.sampling import sampling_timesteps

    torch.manual_seed(0)
    data = build_calibration_set(model, 16, steps, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(num_steps=steps, **cfg), data)
    return save_checkpoint(tmp / "q.pt", q, model, sampling_timesteps(model, steps), "fp", {})


def _one_share_of_the_cores() -> None:
    """Under pytest-xdist each worker takes its share of the cores: torch's default (every core per process)
    would have the workers' thread pools fight over the same cores."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_one_share_of_the_cores()


def rtx_build(path, cc: tuple[int, int], plan=None):
    """NVIDIA's own parse + CPU-only ahead-of-time build (TensorRT-RTX) for one compute capability, with no rules
    check in front: what the builder itself says of a graph (engines.tensorrt.rtx's child process)."""
    pytest.importorskip("tensorrt_rtx")
    import onnx

    from dilatequant.engines.tensorrt.profiles import profile_from_flags
    from dilatequant.engines.tensorrt.rtx import RtxJob, run_jobs

    profile = profile_from_flags(onnx.load(str(path), load_external_data=False), None, None, None)  # dq's default
    job = RtxJob(Path(path), Path(plan) if plan else None, profile.to_json(), compute_capabilities=(cc,))
    return run_jobs([job], timeout_s=300)[0]
