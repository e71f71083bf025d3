"""TensorRT-style QDQ graph -> ONNX Runtime integer graph (`dq-export --target ort`), exactly.

ORT's CPU provider fuses Q/DQ into integer kernels only when a Q follows the op (QLinearConv), which
would re-quantize the output: the per-timestep scales would no longer be exact. What it does run fast
and exactly is an 8-bit GEMM with int32 accumulation (MLAS, weights pre-packed) behind MatMulInteger /
MatMulIntegerToFloat. ConvInteger is exact too but slower than FP32 Conv in ORT 1.32 (no weight
pre-packing; measured), so convolutions become im2col + the integer GEMM. Both operands are uint8 (the
weights shifted by 128, zero point 128): MLAS's uint8 x int8 kernel for x86 CPUs without VNNI (AVX2 only)
sums product pairs in saturating int16 and is wrong by up to millions on such CPUs (seen on an AMD EPYC
without AVX-512: every element of a K=576 GEMM off), while uint8 x uint8 is exact on every CPU.

Pattern (fold.py's deployment form; the t_index Muls/Adds around it are left alone):

    u -> QuantizeLinear(1, 0, int8) -> DequantizeLinear(1, 0) -> Conv|MatMul(., DequantizeLinear(W_int8, s))

Replacement (s: per-output-channel weight scale, 1 for the unit-scale weights of asymmetric layers):

    MatMul: Q(u, 1, 128, uint8) -> MatMulIntegerToFloat(., W_int8 + 128, a_scale 1, b_scale s, a_zp 128, b_zp 128)
    Conv:   Q(u, 1, 128, uint8) -> Transpose(NHWC) -> Pad(128) -> k*k strided Slices -> Concat (im2col)
            -> MatMulIntegerToFloat(., W_col + 128 [k*k*Cin, Cout], 1, s, 128, 128) -> Transpose(NCHW)

Q(u, 1, 128, uint8) - 128 == Q(u, 1, 0, int8) for every u, and padding with the zero point 128 is
padding with 0, so the integer sums equal the TensorRT graph's; MatMulIntegerToFloat (ORT's
com.microsoft op) multiplies the int32 sum by 1 * s once (s: the weight-scale Mul that follows a
symmetric layer, taken into b_scale). The 8-bit clip (Max/Min to [-128, 127]) before the Q is dropped:
the uint8 Q saturates to exactly that range.

Layers too narrow for the integer GEMM stay float. A symmetric one loses its per-timestep elementwise
chain (x * mult[t] -> Clip -> Q -> DQ -> op -> * w_scale -> * delta[t] + bias: six passes over the
activation) to ONNX's per-axis Q/DQ with scales gathered by t_index, the bias fused into the Conv:

    Flatten(x) [B*C, H*W] -> Q(., 1 / mult[t, c], 128) -> DQ(., delta[t], 128, axis 0) -> Conv(., W_int * w_scale, bias)

The same function; values move by float rounding (a division for a multiplication in the Q, the step
size applied before the sum instead of after).

How it matches: the layer structure is an onnxscript rewriter `Pattern` (LAYER_PATTERNS), matched only; its
constants are checked by `_integer_layer`. Every Conv/MatMul that reads a dequantized weight but does not match
is listed with the reason in the stats ("unmatched"), as is every float-kept layer whose rescale chain is not
fused ("epilogue_not_fused"). The rewrite is not a `RewriteRule`: which layers go integer depends on sizes over
the whole graph (OrtConfig), and the replacement is shared between layers (one uint8 Q per original Q, read by
the q/k/v projections of one input), which a per-match replacement cannot express and the rewriter's check
that matched values have no reader outside the match would refuse. The chain after the op (`match_epilogue`:
either operand order of two Muls, an optional Reshape, an optional bias Add, each the only reader of the one
before) and the optional 8-bit clip (`_unclipped`: Max/Min in either order) stay short walks over producers and
uses: as patterns they would be eight and two variants.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter import pattern

from .onnx_files import load_onnx, save_model

ZERO = 128   # uint8 zero point standing for the int8 grid's 0
INT64_MAX = np.iinfo(np.int64).max
MS_DOMAIN = "com.microsoft"


@dataclass
class OrtConfig:
    """Which layers are worth the integer path.

    A narrow layer (the default models' 32-64 channels) runs faster as one FP32 Conv on ORT's NCHWc
    kernels than as the transposes and im2col around an int8 GEMM; SD-width layers (320-1280) run
    2-5x faster integer (measured on 2 AVX512-VNNI cores, batch 8). Layers under min_reduction
    (k*k*Cin, the GEMM's K) or min_out_channels stay float, with their weight DQ folded into a float
    initializer (the same float values DQ computes) so ORT pre-packs them like an FP32 model's.
    """
    min_reduction: int = 256
    min_out_channels: int = 128
    convs: bool = True
    matmuls: bool = True


@dataclass
class IntegerLayer:
    """One match: op(DQ(Q(u, 1, 0)), DQ(W_int8, scale)) with the integer weight and its scale."""
    op: ir.Node
    quant: ir.Node
    source: ir.Value              # what the new uint8 Q reads: u, or u before a clip the Q's saturation repeats
    weight: np.ndarray            # int8, as stored (Conv [O, C, kh, kw]; MatMul [K, N])
    scale: np.ndarray | None      # per output channel, None when it is 1 everywhere
    bias: np.ndarray | None       # a Conv's constant bias input (the exporter shares a zero one), None if 0

    @property
    def reduction(self) -> int:
        return int(np.prod(self.weight.shape[1:])) if self.op.op_type == "Conv" else self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.op.op_type == "Conv" else self.weight.shape[1]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _unit(scale: ir.Value, zero_point: ir.Value) -> bool:
    """The constant scale 1 and int8 zero point 0 of fold.py's activation grid."""
    scale, zp = _const(scale), _const(zero_point)
    return (scale is not None and zp is not None and scale.size == 1 and float(scale.reshape(-1)[0]) == 1.0
            and zp.dtype == np.int8 and zp.size == 1 and int(zp.reshape(-1)[0]) == 0)


def _quantized_layer(op_type: str) -> pattern.Pattern:
    """op(DQ(Q(u, s, z), s, z), DQ(W, s_w[, z_w])): the structure; `_integer_layer` checks the constants."""

    def target(op, u, q_scale, q_zp, dq_scale, dq_zp, weight, w_scale):
        levels = op.QuantizeLinear(u, q_scale, q_zp, _outputs=["levels"])
        x = op.DequantizeLinear(levels, dq_scale, dq_zp)
        w = op.DequantizeLinear(weight, w_scale, _allow_other_inputs=True, _outputs=["w_float"])
        return getattr(op, op_type)(x, w, _allow_other_inputs=True)

    return pattern.Pattern(target, name=f"unit-grid quantized {op_type}")


LAYER_PATTERNS = {op_type: _quantized_layer(op_type) for op_type in ("Conv", "MatMul")}


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}->{node.outputs[0].name}"


def is_quantized(op: ir.Node) -> bool:
    """A Conv/MatMul reading a dequantized weight: a quantized layer, whether this pass can take it or not."""
    w = op.inputs[1] if op.op_type in LAYER_PATTERNS and op.domain in ("", "ai.onnx") and len(op.inputs) > 1 else None
    return w is not None and w.producer() is not None and w.producer().op_type == "DequantizeLinear"


def match(model: ir.Model, op: ir.Node) -> IntegerLayer | str:
    """The declared pattern around a quantized layer (`is_quantized`), or why it does not match."""
    tracer = pattern.MatchingTracer()
    rule = LAYER_PATTERNS[op.op_type]
    found = rule.match(model, op.graph, op, check_nodes_are_removable=False, tracer=tracer)
    if not found:
        tried = tracer.best_matches_map.get(rule)
        return f"not {rule.name}: {tried[0].match_result.reason if tried else 'no Q/DQ around it'}"
    return _integer_layer(op, **found.bindings)


def _integer_layer(op: ir.Node, u, q_scale, q_zp, dq_scale, dq_zp, weight, w_scale, w_float, levels,
                   **_) -> IntegerLayer | str:
    """The constants of a structural match: unit activation grid, int8 weight, zero weight zero point, per-channel
    scale on the output axis; a plain Conv (no groups, dilation or auto_pad)."""
    if op.op_type == "Conv" and (_attr(op, "group", 1) != 1 or any(d != 1 for d in _attr(op, "dilations", [1, 1]))
                                 or _attr(op, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")):
        return "a grouped, dilated or auto-padded Conv"
    if not (_unit(q_scale, q_zp) and _unit(dq_scale, dq_zp)):
        return "its activation Q/DQ is not the unit int8 grid (scale 1, zero point 0)"
    w_dq = w_float.producer()
    if _attr(w_dq, "block_size", 0):
        return "block-quantized (INT4) weights"
    w, scale = _const(weight), _const(w_scale)
    zp = _const(w_dq.inputs[2]) if len(w_dq.inputs) > 2 and w_dq.inputs[2] is not None else None
    if w is None or w.dtype != np.int8 or scale is None or (zp is not None and np.any(zp != 0)):
        return "its weight is not a constant int8 tensor with a constant scale and zero point 0"
    if w.ndim != (4 if op.op_type == "Conv" else 2):
        return f"a {w.ndim}-D weight"
    out_axis = 0 if op.op_type == "Conv" else 1
    if scale.size == 1:
        scale = np.full(w.shape[out_axis], float(scale.reshape(-1)[0]), np.float32)
    elif _attr(w_dq, "axis", 1) != out_axis or scale.size != w.shape[out_axis]:
        return "its weight scale is not per output channel"
    scale = scale.astype(np.float32).reshape(-1)
    bias = None
    if op.op_type == "Conv" and len(op.inputs) > 2 and op.inputs[2] is not None:
        bias = _const(op.inputs[2])
        if bias is None:
            return "a bias computed at run time"
        bias = None if np.all(bias == 0) else bias.astype(np.float32).reshape(-1)
    quant = levels.producer()
    return IntegerLayer(op, quant, _unclipped(u), w, None if np.all(scale == 1.0) else scale, bias)


def _unclipped(u: ir.Value) -> ir.Value:
    """Min(Max(v, -128), 127) (either order) -> v: uint8 Q(., 1, 128) saturates to the same grid."""
    outer = u.producer()
    if outer is None or outer.op_type not in ("Min", "Max") or len(outer.inputs) != 2:
        return u
    inner = outer.inputs[0].producer()
    if inner is None or {outer.op_type, inner.op_type} != {"Min", "Max"} or len(inner.inputs) != 2:
        return u
    bounds = {n.op_type: _const(n.inputs[1]) for n in (outer, inner)}
    if any(b is None or b.size != 1 for b in bounds.values()):
        return u
    if float(bounds["Max"].reshape(-1)[0]) == -128.0 and float(bounds["Min"].reshape(-1)[0]) == 127.0:
        return inner.inputs[0]
    return u


class _Builder:
    """Adds nodes before an anchor node and constants as initializers, with readable unique names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph, self.count = graph, 0

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        self.count += 1
        v = ir.Value(name=f"ort_int/{name}_{self.count}", const_value=ir.tensor(array, name=f"ort_int/{name}_{self.count}"))
        self.graph.register_initializer(v)
        return v

    def node(self, anchor: ir.Node, op_type: str, inputs, name: str, domain: str = "", **attrs) -> ir.Value:
        self.count += 1
        n = ir.Node(domain, op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                    name=f"ort_int/{name}_{self.count}")
        n.outputs[0].name = f"ort_int/{name}_{self.count}_out"
        self.graph.insert_before(anchor, n)
        return n.outputs[0]


def _uint8_input(b: _Builder, layer: IntegerLayer, cache: dict) -> ir.Value:
    """Q(u, 1, 128, uint8), one per original Q node (layers sharing an input share it)."""
    key = ("u8", id(layer.quant))
    if key not in cache:
        cache[key] = b.node(layer.quant, "QuantizeLinear", [layer.source, cache["one"], cache["zp"]], "quantize_u8")
    return cache[key]


def _nhwc_input(b: _Builder, layer: IntegerLayer, cache: dict) -> ir.Value:
    key = ("nhwc", id(layer.quant))
    if key not in cache:
        cache[key] = b.node(layer.quant, "Transpose", [_uint8_input(b, layer, cache)], "to_nhwc", perm=[0, 2, 3, 1])
    return cache[key]


def _im2col(b: _Builder, layer: IntegerLayer, x: ir.Value, anchor: ir.Node) -> ir.Value:
    """NHWC uint8 [B, H, W, C] -> [B, Ho, Wo, kh*kw*C] (kernel offset major, channel minor)."""
    _, _, kh, kw = layer.weight.shape
    sh, sw = _attr(layer.op, "strides", [1, 1])
    pt, pl, pb, pr = _attr(layer.op, "pads", [0, 0, 0, 0])
    if any((pt, pl, pb, pr)):
        pads = b.const("pads", np.array([0, pt, pl, 0, 0, pb, pr, 0], np.int64))
        x = b.node(anchor, "Pad", [x, pads, b.const("pad_value", np.array(ZERO, np.uint8))], "pad_zero_point")
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return x
    axes, steps = b.const("axes", np.array([1, 2], np.int64)), b.const("steps", np.array([sh, sw], np.int64))
    cols = []
    for ky in range(kh):
        for kx in range(kw):
            # from the offset to (padded size - the rest of the kernel): exactly Ho (Wo) strided positions
            ends = [-(kh - 1 - ky) or INT64_MAX, -(kw - 1 - kx) or INT64_MAX]
            cols.append(b.node(anchor, "Slice", [x, b.const("starts", np.array([ky, kx], np.int64)),
                                                 b.const("ends", np.array(ends, np.int64)), axes, steps], "im2col_slice"))
    return cols[0] if len(cols) == 1 else b.node(anchor, "Concat", cols, "im2col", axis=3)


def rewrite_layer(b: _Builder, layer: IntegerLayer, cache: dict) -> None:
    op = layer.op
    if op.op_type == "Conv":
        x = _im2col(b, layer, _nhwc_input(b, layer, cache), op)
        w = np.ascontiguousarray(layer.weight.transpose(2, 3, 1, 0).reshape(-1, layer.weight.shape[0]))
    else:
        x, w = _uint8_input(b, layer, cache), layer.weight
    scale = np.ones(1, np.float32) if layer.scale is None else layer.scale
    scale_mul = _weight_scale_mul(layer) if layer.scale is None and layer.bias is None else None
    if scale_mul is not None:  # int32 sum * (1 * s) is the sum * 1, then * s: the Mul's own values, one pass fewer
        scale = scale_mul[1]
        ir.convenience.replace_all_uses_with(scale_mul[0].outputs[0], op.outputs[0])
    w_u8 = (w.astype(np.int16) + ZERO).astype(np.uint8)  # uint8 x uint8: exact without VNNI too (module doc)
    ins = [x, b.const("weight_u8", w_u8), cache["one"], b.const("weight_scale", scale), cache["zp"], cache["zp"]]
    if layer.bias is not None:
        ins.append(b.const("bias", layer.bias))
    y = b.node(op, "MatMulIntegerToFloat", ins, "matmul_integer", domain=MS_DOMAIN)
    if op.op_type == "Conv":
        y = b.node(op, "Transpose", [y], "to_nchw", perm=[0, 3, 1, 2])
    ir.convenience.replace_all_uses_with(op.outputs[0], y)
    if op.outputs[0].is_graph_output():
        raise ValueError(f"{op.name}: a quantized layer's raw output is a graph output; not a fold.py graph")
    op.graph.remove(op, safe=True)


def fold_weight(b: _Builder, layer: IntegerLayer, scale: np.ndarray | None = None) -> None:
    """A float-kept layer reads W * s as a constant (s: the weight DQ's scale, or the Mul after the op)."""
    scale = layer.scale if scale is None else scale
    w = layer.weight.astype(np.float32)
    if scale is not None:
        w = w * scale.reshape((-1, 1, 1, 1) if layer.op.op_type == "Conv" else (1, -1))
    layer.op.replace_input_with(1, b.const("weight_float", w))


def round_activation(b: _Builder, layer: IntegerLayer, cache: dict) -> None:
    """Clip(-128, 127) -> Q(1, 0) -> DQ(1, 0) of a float-kept layer is Round(Clip(u)): 2 passes, not 4.

    ONNX Round is round-half-to-even like QuantizeLinear, so the values are identical.
    """
    if layer.source is layer.quant.inputs[0]:
        return  # not the 8-bit clip: leave the Q/DQ pair
    key = ("round", id(layer.quant))
    if key not in cache:
        lo, hi = b.const("clip_lo", np.array(-128.0, np.float32)), b.const("clip_hi", np.array(127.0, np.float32))
        clipped = b.node(layer.quant, "Clip", [layer.source, lo, hi], "clip_int8")
        cache[key] = b.node(layer.quant, "Round", [clipped], "round_half_even")
    layer.op.replace_input_with(0, cache[key])


@dataclass
class StepEpilogue:
    """fold.py's rescale chain after a symmetric layer: op -> Mul(w_scale) -> Mul(delta[t]) [-> Add(bias)]."""
    last: ir.Node                 # the node whose output the chain ends in
    w_scale: np.ndarray           # [Cout]
    delta_table: ir.Value         # [T, 1]: one step size per t_index
    t_index: ir.Value             # the (clamped) indices the original Gather used
    bias: np.ndarray | None


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    return users[0].node if len(users) == 1 and not value.is_graph_output() else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _weight_scale_mul(layer: IntegerLayer) -> tuple[ir.Node, np.ndarray] | None:
    """fold.py's per-channel weight-scale Mul right after the op, with its [Cout] values."""
    y = layer.op.outputs[0]
    scale_mul = _single_consumer(y)
    w_scale = _const(_other_input(scale_mul, y)) if scale_mul and scale_mul.op_type == "Mul" else None
    if w_scale is None or w_scale.size != layer.out_channels:
        return None
    return scale_mul, w_scale.astype(np.float32).reshape(-1)


def match_epilogue(layer: IntegerLayer) -> StepEpilogue | str:
    """The declared chain after a symmetric layer, or why it is not that chain (asymmetric, per-head, ...)."""
    found = _weight_scale_mul(layer)
    if found is None:
        return "no per-channel weight-scale Mul as the only reader of its output"
    scale_mul, w_scale = found
    delta_mul = _single_consumer(scale_mul.outputs[0])
    rows = _other_input(delta_mul, scale_mul.outputs[0]) if delta_mul else None
    found = _gathered_rows(rows) if rows is not None else None
    if found is None:
        return "its weight-scale Mul is not followed by a Mul of step sizes gathered by t_index"
    if found[1].shape[1] != 1:
        return "one step size per head, not per t_index"
    last, bias = delta_mul, None
    add = _single_consumer(delta_mul.outputs[0])
    bias_value = _other_input(add, delta_mul.outputs[0]) if add is not None else None
    if bias_value is not None and (c := _const(bias_value)) is not None and c.size == layer.out_channels:
        last, bias = add, c.astype(np.float32).reshape(-1)
    if last.outputs[0].is_graph_output():
        return "its chain ends in the graph output (kept as exported)"
    table, _, t = found
    return StepEpilogue(last, w_scale, table, t, bias)


def fuse_epilogue(b: _Builder, layer: IntegerLayer, epi: StepEpilogue, cache: dict) -> None:
    """A float-kept symmetric layer, its rescale chain moved into one per-sample DequantizeLinear.

        Q(u, 1, 128, uint8) -> DQ(., delta[t], 128, axis 0) -> Conv(., W_int * w_scale, bias) | MatMul(...) + bias

    (convs also take u's multiply into the Q: _per_channel_quantize). delta[t] * w_scale multiply before
    the op's sum instead of after it, the same value up to float rounding, and ORT fuses the bias into
    the Conv.
    """
    key = ("per_sample_dq", id(layer.quant), epi.delta_table.name)
    if key not in cache:
        # uint8 with a per-sample zero point vector: ORT's QDQS8ToU8Transformer breaks an int8 per-axis DQ
        zp_key = ("zp_per_sample", epi.t_index.name)
        if zp_key not in cache:
            batch = b.node(layer.quant, "Shape", [epi.t_index], "batch_size")
            cache[zp_key] = b.node(layer.quant, "Expand", [cache["zp_1d"], batch],
                                   "zero_points")
        rows = b.node(layer.quant, "Gather", [epi.delta_table, epi.t_index], "step_size_rows", axis=0)
        delta = b.node(layer.quant, "Reshape", [rows, cache["flat"]], "step_size")
        q = _per_channel_quantize(b, layer, cache) if layer.op.op_type == "Conv" else None
        cache[key] = b.node(layer.op, "DequantizeLinear", [q or _uint8_input(b, layer, cache), delta, cache[zp_key]],
                            "dequantize_per_sample", axis=0)
    conv = layer.op.op_type == "Conv"
    fold_weight(b, layer, epi.w_scale)
    layer.op.replace_input_with(0, cache[key])
    out = layer.op.outputs[0]
    if epi.bias is not None and conv:
        if len(layer.op.inputs) < 3:
            layer.op.resize_inputs(3)
        layer.op.replace_input_with(2, b.const("bias", epi.bias))
    elif epi.bias is not None:
        out = b.node(epi.last, "Add", [out, b.const("bias", epi.bias)], "bias")
    ir.convenience.replace_all_uses_with(epi.last.outputs[0], out)


def _gathered_rows(value: ir.Value) -> tuple[ir.Value, np.ndarray, ir.Value] | None:
    """value = [Reshape](Gather(table, t)) with a constant 2-D table: (table, its values, t)."""
    g = value.producer()
    if g is not None and g.op_type == "Reshape":  # [B, 1] rows reshaped to broadcast; [B, C] used as is
        g = g.inputs[0].producer()
    if g is None or g.op_type != "Gather" or _attr(g, "axis", 0) != 0:
        return None
    table = _const(g.inputs[0])
    return None if table is None or table.ndim != 2 else (g.inputs[0], table, g.inputs[1])


def _per_channel_quantize(b: _Builder, layer: IntegerLayer, cache: dict) -> ir.Value | None:
    """u = x * mult[t, c] -> Q(u, 1, 128) as one Q of x with a per-(sample, channel) scale 1 / mult[t, c].

    NCHW x flattens to [B*C, H*W] without a copy, so ONNX's per-axis Q (axis 0) carries a scale for each
    sample and channel: the multiply pass goes. round(x / (1 / m)) can differ from round(x * m) in a last
    bit at a rounding tie: the same float-level difference as any other kernel. 8-bit activations only
    (the uint8 Q's saturation is their clip).
    """
    if layer.source is layer.quant.inputs[0]:
        return None
    key = ("per_channel_q", id(layer.quant))
    if key in cache:
        return cache[key]
    mul = layer.source.producer()
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for x, rows in (mul.inputs, mul.inputs[::-1]):
        found = _gathered_rows(rows)
        if found is not None and x.shape is not None and len(x.shape) == 4 and isinstance(x.shape[1], int):
            break
    else:
        return None
    _, table, t = found
    anchor = layer.quant
    flat = b.node(anchor, "Flatten", [x], "flatten_channels", axis=2)
    inv = b.node(anchor, "Gather", [b.const("step_per_channel", (1.0 / table).astype(np.float32)), t], "q_scale_rows",
                 axis=0)
    if table.shape[1] == 1:  # one value per sample: repeat it over the channels
        channels = b.const("channels", np.array([1, x.shape[1]], np.int64))
        inv = b.node(anchor, "Tile", [inv, channels], "q_scale_tile")
    scale = b.node(anchor, "Reshape", [inv, cache["flat"]], "q_scale")
    zp = b.node(anchor, "Expand", [cache["zp_1d"],
                                   b.node(anchor, "Shape", [scale], "q_scale_size")], "q_zero_points")
    q = b.node(anchor, "QuantizeLinear", [flat, scale, zp], "quantize_per_channel", axis=0)
    cache[key] = b.node(anchor, "Reshape", [q, b.node(anchor, "Shape", [x], "input_shape")], "unflatten")
    return cache[key]


def to_ort(model: onnx.ModelProto, cfg: OrtConfig | None = None) -> tuple[onnx.ModelProto, dict]:
    """The ORT-integer rewrite of a TensorRT-style QDQ model; returns the model and counts."""
    cfg = cfg or OrtConfig()
    m = ir.serde.deserialize_model(model)
    g = m.graph
    b = _Builder(g)
    cache = {"zp": b.const("zero_point", np.array(ZERO, np.uint8)), "one": b.const("one", np.array(1.0, np.float32)),
             "zp_1d": b.const("zp_u8", np.array([ZERO], np.uint8)), "flat": b.const("flat", np.array([-1], np.int64))}
    m.opset_imports[MS_DOMAIN] = 1
    found = {n: match(m, n) for n in list(g) if is_quantized(n)}
    layers = [la for la in found.values() if isinstance(la, IntegerLayer)]
    unmatched = {_label(n): reason for n, reason in found.items() if isinstance(reason, str)}
    taken = [la for la in layers
             if (cfg.convs if la.op.op_type == "Conv" else cfg.matmuls)
             and la.reduction >= cfg.min_reduction and la.out_channels >= cfg.min_out_channels]
    for layer in taken:
        rewrite_layer(b, layer, cache)
    fused, not_fused = 0, {}
    for layer in layers:
        if all(layer is not t for t in taken):
            epi = match_epilogue(layer) if layer.scale is None and layer.bias is None else None
            if isinstance(epi, StepEpilogue):
                fuse_epilogue(b, layer, epi, cache)
                fused += 1
                continue
            if epi is not None:
                not_fused[_label(layer.op)] = epi
            fold_weight(b, layer)
            round_activation(b, layer, cache)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass() if hasattr(common, "RemoveUnusedOpsetsPass") else None):
        if p is not None:
            p(m)
    out = ir.serde.serialize_model(m)
    kept = [e for e in out.metadata_props if e.key != "dilatequant.target"]
    del out.metadata_props[:]
    out.metadata_props.extend(kept + [onnx.StringStringEntryProto(key="dilatequant.target", value="ort")])
    if not taken:
        m.opset_imports.pop(MS_DOMAIN, None)
    stats = {"matched": len(layers), "integer_convs": sum(la.op.op_type == "Conv" for la in taken),
             "integer_matmuls": sum(la.op.op_type == "MatMul" for la in taken), "float_kept": len(layers) - len(taken),
             "float_kept_fused_epilogue": fused, "unmatched": unmatched, "epilogue_not_fused": not_fused,
             "config": {"min_reduction": cfg.min_reduction, "min_out_channels": cfg.min_out_channels}}
    return out, stats


def convert_file(src: str | Path, dst: str | Path, cfg: OrtConfig | None = None) -> dict:
    """Rewrite src (a dq-export graph) into dst; dst may equal src (src is read whole, external data included,
    before dst is written: onnx_files.save_model replaces both files, data first)."""
    model, stats = to_ort(load_onnx(src), cfg)
    written = save_model(model, dst)
    return {**stats, "bytes": written["bytes"], "external_data": written["external_data"]}
