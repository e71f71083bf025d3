"""TensorRT explicit-quantization rules, checked on the ONNX graph before any engine build.

Each rule names the node and what to change; `check_graph` returns every violation so one run shows
them all. These are the rules TensorRT 11 enforces (deployment.md) plus strong typing. The Q/DQ rules
follow what onnx-tensorrt's QuantDequantLinearHelper does, where it differs from ONNX: without a zero
point it quantizes to INT8 (ONNX: UINT8), it infers blocks from the scale's shape and needs them to
divide the weight exactly (ONNX rounds up), and a 1-D scale must have one value per channel of `axis`,
whose ONNX default is 1 (the input channels of a Conv weight, not its output channels).

FP8: TensorRT quantizes to FLOAT8E4M3FN only (not E5M2 or the FNUZ variants), needs opset 19 or later for FP8
types, and its parser does not check an FP8 zero point at all (it is ignored: a non-zero one builds and computes
something else than ONNX), so this checker does; a convolution or GEMM must read activation and weight of one
quantized type (an FP8 activation with an INT8 or INT4 weight has no kernel). FP8 convolutions and GEMMs need
compute capability 8.9 or newer: a dilatequant FP8 graph must say so in its metadata.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import UserError
from .export_config import FP8_MIN_COMPUTE_CAPABILITY
from .onnx_files import load_model, tensor_array, without_weights

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
FORBIDDEN = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
OPSET_RANGE = (13, 25)  # opset 13 brings per-channel Q/DQ (axis); TensorRT 11's ONNX parser reads up to 25
INTEGER_QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4}
FP8 = onnx.TensorProto.FLOAT8E4M3FN
QUANT_TYPES = INTEGER_QUANT_TYPES | {FP8}  # what TensorRT quantizes to on a GPU
OTHER_FP8_TYPES = {onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2FNUZ}
FP8_MIN_OPSET = 19  # ONNX's FP8 types
FOUR_BIT_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
CHANNEL_OPS = ("Conv", "Gemm", "MatMul")  # ops whose constant weight may carry a per-channel scale
# inputs whose float type legitimately differs from the data input (ONNX typing, not precision)
MIXED_TYPE_INPUTS = {"Resize": {1, 2}, "DequantizeLinear": {0, 1, 2}, "QuantizeLinear": {2}, "Cast": set(),
                     "CastLike": {1}, "ConstantOfShape": set()}


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] node '{self.node}': {self.detail}"


class TrtRuleError(UserError):
    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        shown = "; ".join(str(v) for v in violations[:5])
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        super().__init__(f"graph breaks TensorRT rules: {shown}{more}")


class _Constants(Mapping):
    """Initializer and Constant values by name, read on first use: the rules look at scales and zero points,
    so the weights of a multi-GB graph (in its external-data file, beside the graph in base_dir) stay on disk."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | Path | None) -> None:
        self._tensors = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self._tensors[n.output[0]] = a.t
        self._base_dir, self._values = base_dir, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = tensor_array(self._tensors[name], self._base_dir)
        return self._values[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _constants(model: onnx.ModelProto, base_dir: str | Path | None = None) -> Mapping[str, np.ndarray]:
    return _Constants(model, base_dir)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    # inferred on a weightless copy: shape inference serializes the model, which fails past 2 GiB
    inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def check_graph(model: onnx.ModelProto, base_dir: str | Path | None = None) -> list[Violation]:
    """Every violation in `model`; base_dir is the graph's folder when its tensors are in external data."""
    v: list[Violation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        v.append(Violation("opset", "<model>", f"opset {opset} is outside TensorRT 11's supported {OPSET_RANGE}"))
    consts, types = _constants(model, base_dir), _types(model)
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        name = n.name or f"{n.op_type}->{n.output[0]}"
        if n.op_type in FORBIDDEN:
            v.append(Violation("unsupported-op", name, f"{n.op_type} is not supported by TensorRT; use Q/DQ around "
                               "the float op instead"))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            v += _check_qdq(n, name, consts, types, consumers, opset)
            v += _check_zero_point(n, name, consts, types)
        if n.op_type == "QuantizeLinear":
            v += _check_q_feeds_dq(n, name, consumers, graph_outputs)
        v += _check_dtypes(n, name, types)
    v += _check_int4_activations(model, types)
    v += _check_fp8(model, types, opset)
    return v


def _quantized_type(n: onnx.NodeProto, types: dict[str, int]) -> int | None:
    """The type a Q produces or a DQ reads (its zero point's type when the Q names one; ONNX's default: UINT8)."""
    if n.op_type == "DequantizeLinear":
        return types.get(n.input[0])
    zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
    return types.get(zp) if zp else (_attr(n, "output_dtype") or onnx.TensorProto.UINT8)


def _check_fp8(model: onnx.ModelProto, types: dict[str, int], opset: int) -> list[Violation]:
    """FP8 types TensorRT runs (E4M3FN), the opset that has them, one quantized type per conv/GEMM."""
    producers = {o: n for n in model.graph.node for o in n.output}
    v = []
    fp8_nodes = 0
    for n in model.graph.node:
        name = n.name or f"{n.op_type}->{n.output[0]}"
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qt = _quantized_type(n, types)
            if qt in OTHER_FP8_TYPES:
                v.append(Violation("fp8-type", name, f"{onnx.TensorProto.DataType.Name(qt)}: TensorRT quantizes to "
                                   "FLOAT8E4M3FN (E4M3) only"))
            fp8_nodes += qt == FP8
        if n.op_type in CHANNEL_OPS:
            srcs = [producers.get(i) for i in n.input[:2]]
            kinds = {_quantized_type(p, types) for p in srcs if p is not None and p.op_type == "DequantizeLinear"}
            if len(srcs) == 2 and len(kinds) == 2 and FP8 in kinds:
                named = sorted(onnx.TensorProto.DataType.Name(k) for k in kinds if k)
                v.append(Violation("fp8-mixed", name, f"reads {' and '.join(named)} operands; TensorRT's FP8 "
                                   "convolutions and GEMMs take FP8 activations with FP8 weights"))
    if fp8_nodes and opset < FP8_MIN_OPSET:
        v.append(Violation("fp8-opset", "<model>", f"FP8 Q/DQ needs opset {FP8_MIN_OPSET} or later (got {opset})"))
    props = {p.key: p.value for p in model.metadata_props}
    if fp8_nodes and "dilatequant.format_version" in props \
            and props.get("dilatequant.min_compute_capability") != FP8_MIN_COMPUTE_CAPABILITY:
        v.append(Violation("fp8-metadata", "<model>", f"FP8 graph without dilatequant.min_compute_capability "
                           f"{FP8_MIN_COMPUTE_CAPABILITY}: engine builders could target GPUs without FP8 (Ampere); "
                           "re-export it with dq-export"))
    return v


def _check_int4_activations(model: onnx.ModelProto, types: dict[str, int]) -> list[Violation]:
    """TensorRT's INT4 is weight-only (W4A16): an INT4 GEMM's activation must not pass an INT8 Q/DQ (no kernel)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    v = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        srcs = [producers.get(i) for i in n.input[:2]]
        int4 = [k for k, p in enumerate(srcs) if p is not None and p.op_type == "DequantizeLinear"
                and types.get(p.input[0]) == onnx.TensorProto.INT4]
        if int4 and any(p is not None and p.op_type == "DequantizeLinear" and k not in int4 for k, p in enumerate(srcs)):
            name = n.name or f"{n.op_type}->{n.output[0]}"
            v.append(Violation("int4-activation", name, "INT4 weights with an INT8-quantized activation: TensorRT's "
                               "INT4 is weight-only, keep this GEMM's activation float (export with --precision int4)"))
    return v


def _check_qdq(n, name, consts, types, consumers, opset) -> list[Violation]:
    v = []
    scale_name = n.input[1]
    if scale_name not in consts:
        v.append(Violation("constant-scale", name, f"scale '{scale_name}' is computed at run time; TensorRT needs a "
                           "build-time constant (hoist per-timestep factors into Mul nodes)"))
        return v
    scale = consts[scale_name]
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        v.append(Violation("positive-scale", name, f"scale '{scale_name}' has values <= 0 or non-finite "
                           f"(min {scale.min() if scale.size else 'n/a'})"))
    per_channel = scale.size > 1
    block = _attr(n, "block_size") or 0
    if per_channel:
        if _attr(n, "axis") is None and not block:
            v.append(Violation("explicit-axis", name, "per-channel scale without an explicit axis attribute "
                               "(ONNX's default axis 1 is wrong for Conv weights)"))
        if n.op_type == "QuantizeLinear" or n.input[0] not in consts:
            v.append(Violation("per-tensor-activations", name, "per-channel scale on a runtime tensor; "
                               "activations must be per-tensor, per-channel only on constant weights"))
    w = consts.get(n.input[0])
    if n.op_type == "DequantizeLinear" and w is not None and per_channel:
        v += _check_blocks(n, name, w, scale, block) if block else _check_channels(n, name, w, scale, consumers)
    data_type = types.get(n.input[0])
    if n.op_type == "DequantizeLinear" and data_type == onnx.TensorProto.INT4:
        users = consumers.get(n.output[0], [])
        if opset < 21:
            v.append(Violation("int4", name, "INT4 needs opset 21"))
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            v.append(Violation("int4", name, "INT4 weights may only feed MatMul/Gemm (weight-only INT4)"))
        if not block or block <= 0:
            v.append(Violation("int4", name, "INT4 weights need block quantization (block_size > 0)"))
    if n.op_type == "DequantizeLinear" and data_type in FOUR_BIT_TYPES and w is not None and w.ndim:
        if w.shape[-1] % 2:
            v.append(Violation("int4-even", name, f"4-bit weight {list(w.shape)} has an odd last dimension; "
                               "TensorRT packs two 4-bit values per byte: pad the last dimension to an even size"))
    if n.op_type == "QuantizeLinear" and data_type in FLOAT_TYPES and types.get(scale_name) not in (None, data_type):
        v.append(Violation("strong-typing", name, "Q input and scale have different float types"))
    return v


def _channel_axis(n, consumers, w) -> tuple[int, str] | None:
    """The axis a per-channel weight scale must use for the op reading this DQ (Conv [Cout,Cin,kh,kw]: 0; Gemm B:
    0 with transB=1, else 1; MatMul [in, out] initializer: its last axis), or None when no single rule applies."""
    expected = set()
    for u in consumers.get(n.output[0], []):
        if u.op_type not in CHANNEL_OPS or len(u.input) < 2 or u.input[1] != n.output[0]:
            return None
        if u.op_type == "Conv":
            expected.add((0, "Conv weight [Cout, Cin, kh, kw]: output channels are axis 0"))
        elif u.op_type == "Gemm":
            trans_b = bool(_attr(u, "transB") or 0)
            expected.add((0, "Gemm with transB=1 (nn.Linear [out, in]): axis 0") if trans_b
                         else (1, "Gemm with transB=0 ([in, out]): axis 1"))
        else:
            expected.add((w.ndim - 1, f"MatMul weight [in, out]: output channels are axis {w.ndim - 1}"))
    return expected.pop() if len(expected) == 1 else None


def _check_channels(n, name, w, scale, consumers) -> list[Violation]:
    """A per-channel (not blocked) weight scale: 1-D, on the consumer's output-channel axis, one value per channel."""
    v = []
    explicit = _attr(n, "axis")
    axis = 1 if explicit is None else int(explicit)  # ONNX's default axis is 1
    axis = axis + w.ndim if axis < 0 else axis
    want = _channel_axis(n, consumers, w)
    if want is not None and axis != want[0]:
        if explicit is None:
            v.append(Violation("default-axis", name, f"per-channel DequantizeLinear without an axis uses ONNX's default "
                               f"axis 1, but {want[1]}; set axis={want[0]}"))
        else:
            v.append(Violation("channel-axis", name, f"per-channel axis {explicit}, but {want[1]}; set axis={want[0]}"))
    if scale.ndim != 1 or not 0 <= axis < w.ndim or scale.size != w.shape[axis]:
        dim = w.shape[axis] if 0 <= axis < w.ndim else "n/a"
        v.append(Violation("scale-length", name, f"per-channel scale of shape {list(scale.shape)} for weight "
                           f"{list(w.shape)} on axis {axis} ({dim} channels): give a 1-D scale with one value per channel"))
    return v


def _check_blocks(n, name, w, scale, block) -> list[Violation]:
    """Block quantization as TensorRT reads it: the scale has the weight's rank, exactly one axis (the last or the
    second-to-last) is blocked, and the block size divides that axis (ONNX would round the last block up)."""
    v = []
    if scale.ndim != w.ndim:
        return [Violation("block-scale-rank", name, f"block scale of rank {scale.ndim} {list(scale.shape)} for weight "
                          f"{list(w.shape)} of rank {w.ndim}; give the scale the weight's rank")]
    axis = _attr(n, "axis")
    axis = 1 if axis is None else int(axis)
    axis = axis + w.ndim if axis < 0 else axis
    if axis not in (w.ndim - 1, w.ndim - 2) or axis < 0:
        v.append(Violation("block-axis", name, f"blocks along axis {axis} of weight {list(w.shape)}; TensorRT blocks "
                           "only the last or second-to-last axis"))
        return v
    if w.shape[axis] % block:
        v.append(Violation("block-size", name, f"block_size {block} does not divide dimension {axis} of weight "
                           f"{list(w.shape)} ({w.shape[axis]}); TensorRT needs whole blocks: choose a divisor"))
        return v
    want = tuple(w.shape[a] // block if a == axis else w.shape[a] for a in range(w.ndim))
    if tuple(scale.shape) != want:
        v.append(Violation("block-scale-shape", name, f"block scale {list(scale.shape)} for weight {list(w.shape)} "
                           f"with block_size {block} on axis {axis}; expected {list(want)}"))
    return v


def _check_zero_point(n, name, consts, types) -> list[Violation]:
    """A zero point, constant, 0, of the integer type that TensorRT and ONNX both read the same way.

    Without one, ONNX's QuantizeLinear makes UINT8 (levels 0..255) while TensorRT makes INT8 (-128..127). A
    DequantizeLinear of a constant integer weight is exempt: its input's type says what ONNX and TensorRT read.
    """
    zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if zp_name is None:
        weight = n.op_type == "DequantizeLinear" and n.input[0] in consts and types.get(n.input[0]) in QUANT_TYPES
        if weight:
            return []
        what = ("ONNX then quantizes to UINT8 (0..255) but TensorRT to INT8 (-128..127)" if n.op_type == "QuantizeLinear"
                else "ONNX then reads UINT8 levels but TensorRT INT8")
        return [Violation("zero-point-missing", name, f"no zero point: {what}; give an INT8 zero point of 0")]
    if zp_name not in consts:
        return [Violation("zero-point", name, "zero point is not a constant")]
    v = []
    zp_type = types.get(zp_name)
    want = _attr(n, "output_dtype") if n.op_type == "QuantizeLinear" else types.get(n.input[0])
    if zp_type not in QUANT_TYPES | OTHER_FP8_TYPES:  # other FP8 types: the fp8-type rule names them
        zt = onnx.TensorProto.DataType.Name(zp_type) if zp_type else "unknown"
        v.append(Violation("zero-point-type", name, f"zero point of type {zt}; TensorRT quantizes to INT8, INT4 or "
                           "FLOAT8E4M3FN (a UINT8 zero point is read as INT8 on a GPU): give an INT8 zero point of 0"))
    elif want and zp_type != want:
        v.append(Violation("zero-point-type", name, f"zero point of type {onnx.TensorProto.DataType.Name(zp_type)} "
                           f"but the quantized type is {onnx.TensorProto.DataType.Name(want)}; make them the same"))
    if np.any(consts[zp_name].astype(np.float64) != 0):
        extra = " (TensorRT's parser ignores an FP8 zero point: the engine would compute something else)" \
            if zp_type == FP8 else ""
        v.append(Violation("zero-point", name, "zero point is not 0; TensorRT supports symmetric quantization "
                           f"only (shift asymmetric levels before Q instead){extra}"))
    return v


def _check_q_feeds_dq(n, name, consumers, graph_outputs) -> list[Violation]:
    """TensorRT fuses a Q only into the DQ that follows it; any other reader would get integer levels."""
    others = sorted({u.name or u.op_type for u in consumers.get(n.output[0], []) if u.op_type != "DequantizeLinear"})
    if n.output[0] in graph_outputs:
        others.append("<graph output>")
    if others:
        return [Violation("q-feeds-dq", name, f"QuantizeLinear output is read by {', '.join(others)}; a Q may feed "
                          "only DequantizeLinear nodes")]
    return []


def _check_dtypes(n, name, types) -> list[Violation]:
    skip = MIXED_TYPE_INPUTS.get(n.op_type, set())
    floats = {types[i] for k, i in enumerate(n.input) if i and k not in skip and types.get(i) in FLOAT_TYPES}
    if len(floats) > 1:
        names = sorted(onnx.TensorProto.DataType.Name(t) for t in floats)
        return [Violation("strong-typing", name, f"float inputs of mixed types {names}; insert a Cast so every "
                          "float input of a node has one type")]
    return []


def check_file(path: str | Path) -> list[Violation]:
    """The graph's structure only; the few constants the rules read come from its external data on demand."""
    return check_graph(load_model(path, with_data=False), Path(path).parent)


def enforce(model_or_path) -> None:
    violations = check_graph(model_or_path) if isinstance(model_or_path, onnx.ModelProto) else check_file(model_or_path)
    if violations:
        raise TrtRuleError(violations)
