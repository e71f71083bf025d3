import pytest
import torch

from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.quantizers import IntRange, WeightQuantizer, fake_quant, round_clamp
from dilatequant.calibrate.timestep_quantizer import StepContext, TimestepActQuantizer
from dilatequant.core.errors import UserError


def _quantizer(symmetric, steps=3, bits=8, heads=1):
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, steps, bits, symmetric, heads=heads)
    q.mode = "quant"
    return ctx, q


def test_each_sample_uses_its_own_t_index_row():
    ctx, q = _quantizer(symmetric=True)
    with torch.no_grad():
        q.delta.copy_(torch.tensor([[0.5], [0.1], [0.01]]))
    x = torch.full((3, 4), 0.237)
    ctx.t_index = torch.tensor([2, 0, 1])
    out = q(x)
    assert out[0, 0].item() == pytest.approx(0.24)   # step 0.01
    assert out[1, 0].item() == pytest.approx(0.0)    # step 0.5: 0.474 rounds to 0
    assert out[2, 0].item() == pytest.approx(0.2)    # step 0.1


def test_per_head_rows():
    ctx, q = _quantizer(symmetric=True, steps=2, heads=2)
    with torch.no_grad():
        q.delta.copy_(torch.tensor([[1.0, 0.1], [0.5, 0.05]]))
    x = torch.full((2, 2, 3, 4), 0.33)  # [B, H, N, d]
    ctx.t_index = torch.tensor([1, 0])
    out = q(x)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert out[0, 1, 0, 0].item() == pytest.approx(0.35)
    assert out[1, 0, 0, 0].item() == pytest.approx(0.0)
    assert out[1, 1, 0, 0].item() == pytest.approx(0.3)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_grid_values_round_trip_exactly(symmetric, bits):
    r = IntRange.for_activations(bits, symmetric)
    scale, z = torch.tensor(0.125), (None if symmetric else torch.tensor(float(2 ** (bits - 2))))
    levels = torch.arange(r.qmin, r.qmax + 1, dtype=torch.float32)
    x = (levels - (0 if z is None else z)) * scale
    assert torch.equal(fake_quant(x, scale, z, r), x)
    beyond = torch.tensor([x.max() + 1.0, x.min() - 1.0])
    assert torch.equal(fake_quant(beyond, scale, z, r), torch.stack([x.max(), x.min()]))


def test_weight_quantizer_round_trip_and_range():
    wq = WeightQuantizer(2, bits=4)
    with torch.no_grad():
        wq.scale.copy_(torch.tensor([0.5, 0.25]))
    w = torch.tensor([[3.5, -3.5], [1.75, -1.0]])
    assert torch.equal(wq(w), w)
    assert wq.integer_weight(torch.tensor([[100.0, -100.0], [0.0, 0.1]])).tolist() == [[7, -7], [0, 0]]


def test_per_timestep_initialisation_follows_each_steps_range():
    ctx, q = _quantizer(symmetric=False, steps=2)
    q.mode = "observe"
    ctx.t_index = torch.tensor([0, 1])
    q(torch.stack([torch.linspace(-1, 1, 1000), torch.linspace(-10, 10, 1000)]))
    q.init_from_observations("minmax")
    assert q.delta[0, 0].item() == pytest.approx(2 / 255, rel=1e-4)
    assert q.delta[1, 0].item() == pytest.approx(20 / 255, rel=1e-4)
    assert q.zero_point[0, 0].item() == pytest.approx(128, abs=1)


def test_out_of_range_t_index_is_rejected(uncond_model):
    q = QuantUNet(uncond_model.unet, QuantConfig(num_steps=4))
    with pytest.raises(UserError, match="t_index out of range"):
        q(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 4]))


def test_no_grad_round_clamp_matches_the_straight_through_path_bit_for_bit():
    """PTQ passes round and clamp in place (no gradient to carry); the values must be the STE path's exactly,
    ties (x.5: round half to even), values just off them, large magnitudes and clamped ones included."""
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-300, 300, dtype=torch.float32) + 0.5
    near = torch.cat([ties.nextafter(ties + 1), ties.nextafter(ties - 1)])
    big = torch.tensor([2.0**22 + 0.5, 2.0**23 - 0.5, 2.0**23 + 1, -(2.0**22) - 0.5, 1e9, -1e9])
    u = torch.cat([ties, near, big, torch.randn(10_000, generator=g) * 200, torch.tensor([0.0, -0.0, 0.49999997])])
    leaf = u.clone().requires_grad_()
    with_grad = round_clamp(leaf * 1.0, -128, 127)
    assert with_grad.requires_grad
    with torch.no_grad():
        fresh = u.clone()
        in_place = round_clamp(fresh, -128, 127)
    assert in_place.data_ptr() == fresh.data_ptr()  # no new tensor
    assert torch.equal(in_place, with_grad.detach())
    assert torch.equal(in_place, torch.clamp(torch.round(u), -128, 127))
    with torch.no_grad():  # round half away from zero (a plausible slip) is caught by the ties
        assert not torch.equal(torch.clamp(torch.floor(u + 0.5), -128, 127), in_place)
