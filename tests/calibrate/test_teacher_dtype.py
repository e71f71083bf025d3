"""--teacher-dtype bf16: BKD's teacher held in bfloat16 and the UNet quantized in place (one float32 copy, which
is what lets an SDXL-sized UNet calibrate in 24 GB); the calibration data and the PTQ model are unchanged."""
import math

import pytest
import torch

from dilatequant.calibrate import recipe
from dilatequant.calibrate.distill import distill
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.core.errors import UserError

from conftest import tiny_cond


def _run(tmp_path, monkeypatch, teacher_dtype: str, seen: dict) -> dict:
    model = tiny_cond()  # a fresh model: bf16 mode wraps its UNet in place
    seen["fp32_weights"] = {p.data_ptr() for p in model.unet.parameters()}
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(recipe, "load_model", lambda name, resolution=None: model)
    def spy(qunet, fp_unet, *args, **kwargs):
        seen["teacher_dtypes"] = {p.dtype for p in fp_unet.parameters()}
        seen["quant_weights"] = {layer.weight.data_ptr() for layer in qunet.layers().values()}
        return distill(qunet, fp_unet, *args, **kwargs)

    monkeypatch.setattr(recipe, "distill", spy)
    job = recipe.CalibrationJob(model="tiny", config=QuantConfig(weight_bits=8, act_bits=8, num_steps=4),
                                distill=DistillConfig(iters=8, batch=4), calib_samples=16,
                                out=tmp_path / f"q-{teacher_dtype}.pt", teacher_dtype=teacher_dtype)
    return recipe.run_calibration(job)


def test_bf16_teacher_quantizes_in_place_and_keeps_the_ptq_model(tmp_path, monkeypatch):
    fp32, bf16 = {}, {}
    a = _run(tmp_path, monkeypatch, "fp32", fp32)
    b = _run(tmp_path, monkeypatch, "bf16", bf16)
    assert fp32["teacher_dtypes"] == {torch.float32} and bf16["teacher_dtypes"] == {torch.bfloat16}
    assert not fp32["quant_weights"] & fp32["fp32_weights"], "fp32 teacher: the quantized model is a copy"
    assert bf16["quant_weights"] <= bf16["fp32_weights"], "bf16 teacher: the loaded float32 weights, not a copy"
    # the same calibration data and PTQ model: identical validation error before BKD
    assert a["val_before_training"] == b["val_before_training"]
    assert "teacher" in b["stages"] and b["teacher_dtype"] == "bf16"
    after = b["val_after_training"]["noise_sqnr_db"]
    assert math.isfinite(after) and abs(after - a["val_after_training"]["noise_sqnr_db"]) < 3.0


def test_quant_unet_wraps_in_place_only_when_asked():
    model = tiny_cond()
    cfg = QuantConfig(weight_bits=8, act_bits=8, num_steps=4)
    original = {p.data_ptr() for p in model.unet.parameters()}
    copied = QuantUNet(model.unet, cfg)
    assert not {p.data_ptr() for p in copied.parameters()} & original
    wrapped = QuantUNet(model.unet, cfg, copy_weights=False)
    assert wrapped.unet is model.unet
    assert {layer.weight.data_ptr() for layer in wrapped.layers().values()} <= original


def test_unknown_teacher_dtype_is_refused(tmp_path):
    job = recipe.CalibrationJob(model="default-cond", out=tmp_path / "q.pt", teacher_dtype="fp8")
    with pytest.raises(UserError, match="unknown teacher dtype 'fp8'"):
        recipe.run_calibration(job)
