import pytest
import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.checkpoint import load_checkpoint, save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import sampling_timesteps


@pytest.fixture(params=[False, True], ids=["asym-float-input", "sym-attn"])
def saved(request, cond_model, tmp_path):
    data = build_calibration_set(cond_model, 16, 4, use_cache=False)
    cfg = QuantConfig(num_steps=4, symmetric=request.param, attn_matmul=request.param,
                      float_layers=() if request.param else ("conv_in",))
    q, _ = prepare(cond_model.unet, cfg, data)
    path = save_checkpoint(tmp_path / "q.pt", q, cond_model, sampling_timesteps(cond_model, 4), "fp-hash", {"k": 1})
    return q, data, path


def test_round_trip_is_bit_identical(saved):
    q, data, path = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dilatequant.q.pt" and raw["schedule"]["timesteps"] == [750, 500, 250, 0]
    ck = load_checkpoint(path)
    c = data.inputs(slice(None))
    with torch.no_grad():
        a = q(c["sample"], c["timestep"], c["t_index"], c["encoder_hidden_states"])
        b = ck.qunet(c["sample"], c["timestep"], c["t_index"], c["encoder_hidden_states"])
    assert torch.equal(a, b)
    assert ck.qunet.config == q.config and ck.timesteps == [750, 500, 250, 0]
    assert ck.summary == {"k": 1} and ck.source_fingerprint == "fp-hash"
    assert ck.model.class_encoder is not None


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    _, _, path = saved
    bad = tmp_path / "cut.pt"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_foreign_checkpoints_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(UserError, match="not a DilateQuant checkpoint"):
        load_checkpoint(tmp_path / "sd.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_records_the_sampler_with_float_timesteps_and_loads_version_1(uncond_model, tmp_path):
    """q.pt v2 records the calibration sampler (class, whole config, steps); Euler with linspace spacing gives float
    timesteps, kept as floats. A version 1 file (no sampler record) was calibrated with DDIM.from_config."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from dilatequant.core.sampling import SamplingSchedule
    from dilatequant.core.schedulers import same_scheduler

    euler = EulerDiscreteScheduler(timestep_spacing="linspace")
    schedule = SamplingSchedule(euler, 6, sampling_timesteps(uncond_model, 6, euler), "euler")
    data = build_calibration_set(uncond_model, 12, 6, use_cache=False, schedule=schedule)
    assert sorted(set(data.t_index.tolist())) == list(range(6)) and data.timestep.dtype == torch.int64
    q, _ = prepare(uncond_model.unet, QuantConfig(num_steps=6), data)
    path = save_checkpoint(tmp_path / "q.pt", q, uncond_model, schedule.timesteps, "fp", {}, schedule, seed=3)
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 2 and raw["schedule"]["sampler"] == "EulerDiscreteScheduler"
    assert raw["schedule"]["inference_steps"] == 6 and raw["schedule"]["seed"] == 3
    ck = load_checkpoint(path)
    assert ck.timesteps == schedule.timesteps and isinstance(ck.timesteps[1], float) and ck.timesteps[0] == 999
    assert same_scheduler(ck.schedule.scheduler, euler) and ck.schedule.steps == 6 and ck.schedule.name == "euler"
    for key in ("sampler_config", "sampler_name", "inference_steps", "timestep_kwargs", "seed", "step_noise"):
        raw["schedule"].pop(key)
    raw["version"], raw["schedule"]["sampler"] = 1, "DDIM"
    torch.save(raw, tmp_path / "v1.pt")
    v1 = load_checkpoint(tmp_path / "v1.pt")
    assert same_scheduler(v1.schedule.scheduler, DDIMScheduler.from_config(uncond_model.scheduler.config))
    assert v1.schedule.steps == 6 and v1.timesteps == ck.timesteps
