"""dq-verify end to end on a tiny exported model: report fields and numeric bounds, and CLI bad input."""
import json
import math

import pytest

from dilatequant.engines.verify import VerifyConfig, run_verify

from conftest import assert_clean_error, run_cli, tiny_uncond
from tiny_runtime import STEPS, get


def run_verify_cli(*args, timeout=300):
    return run_cli("verify", *args, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return (tmp_path_factory.mktemp("verify"), *get("uncond"))


def test_report_fields_and_bounds(tiny):
    tmp, model, ck, onnx_path = tiny
    cfg = VerifyConfig(ckpt=ck, runtime=onnx_path, report_dir=tmp / "report", batches=(1, 2), num_samples=4,
                       traj_samples=2, mapped_steps=(2, 8), warmup=1, repeats=3)
    r = run_verify(cfg, fp_model=model)
    saved = json.loads((tmp / "report" / "report.json").read_text())
    assert saved["runtime"]["name"] == "onnxruntime-cpu" and saved["checkpoint"]["num_steps"] == STEPS
    assert {"torch", "onnxruntime", "cpu"} <= set(saved["environment"])
    acc = r["accuracy"]
    assert [row["t_index"] for row in acc["per_step"]] == list(range(STEPS))
    # most steps match fake-quant to float precision; a rounding tie moved by ORT's float kernels (GroupNorm, SiLU)
    # can flip a single step (see dq_export.parity), a wrong scale or table would flip them all
    per_step = sorted(r["runtime_vs_fake_quant_sqnr_db"] for r in acc["per_step"])
    assert per_step[len(per_step) // 2] >= 80, per_step
    # the runtime is as far from FP as the fake-quant model is (within 1 dB)
    sq = acc["noise_sqnr_db"]
    assert abs(sq["runtime_vs_fp_sqnr_db"]["mean"] - sq["fake_quant_vs_fp_sqnr_db"]["mean"]) < 1
    assert acc["images"]["runtime_vs_fake_quant"]["image_psnr_db"] >= 40
    assert acc["images"]["runtime_vs_fake_quant"]["image_ssim"] is None  # 8x8 is below SSIM's 11x11 window
    assert "skipped" in acc["digits"]["runtime"]  # 8x8 images: no digit-FID
    rows = {row["steps"]: row for row in r["schedule_mapping"]}
    assert set(rows) == {2, STEPS, 8} and {row["sampler"] for row in rows.values()} == {"DDIM"}  # the model's own
    assert acc["calibrated_with"] == r["checkpoint"]["calibrated_with"] == "DDIM-4"
    assert r["checks"] == {"runtime_runs": "passed", "layer_parity": "passed", "failed": []}
    assert rows[STEPS]["mapping"] == "exact" and rows[STEPS]["t_index_per_step"] == [0, 1, 2, 3]
    assert rows[8]["t_index_per_step"] == [0, 0, 0, 1, 1, 2, 2, 3] and rows[8]["max_timestep_gap"] == 125
    assert rows[2]["t_index_per_step"] == [1, 3] and rows[2]["max_timestep_gap"] == 0
    lat = r["speed"]["unet_latency_ms"]
    assert set(lat) == {"onnxruntime-cpu", "torch-fp", "torch-fakequant"}
    for per_b in lat.values():
        assert set(per_b) == {"1", "2"}
        for row in per_b.values():
            assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] and row["repeats"] == 3
    for name, per_b in r["speed"]["speedup_of_runtime"].items():
        for b, v in per_b.items():
            assert math.isclose(v, lat[name][b]["median_ms"] / lat["onnxruntime-cpu"][b]["median_ms"], rel_tol=1e-2)
    assert set(r["speed"]["sampler"]["wall_s"]) == {"onnxruntime-cpu", "torch-fp", "torch-fakequant"}
    mem = r["memory"]
    assert mem["runtime_weight_bytes"] == onnx_path.stat().st_size and mem["peak_host_rss_mb"] > 50
    assert mem["fp_parameter_bytes"] == 4 * mem["fp_parameters"] and mem["gpu"] is None
    for fig in r["figures"].values():
        assert (tmp / "report" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (tmp / "report" / "README.md").read_text()
    assert readme.startswith("# dq-verify: onnxruntime-cpu vs PyTorch") and "![latency](latency.png)" in readme


def test_bad_config_is_rejected_before_work(tiny, tmp_path):
    from dilatequant.core.errors import UserError

    _, model, ck, onnx_path = tiny
    for bad, needle in ((dict(device="tpu"), "unknown device"), (dict(batches=(0, 4)), "positive batch"),
                        (dict(runtime=tmp_path / "none.onnx"), "does not exist; write one with dq-export"),
                        (dict(runtime=tmp_path / "x.bin"), "neither an ONNX graph")):
        (tmp_path / "x.bin").write_bytes(b"x")
        cfg = VerifyConfig(**(dict(ckpt=ck, runtime=onnx_path, report_dir=tmp_path / "r") | bad))
        with pytest.raises(UserError, match=needle):
            run_verify(cfg, fp_model=model)


def test_checkpoint_graph_mismatch_is_rejected(tiny, tmp_path):
    from dilatequant.core.errors import UserError

    _, model, _, onnx_path = tiny
    other = tiny_uncond()
    from dilatequant.calibrate.checkpoint import save_checkpoint
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.quant_unet import QuantUNet
    from dilatequant.core.sampling import sampling_timesteps

    q = QuantUNet(other.unet, QuantConfig(num_steps=5, weight_bits=8, act_bits=8, symmetric=True))
    ck5 = save_checkpoint(tmp_path / "q5.pt", q, other, sampling_timesteps(other, 5), "fp", {})
    with pytest.raises(UserError, match="pass the q.pt it was exported from"):
        run_verify(VerifyConfig(ckpt=ck5, runtime=onnx_path, report_dir=tmp_path / "r"), fp_model=model)


def test_cli_bad_inputs(tiny, tmp_path):
    _, _, ck, onnx_path = tiny
    assert_clean_error(run_verify_cli("--ckpt", str(tmp_path / "missing.pt"), "--onnx", str(onnx_path), "--report",
                               str(tmp_path / "r")), "does not exist")
    assert_clean_error(run_verify_cli("--ckpt", str(ck), "--onnx", str(onnx_path), "--report", str(tmp_path / "r"),
                               "--batch", "1,x"), "--batch takes comma-separated integers")
    (tmp_path / "e.plan").write_bytes(b"x")
    assert_clean_error(run_verify_cli("--ckpt", str(ck), "--engine", str(tmp_path / "e.plan"), "--report",
                               str(tmp_path / "r")), "no sidecar")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(run_verify_cli("--ckpt", str(ck), "--onnx", str(onnx_path), "--report", str(blocker / "r")),
                       "cannot write")
    # the checkpoint names a model that cannot be loaded ("tiny-random"): one line naming --model
    assert_clean_error(run_verify_cli("--ckpt", str(ck), "--onnx", str(onnx_path), "--report", str(tmp_path / "r")),
                       "--model")


def test_digit_fid_only_from_250_samples_with_count_and_spread():
    """16 images: digit-FID moves by ~64 from one draw to the next (real digits 267 +- 64, measured), so dq-verify
    says it was not computed; from 250 on it comes with its sample count and the measured spread."""
    import torch

    from dilatequant.core.digits import load_digits
    from dilatequant.core.metrics import FID_MIN_SAMPLES, FID_SPREAD, digit_fid_spread
    from dilatequant.core.metrics import format_digit_fid
    from dilatequant.engines.verify import _digits

    d = load_digits()
    pick = torch.randperm(len(d.train_images), generator=torch.Generator().manual_seed(0))
    small = _digits(d.train_images[pick[:16]], d.train_labels[pick[:16]])
    assert small["digit_fid"] is None and small["num_samples"] == 16 and "digit_fid_spread" not in small
    assert format_digit_fid(small) == small["digit_fid_note"] == "not computed: needs >= 250 samples, got 16"
    assert 0.5 < small["classifier_mean_confidence"] <= 1 and small["class_accuracy"] > 0.8  # still reported
    assert FID_MIN_SAMPLES == 250
    big = _digits(d.train_images[pick[:250]], d.train_labels[pick[:250]])
    assert big["num_samples"] == 250 and big["digit_fid_spread"] == FID_SPREAD[250] > 0
    assert 10 < big["digit_fid"] < 40, big  # real digits at n=250: 22.5 +- 5.1 over 20 draws
    assert format_digit_fid(big) == f"{big['digit_fid']:.2f} ± {FID_SPREAD[250]:.1f} (n=250)"
    assert digit_fid_spread(400) == FID_SPREAD[250] and digit_fid_spread(100) is None


def test_fid_spread_table_is_the_committed_measurement():
    """FID_SPREAD is benchmarks/digit_fid_spread.py's std (the larger of real digits and FP samples) per count."""
    from pathlib import Path

    from dilatequant.core.metrics import FID_MIN_SAMPLES, FID_SPREAD

    path = Path(__file__).parents[2] / "benchmarks" / "results" / "digit_fid_spread" / "digit_fid_spread.json"
    m = json.loads(path.read_text())
    real, model = m["real_train_digits"], m.get("model", {}).get("spread", {})
    for n, std in FID_SPREAD.items():
        measured = max(real[str(n)]["std"], model.get(str(n), {}).get("std", 0.0))
        assert std == round(measured, 1), (n, std, measured)
    # below the threshold the spread is at least twice the threshold's (16: ~64, 100: ~12.5 vs 250: ~5)
    below = [int(n) for n in real if int(n) < FID_MIN_SAMPLES]
    assert all(real[str(n)]["std"] >= 2 * real[str(FID_MIN_SAMPLES)]["std"] for n in below)


def _verify_cli(capsys, *args) -> tuple[int, list[str]]:
    """dq-verify in process: (exit status, stderr lines without warnings)."""
    from dilatequant.cli import verify_main

    try:
        verify_main([str(a) for a in args])
        code = 0
    except SystemExit as err:
        code = err.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_dq_verify_is_a_gate(tiny, tmp_path, capsys, monkeypatch):
    """A graph with one per-timestep scale row x1.25 fails layer-wise parity: exit 1 and one line naming the check;
    the clean graph exits 0; --report-only exits 0 on the failed report; a graph the runtime cannot load fails
    even then."""
    import onnx

    from dilatequant.engines import verify
    from graph_faults import plant_fault

    _, model, ck, onnx_path = tiny
    folder = tmp_path / "fp"
    model.save(folder)
    bad = tmp_path / "bad.onnx"
    plant_fault(onnx_path, bad, "scale", "down_blocks.0.resnets.0.conv1", STEPS)
    light = ["--ckpt", ck, "--model", folder, "--samples", 2, "--traj-samples", 1, "--batch", 1, "--repeats", 1,
             "--warmup", 0, "--mapped-steps", STEPS]
    code, err = _verify_cli(capsys, *light, "--onnx", onnx_path, "--report", tmp_path / "clean")
    assert code == 0, err
    assert json.loads((tmp_path / "clean" / "report.json").read_text())["checks"]["layer_parity"] == "passed"
    reports = []
    real = verify.run_verify
    monkeypatch.setattr(verify, "run_verify", lambda cfg: reports.append(real(cfg)) or reports[-1])
    code, err = _verify_cli(capsys, *light, "--onnx", bad, "--report", tmp_path / "bad")
    failed = [line for line in err if "FAILED" in line]
    assert code == 1 and len(failed) == 1 and "Traceback" not in "\n".join(err), err
    assert failed[0].startswith("layer-wise parity FAILED (max level diff") and "report:" in failed[0]
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["checks"]["layer_parity"] == "FAILED" and not report["layer_parity"]["passed"]
    monkeypatch.setattr(verify, "run_verify", lambda cfg: reports[0])  # the same report, asked for as a report only
    code, err = _verify_cli(capsys, *light, "--onnx", bad, "--report", tmp_path / "bad", "--report-only")
    assert code == 0 and not [line for line in err if "FAILED" in line], err
    monkeypatch.undo()
    m = onnx.load(str(onnx_path))
    next(n for n in m.graph.node if n.op_type == "Conv").op_type = "NoSuchOp"
    onnx.save(m, str(tmp_path / "broken.onnx"))
    code, err = _verify_cli(capsys, *light, "--onnx", tmp_path / "broken.onnx", "--report", tmp_path / "x", "--report-only")
    assert code == 1 and len(err) == 1 and err[0].startswith("runtime check FAILED: onnxruntime-cpu cannot run"), err
