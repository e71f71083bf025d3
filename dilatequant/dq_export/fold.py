"""Deployment form of a quantized layer: integer weights, constant unit-scale Q/DQ, hoisted step sizes.

TensorRT needs constant Q/DQ scales and zero points of 0, while TPQ needs a step size per timestep.
Conv and linear are linear in their input, so f(delta * q) = delta * f(q): the runtime factor moves
into ordinary Muls around a Q/DQ pair whose own scale is the constant 1 (deployment.md):

    u = x * F[t]  (+ z[t] - 2^(b-1))  -> Clip to b bits -> Q(1, 0) -> DQ(1, 0)
    y = (op(v, DQ(W_int, 1)) (+ c[t] * op(ones, sum_c W))) * w_scale * delta[t] + bias

F[t, c] = (1/s_c) / delta[t] merges the dilation (or SmoothQuant) vector with the step size, so an
unfolded 1/s costs nothing. Asymmetric zero points are shifted into int8 and corrected after the op
with c[t] = 2^(b-1) - z[t]; for convs the correction is op(ones, sum_c W), which is exact at zero-padded
borders. A Gather on t_index feeds only these Muls/Adds, never a Q/DQ scale.

FP8 (E4M3) layers take the same form with FP8 Q/DQ (float8e4m3fn zero points of 0, fp8_ops.py) and no clip
(QuantizeLinear saturates to +-448 itself):

    x * F[t] -> Q(fp8, 1) -> DQ(1) -> op(., DQ(W_fp8, 1)) * w_scale * delta[t] + bias

The per-channel weight scale stays a Mul after the op rather than the weight DQ's scale: the op then multiplies
E4M3 values only (exact products, so PyTorch and the runtimes differ only in summation order), and TensorRT
sees a per-tensor FP8 conv/GEMM, which has kernels on Ada and Hopper alike (per-channel FP8 GEMM scales came
with TensorRT 10.6, for Hopper), with a per-channel pointwise epilogue.
"""
from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from ..calibrate.quant_unet import QuantAttnProcessor, QuantConv2d, QuantLayer, QuantLinear, QuantUNet
from ..calibrate.timestep_quantizer import TimestepActQuantizer
from .fp8_ops import e4m3_dequant, e4m3_qdq

qd = torch.ops.quantized_decomposed


class StepTables(nn.Module):
    """Per-timestep multiplier, shift and correction tables of one activation quantizer."""

    def __init__(self, q: TimestepActQuantizer, static: bool) -> None:
        super().__init__()
        delta = q.delta.detach().clone()  # [T, H]
        z = None if q.zero_point is None else torch.round(q.zero_point.detach())
        if static:
            delta, z = _static_row(delta, z, q)
        self.fp8 = q.format == "fp8"
        half = 2 ** (q.bits - 1)
        self.lo, self.hi = -half, half - 1
        inv = q.inv_scale.detach() if q.inv_scale.numel() else torch.ones(1)
        heads = delta.shape[1]
        self.register_buffer("delta", delta.reshape(len(delta), -1) if heads > 1 else delta[:, 0:1])
        # the same float expression as TimestepActQuantizer._multiplier, so both round identical values
        self.register_buffer("mult", (inv[None, :] / delta) if q.inv_scale.numel() else 1.0 / delta)
        self.asymmetric = z is not None
        if z is not None:
            self.register_buffer("shift", z - half)     # added before the clip
            self.register_buffer("correction", half - z)  # added back after the op
        self.static = static

    def rows(self, table: torch.Tensor, t_index: torch.Tensor | None) -> torch.Tensor:
        if self.static or t_index is None:
            return table[0:1]
        return torch.index_select(table, 0, t_index)

    def to_int_domain(self, x: torch.Tensor, t_index, layout: str) -> torch.Tensor:
        """x -> the b-bit integer grid (as float), through a unit-scale int8 Q/DQ pair (fp8: the E4M3 grid)."""
        u = x * _broadcast(self.rows(self.mult, t_index), x, layout)
        if self.fp8:
            return e4m3_qdq(u)
        if self.asymmetric:
            u = u + _broadcast(self.rows(self.shift, t_index), x, layout)
        u = torch.clamp(u, self.lo, self.hi)
        q = qd.quantize_per_tensor(u, 1.0, 0, -128, 127, torch.int8)
        return qd.dequantize_per_tensor(q, 1.0, 0, -128, 127, torch.int8)


