"""Layers kept in float (QuantConfig.float_layers): left untouched, untrained, and validated up front."""
import json

import pytest
import torch
from torch import nn

from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantLayer, QuantUNet
from dilatequant.core.errors import UserError


def test_float_input_layer_stays_float_and_out_of_training(uncond_model):
    fp = uncond_model.unet
    q = QuantUNet(fp, QuantConfig(num_steps=4, float_layers=("conv_in",)))
    assert type(q.unet.conv_in) is nn.Conv2d and torch.equal(q.unet.conv_in.weight, fp.conv_in.weight)
    assert not any("conv_in" in k for k in q.act_quantizers), "no input quantizer for a float layer"
    assert "conv_in" not in q.unit_order and "conv_in" not in q.unit_of_layer
    others = [m for n, m in q.unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv_in"]
    assert others == [], "every other Conv2d/Linear is quantized"
    assert len(q.layers()) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in fp.modules()) - 1
    for qs in q.act_quantizers.values():  # crude tables: enough to make every other layer really quantize
        qs.mode, qs.delta.data[:] = "quant", 0.05
    seen = {}
    q.unet.conv_in.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        q(x, torch.tensor([900, 500, 10]), torch.tensor([0, 2, 3]))
        assert torch.equal(seen["q"], fp.conv_in(x)), "the UNet input reaches conv_in unquantized"
        full = QuantUNet(fp, QuantConfig(num_steps=4, float_layers=()))
        assert isinstance(full.unet.conv_in, QuantLayer) and "conv_in" in full.unit_order
    assert "conv_in" not in QuantUNet(fp, QuantConfig(num_steps=4)).layers(), "the UNet input stays float unless asked"


def test_bad_float_layers_are_clear_errors(cond_model):
    with pytest.raises(UserError, match=r"\['conv_inn'\] are not Conv2d/Linear layers"):
        QuantUNet(cond_model.unet, QuantConfig(num_steps=4, float_layers=("conv_inn",)))
    shared = next(g.layers for g in QuantUNet(cond_model.unet, QuantConfig(num_steps=4)).groups if len(g.layers) > 1)
    with pytest.raises(UserError, match="keep all of them in float or none"):
        QuantUNet(cond_model.unet, QuantConfig(num_steps=4, float_layers=(shared[0],)))
    q = QuantUNet(cond_model.unet, QuantConfig(num_steps=4, float_layers=tuple(shared)))
    assert all(type(dict(q.unet.named_modules())[n]) is nn.Linear for n in shared)


def test_config_round_trips_and_older_configs_quantize_every_layer():
    cfg = QuantConfig(weight_bits=8, float_layers=("conv_in", "conv_out"))
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg and back.float_layers == ("conv_in", "conv_out")
    old = json.loads(QuantConfig().to_json())
    del old["float_layers"]  # a q.pt written before the option existed
    assert QuantConfig.from_json(json.dumps(old)).float_layers == ()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (64, 64, 3, 3), (320, 1280), (3, 70000)])
def test_weight_mse_search_in_place_equals_out_of_place_loop(shape, bits):
    """The in-place search picks exactly the scales of the out-of-place loop it replaced."""
    from dilatequant.calibrate.quantizers import IntRange, _mse_search_reference, mse_search_symmetric

    torch.manual_seed(bits)
    w = torch.randn(shape) * torch.rand(shape[0], *([1] * (len(shape) - 1)))
    r = IntRange.for_weights(bits)
    got, want = mse_search_symmetric(w, r), _mse_search_reference(w, r)
    assert torch.equal(got, want)
    if w[0].numel() >= 500:  # wide rows: the search clips, so the scales are not just absmax / qmax
        assert (got < w.abs().flatten(1).amax(1) / r.qmax).any()
