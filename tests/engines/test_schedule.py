"""Schedule mapping: identity on the calibrated schedule, nearest calibrated timestep otherwise."""
import pytest
import torch

from dilatequant.core.models import default_scheduler, DiffusionModel
from dilatequant.core.sampling import sampling_timesteps
from dilatequant.engines.schedule import ScheduleMapper, map_schedule, nearest_t_index

CAL = [750, 500, 250, 0]  # DDIM-4 on 1000 training steps


def _model():
    return DiffusionModel(None, default_scheduler(), None, "none")


def test_same_schedule_is_identity():
    assert map_schedule(CAL, CAL) == [0, 1, 2, 3]
    t50 = sampling_timesteps(_model(), 50)
    assert map_schedule(t50, t50) == list(range(50))


def test_other_step_counts_use_nearest_calibrated_timestep():
    t2 = sampling_timesteps(_model(), 2)   # [500, 0]
    t8 = sampling_timesteps(_model(), 8)   # [875, 750, 625, 500, 375, 250, 125, 0]
    assert t2 == [500, 0] and t8 == [875, 750, 625, 500, 375, 250, 125, 0]
    assert map_schedule(CAL, t2) == [1, 3]
    # 875 -> 750 (index 0); 625 is equidistant from 750 and 500: the larger (noisier) one wins
    assert map_schedule(CAL, t8) == [0, 0, 0, 1, 1, 2, 2, 3]
    t50 = sampling_timesteps(_model(), 50)
    m = map_schedule(sampling_timesteps(_model(), 25), t50)
    assert len(m) == 50 and m[0] == 0 and m[-1] == 24 and sorted(m) == m
    assert nearest_t_index(CAL, torch.tensor([999, 1, 260])).tolist() == [0, 3, 2]


def test_mapper_replaces_sampler_t_index():
    seen = {}

    def predict(x, t, ti, c=None):
        seen["t_index"] = ti.tolist()
        return x

    ScheduleMapper(predict, CAL)(torch.zeros(3, 1, 2, 2), torch.tensor([875, 600, 10]), torch.tensor([0, 1, 7]))
    assert seen["t_index"] == [0, 1, 3]


def test_float_calibrated_timesteps_reach_every_consumer():
    """Euler-type calibration records float timesteps: graph metadata, runner metadata, the diffusers drop-in UNet,
    the Triton spec and the nearest-timestep mapping all take them (the graph's timestep input stays int64)."""
    import json
    from types import SimpleNamespace

    from dilatequant.engines.base import metadata_from_props
    from dilatequant.engines.pytorch.diffusers_unet import QuantizedUNet
    from dilatequant.engines.triton.unet_spec import UnetSpec

    cal = [999, 946.4210205078125, 893.8421020507812, 52.578948974609375, 0]
    props = {"dilatequant.timesteps": json.dumps(cal), "dilatequant.conditional": "false",
             "dilatequant.sample_shape": "[1, 8, 8]"}
    meta = metadata_from_props(props, "g", "onnxruntime", "cpu", "g.onnx")
    assert list(meta.timesteps) == cal and isinstance(meta.timesteps[0], int) and meta.num_steps == 5
    assert UnetSpec([], [], props).timesteps == cal
    assert map_schedule(cal, cal) == list(range(5))
    assert nearest_t_index(cal, torch.tensor([920.2, 919.9, 53.4, 27.0, 26.0])).tolist() == [1, 2, 3, 3, 4]
    unet = QuantizedUNet(SimpleNamespace(metadata=meta), {})
    ts, ti = unet.t_index(torch.tensor(52.578948974609375), 2)
    assert ts.tolist() == [53, 53] and ts.dtype == torch.int64 and ti.tolist() == [3, 3]
    bad = dict(props, **{"dilatequant.timesteps": '["x"]'})
    with pytest.raises(Exception, match="malformed"):
        metadata_from_props(bad, "g", "onnxruntime", "cpu", "g.onnx")
