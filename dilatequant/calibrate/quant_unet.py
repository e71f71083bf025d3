"""A diffusers denoiser (UNet or diffusion transformer) with every Conv2d and Linear fake-quantized, driven by a
per-sample t_index.

Layers that read the same tensor inside one block (q/k/v of self-attention, k/v of cross-attention, a FLUX
single-stream block's q/k/v and MLP input) share one input quantizer and one dilation vector: in a deployed graph
that is one Q/DQ pair, which is also what lets TensorRT fuse the QKV GEMMs. Nothing else in the model changes.
What a BKD unit is, which layer reads the noisy sample and how the denoiser is called come from its family
(core/denoisers.py).
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..core.conditioning import ConditionLike
from ..core.denoisers import UNetFamily, family_of
from ..core.device import module_device, to_device
from ..core.errors import UserError
from .quant_config import QuantConfig
from .quantizers import WeightQuantizer
from .timestep_quantizer import StepContext, TimestepActQuantizer

EXACT_FLOAT32 = 2**24  # every integer up to 2^24 in magnitude is a float32; 2^24 + 1 is not


class QuantLayer(nn.Module):
    """Shared part of QuantConv2d / QuantLinear: (dilated) weight, its quantizer, a shared input quantizer.

    The forward pass runs in the order of the deployed graph (dq_export/fold.py): op of the integer input
    levels and the integer weights, zero-point correction, then the per-channel weight scale, the step size,
    the bias. The integer sums equal an int32 accumulation (what TensorRT's and ONNX Runtime's int8 kernels
    compute), so no summation order changes them (per-channel float weights made PyTorch at batch 1 and batch
    16 differ by 33 dB on `default`: summation order flips rounding ties, and a flip propagates through the
    UNet). float32 adds integers exactly only while every partial sum stays within 2^24; a wider layer
    (an SD 3x3 conv over 1,280 channels sums 11,520 int8 x int8 products) is summed in input-channel chunks
    that each stay within it, and the chunks are added in float64 (`integer_op`).
    """

    out_shape: tuple[int, ...] = (-1,)
    taps = 1  # products per input channel and output element (kh * kw for a conv)

    def __init__(self, src: nn.Conv2d | nn.Linear, weight_bits: int, input_quantizer: TimestepActQuantizer,
                 fmt: str = "int"):
        super().__init__()
        # src's own tensors, not clones: QuantUNet already works on its copy (or wraps in place on purpose), and a
        # clone per layer would hold a second copy of every weight while QuantUNet's module map keeps src alive
        self.weight = nn.Parameter(src.weight.detach())
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach())
        self.weight_quantizer = WeightQuantizer(src.weight.shape[0], weight_bits, fmt)
        object.__setattr__(self, "input_quantizer", input_quantizer)  # owned by QuantUNet.act_quantizers

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exact_channels(self) -> int | None:
        """Most input channels whose integer sum float32 holds exactly, whatever the order it adds them in.

        |level| <= 2^(a-1) (symmetric levels and the int8-shifted asymmetric ones alike), |w_int| <= 2^(w-1) - 1:
        every partial sum of c channels is an integer of magnitude <= c * taps * 2^(a-1) * (2^(w-1) - 1).
        None for FP8: its products are exact but no chunking makes their float32 sums order-independent, so the
        op runs as the runtimes' FP8 kernels do, in one float32 accumulation (layer_parity.py bounds the rest).
        """
        if not self.weight_quantizer.range.integer:
            return None
        per_channel = self.taps * 2 ** (self.input_quantizer.bits - 1) * self.weight_quantizer.range.qmax
        return max(1, EXACT_FLOAT32 // per_channel)

    def integer_op(self, v: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        """op(integer levels, integer weights), equal to an int32 accumulation at any width (gradients flow).

        Within float32's exact range (every layer of the small default models) this is the plain op, bit for
        bit; wider layers are split along the input channels into float32-exact chunks whose sums are added
        in float64, then rounded once to float32, as an int32 accumulator converted to float is.
        """
        step, cin = self.exact_channels(), w_int.shape[1]
        if step is None or cin <= step:
            return self.op(v, w_int)
        y = None
        for start in range(0, cin, step):
            part = self.op(self.input_slice(v, start, start + step), w_int[:, start:start + step]).double()
            y = part if y is None else y + part
        return y.to(v.dtype)

    def input_slice(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def ones_response(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """op(all-ones input): what a constant shift of the input adds (exact at zero-padded borders)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lv = self.input_quantizer.levels(x)
        if lv.delta is not None and self.weight_quantizer.enabled:
            # integer levels x integer weights: exact integer sums, so PyTorch, the runtimes' int32 kernels and
            # any batch size add them up to the same value (only the float ops around the layer can still differ);
            # E4M3 x E4M3: exact products, float32 sums (the graph's order: op, then w_scale, then delta)
            w_int, w_scale = self.weight_quantizer.integer_ste(self.weight)
            y = self.integer_op(lv.v, w_int)
            if lv.correction is not None:
                y = y + lv.correction * self.ones_response(x, w_int)
            y = y * w_scale.view(self.out_shape)
        elif lv.correction is not None:
            y = self.op(lv.v, self.weight) + lv.correction * self.ones_response(x, self.weight)
        else:
            y = self.op(lv.v, self.quantized_weight())
        if lv.delta is not None:
            y = y * lv.delta
        return y if self.bias is None else y + self.bias.view(self.out_shape)


