"""Every calibration stage is timed in the summary (q.pt and CLI); the validation set scales with the run and is
held out from the calibration trajectories (no extra sampling, no shared input)."""
import math

import torch

from dilatequant.calibrate import recipe
from dilatequant.calibrate.calibration_data import build_calibration_set, build_calibration_sets, validation_size
from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig

STAGES = {"load", "calibration_data", "scaling", "weight_scales", "observe_activations", "tpq_init", "validation",
          "bkd", "save"}


def test_validation_size_scales_with_the_run():
    assert validation_size(16, 4) == 32          # the floor
    assert validation_size(512, 4) == 128        # a quarter of the calibration set
    assert validation_size(512, 100) == 128 and validation_size(64, 100) == 100  # at least one per step


def test_validation_is_held_out_of_the_calibration_trajectories(cond_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    calib, val = build_calibration_sets(cond_model, 16, 4, 32, guidance_scale=1.5)
    alone = build_calibration_set(cond_model, 16, 4, guidance_scale=1.5, use_cache=False)
    assert torch.equal(calib.sample, alone.sample), "the calibration set does not depend on the validation draw"
    assert len(val) == 32 and torch.bincount(val.t_index, minlength=4).tolist() == [8, 8, 8, 8]
    rows = lambda d: {(int(t), tuple(x.flatten().tolist())) for t, x in zip(d.t_index, d.sample)}  # noqa: E731
    assert not rows(calib) & rows(val), "no validation latent is a calibration latent (not even its CFG twin)"
    inputs = {(x.flatten().tolist().__repr__(), c.flatten().tolist().__repr__())
              for x, c in zip(val.sample, val.encoder_hidden_states)}
    assert len(inputs) == 32, "32 distinct (latent, condition) inputs"
    again = build_calibration_sets(cond_model, 16, 4, 32, guidance_scale=1.5)  # from the on-disk cache
    assert torch.equal(again[1].sample, val.sample) and torch.equal(again[0].sample, calib.sample)


def test_summary_times_every_stage(cond_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(recipe, "load_model", lambda name, resolution=None: cond_model)
    job = recipe.CalibrationJob(model="tiny", config=QuantConfig(weight_bits=8, act_bits=8, num_steps=4),
                                distill=DistillConfig(iters=1, batch=4), calib_samples=16, out=tmp_path / "q.pt")
    s = recipe.run_calibration(job)
    assert set(s["stages"]) == STAGES
    assert all(isinstance(v, float) and v > 0 for v in s["stages"].values()), s["stages"]
    assert sum(s["stages"].values()) <= s["wall_s"] + 0.1
    assert s["val_samples"] == 32
    stored = load_checkpoint(tmp_path / "q.pt").summary["stages"]
    assert set(stored) == STAGES - {"save"} and all(v > 0 for v in stored.values())
    assert math.isfinite(s["val_after_training"]["noise_sqnr_db"])
