import pytest
import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.recipe import apply_scaling
from dilatequant.calibrate.weight_dilation import dilate, dilation_scales


def _times_s(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W.s per input channel, written out here so the test does not trust the module's own helper."""
    return w * s.reshape((1, -1) + (1,) * (w.dim() - 2))


def _assert_same_row_ranges(w: torch.Tensor, wd: torch.Tensor) -> None:
    rows, rows_d = w.reshape(w.shape[0], -1), wd.reshape(w.shape[0], -1)
    assert torch.equal(rows.amax(1), rows_d.amax(1))
    assert torch.equal(rows.amin(1), rows_d.amin(1))


@pytest.mark.parametrize("shape", [(16, 12), (8, 6, 3, 3), (64, 64), (32, 16, 3, 3)])
def test_dilation_keeps_every_out_channel_range(shape):
    # 25 random layers per shape: in float32, W.s with s = w_max / w rounds one ulp past the row's max
    # for about one in six of them; s must absorb that (not a clamp on the product).
    gen = torch.Generator().manual_seed(0)
    dilated = 0
    for _ in range(25):
        w = torch.randn(shape, generator=gen)
        s = dilation_scales([w], cap=16.0)
        wd = dilate(w, s)
        assert torch.equal(wd, _times_s(w, s)), "dilate must be exactly W.s (X.W = (X/s).(sW))"
        _assert_same_row_ranges(w, wd)
        assert (s >= 1).all() and (s <= 16).all() and torch.isfinite(s).all()
        dilated += int((s > 1).sum())
    assert dilated > 0, "random weights leave unsaturated channels to dilate"


def test_dilate_does_not_hide_a_wrong_scale():
    """A too-large s must show up as a widened range, not be clamped back into it."""
    w = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    s = dilation_scales([w], cap=16.0) * 1.5
    wd = dilate(w, s)
    assert torch.equal(wd, _times_s(w, s))
    assert (wd.amax(1) > w.amax(1)).any() or (wd.amin(1) < w.amin(1)).any()


def test_dilation_guards_and_saturated_channels():
    w = torch.tensor([[1.0, 0.5, 0.0, 1e-12, 0.0], [-2.0, 0.1, 0.4, 0.0, 0.0]])
    s = dilation_scales([w], cap=4.0)
    assert s[0] == 1.0  # holds the max of row 0 and the min of row 1
    assert s[1] == pytest.approx(2.0)  # row 0 allows 1.0 / 0.5 = 2, row 1 allows 0.4 / 0.1 = 4
    assert s[2] == 1.0  # holds the max of row 1
    assert s[3] == 1.0 and s[4] == 1.0  # near-zero and all-zero columns stay put
    s_cap = dilation_scales([torch.tensor([[1.0, 0.01, -1.0]])], cap=4.0)  # would be 100 uncapped
    assert s_cap[1] == 4.0


def test_shared_input_layers_get_one_joint_scale():
    a, b = torch.randn(5, 7), torch.randn(3, 7)
    s = dilation_scales([a, b], cap=16.0)
    for w in (a, b):
        wd = dilate(w, s)
        assert torch.equal(wd, _times_s(w, s))
        _assert_same_row_ranges(w, wd)


@pytest.mark.parametrize("scaling", ["dilation", "smoothquant"])
@pytest.mark.parametrize("which", ["uncond_model", "cond_model"])
def test_scaled_model_equals_original_before_quantization(request, which, scaling):
    model = request.getfixturevalue(which)
    data = build_calibration_set(model, 16, 4, use_cache=False)
    q = QuantUNet(model.unet, QuantConfig(num_steps=4, scaling=scaling))
    info = apply_scaling(q, data)
    assert info["folded_into_norms"] >= 1
    q.set_quant(weights=False, acts="off")
    c = data.inputs(slice(None))
    with torch.no_grad():
        kw = {"encoder_hidden_states": c["encoder_hidden_states"]} if "encoder_hidden_states" in c else {}
        ref = model.unet(c["sample"], c["timestep"], **kw).sample
        out = q(c["sample"], c["timestep"], c["t_index"], kw.get("encoder_hidden_states"))
    assert (out - ref).abs().max() < 1e-5
    changed = [n for n, layer in q.layers().items() if not torch.equal(layer.weight, dict(model.unet.named_modules())[n].weight)]
    assert changed, "scaling must actually change weights"
