"""dq-calibrate under torchrun: 2 gloo processes on CPU against one process, on the embedded tiny models.

Every process runs one thread (torchrun's default; the one-process references here too): CPU kernels round
differently at other thread counts and batch sizes, so "equal" means equal at the same threads and the same
--sample-batch.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_worker
from dilatequant.calibrate.calibration_data import build_calibration_sets
from dilatequant.calibrate.distill import adam_radius, bkd_divergence_bound
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.distributed import SINGLE, shard
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.recipe import apply_scaling, init_act_tables, init_weight_scales, observe_activations
from dilatequant.core.models import load_model

WORKER = Path(dist_worker.__file__)
# the BKD runs: `default`, 4 steps, 16 samples (8 trajectories: 4 per rank), 3 iterations per block, batch 8
RUN = ["--model", "default", "--steps", "4", "--calib-samples", "16", "--iters", "3", "--batch", "8",
       "--sample-batch", "4"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DQ_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    return env


def torchrun(tmp_path: Path, *args: str, nproc: int = 2, timeout: float = 120, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(tmp_path))


def calibrate(tmp_path: Path, *args: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "dilatequant.cli", "calibrate", *args], capture_output=True,
                           text=True, timeout=timeout, env=_env(tmp_path))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shard_covers_every_index_once():
    for n in (1, 5, 16, 17):
        for world in range(1, min(n, 5) + 1):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_merged_calibration_set_and_tpq_tables_equal_one_process(tmp_path, one_thread):
    """default-cond (guided: conditions travel too), 24 samples from 12 trajectories in 4 sampling batches
    (2 per rank), TPQ observed in 5 chunks (3 + 2) with attention-matmul quantizers: bit-identical."""
    out = tmp_path / "two.pt"
    proc = torchrun(tmp_path, str(WORKER), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    one = dist_worker.tables(SINGLE, str(tmp_path / "one.pt"))
    for part in ("data", "val", "state"):
        assert two[part].keys() == one[part].keys()
        differ = [k for k in one[part] if not torch.equal(one[part][k], two[part][k])]
        assert not differ, f"{part}: {differ[:5]}"


def test_bkd_two_processes_within_the_derived_bound(tmp_path, one_thread):
    """Same settings, same global batch of 8: the 2-process q.pt is the 1-process one within
    bkd_divergence_bound, the untrained tensors exactly; every block starts from the same loss."""
    two = torchrun(tmp_path, "-m", "dilatequant.cli", "calibrate", *RUN, "--out", str(tmp_path / "two" / "q.pt"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = calibrate(tmp_path, *RUN, "--out", str(tmp_path / "one" / "q.pt"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "q.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "q.pt", weights_only=True)
    import json

    sa, sb = json.loads(a["summary"]), json.loads(b["summary"])
    assert sb["world_size"] == 2 and sa["world_size"] == 1
    assert sa["val_before_training"] == sb["val_before_training"], "same calibration set, same TPQ init"
    blocks = list(sa["distill"]["block_losses"])
    # block 1 starts from the same model on the same rows: its first loss differs only in float summation order
    # (a rank drawing its own batch, or half a batch, would be off by the sampling spread: ~10% here)
    assert sb["distill"]["block_losses"][blocks[0]][0] == pytest.approx(sa["distill"]["block_losses"][blocks[0]][0],
                                                                         rel=1e-5)
    for block in blocks[1:]:  # later blocks see inputs from blocks trained within the bound below
        assert sb["distill"]["block_losses"][block][0] == pytest.approx(sa["distill"]["block_losses"][block][0],
                                                                         rel=0.05), block

    model = load_model("default")  # the initial model both runs trained from (one process, same threads)
    data, _ = build_calibration_sets(model, 16, 4, 0, seed=0, use_cache=False, sample_batch=4)
    qunet = QuantUNet(model.unet, QuantConfig(weight_bits=4, act_bits=8, num_steps=4))
    apply_scaling(qunet, data)
    init_weight_scales(qunet)
    observe_activations(qunet, data)
    init_act_tables(qunet)
    bound = bkd_divergence_bound(qunet, DistillConfig(iters=3, batch=8))
    assert 2.9 < adam_radius(3) < 3.1  # about 1 per step early on
    worst = 0.0
    for k, va in a["state_dict"].items():
        diff = (va.double() - b["state_dict"][k].double()).abs().max().item() if va.numel() else 0.0
        assert diff <= bound[k], (k, diff, bound[k])
        if bound[k]:
            worst = max(worst, diff / bound[k])
    assert worst < 1.0


def _rank_pid(parent: int, rank: int) -> int | None:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def test_killed_rank_ends_the_run_and_resume_completes(tmp_path):
    """Rank 1 is SIGKILLed mid-BKD: the run ends naming rank 1, no q.pt, the progress file keeps the finished
    blocks; one process resumes it (another world size) and finishes without retraining them."""
    out = tmp_path / "q.pt"
    progress = Path(f"{out}.progress")
    proc = torchrun(tmp_path, "-m", "dilatequant.cli", "calibrate", *RUN, "--iters", "6", "--out", str(out),
                    popen=True)
    try:
        deadline = time.monotonic() + 90
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None and progress.exists(), "no BKD block finished"
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ours = error_lines(stderr)  # rank 0's line (torchrun's own report below it names rank 1 too)
    assert len(ours) == 1 and ours[0].startswith("error: rank 0 of 2: rank 1 stopped") and "--resume" in ours[0], \
        stderr[-3000:]
    assert "_StoppedByLauncher" not in stderr
    assert not out.exists()
    completed = torch.load(progress, weights_only=True)["completed"]
    assert 0 < len(completed) < 21
    resumed = calibrate(tmp_path, *RUN, "--iters", "6", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(completed)} of 21 blocks already distilled" in resumed.stdout
    assert out.is_file() and not progress.exists()


def test_one_process_run_resumes_under_two_ranks(tmp_path):
    """A one-process run killed mid-BKD resumes under torchrun with 2 ranks (the other direction of the test
    above) and finishes without retraining the blocks it had done."""
    out = tmp_path / "q.pt"
    progress = Path(f"{out}.progress")
    proc = subprocess.Popen([sys.executable, "-m", "dilatequant.cli", "calibrate", *RUN, "--iters", "6", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        deadline = time.monotonic() + 90
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.exists() and proc.poll() is None, "no BKD block finished while the run was alive"
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    completed = torch.load(progress, weights_only=True)["completed"]
    assert 0 < len(completed) < 21
    resumed = torchrun(tmp_path, "-m", "dilatequant.cli", "calibrate", *RUN, "--iters", "6", "--out", str(out),
                       "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(completed)} of 21 blocks already distilled" in resumed.stdout
    assert out.is_file() and not progress.exists()


def test_world_size_larger_than_the_calibration_set(tmp_path):
    proc = torchrun(tmp_path, "-m", "dilatequant.cli", "calibrate", "--calib-samples", "1", "--out",
                    str(tmp_path / "q.pt"))
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: world size 2 is larger than the calibration set (1 samples): use "
                                        "fewer processes or more --calib-samples"], proc.stderr[-3000:]
    assert not list(tmp_path.glob("q.pt*"))


def test_unwritable_output_on_rank_0(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = torchrun(tmp_path, "-m", "dilatequant.cli", "calibrate", *RUN, "--out", str(blocker / "q.pt"))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "cannot write to" in lines[0], proc.stderr[-3000:]
    assert blocker.read_text() == "not a folder"


def test_mismatched_settings_between_ranks(tmp_path):
    """Two ranks launched by hand (as two nodes' command lines would be) with different --iters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, iters in ((0, "3"), (1, "4")):
        env = dict(_env(tmp_path), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dilatequant.cli", "calibrate", *RUN, "--iters", iters,
                                       "--out", str(tmp_path / "q.pt")], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert error_lines(results[0][1]) == ["error: ranks 1 were started with other settings than rank 0; launch "
                                          "every rank with the same command line"]
    assert results[1][1].strip() == "" or not error_lines(results[1][1])
    assert not list(tmp_path.glob("q.pt*"))


def test_bf16_autocast_bkd_trains_on_cpu(cond_model):
    """--autocast bf16 (meant for GPUs; CPU autocast runs the same code, slowly): BKD captures bf16 targets
    (a smaller cache than float32) and trains float32 parameters to finite losses."""
    from dilatequant.calibrate.distill import distill
    from dilatequant.calibrate.recipe import noise_error, prepare

    data, _ = build_calibration_sets(cond_model, 32, 4, 0, use_cache=False)
    q, _ = prepare(cond_model.unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=4), data)
    import math

    cfg = DistillConfig(iters=2, batch=8, lr_weight=1e-3, lr_act=1e-3)
    fp32 = distill(prepare(cond_model.unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=4), data)[0],
                   cond_model.unet, data, cfg)
    report = distill(q, cond_model.unet, data, cfg, amp="bf16")
    assert report["largest_block_cache_mb"] < fp32["largest_block_cache_mb"]  # bf16 conv/matmul outputs
    assert all(math.isfinite(v) for first_last in report["block_losses"].values() for v in first_last)
    assert all(p.dtype == torch.float32 for p in q.parameters())
    assert math.isfinite(noise_error(q, cond_model.unet, data)["noise_mse"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    proc = calibrate(tmp_path, "--device", "cuda", "--out", str(tmp_path / "q.pt"))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: --device cuda needs a CUDA build of PyTorch and a visible GPU "
                                        "(torch.cuda.is_available() is False); install your CUDA build of torch "
                                        "or use --device cpu"]
    assert not list(tmp_path.glob("q.pt*"))
