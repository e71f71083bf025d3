"""The whole chain as a user types it: dq-calibrate -> dq-export -> dq-verify -> dq-triton --kind cpu (and
dq-build-engine, which on a machine without TensorRT must stop in one line), each command reading what the
previous one wrote. Asserts the numbers in the written reports, and that each report describes the files the
next command was given (same checkpoint hash, same timesteps, same graph bytes)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_cond

from dilatequant.core.reporting import read_json

STEPS = 4


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    """One console command, in this process (the interpreter start of five subprocesses would double the test's
    time): the same entry function the dq-* script calls, with the user's argv; (exit code, stdout, stderr)."""
    from dilatequant import cli

    mains = {"calibrate": cli.calibrate_main, "export": cli.export_main, "build-engine": cli.build_engine_main,
             "verify": cli.verify_main, "triton": cli.triton_main}
    capsys.readouterr()
    try:
        mains[str(args[0])]([str(a) for a in args[1:]])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny class-conditional model saved as a user would hand it to dq-calibrate --model FOLDER."""
    folder = tmp_path_factory.mktemp("chain") / "tiny-cond"
    torch.manual_seed(0)
    m = tiny_cond()
    m.unet.save_pretrained(folder / "unet")
    m.class_encoder.save_pretrained(folder / "class_encoder")
    m.scheduler.save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.slow  # 205 s with the 2 cores shared 5 ways (load 10); calibrate 58 s, export 83 s, verify 60 s
def test_calibrate_export_verify_triton(model_folder, tmp_path, capsys):
    from dilatequant.calibrate.checkpoint import checkpoint_hash, load_checkpoint

    # -- dq-calibrate ----------------------------------------------------------------------------
    q = tmp_path / "q.pt"
    out = _ok(_cli(capsys, "calibrate", "--model", model_folder, "--bits", "W8A8", "--sym", "--steps", STEPS,
                   "--calib-samples", 16, "--iters", 2, "--batch", 8, "--out", q))
    ck = load_checkpoint(q)
    s = ck.summary
    assert s["bits"] == "W8A8" and s["quant_config"]["symmetric"] is True and s["distill"]["mode"] != "none (PTQ)"
    assert len(ck.timesteps) == STEPS and ck.timesteps == sorted(ck.timesteps, reverse=True)
    before, after = s["val_before_training"]["noise_sqnr_db"], s["val_after_training"]["noise_sqnr_db"]
    # W8A8 on a random tiny UNet: a real quantization error, neither exact nor noise
    assert 15 < before < 80 and 15 < after < 80, (before, after)
    assert f"{before:.2f} dB before training -> {after:.2f} dB after" in out  # what it printed is what it stored

    # -- dq-export (layer-wise parity, TensorRT rules, ORT parity) -----------------------------------
    graph = tmp_path / "unet.onnx"
    out = _ok(_cli(capsys, "export", "--ckpt", q, "--onnx", graph))
    ex = read_json(Path(f"{graph}.export.json"))
    assert ex["trt_rules"] == "passed" and f"TensorRT rules: {ex['trt_rules']}" in out
    lp = ex["layer_parity"]
    assert lp["passed"] and lp["max_level_diff"] <= 1 and lp["t_index_values"] == STEPS and lp["layers"] > 10
    assert lp["differing_levels"] <= lp["levels_compared"] * 1e-4, lp
    assert lp["min_layer_sqnr_db"] >= 60, lp
    par = ex["parity"]
    assert len(par["per_t_index"]) == STEPS
    assert par["min_median_sample_sqnr_db"] >= 80 and par["samples_below"] <= par["samples"] // 5, par
    import onnx

    props = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    assert json.loads(props["dilatequant.timesteps"]) == ck.timesteps

    # -- dq-build-engine: TensorRT-RTX builds here without a GPU; with no builder at all, one line ---------
    import importlib.util

    have_rtx = importlib.util.find_spec("tensorrt_rtx") is not None
    code, _, err = _cli(capsys, "build-engine", "--onnx", graph, "--engine", tmp_path / "unet.plan")
    assert "Traceback" not in err, err
    if have_rtx and importlib.util.find_spec("tensorrt") is None:
        assert code == 0, err
        side = read_json(Path(f"{tmp_path / 'unet.plan'}.json"))
        assert side["backend"] == "tensorrt-rtx" and side["built_without_gpu"] is True, side
        assert (tmp_path / "unet.plan").stat().st_size > 100_000
    elif not have_rtx:
        assert code == 2, err
        assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.strip()]  # one line
        assert err.startswith("error: no engine builder is usable here"), err
        assert not (tmp_path / "unet.plan").exists()

    # -- dq-verify on ONNX Runtime -----------------------------------------------------------------
    rep = tmp_path / "verify"
    out = _ok(_cli(capsys, "verify", "--ckpt", q, "--onnx", graph, "--report", rep, "--batch", "1,2", "--samples", 2,
                   "--traj-samples", 1, "--repeats", 1, "--warmup", 0, "--mapped-steps", "2", "--layer-per-step", 1))
    r = read_json(rep / "report.json")
    assert r["checkpoint"]["sha256"] == checkpoint_hash(q) and r["checkpoint"]["timesteps"] == ck.timesteps
    assert Path(r["runtime"]["path"]) == graph and r["runtime"]["name"] == "onnxruntime-cpu"
    acc = r["accuracy"]
    assert [row["t_index"] for row in acc["per_step"]] == list(range(STEPS))
    per_step = sorted(row["runtime_vs_fake_quant_sqnr_db"] for row in acc["per_step"])
    assert per_step[len(per_step) // 2] >= 80, per_step  # the graph computes the fake-quant model
    agree = acc["fp_agreement"]
    assert agree["within"] and agree["max_sqnr_gap_db"] <= 0.1, agree
    fq_vs_fp = acc["noise_sqnr_db"]["fake_quant_vs_fp_sqnr_db"]["mean"]
    assert 15 < fq_vs_fp < 80 and math.isfinite(acc["noise_sqnr_db"]["runtime_vs_fp_sqnr_db"]["min"])
    assert acc["images"]["runtime_vs_fake_quant"]["image_psnr_db"] >= 40
    assert r["layer_parity"]["passed"] and r["layer_parity"]["max_level_diff"] <= 1
    assert {row["steps"] for row in r["schedule_mapping"]} == {2, STEPS}
    for per_b in r["speed"]["unet_latency_ms"].values():
        assert set(per_b) == {"1", "2"} and all(0 < v["median_ms"] < 10_000 for v in per_b.values())
    assert r["memory"]["runtime_weight_bytes"] == graph.stat().st_size
    readme = (rep / "README.md").read_text()
    mean = acc["noise_sqnr_db"]["runtime_vs_fake_quant_sqnr_db"]["mean"]
    assert f"| runtime vs PyTorch fake-quant | {mean:.2f} |" in readme  # the summary shows the JSON's number
    assert "**passed**" in readme

    # -- dq-triton --kind cpu --------------------------------------------------------------------------
    repo = tmp_path / "repo"
    out = _ok(_cli(capsys, "triton", "--onnx", graph, "--ckpt", q, "--repo", repo, "--kind", "cpu", "--max-batch", 4))
    assert f"{STEPS} calibrated timesteps, class-conditional" in out and "max batch 4" in out
    served = repo / "unet" / "1" / "model.onnx"
    assert _sha256(served) == _sha256(graph)  # Triton serves the graph dq-verify measured, byte for byte
    unet_cfg = (repo / "unet" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in unet_cfg and 'backend: "python"' in unet_cfg
    pipe = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'backend: "python"' in pipe
    tokens = repo / "pipeline" / "1" / "class_tokens.npy"
    import numpy as np

    np.testing.assert_array_equal(np.load(tokens), ck.model.class_encoder.table.weight.detach().numpy())  # + null row
    files = {p.name for p in (repo / "pipeline" / "1").iterdir()}
    timesteps = _pipeline_timesteps(repo, files)
    assert timesteps == ck.timesteps


@pytest.mark.slow  # end to end: calibrate, export (with both parity checks), an RTX build, verify
def test_fp8_calibrate_export_rtx_plan_verify(model_folder, tmp_path, capsys):
    """FP8 (E4M3) through the CLI: dq-calibrate --format fp8 -> dq-export (TensorRT rules; layer parity within the
    float32 summation bound at every t_index) -> a TensorRT-RTX plan for compute capability 8.9 on this GPU-less
    machine -> dq-verify on ONNX Runtime writes its report -> dq-triton --kind cpu serves the same graph."""
    from dilatequant.calibrate.checkpoint import load_checkpoint

    q = tmp_path / "q.pt"
    out = _ok(_cli(capsys, "calibrate", "--model", model_folder, "--format", "fp8", "--steps", STEPS,
                   "--calib-samples", 16, "--iters", 2, "--batch", 8, "--float-layers", "none", "--out", q))
    ck = load_checkpoint(q)
    assert ck.qunet.config.format == "fp8" and ck.summary["quant_config"]["format"] == "fp8"
    assert f"wrote {q}: FP8 W8A8 " in out
    after = ck.summary["val_after_training"]["noise_sqnr_db"]
    assert 10 < after < 80, after  # E4M3 on a random tiny UNet: a real quantization error

    graph = tmp_path / "unet.onnx"
    out = _ok(_cli(capsys, "export", "--ckpt", q, "--onnx", graph))
    ex = read_json(Path(f"{graph}.export.json"))
    assert ex["precision"] == "fp8" and ex["trt_rules"] == "passed" and ", fp8, fp32, " in out
    assert "FP8 sums at most" in out and "x their float32 bound: passed" in out
    lp = ex["layer_parity"]
    assert lp["passed"] and lp["t_index_values"] == STEPS and lp["layers"] == len(ck.qunet.layers())
    assert lp["max_level_diff"] == 0 and 0 < lp["max_error_over_bound"] <= 1, lp

    plan = tmp_path / "unet.plan"
    _ok(_cli(capsys, "build-engine", "--onnx", graph, "--engine", plan, "--backend", "tensorrt-rtx",
             "--compute-capability", "8.9"))
    side = read_json(Path(f"{plan}.json"))
    assert side["backend"] == "tensorrt-rtx" and side["targets"]["compute_capabilities"] == ["8.9"], side["targets"]
    assert side["targets"]["required"]["compute_capability"] == "8.9" and plan.stat().st_size == side["engine_bytes"]

    rep = tmp_path / "verify"
    _ok(_cli(capsys, "verify", "--ckpt", q, "--onnx", graph, "--report", rep, "--batch", "1,2", "--samples", 2,
             "--traj-samples", 1, "--repeats", 1, "--warmup", 0, "--layer-per-step", 1))
    r = read_json(rep / "report.json")
    assert Path(r["runtime"]["path"]) == graph and r["runtime"]["name"] == "onnxruntime-cpu"
    per_step = sorted(row["runtime_vs_fake_quant_sqnr_db"] for row in r["accuracy"]["per_step"])
    assert len(per_step) == STEPS and per_step[len(per_step) // 2] >= 60, per_step
    assert r["layer_parity"]["passed"] and r["layer_parity"]["max_level_diff"] == 0
    assert (rep / "README.md").is_file()

    repo = tmp_path / "repo"
    _ok(_cli(capsys, "triton", "--onnx", graph, "--ckpt", q, "--repo", repo, "--kind", "cpu", "--max-batch", 2))
    assert _sha256(repo / "unet" / "1" / "model.onnx") == _sha256(graph)


def _pipeline_timesteps(repo: Path, files: set[str]) -> list[int]:
    """The calibrated timesteps the served pipeline maps steps onto (its config parameter or a JSON beside it)."""
    text = (repo / "pipeline" / "config.pbtxt").read_text()
    import re

    m = re.search(r'key: "timesteps"\s*value\s*\{\s*string_value:\s*"([^"]*)"', text)
    if m:
        return json.loads(m.group(1).replace('\\"', '"'))
    for name in files:
        if name.endswith(".json"):
            data = json.loads((repo / "pipeline" / "1" / name).read_text())
            if isinstance(data, dict) and "timesteps" in data:
                return list(data["timesteps"])
    raise AssertionError(f"no calibrated timesteps in the pipeline model: {sorted(files)}")
