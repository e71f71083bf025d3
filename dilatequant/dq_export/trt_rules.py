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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ..core.errors import UserError
from .onnx_files import read_graph
from .graph_passes import ensure_types

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
FORBIDDEN = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
OPSET_RANGE = (13, 25)  # opset 13 brings per-channel Q/DQ (axis); TensorRT 11's ONNX parser reads up to 25
INTEGER_QUANT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4}
# what TensorRT quantizes to on a GPU (FP8: E4M3FN only, on compute capability 8.9 and newer)
QUANT_TYPES = INTEGER_QUANT_TYPES | {onnx.TensorProto.FLOAT8E4M3FN}
# block quantization: NvInfer.h (11.1) IQuantizeLayer / IDequantizeLayer, "Block quantization is supported for
# input types DataType::kFP4, DataType::kFP8 and DataType::kINT4"
BLOCK_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT4E2M1}
# Quantization Schemes (TensorRT 11): "INT4 quantization requires per-block scales. The supported block sizes
# are {64, 128}."
INT4_BLOCK_SIZES = (64, 128)
BLOCK_OPSET = 21  # DequantizeLinear / QuantizeLinear take block_size (and INT4) from opset 21
# ops that scale, cast or reshape a tensor without computing across it: an activation DQ seen through them
# still feeds the GEMM after them (the export puts Mul(step size) between a DQ and its layer)
PASS_THROUGH = {"Mul", "Div", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
FP8 = onnx.TensorProto.FLOAT8E4M3FN
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


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    """An initializer's or Constant's tensor: its shape and type are known without reading its data."""
    return None if value is None else ir.convenience.get_const_tensor(value)


def _values(value: ir.Value) -> np.ndarray:
    """A constant's values, read on demand: the rules read scales and zero points only, so the weights of a
    multi-GB graph (in its external-data file, beside the graph) stay on disk."""
    t = _const(value)
    if isinstance(t, ir.ExternalTensor) and not t.base_dir:
        raise UserError(f"tensor '{value.name}' is stored in external data, but the graph's folder is unknown; "
                        "check the graph by path (dq-export --check unet.onnx)")
    return t.numpy()


def _dtype(value: ir.Value | None) -> int | None:
    return None if value is None or value.dtype is None else int(value.dtype)


def _name(n: ir.Node) -> str:
    return n.name or f"{n.op_type}->{n.outputs[0].name}"


def _users(value: ir.Value) -> list[ir.Node]:
    return [u.node for u in value.uses()]


def _input(n: ir.Node, k: int) -> ir.Value | None:
    return n.inputs[k] if len(n.inputs) > k else None


def check_graph(model: onnx.ModelProto | ir.Model, base_dir: str | Path | None = None) -> list[Violation]:
    """Every violation in `model`; base_dir is the graph's folder when its tensors are in external data."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, Path(base_dir))
    ensure_types(model)
    v: list[Violation] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        v.append(Violation("opset", "<model>", f"opset {opset} is outside TensorRT 11's supported {OPSET_RANGE}"))
    for n in model.graph:
        name = _name(n)
        if n.op_type in FORBIDDEN:
            v.append(Violation("unsupported-op", name, f"{n.op_type} is not supported by TensorRT; use Q/DQ around "
                               "the float op instead"))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            v += _check_qdq(n, name, opset)
            v += _check_zero_point(n, name)
        if n.op_type == "QuantizeLinear":
            v += _check_q_feeds_dq(n, name)
        v += _check_dtypes(n, name)
    v += _check_int4_activations(model)
    v += check_int4_quantize(model)
    v += check_blocks_supported(model, opset)
    v += _check_fp8(model, opset)
    return v


def check_int4_quantize(model: ir.Model) -> list[Violation]:
    """A QuantizeLinear to INT4 (its zero point's type or output_dtype) quantizes an activation: TensorRT's INT4 is
    weight-only ("INT4 (signed 4-bit integer, weight-only quantization)", Working with Quantized Types)."""
    v = []
    for n in model.graph:
        if n.op_type == "QuantizeLinear" and onnx.TensorProto.INT4 in (_dtype(_input(n, 2)),
                                                                       n.attributes.get_int("output_dtype")):
            v.append(Violation("int4-activation", _name(n), "an activation quantized to INT4: TensorRT's INT4 "
                               "is weight-only (W4A16); quantize activations to INT8 or keep them float"))
    return v


def check_blocks_supported(model: ir.Model, opset: int) -> list[Violation]:
    """Block quantization as TensorRT 11 documents it: only for INT4 / FP8 / FP4 data (NvInfer.h), INT4 blocks of
    64 or 128 (Quantization Schemes), and only in opset 21 graphs (where ONNX defines block_size)."""
    v = []
    for n in model.graph:
        block = n.attributes.get_int("block_size", 0) if n.op_type in ("QuantizeLinear", "DequantizeLinear") else 0
        if not block:
            continue
        name = _name(n)
        if opset < BLOCK_OPSET:
            v.append(Violation("opset", name, f"block_size in an opset {opset} graph; ONNX defines blocked "
                               f"Quantize/DequantizeLinear from opset {BLOCK_OPSET}: export at opset {BLOCK_OPSET}"))
        data = _dtype(n.inputs[0]) if n.op_type == "DequantizeLinear" else \
            (_dtype(_input(n, 2)) or n.attributes.get_int("output_dtype"))
        if data not in BLOCK_TYPES:
            what = onnx.TensorProto.DataType.Name(data) if data else "unknown"
            v.append(Violation("block-type", name, f"{what} blocks; TensorRT blocks INT4, FP8 and FP4 only: quantize "
                               "INT8 weights per channel"))
        elif data == onnx.TensorProto.INT4 and block not in INT4_BLOCK_SIZES:
            v.append(Violation("int4-block-size", name, f"INT4 blocks of {block}; TensorRT supports blocks of "
                               f"{' and '.join(map(str, INT4_BLOCK_SIZES))}: export with int4_block 64 or 128"))
    return v


def _quantized_type(n: ir.Node) -> int | None:
    """The type a Q produces or a DQ reads (its zero point's type when the Q names one; ONNX's default: UINT8)."""
    if n.op_type == "DequantizeLinear":
        return _dtype(n.inputs[0])
    zp = _input(n, 2)
    return _dtype(zp) if zp is not None else n.attributes.get_int("output_dtype", onnx.TensorProto.UINT8)


def _check_fp8(model: ir.Model, opset: int) -> list[Violation]:
    """FP8 types TensorRT runs (E4M3FN), the opset that has them, one quantized type per conv/GEMM. (The compute
    capability an FP8 graph needs, 8.9, is read from its tensor types by engines.tensorrt.targets at build time.)"""
    v = []
    fp8_nodes = 0
    for n in model.graph:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qt = _quantized_type(n)
            if qt in OTHER_FP8_TYPES:
                v.append(Violation("fp8-type", _name(n), f"{onnx.TensorProto.DataType.Name(qt)}: TensorRT quantizes "
                                   "to FLOAT8E4M3FN (E4M3) only"))
            fp8_nodes += qt == FP8
        if n.op_type in CHANNEL_OPS:  # through the Mul(step size) the export puts between a DQ and its layer
            srcs = [_through(i.producer()) if i is not None else None for i in n.inputs[:2]]
            kinds = {_quantized_type(p) for p in srcs if p is not None and p.op_type == "DequantizeLinear"}
            if len(kinds) == 2 and FP8 in kinds:
                named = sorted(onnx.TensorProto.DataType.Name(k) for k in kinds if k)
                v.append(Violation("fp8-mixed", _name(n), f"reads {' and '.join(named)} operands; TensorRT's FP8 "
                                   "convolutions and GEMMs take FP8 activations with FP8 weights"))
    if fp8_nodes and opset < FP8_MIN_OPSET:
        v.append(Violation("fp8-opset", "<model>", f"FP8 Q/DQ needs opset {FP8_MIN_OPSET} or later (got {opset})"))
    return v


def _check_int4_activations(model: ir.Model) -> list[Violation]:
    """TensorRT's INT4 is weight-only (W4A16): an INT4 GEMM's activation must not pass an INT8 Q/DQ (no kernel)."""
    v = []
    for n in model.graph:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        srcs = [_through(i.producer()) if i is not None else None for i in n.inputs[:2]]
        int4 = [k for k, p in enumerate(srcs) if p is not None and p.op_type == "DequantizeLinear"
                and _dtype(p.inputs[0]) == onnx.TensorProto.INT4]
        quantized = [k for k, p in enumerate(srcs) if p is not None and p.op_type == "DequantizeLinear"]
        if int4 and any(k not in int4 for k in quantized):
            v.append(Violation("int4-activation", _name(n), "INT4 weights with a quantized (INT8 or FP8) activation: "
                               "TensorRT's INT4 is weight-only, keep this GEMM's activation float (export with "
                               "--precision int4)"))
    return v


def _through(node: ir.Node | None) -> ir.Node | None:
    """The DequantizeLinear behind `node` when only pass-through ops (scaling, casts, reshapes; any of their inputs)
    separate them, else `node`."""
    frontier, steps = [node], 0
    while frontier and steps < 32:
        cur, steps = frontier.pop(0), steps + 1
        if cur is not None and cur.op_type == "DequantizeLinear":
            return cur
        if cur is not None and cur.op_type in PASS_THROUGH:
            frontier += [i.producer() for i in cur.inputs if i is not None]
    return node


def _check_qdq(n: ir.Node, name: str, opset: int) -> list[Violation]:
    v = []
    scale_value = n.inputs[1]
    scale_name = scale_value.name if scale_value is not None else ""
    if _const(scale_value) is None:
        v.append(Violation("constant-scale", name, f"scale '{scale_name}' is computed at run time; TensorRT needs a "
                           "build-time constant (hoist per-timestep factors into Mul nodes)"))
        return v
    scale = _values(scale_value)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        v.append(Violation("positive-scale", name, f"scale '{scale_name}' has values <= 0 or non-finite "
                           f"(min {scale.min() if scale.size else 'n/a'})"))
    per_channel = scale.size > 1
    block = n.attributes.get_int("block_size", 0)
    weight = _const(n.inputs[0])
    if per_channel:
        if "axis" not in n.attributes and not block:
            v.append(Violation("explicit-axis", name, "per-channel scale without an explicit axis attribute "
                               "(ONNX's default axis 1 is wrong for Conv weights)"))
        if n.op_type == "QuantizeLinear" or weight is None:
            v.append(Violation("per-tensor-activations", name, "per-channel scale on a runtime tensor; "
                               "activations must be per-tensor, per-channel only on constant weights"))
    w = None if weight is None else tuple(weight.shape)  # the weight's shape: its values stay on disk
    if n.op_type == "DequantizeLinear" and w is not None and per_channel:
        v += _check_blocks(n, name, w, scale, block) if block else _check_channels(n, name, w, scale)
    data_type = _dtype(n.inputs[0])
    if n.op_type == "DequantizeLinear" and data_type == onnx.TensorProto.INT4:
        users = _users(n.outputs[0])
        if opset < 21:
            v.append(Violation("int4", name, "INT4 needs opset 21"))
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            v.append(Violation("int4", name, "INT4 weights may only feed MatMul/Gemm (weight-only INT4)"))
        if not block or block <= 0:
            v.append(Violation("int4", name, "INT4 weights need block quantization (block_size > 0)"))
    if n.op_type == "DequantizeLinear" and data_type in FOUR_BIT_TYPES and w is not None and len(w):
        if w[-1] % 2:
            v.append(Violation("int4-even", name, f"4-bit weight {list(w)} has an odd last dimension; "
                               "TensorRT packs two 4-bit values per byte: pad the last dimension to an even size"))
    if n.op_type == "QuantizeLinear" and data_type in FLOAT_TYPES and _dtype(scale_value) not in (None, data_type):
        v.append(Violation("strong-typing", name, "Q input and scale have different float types"))
    return v


def _channel_axis(n: ir.Node, w: tuple[int, ...]) -> tuple[int, str] | None:
    """The axis a per-channel weight scale must use for the op reading this DQ (Conv [Cout,Cin,kh,kw]: 0; Gemm B:
    0 with transB=1, else 1; MatMul [in, out] initializer: its last axis), or None when no single rule applies."""
    expected = set()
    for u in _users(n.outputs[0]):
        if u.op_type not in CHANNEL_OPS or len(u.inputs) < 2 or u.inputs[1] is not n.outputs[0]:
            return None
        if u.op_type == "Conv":
            expected.add((0, "Conv weight [Cout, Cin, kh, kw]: output channels are axis 0"))
        elif u.op_type == "Gemm":
            trans_b = bool(u.attributes.get_int("transB", 0))
            expected.add((0, "Gemm with transB=1 (nn.Linear [out, in]): axis 0") if trans_b
                         else (1, "Gemm with transB=0 ([in, out]): axis 1"))
        else:
            expected.add((len(w) - 1, f"MatMul weight [in, out]: output channels are axis {len(w) - 1}"))
    return expected.pop() if len(expected) == 1 else None


def _check_channels(n: ir.Node, name: str, w: tuple[int, ...], scale: np.ndarray) -> list[Violation]:
    """A per-channel (not blocked) weight scale: 1-D, on the consumer's output-channel axis, one value per channel."""
    v = []
    explicit = n.attributes.get_int("axis")
    axis = 1 if explicit is None else int(explicit)  # ONNX's default axis is 1
    axis = axis + len(w) if axis < 0 else axis
    want = _channel_axis(n, w)
    if want is not None and axis != want[0]:
        if explicit is None:
            v.append(Violation("default-axis", name, f"per-channel DequantizeLinear without an axis uses ONNX's default "
                               f"axis 1, but {want[1]}; set axis={want[0]}"))
        else:
            v.append(Violation("channel-axis", name, f"per-channel axis {explicit}, but {want[1]}; set axis={want[0]}"))
    if scale.ndim != 1 or not 0 <= axis < len(w) or scale.size != w[axis]:
        dim = w[axis] if 0 <= axis < len(w) else "n/a"
        v.append(Violation("scale-length", name, f"per-channel scale of shape {list(scale.shape)} for weight "
                           f"{list(w)} on axis {axis} ({dim} channels): give a 1-D scale with one value per channel"))
    return v


def _check_blocks(n: ir.Node, name: str, w: tuple[int, ...], scale: np.ndarray, block: int) -> list[Violation]:
    """Block quantization as TensorRT reads it: the scale has the weight's rank, exactly one axis (the last or the
    second-to-last) is blocked, and the block size divides that axis (ONNX would round the last block up)."""
    v = []
    rank = len(w)
    if scale.ndim != rank:
        return [Violation("block-scale-rank", name, f"block scale of rank {scale.ndim} {list(scale.shape)} for weight "
                          f"{list(w)} of rank {rank}; give the scale the weight's rank")]
    axis = n.attributes.get_int("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if axis not in (rank - 1, rank - 2) or axis < 0:
        v.append(Violation("block-axis", name, f"blocks along axis {axis} of weight {list(w)}; TensorRT blocks "
                           "only the last or second-to-last axis"))
        return v
    if w[axis] % block:
        v.append(Violation("block-size", name, f"block_size {block} does not divide dimension {axis} of weight "
                           f"{list(w)} ({w[axis]}); TensorRT needs whole blocks: choose a divisor"))
        return v
    want = tuple(w[a] // block if a == axis else w[a] for a in range(rank))
    if tuple(scale.shape) != want:
        v.append(Violation("block-scale-shape", name, f"block scale {list(scale.shape)} for weight {list(w)} "
                           f"with block_size {block} on axis {axis}; expected {list(want)}"))
    return v


def _check_zero_point(n: ir.Node, name: str) -> list[Violation]:
    """A zero point, constant, 0, of the integer type that TensorRT and ONNX both read the same way.

    Without one, ONNX's QuantizeLinear makes UINT8 (levels 0..255) while TensorRT makes INT8 (-128..127). A
    DequantizeLinear of a constant integer weight is exempt: its input's type says what ONNX and TensorRT read.
    """
    zp = _input(n, 2)
    if zp is None:
        weight = n.op_type == "DequantizeLinear" and _const(n.inputs[0]) is not None \
            and _dtype(n.inputs[0]) in QUANT_TYPES
        if weight:
            return []
        what = ("ONNX then quantizes to UINT8 (0..255) but TensorRT to INT8 (-128..127)" if n.op_type == "QuantizeLinear"
                else "ONNX then reads UINT8 levels but TensorRT INT8")
        return [Violation("zero-point-missing", name, f"no zero point: {what}; give an INT8 zero point of 0")]
    if _const(zp) is None:
        return [Violation("zero-point", name, "zero point is not a constant")]
    v = []
    zp_type = _dtype(zp)
    want = n.attributes.get_int("output_dtype") if n.op_type == "QuantizeLinear" else _dtype(n.inputs[0])
    if zp_type not in QUANT_TYPES | OTHER_FP8_TYPES:  # other FP8 types: the fp8-type rule names them
        zt = onnx.TensorProto.DataType.Name(zp_type) if zp_type else "unknown"
        v.append(Violation("zero-point-type", name, f"zero point of type {zt}; TensorRT quantizes to INT8, INT4 or "
                           "FLOAT8E4M3FN (a UINT8 zero point is read as INT8 on a GPU): give an INT8 zero point of 0"))
    elif want and zp_type != want:
        v.append(Violation("zero-point-type", name, f"zero point of type {onnx.TensorProto.DataType.Name(zp_type)} "
                           f"but the quantized type is {onnx.TensorProto.DataType.Name(want)}; make them the same"))
    if np.any(_values(zp).astype(np.float64) != 0):
        extra = " (TensorRT's parser ignores an FP8 zero point: the engine would compute something else)" \
            if zp_type == FP8 else ""
        v.append(Violation("zero-point", name, "zero point is not 0; TensorRT supports symmetric quantization "
                           f"only (shift asymmetric levels before Q instead){extra}"))
    return v


def _check_q_feeds_dq(n: ir.Node, name: str) -> list[Violation]:
    """TensorRT fuses a Q only into the DQ that follows it; any other reader would get integer levels."""
    others = sorted({u.name or u.op_type for u in _users(n.outputs[0]) if u.op_type != "DequantizeLinear"})
    if n.outputs[0].is_graph_output():
        others.append("<graph output>")
    if others:
        return [Violation("q-feeds-dq", name, f"QuantizeLinear output is read by {', '.join(others)}; a Q may feed "
                          "only DequantizeLinear nodes")]
    return []


def _check_dtypes(n: ir.Node, name: str) -> list[Violation]:
    skip = MIXED_TYPE_INPUTS.get(n.op_type, set())
    floats = {_dtype(i) for k, i in enumerate(n.inputs) if i is not None and k not in skip and _dtype(i) in FLOAT_TYPES}
    if len(floats) > 1:
        names = sorted(onnx.TensorProto.DataType.Name(t) for t in floats)
        return [Violation("strong-typing", name, f"float inputs of mixed types {names}; insert a Cast so every "
                          "float input of a node has one type")]
    return []


def check_file(path: str | Path) -> list[Violation]:
    """The graph's structure; the few constants the rules read (scales, zero points) come from its external data."""
    return check_graph(read_graph(path))


def enforce(model_or_path: onnx.ModelProto | ir.Model | str | Path) -> None:
    model = model_or_path if isinstance(model_or_path, (onnx.ModelProto, ir.Model)) else None
    violations = check_graph(model) if model is not None else check_file(model_or_path)
    if violations:
        raise TrtRuleError(violations)