class QuantConv2d(QuantLayer):
    out_shape = (1, -1, 1, 1)

    def __init__(self, src: nn.Conv2d, weight_bits: int, input_quantizer: TimestepActQuantizer, fmt: str = "int"):
        super().__init__(src, weight_bits, input_quantizer, fmt)
        self.stride, self.padding, self.dilation, self.groups = src.stride, src.padding, src.dilation, src.groups
        self.taps = src.weight.shape[2] * src.weight.shape[3]

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def input_slice(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[:, start:stop]

    def ones_response(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.op(torch.ones_like(x[:1, :1]), w.sum(1, keepdim=True))


class QuantLinear(QuantLayer):
    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, w.t())

    def input_slice(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[..., start:stop]

    def ones_response(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.sum(1)


class QuantAttnProcessor:
    """Explicit attention with per-head TPQ on q, k, v and the softmax output (the attn-matmul switch)."""

    def __init__(self, q: TimestepActQuantizer, k: TimestepActQuantizer, v: TimestepActQuantizer,
                 p: TimestepActQuantizer) -> None:
        self.q, self.k, self.v, self.p = q, k, v, p

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None:
            raise UserError("attention masks and spatial norms are not supported with --attn-matmul")
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scores = self.q(q) @ self.k(k).transpose(-1, -2) * attn.scale
        out = self.p(scores.softmax(-1)) @ self.v(v)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class InputGroup:
    """Quantized layers that read one tensor, with their one input quantizer."""

    key: str
    unit: str
    layers: list[str]
    fold_norm: str | None  # a norm whose affine can absorb 1/s exactly, if any


def _fold_patterns(unet: nn.Module) -> dict[frozenset, str]:
    """Declared places where 1/s folds exactly into the affine of the norm right before the layers."""
    out: dict[frozenset, str] = {}
    for name, m in unet.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, Attention) and m.group_norm is not None and m.group_norm.affine \
                and not m.is_cross_attention and m.spatial_norm is None:
            out[frozenset(f"{p}to_{x}" for x in "qkv")] = f"{p}group_norm"
        elif isinstance(m, BasicTransformerBlock) and m.norm_type == "layer_norm" and m.pos_embed is None:
            if not m.only_cross_attention and m.norm1.elementwise_affine:
                out[frozenset(f"{p}attn1.to_{x}" for x in "qkv")] = f"{p}norm1"
            if m.attn2 is not None and m.norm2.elementwise_affine:
                out[frozenset([f"{p}attn2.to_q"])] = f"{p}norm2"
            if m.norm3.elementwise_affine and hasattr(m.ff.net[0], "proj"):
                out[frozenset([f"{p}ff.net.0.proj"])] = f"{p}norm3"
        elif isinstance(m, Transformer2DModel) and getattr(m, "norm", None) is not None and m.norm.affine:
            out[frozenset([f"{p}proj_in"])] = f"{p}norm"
    return out


def _unit_of(name: str, units: set[str]) -> str:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in units:
            return ".".join(parts[:i])
    return name


def example_inputs(denoiser: nn.Module, batch: int = 1) -> dict:
    """Random (sample, timestep, cond) of the right shapes at the denoiser's smallest size (a trace only needs
    them to reach every layer)."""
    family = family_of(denoiser)
    size = family.latent_size(denoiser) if isinstance(family, UNetFamily) else 2 * family.patch_multiple(denoiser)
    sample = torch.randn(batch, family.latent_channels(denoiser), size, size)
    return {"sample": sample, "timestep": family.example_timestep(batch),
            "cond": family.example_condition(denoiser, batch)}


def example_condition(denoiser: nn.Module, batch: int, tokens: int = 4, generator=None) -> dict[str, torch.Tensor] | None:
    """A random condition of the shapes the denoiser takes (SDXL: pooled text_embeds and time_ids as well)."""
    return family_of(denoiser).example_condition(denoiser, batch, tokens, generator)


def _trace(unet: nn.Module) -> tuple[list[str], dict[str, int], list[str]]:
    """One forward with hooks: which layer reads which tensor, and the order units run in."""
    family = family_of(unet)
    readers: dict[str, int] = {}
    keep: list[torch.Tensor] = []
    order: list[str] = []
    hooks = []
    unit_types = family.block_types
    unit_names = {n for n, m in unet.named_modules() if isinstance(m, unit_types) and n}
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def pre(mod, args, name=name):
                readers[name] = id(args[0])
                keep.append(args[0])
                unit = _unit_of(name, unit_names)
                if unit not in order:
                    order.append(unit)
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            ins = to_device(example_inputs(unet), module_device(unet))  # bf16 teacher: the model is on its device
            family.predict(unet, ins["sample"], ins["timestep"], ins["cond"])
    finally:
        for h in hooks:
            h.remove()
    layers = list(readers)
    return layers, readers, order


def _check_float_layers(names: tuple[str, ...], layers: list[str], groups) -> set[str]:
    """The layers to keep in float; a shared input quantizer (q/k/v) must stay whole, in or out.

    A name with * ? [ is a shell-style pattern over the module names (`*norm1*.linear`: every adaLN modulation
    linear of an SD3 or FLUX block); each name or pattern must match a layer."""
    unknown = [n for n in names if not fnmatch.filter(layers, n)]
    if unknown:
        raise UserError(f"float layer(s) {unknown} are not Conv2d/Linear layers of this model; "
                        f"use names such as {', '.join(layers[:3])}, ... (the module names of the denoiser, "
                        "or shell patterns over them)")
    chosen = {layer for n in names for layer in fnmatch.filter(layers, n)}
    for group in groups:
        partial = chosen.intersection(group)
        if partial and len(partial) != len(group):
            raise UserError(f"layers {group} read one tensor through one input quantizer; keep all of them "
                            f"in float or none (got {sorted(partial)})")
    return chosen


class QuantDenoiser(nn.Module):
    """forward(sample, timestep, t_index, cond=None) -> the denoiser's prediction (cond: see conditioning.py).

    `unet` holds the wrapped denoiser, UNet or transformer (`denoiser` names it too): the attribute is the
    prefix of every q.pt state-dict key and exported initializer name, so it keeps its first name."""

    def __init__(self, unet: nn.Module, config: QuantConfig, copy_weights: bool = True) -> None:
        """copy_weights=False wraps `unet` itself (its layers are replaced): no second full-precision copy, for a
        caller that keeps its teacher elsewhere (recipe's --teacher-dtype bf16) or builds a meta-device check."""
        super().__init__()
        self.family = family_of(unet)  # an unsupported model fails here, naming the supported classes
        if config.attn_matmul and not isinstance(self.family, UNetFamily):
            raise UserError(f"--attn-matmul quantizes UNet attention only; a {self.family.name} keeps its attention "
                            "matmuls in float (as NVIDIA's INT8 recipe does): drop --attn-matmul")
        self.config = config
        self.ctx = StepContext()
        self.unet = (copy.deepcopy(unet) if copy_weights else unet).eval().requires_grad_(False)
        self.act_quantizers = nn.ModuleDict()
        layers, readers, self.unit_order = _trace(self.unet)
        modules = dict(self.unet.named_modules())
        unit_names = {n for n, m in modules.items() if isinstance(m, self.family.block_types) and n}
        by_input: dict[tuple[str, int], list[str]] = {}
        for name in layers:
            by_input.setdefault((_unit_of(name, unit_names), readers[name]), []).append(name)
        folds = _fold_patterns(self.unet)
        float_names = (self.family.input_layer,) if config.float_layers is None else config.float_layers
        float_layers = _check_float_layers(float_names, layers, by_input.values())
        self.groups: list[InputGroup] = []
        for (unit, _), names in by_input.items():
            if names[0] in float_layers:
                continue
            key = "+".join(names).replace(".", "/")
            self.groups.append(InputGroup(key, unit, names, folds.get(frozenset(names))))
            self._wrap_group(self.groups[-1], modules)
        if config.attn_matmul:
            self._wrap_attention(modules)
        self.unit_of_layer = {n: g.unit for g in self.groups for n in g.layers}
        quantized_units = set(self.unit_of_layer.values())
        self.unit_order = [u for u in self.unit_order if u in quantized_units]  # a float-only unit has nothing to train

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def _bits(self, layer: str) -> tuple[int, int]:
        if layer in (self.family.input_layer, self.family.output_layer) and self.config.first_last_bits:
            return self.config.first_last_bits, self.config.first_last_bits
        return self.config.weight_bits, self.config.act_bits

    def _wrap_group(self, group: InputGroup, modules: dict[str, nn.Module]) -> None:
        first = modules[group.layers[0]]
        conv = isinstance(first, nn.Conv2d)
        w_bits, a_bits = self._bits(group.layers[0])
        q = TimestepActQuantizer(self.ctx, self.config.table_rows, a_bits, self.config.symmetric,
                                 channels=first.weight.shape[1], channel_dim=1 if conv else -1, fmt=self.config.format)
        self.act_quantizers[group.key] = q
        for name in group.layers:
            src = modules[name]
            if isinstance(src, nn.Conv2d):
                if src.groups != 1 or src.padding_mode != "zeros" or isinstance(src.padding, str):
                    raise UserError(f"unsupported layer {name}: grouped convs, non-zero or string padding cannot be quantized")
                new = QuantConv2d(src, w_bits, q, self.config.format)
            else:
                new = QuantLinear(src, w_bits, q, self.config.format)
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else self.unet, attr, new)

    def _wrap_attention(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            if isinstance(m, Attention):
                qs = []
                for part in "qkvp":
                    q = TimestepActQuantizer(self.ctx, self.config.table_rows, self.config.act_bits,
                                             self.config.symmetric, heads=m.heads, fmt=self.config.format)
                    self.act_quantizers[f"{name.replace('.', '/')}/attn_{part}"] = q
                    qs.append(q)
                m.set_processor(QuantAttnProcessor(*qs))

    # ---- modes -----------------------------------------------------------------------------
    def layers(self) -> dict[str, QuantLayer]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, QuantLayer)}

    def set_quant(self, weights: bool, acts: str) -> None:
        """acts: off | observe | quant."""
        for layer in self.layers().values():
            layer.weight_quantizer.enabled = weights
        for q in self.act_quantizers.values():
            q.mode = acts

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, t_index: torch.Tensor,
                cond: ConditionLike = None) -> torch.Tensor:
        t_index = torch.as_tensor(t_index, dtype=torch.long).reshape(-1)
        if len(t_index) == 1 and sample.shape[0] > 1:
            t_index = t_index.expand(sample.shape[0])
        if t_index.min() < 0 or t_index.max() >= self.config.num_steps:
            raise UserError(f"t_index out of range: got {t_index.tolist()}, this model is calibrated for "
                            f"0..{self.config.num_steps - 1} ({self.config.num_steps} steps)")
        self.ctx.t_index = t_index
        try:
            return self.family.predict(self.unet, sample, timestep, cond)
        finally:
            self.ctx.t_index = None

    def predictor(self):
        """This model as a sampling.NoisePredictor."""

        @torch.no_grad()
        def predict(x, timestep, t_index, cond=None):
            return self(x, timestep, t_index, cond)

        return predict


QuantUNet = QuantDenoiser  # the name every UNet-era caller and test uses
