"""The fake-quant integer sums equal an int32 accumulation at SD widths, where float32 sums are wrong."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dilatequant.calibrate.quant_unet import QuantConv2d, QuantLinear
from dilatequant.calibrate.timestep_quantizer import StepContext, TimestepActQuantizer


def _layer(src: nn.Module, symmetric: bool = True, act_bits: int = 8, weight_bits: int = 8):
    """A quantized layer with unit step sizes: its input levels and integer weights are the given integers."""
    ctx = StepContext()
    conv = isinstance(src, nn.Conv2d)
    q = TimestepActQuantizer(ctx, 1, act_bits, symmetric, channels=src.weight.shape[1], channel_dim=1 if conv else -1)
    q.mode = "quant"
    layer = (QuantConv2d if conv else QuantLinear)(src, weight_bits, q)
    with torch.no_grad():
        layer.weight_quantizer.scale.fill_(1.0)
        if not symmetric:
            q.zero_point.fill_(100.0)  # int8 level v = x + 100 - 128, correction 128 - 100 = 28 after the op
    return layer


def _adversarial(shape, gen) -> torch.Tensor:
    """int8 extremes of one sign (large partial sums) with odd values mixed in (low bits float32 drops)."""
    x = torch.randint(100, 128, shape, generator=gen).float()
    return torch.where(torch.rand(shape, generator=gen) < 0.5, x, x - 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_wide_conv_sums_equal_int32_accumulation(symmetric):
    """SD's widest 3x3 conv (1,280 input channels: 11,520 int8 x int8 products per output)."""
    gen = torch.Generator().manual_seed(0)
    src = nn.Conv2d(1280, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        src.weight.copy_(_adversarial(src.weight.shape, gen))
    layer = _layer(src, symmetric)
    x = _adversarial((2, 1280, 6, 6), gen)
    exact = F.conv2d(x.double(), src.weight.double(), padding=1)  # integers below 2^53: exact, the int32 sum
    assert exact.abs().max() > 2**24 and exact.abs().max() < 2**31, "beyond float32's exact range, within int32"
    plain = F.conv2d(x, src.weight, padding=1)
    assert (plain.double() != exact.float().double()).float().mean() > 0.1, "float32 summation really is wrong here"
    with torch.no_grad():
        y = layer(x if symmetric else x + 28)
    assert layer.exact_channels() == 114  # 2^24 // (9 * 128 * 127)
    expected = exact.float()
    if not symmetric:  # + 28 * op(ones, sum_c W) in float32, as the graph adds the zero-point correction
        expected = expected + 28 * F.conv2d(torch.ones(1, 1, 6, 6), src.weight.sum(1, keepdim=True), padding=1)
    assert torch.equal(y, expected), "every output is the int32 sum, rounded once to float32"


def test_wide_linear_sums_equal_int32_accumulation_and_keep_gradients():
    """SD's feed-forward down-projection reads 5,120 features."""
    gen = torch.Generator().manual_seed(1)
    src = nn.Linear(5120, 16, bias=False)
    with torch.no_grad():
        src.weight.copy_(_adversarial(src.weight.shape, gen))
    layer = _layer(src)
    x = _adversarial((3, 7, 5120), gen).requires_grad_(True)
    exact = x.detach().double() @ src.weight.double().t()
    assert exact.abs().max() > 2**24
    assert not torch.equal(x.detach() @ src.weight.t(), exact.float()), "float32 summation really is wrong here"
    y = layer(x)
    assert torch.equal(y.detach(), exact.float())
    y.sum().backward()  # STE: d/dx of sum(x @ W^T) is the column sums of W, wherever x stays inside the int8 range
    assert layer.weight.grad is not None and x.grad is not None
    inside = (x.detach() > -128) & (x.detach() < 127)
    expected = src.weight.detach().sum(0).expand_as(x)
    assert torch.allclose(x.grad[inside], expected[inside])


def test_narrow_layers_take_the_plain_op_bit_for_bit():
    """Where float32 is already exact (W4A8 at 1,280 channels: 10.3 M < 2^24), nothing changes."""
    src = nn.Conv2d(1280, 4, 3, padding=1)
    layer = _layer(src, weight_bits=4)
    assert layer.exact_channels() >= 1280
    calls = []
    layer.op = lambda x, w, op=layer.op: calls.append(x.shape[1]) or op(x, w)
    with torch.no_grad():
        layer(torch.randn(1, 1280, 4, 4))
    assert calls == [1280], "one plain conv over every channel"
