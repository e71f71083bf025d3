"""FP8 (E4M3) fake-quant: torch.float8_e4m3fn semantics, the straight-through gradient, the per-timestep scale
search on E4M3's non-uniform grid, and the format recorded in (and read back from) the quantization config."""
import json

import pytest
import torch

from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.calibrate.quantizers import E4M3_MAX, E4M3Grid, WeightQuantizer, fake_quant, mse_search_symmetric
from dilatequant.calibrate.timestep_quantizer import StepContext, TimestepActQuantizer
from dilatequant.core.errors import UserError

from conftest import assert_clean_error, run_cli


def _all_finite_e4m3() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = codes.view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)]


def test_every_e4m3_value_is_a_fixed_point_and_the_grid_saturates():
    g = E4M3Grid()
    v = _all_finite_e4m3()
    assert len(v) == 254 and v.max().item() == E4M3_MAX  # 256 codes less the two NaNs
    assert torch.equal(g.round_values(v), v)
    big = torch.tensor([449.0, 464.0, 1e6, float("inf"), -500.0, -float("inf")])
    assert g.round_values(big).tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, -448.0]  # no inf, no NaN


def test_rounding_is_nearest_even_as_torch_float8_e4m3fn():
    g = E4M3Grid()
    # [1, 2) has step 1/8: 1.0625 is the tie between 1 and 1.125 -> even mantissa (1.0); 1.1875 -> 1.25
    # subnormals step 2^-9: 2^-10 ties to 0, 1.5 * 2^-9 ties to 2 * 2^-9, 2.5 * 2^-9 ties to 2 * 2^-9
    x = torch.tensor([1.0625, 1.1875, 2.0 ** -10, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, -1.0625, 300.0, 304.0])
    want = [1.0, 1.25, 0.0, 2.0 ** -8, 2.0 ** -8, -1.0, 288.0, 320.0]
    assert g.round_values(x).tolist() == want
    r = torch.randn(100_000) * torch.exp(torch.randn(100_000) * 3)
    assert torch.equal(g.round_values(r), r.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_straight_through_gradient_inside_and_none_outside_the_range():
    g = E4M3Grid()
    u = torch.tensor([0.3, -17.2, 447.0, 500.0, -1000.0], requires_grad=True)
    q = g.quantize(u)
    assert q.tolist() == g.round_values(u.detach()).tolist()
    q.sum().backward()
    assert u.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # the step size learns through scale * e4m3(x / scale) (LSQ): saturated values pull with +-448
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(torch.tensor([1.0, 1000.0]), s, None, g).sum().backward()
    assert s.grad.item() == pytest.approx((g.round_values(torch.tensor(2.0)) - 2.0).item() + 448.0)


def _crowded_just_below_amax(n: int) -> torch.Tensor:
    """n values of 1.0 and a maximum of 1.09: at amax / 448 the 1.0s fall between two E4M3 levels (1.0 / s =
    411, levels 384 and 416), at 2^(-1/8) of it on one (448); clipping the one maximum costs less than that."""
    return torch.cat([torch.ones(n), torch.tensor([1.09])])


def _brute_force_ratio(x: torch.Tensor, g: E4M3Grid) -> float:
    start = x.abs().max() / E4M3_MAX
    errs = [((fake_quant(x, start * r, None, g) - x) ** 2).sum().item() for r in g.search_ratios]
    return g.search_ratios[min(range(len(errs)), key=errs.__getitem__)]


def test_weight_scales_are_the_least_error_multiple_of_amax_over_448():
    torch.manual_seed(0)
    w = torch.randn(4, 1001) * torch.rand(4, 1) * 3
    w[0] = _crowded_just_below_amax(1000)
    g = E4M3Grid()
    ratios = (mse_search_symmetric(w, g) / (w.abs().amax(1) / E4M3_MAX)).tolist()
    want = [_brute_force_ratio(row, g) for row in w]
    assert ratios == pytest.approx(want, rel=1e-6)
    assert want[0] == 2.0 ** (-1 / 8) and want[1:] == [1.0] * 3  # bell-shaped rows keep amax / 448: no clipping
    wq = WeightQuantizer(4, 8, "fp8")
    wq.init_from(w)
    levels = wq.integer_weight(w)
    assert torch.equal(levels, levels.to(torch.float8_e4m3fn).float()) and levels.abs().max() <= E4M3_MAX
    assert wq.storage_dtype == torch.float8_e4m3fn


def _observe_two_steps(q, ctx):
    q.mode = "observe"
    ctx.t_index = torch.tensor([0, 1])
    x = torch.stack([_crowded_just_below_amax(2999), torch.randn(3000, generator=torch.Generator().manual_seed(0))])
    x[1] *= 50.0  # step 1 is much wider
    q(x)
    ctx.t_index = None
    return x


def test_per_timestep_rows_follow_each_steps_amax_and_static_row_pools_them():
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, 2, 8, True, fmt="fp8")
    x = _observe_two_steps(q, ctx)
    q.init_from_observations("minmax")  # ModelOpt's max calibration: amax / 448 per row
    amax = x.abs().amax(1)
    assert q.delta[:, 0].tolist() == pytest.approx((amax / E4M3_MAX).tolist(), rel=1e-6)
    assert q.static_delta.item() == pytest.approx(amax.max().item() / E4M3_MAX, rel=1e-6)  # the static baseline


