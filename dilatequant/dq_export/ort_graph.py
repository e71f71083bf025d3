"""TensorRT-style QDQ graph -> ONNX Runtime integer graph (`dq-export --target ort`), exactly.

ORT's CPU provider fuses Q/DQ into integer kernels only when a Q follows the op (QLinearConv), which
would re-quantize the output: the per-timestep scales would no longer be exact. What it does run fast
and exactly is MatMulInteger (int32 accumulation, MLAS int8 GEMM with pre-packed constant weights,
AVX512-VNNI where the CPU has it). ConvInteger is exact too but slower than FP32 Conv in ORT 1.32
(no weight pre-packing: see benchmarks/cpu_speed.py), so convolutions become im2col + MatMulInteger.

Pattern (fold.py's deployment form; the t_index Muls/Adds around it are left alone):

    u -> QuantizeLinear(1, 0, int8) -> DequantizeLinear(1, 0) -> Conv|MatMul(., DequantizeLinear(W_int8, s))

Replacement (s: per-output-channel weight scale, dropped when it is the unit scale of asymmetric layers):

    MatMul: Q(u, 1, 128, uint8) -> MatMulInteger(., W_int8, 128) -> Cast(float) -> * s
    Conv:   Q(u, 1, 128, uint8) -> Transpose(NHWC) -> Pad(128) -> k*k strided Slices -> Concat (im2col)
            -> MatMulInteger(., W_col int8 [k*k*Cin, Cout], 128) -> Cast(float) -> * s -> Transpose(NCHW)

Q(u, 1, 128, uint8) - 128 == Q(u, 1, 0, int8) for every u, and padding with the zero point 128 is
padding with 0, so the integer sums equal the TensorRT graph's; only float rounding of the final
products differs (int32 sums, one rounding in Cast, instead of a float accumulation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from ..calibrate.reporting import atomic_write_bytes

ZERO = 128   # uint8 zero point standing for the int8 grid's 0
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class OrtConfig:
    """Which layers are worth the integer path.

    A tiny layer (a few dozen channels) runs faster as one FP32 Conv than as the transposes and
    im2col around an int8 GEMM; min_reduction (k*k*Cin, the GEMM's K) and min_out_channels keep those
    in float. The defaults come from benchmarks/cpu_speed.py.
    """
    min_reduction: int = 0
    min_out_channels: int = 0
    convs: bool = True
    matmuls: bool = True


@dataclass
class IntegerLayer:
    """One match: op(DQ(Q(u, 1, 0)), DQ(W_int8, scale)) with the integer weight and its scale."""
    op: ir.Node
    quant: ir.Node
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


def _unit_qdq(node: ir.Node | None, op_type: str) -> bool:
    """A Q or DQ with the constant scale 1 and int8 zero point 0 (fold.py's activation grid)."""
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return False
    scale, zp = _const(node.inputs[1]), _const(node.inputs[2])
    return (scale is not None and zp is not None and scale.size == 1 and float(scale.reshape(-1)[0]) == 1.0
            and zp.dtype == np.int8 and zp.size == 1 and int(zp.reshape(-1)[0]) == 0)


def match(op: ir.Node) -> IntegerLayer | None:
    """The declared pattern; None when op is not a unit-grid quantized Conv/MatMul this pass can take."""
    if op.op_type not in ("Conv", "MatMul") or op.domain not in ("", "ai.onnx") or len(op.inputs) < 2:
        return None
    if op.op_type == "Conv":
        if _attr(op, "group", 1) != 1 or any(d != 1 for d in _attr(op, "dilations", [1, 1])) \
                or _attr(op, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
    act_dq = op.inputs[0].producer() if op.inputs[0] is not None else None
    if not _unit_qdq(act_dq, "DequantizeLinear"):
        return None
    quant = act_dq.inputs[0].producer()
    if not _unit_qdq(quant, "QuantizeLinear"):
        return None
    w_dq = op.inputs[1].producer()
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or _attr(w_dq, "block_size", 0):
        return None
    weight, scale = _const(w_dq.inputs[0]), _const(w_dq.inputs[1])
    zp = _const(w_dq.inputs[2]) if len(w_dq.inputs) > 2 and w_dq.inputs[2] is not None else None
    if weight is None or weight.dtype != np.int8 or scale is None or (zp is not None and np.any(zp != 0)):
        return None
    if op.op_type == "Conv" and weight.ndim != 4 or op.op_type == "MatMul" and weight.ndim != 2:
        return None
    out_axis = 0 if op.op_type == "Conv" else 1
    if scale.size == 1:
        scale = np.full(weight.shape[out_axis], float(scale.reshape(-1)[0]), np.float32)
    elif _attr(w_dq, "axis", 1) != out_axis or scale.size != weight.shape[out_axis]:
        return None
    scale = scale.astype(np.float32).reshape(-1)
    bias = None
    if op.op_type == "Conv" and len(op.inputs) > 2 and op.inputs[2] is not None:
        bias = _const(op.inputs[2])
        if bias is None:
            return None
        bias = None if np.all(bias == 0) else bias.astype(np.float32).reshape(-1)
    return IntegerLayer(op, quant, weight, None if np.all(scale == 1.0) else scale, bias)


class _Builder:
    """Adds nodes before an anchor node and constants as initializers, with readable unique names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph, self.count = graph, 0

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        self.count += 1
        v = ir.Value(name=f"ort_int/{name}_{self.count}", const_value=ir.tensor(array, name=f"ort_int/{name}_{self.count}"))
        self.graph.register_initializer(v)
        return v

    def node(self, anchor: ir.Node, op_type: str, inputs, name: str, **attrs) -> ir.Value:
        self.count += 1
        n = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                    name=f"ort_int/{name}_{self.count}")
        n.outputs[0].name = f"ort_int/{name}_{self.count}_out"
        self.graph.insert_before(anchor, n)
        return n.outputs[0]


def _uint8_input(b: _Builder, layer: IntegerLayer, cache: dict) -> ir.Value:
    """Q(u, 1, 128, uint8), one per original Q node (layers sharing an input share it)."""
    key = ("u8", id(layer.quant))
    if key not in cache:
        one = b.const("one", np.array(1.0, np.float32))
        cache[key] = b.node(layer.quant, "QuantizeLinear", [layer.quant.inputs[0], one, cache["zp"]], "quantize_u8")
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
    acc = b.node(op, "MatMulInteger", [x, b.const("weight_int8", w), cache["zp"]], "matmul_integer")
    y = b.node(op, "Cast", [acc], "int32_to_float", to=ir.DataType.FLOAT)
    if layer.scale is not None:
        y = b.node(op, "Mul", [y, b.const("weight_scale", layer.scale)], "weight_scale")
    if layer.bias is not None:
        y = b.node(op, "Add", [y, b.const("bias", layer.bias)], "bias")
    if op.op_type == "Conv":
        y = b.node(op, "Transpose", [y], "to_nchw", perm=[0, 3, 1, 2])
    ir.convenience.replace_all_uses_with(op.outputs[0], y)
    if op.outputs[0].is_graph_output():
        raise ValueError(f"{op.name}: a quantized layer's raw output is a graph output; not a fold.py graph")
    op.graph.remove(op, safe=True)


def to_ort(model: onnx.ModelProto, cfg: OrtConfig | None = None) -> tuple[onnx.ModelProto, dict]:
    """The ORT-integer rewrite of a TensorRT-style QDQ model; returns the model and counts."""
    cfg = cfg or OrtConfig()
    m = ir.serde.deserialize_model(model)
    g = m.graph
    b = _Builder(g)
    cache = {"zp": b.const("zero_point", np.array(ZERO, np.uint8))}
    layers = [layer for n in list(g) if (layer := match(n)) is not None]
    taken = [la for la in layers
             if (cfg.convs if la.op.op_type == "Conv" else cfg.matmuls)
             and la.reduction >= cfg.min_reduction and la.out_channels >= cfg.min_out_channels]
    for layer in taken:
        rewrite_layer(b, layer, cache)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass() if hasattr(common, "RemoveUnusedOpsetsPass") else None):
        if p is not None:
            p(m)
    out = ir.serde.serialize_model(m)
    kept = [e for e in out.metadata_props if e.key != "dilatequant.target"]
    del out.metadata_props[:]
    out.metadata_props.extend(kept + [onnx.StringStringEntryProto(key="dilatequant.target", value="ort")])
    stats = {"matched": len(layers), "integer_convs": sum(la.op.op_type == "Conv" for la in taken),
             "integer_matmuls": sum(la.op.op_type == "MatMul" for la in taken), "float_kept": len(layers) - len(taken)}
    return out, stats


def convert_file(src: str | Path, dst: str | Path, cfg: OrtConfig | None = None) -> dict:
    """Rewrite src (a dq-export graph) into dst; dst may equal src."""
    model, stats = to_ort(onnx.load(str(src)), cfg)
    data = model.SerializeToString()
    atomic_write_bytes(dst, data)
    return {**stats, "bytes": len(data)}
