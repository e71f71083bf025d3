"""TensorRT explicit-quantization rules, checked on the ONNX graph before any engine build.

Each rule names the node and what to change; `check_graph` returns every violation so one run shows
them all. These are the rules TensorRT 11 enforces (deployment.md) plus strong typing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UserError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
FORBIDDEN = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
OPSET_RANGE = (13, 22)
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


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def check_graph(model: onnx.ModelProto) -> list[Violation]:
    v: list[Violation] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        v.append(Violation("opset", "<model>", f"opset {opset} is outside TensorRT 11's supported {OPSET_RANGE}"))
    consts, types = _constants(model), _types(model)
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
        v += _check_dtypes(n, name, types)
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
    if len(n.input) > 2 and n.input[2]:
        if n.input[2] not in consts:
            v.append(Violation("zero-point", name, "zero point is not a constant"))
        elif np.any(consts[n.input[2]].astype(np.int64) != 0):
            v.append(Violation("zero-point", name, "zero point is not 0; TensorRT supports symmetric quantization "
                               "only (shift asymmetric levels before Q instead)"))
    per_channel = scale.size > 1
    block = _attr(n, "block_size") or 0
    if per_channel:
        if _attr(n, "axis") is None and not block:
            v.append(Violation("explicit-axis", name, "per-channel scale without an explicit axis attribute "
                               "(ONNX's default axis 1 is wrong for Conv weights)"))
        if n.op_type == "QuantizeLinear" or n.input[0] not in consts:
            v.append(Violation("per-tensor-activations", name, "per-channel scale on a runtime tensor; "
                               "activations must be per-tensor, per-channel only on constant weights"))
    data_type = types.get(n.input[0])
    if n.op_type == "DequantizeLinear" and data_type == onnx.TensorProto.INT4:
        users = consumers.get(n.output[0], [])
        if opset < 21:
            v.append(Violation("int4", name, "INT4 needs opset 21"))
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            v.append(Violation("int4", name, "INT4 weights may only feed MatMul/Gemm (weight-only INT4)"))
        w = consts.get(n.input[0])
        if not block or block <= 0:
            v.append(Violation("int4", name, "INT4 weights need block quantization (block_size > 0)"))
        elif w is not None and scale.ndim == w.ndim:
            axis = _attr(n, "axis") or 0
            if -(-w.shape[axis] // block) != scale.shape[axis]:
                v.append(Violation("int4", name, f"block_size {block} does not match scale shape {scale.shape} "
                                   f"for weight {w.shape}"))
    if n.op_type == "QuantizeLinear" and data_type in FLOAT_TYPES and types.get(scale_name) not in (None, data_type):
        v.append(Violation("strong-typing", name, "Q input and scale have different float types"))
    return v


def _check_dtypes(n, name, types) -> list[Violation]:
    skip = MIXED_TYPE_INPUTS.get(n.op_type, set())
    floats = {types[i] for k, i in enumerate(n.input) if i and k not in skip and types.get(i) in FLOAT_TYPES}
    if len(floats) > 1:
        names = sorted(onnx.TensorProto.DataType.Name(t) for t in floats)
        return [Violation("strong-typing", name, f"float inputs of mixed types {names}; insert a Cast so every "
                          "float input of a node has one type")]
    return []


def check_file(path: str | Path) -> list[Violation]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable ONNX model ({err})") from err
    return check_graph(model)


def enforce(model_or_path) -> None:
    violations = check_graph(model_or_path) if isinstance(model_or_path, onnx.ModelProto) else check_file(model_or_path)
    if violations:
        raise TrtRuleError(violations)