def _static_row(delta, z, q: TimestepActQuantizer):
    """One row for every timestep (the static-scale twin), calibrated on all timesteps' activations pooled.

    A --no-tpq model's single row is that calibration (then trained by BKD); a TPQ model carries it beside its
    tables (TimestepActQuantizer.static_delta, set at initialisation). A q.pt written before that row existed
    falls back to the union of every timestep's clipping range, with a warning.
    """
    if len(delta) == 1:
        return delta, z
    if q.has_static_row():
        zs = None if z is None else torch.round(q.static_zero_point.detach().clone())
        return q.static_delta.detach().clone(), zs
    import warnings

    warnings.warn("this q.pt has no pooled static activation row (written before it existed): the static-scale "
                  "twin uses the union of the per-timestep ranges; re-run dq-calibrate for the pooled calibration")
    r = q.range
    if z is None:
        d = delta.amax(0, keepdim=True)
        return d, None
    lo = ((r.qmin - z) * delta).amin(0, keepdim=True)
    hi = ((r.qmax - z) * delta).amax(0, keepdim=True)
    d = (hi - lo) / r.levels
    return d, torch.clamp(torch.round(-lo / d), r.qmin, r.qmax)


def _broadcast(rows: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B or 1, C|H|1] rows -> a shape that broadcasts against x."""
    if layout == "conv":      # x [B, C, H, W]
        return rows.reshape(rows.shape[0], -1, 1, 1)
    if layout == "heads":     # x [B, H, N, d]
        return rows.reshape(rows.shape[0], -1, 1, 1)
    if x.dim() == 3:          # linear on [B, N, C]
        return rows.reshape(rows.shape[0], 1, -1)
    return rows               # linear on [B, C]


class DeployLayer(nn.Module):
    """A QuantConv2d / QuantLinear in deployment form: the same function, in the same float order.

    Weights are DQ(int8, unit scale) so op(v) (and the asymmetric zero-point correction) are exact integer
    sums in any runtime; the per-channel weight scale is a constant Mul after the op, a pointwise epilogue
    like the step-size Mul and the bias Add (what TensorRT fuses is visible in dq-build-engine --inspect).
    """

    def __init__(self, layer: QuantLayer, tables: StepTables, ctx_holder: "ExportContext") -> None:
        super().__init__()
        self.tables, self.ctx = tables, ctx_holder
        self.is_conv = isinstance(layer, QuantConv2d)
        wq = layer.weight_quantizer
        w_int = wq.integer_weight(layer.weight.detach())
        self.w_range = (wq.range.qmin, wq.range.qmax)
        self.fp8 = wq.format == "fp8"
        self.out_shape = layer.out_shape
        self.register_buffer("w_scale", wq.scale.detach().clone())
        if self.is_conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.register_buffer("w_int", w_int.to(wq.storage_dtype))
        else:  # stored [in, out] so the graph is DQ(axis=1) -> MatMul, TensorRT's GEMM weight layout
            self.register_buffer("w_int", w_int.t().contiguous().to(wq.storage_dtype))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if tables.asymmetric:  # integer sums, as QuantLayer.ones_response computes them
            self.register_buffer("w_sum", w_int.sum(1, keepdim=True) if self.is_conv else w_int.sum(1))

    def weight(self) -> torch.Tensor:
        if self.fp8:
            return e4m3_dequant(self.w_int)
        lo, hi = self.w_range
        return qd.dequantize_per_tensor(self.w_int, 1.0, 0, lo, hi, torch.int8)

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)
        return torch.matmul(x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ctx.t_index
        layout = "conv" if self.is_conv else "linear"
        v = self.tables.to_int_domain(x, t, layout)
        y = self.op(v, self.weight())
        if self.tables.asymmetric:
            c = _broadcast(self.tables.rows(self.tables.correction, t), y, layout)
            ones = self.op(torch.ones_like(x[:1, :1]), self.w_sum) if self.is_conv else self.w_sum
            y = y + c * ones
        y = y * self.w_scale.view(self.out_shape)
        y = y * _broadcast(self.tables.rows(self.tables.delta, t), y, layout)
        return y if self.bias is None else y + self.bias.view(self.out_shape)


class W4A16Layer(nn.Module):
    """A 4-bit QuantLinear as TensorRT runs INT4: weight-only, the activation stays float (W4A16).

    TensorRT's INT4 GEMMs take a float activation; an INT8 Q/DQ in front of one has no kernel (deployment.md).
    The graph is x * (1/s) -> MatMul(DQ(W_int [in, out], w_scale, axis 1)) + bias, whose DQ the INT4 pass
    (graph_passes.int4_weights) turns into INT4 blocks; the PyTorch reference for it is the same layer with its
    input quantizer off (`w4a16_reference`).
    """

    def __init__(self, layer: QuantLayer, inv_scale: torch.Tensor | None) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        self.register_buffer("w_int", wq.integer_weight(layer.weight.detach()).t().contiguous().to(torch.int8))
        self.register_buffer("w_scale", wq.scale.detach().clone())
        self.register_buffer("inv_scale", inv_scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale is not None:
            x = x * self.inv_scale
        zero = torch.zeros_like(self.w_scale, dtype=torch.int64)
        w = qd.dequantize_per_channel(self.w_int, self.w_scale, zero, 1, -8, 7, torch.int8)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


def int4_layers(qunet: QuantUNet, block: int) -> list[str]:
    """Layers `--precision int4` runs as weight-only INT4 GEMMs: 4-bit linear weights whose K splits into blocks.

    A whole input group or none of it (q/k/v share one input): its quantizer is switched off in the reference.
    """
    layers = qunet.layers()
    out = []
    for g in qunet.groups:
        members = [layers[n] for n in g.layers]
        if all(isinstance(m, QuantLinear) and m.weight_quantizer.bits <= 4 and m.weight.shape[1] % block == 0
               for m in members):
            out += g.layers
    return out


def w4a16_reference(qunet: QuantUNet, names: list[str]) -> None:
    """Configure the fake-quant model as the INT4 graph runs: those layers' input quantizers pass x through."""
    layers = qunet.layers()
    for name in names:
        layers[name].input_quantizer.mode = "off"