def test_mse_search_per_timestep_is_the_least_error_multiple_of_amax():
    ctx = StepContext()
    q = TimestepActQuantizer(ctx, 2, 8, True, fmt="fp8")
    x = _observe_two_steps(q, ctx)
    q.init_from_observations("mse")
    ratios = [q.delta[t, 0].item() / (x[t].abs().max().item() / E4M3_MAX) for t in range(2)]
    assert ratios == pytest.approx([2.0 ** (-1 / 8), 1.0], rel=1e-6)  # each step its own; brute force agrees:
    assert [_brute_force_ratio(x[t], q.range) for t in range(2)] == pytest.approx(ratios, rel=1e-6)


def test_fp8_layer_quantizes_with_per_timestep_rows_and_trains(uncond_model):
    q = QuantUNet(uncond_model.unet, QuantConfig(num_steps=2, weight_bits=8, act_bits=8, symmetric=True,
                                                 format="fp8", float_layers=()))
    layer = q.layers()["down_blocks.0.resnets.0.conv1"]
    aq = layer.input_quantizer
    assert aq.format == "fp8" and aq.zero_point is None and layer.weight_quantizer.range == E4M3Grid()
    with torch.no_grad():
        aq.delta.copy_(torch.tensor([[0.01], [0.1]]))
    q.set_quant(weights=True, acts="quant")
    x = torch.randn(2, 8, 8, 8)
    q.ctx.t_index = torch.tensor([0, 1])
    lv = aq.levels(x)
    assert torch.equal(lv.v[0], (x[0] / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert torch.equal(lv.v[1], (x[1] / 0.1).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    layer.weight.requires_grad_(True)
    aq.delta.requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0 and (aq.delta.grad != 0).all()  # both rows train (BKD)
    assert layer.weight_quantizer.scale.grad is not None and layer.weight_quantizer.scale.grad.abs().sum() > 0
    q.ctx.t_index = None


def test_format_round_trips_and_older_configs_are_int():
    cfg = QuantConfig(weight_bits=8, act_bits=8, symmetric=True, format="fp8")
    assert QuantConfig.from_json(cfg.to_json()) == cfg and cfg.format_name == "FP8 W8A8"
    old = json.loads(QuantConfig().to_json())
    assert "format" not in old  # an int config's JSON is what it was before FP8 existed (older readers, --resume)
    assert QuantConfig.from_json(json.dumps(old)).format == "int"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(weight_bits=4, act_bits=8, symmetric=True), "pass --bits W8A8"),
    (dict(weight_bits=8, act_bits=8, symmetric=True, first_last_bits=4), "--first-last-bits 4"),
    (dict(weight_bits=8, act_bits=8, symmetric=False), "symmetric"),
])
def test_fp8_rejects_other_bit_settings(kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        QuantConfig(format="fp8", **kwargs)


def test_cli_refuses_fp8_with_other_bits_in_one_line(tmp_path):
    assert_clean_error(run_cli("calibrate", "--format", "fp8", "--bits", "W4A8", "--out", str(tmp_path / "q.pt")),
                       "fp8 (E4M3) is 8-bit", "--bits W8A8")
    assert not (tmp_path / "q.pt").exists()
