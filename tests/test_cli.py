"""The console entry points: bad input gives one clear line, exit code 2, no traceback."""
import pytest

from conftest import assert_clean_error, run_cli


def run(*args, timeout=300):
    return run_cli(*args, timeout=timeout)


def test_unknown_model(tmp_path):
    assert_clean_error(run("demo", "--models", "no-such-model", "--report", str(tmp_path / "r")), "no-such-model")


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run("demo", "--models", str(tmp_path / "empty"), "--report", str(tmp_path / "r")),
                       "not a diffusers model")


def test_unwritable_report_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_clean_error(run("demo", "--report", str(blocker / "report")), "cannot write")


def test_calibrate_bad_bits_and_export_bad_inputs(tmp_path):
    assert_clean_error(run("calibrate", "--bits", "W9A8"), "weight_bits")
    assert_clean_error(run("calibrate", "--bits", "8bit"), "W4A8")
    # a misspelt layer fails before minutes of calibration sampling, and nothing is written
    assert_clean_error(run("calibrate", "--float-layers", "conv_inn", "--out", str(tmp_path / "q.pt")),
                       "['conv_inn'] are not Conv2d/Linear layers")
    assert not (tmp_path / "q.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    assert_clean_error(run("export", "--ckpt", str(tmp_path / "junk.pt"), "--onnx", str(tmp_path / "x.onnx")),
                       "not a readable checkpoint")
    assert_clean_error(run("export", "--ckpt", str(tmp_path / "junk.pt"), "--onnx", str(tmp_path / "x.onnx"),
                           "--precision", "int2"), "unknown precision")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_demo_quick_run_writes_report(tmp_path):
    proc = run("demo", "--report", str(tmp_path / "r"), "--samples", "8", "--steps", "4", "--no-quant", timeout=600)
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for name in ("default", "default-cond", "sd-digits"):
        fp = report["models"][name]["fp"]
        # 8 samples: far below the digit-FID floor, so no FID is shown (its seed-to-seed spread would exceed it)
        assert fp["num_samples"] == 8 and fp["digit_fid"] is None and "needs >= 250" in fp["digit_fid_note"]
        assert 0 < fp["classifier_mean_confidence"] <= 1
        assert (tmp_path / "r" / fp["grid"]).stat().st_size > 100
    assert "class_accuracy" in report["models"]["default-cond"]["fp"]
    sd = report["models"]["sd-digits"]["fp"]  # prompted: the digit each caption asks for, at the folder's guidance
    assert sd["guidance_scale"] == 3.0 and len(sd["class_accuracy_per_class"]) == 10 and 0 <= sd["class_accuracy"] <= 1
    assert (tmp_path / "r" / "README.md").read_text().startswith("# DilateQuant demo report")