class DeployAttnProcessor(QuantAttnProcessor):
    """q, k, v and softmax output through unit-scale Q/DQ; step sizes multiplied back before the matmuls."""

    def __init__(self, tables: list[StepTables], ctx_holder: "ExportContext") -> None:
        fakes = [_DequantizedOperand(t, ctx_holder) for t in tables]
        super().__init__(*fakes)


class _DequantizedOperand(nn.Module):
    def __init__(self, tables: StepTables, ctx_holder: "ExportContext") -> None:
        super().__init__()
        self.tables, self.ctx = tables, ctx_holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ctx.t_index
        v = self.tables.to_int_domain(x, t, "heads")
        if self.tables.asymmetric:
            v = v + _broadcast(self.tables.rows(self.tables.correction, t), x, "heads")
        return v * _broadcast(self.tables.rows(self.tables.delta, t), x, "heads")


class ExportContext:
    def __init__(self) -> None:
        self.t_index: torch.Tensor | None = None


def deploy_unet(qunet: QuantUNet, static: bool = False,
                w4a16: tuple[str, ...] = ()) -> tuple[nn.Module, ExportContext]:
    """A copy of qunet.unet with every quantized layer in deployment form (shared tables per input).

    w4a16: layers exported weight-only (float activation; `int4_layers` for `--precision int4`).
    """
    import copy

    ctx = ExportContext()
    # New modules, the same tensors: a plain deepcopy would hold a second full-precision copy of every weight
    # (3.4 GB at SD 1.5 size) until the quantized layers below are swapped for their integer form.
    shared = {id(t): t for t in (*qunet.unet.parameters(), *qunet.unet.buffers())}
    unet = copy.deepcopy(qunet.unet, shared)
    layers = dict(unet.named_modules())
    tables = {key: StepTables(q, static) for key, q in qunet.act_quantizers.items()}
    for group in qunet.groups:
        for name in group.layers:
            parent, _, attr = name.rpartition(".")
            if name in w4a16:
                inv = qunet.act_quantizers[group.key].inv_scale.detach()
                deployed = W4A16Layer(layers[name], inv.clone() if inv.numel() else None)
            else:
                deployed = DeployLayer(layers[name], tables[group.key], ctx)
            setattr(layers[parent] if parent else unet, attr, deployed)
    if qunet.config.attn_matmul:
        from diffusers.models.attention_processor import Attention

        for name, m in layers.items():
            if isinstance(m, Attention):
                prefix = name.replace(".", "/")
                m.set_processor(DeployAttnProcessor([tables[f"{prefix}/attn_{p}"] for p in "qkvp"], ctx))
    return unet, ctx
