"""Q/DQ-aware FP16 fallback: the non-quantized computation in FP16, every quantized layer untouched.

TensorRT 11 is strongly typed: FP16 comes from FP16 tensors in the ONNX, not from a builder flag, so
"--fp16-fallback" is this graph pass. NVIDIA's AutoCast does not take quantized models and
onnxconverter-common is not Q/DQ aware, hence our own. What stays FP32, and why:

- quantized layers, from the hoisted step-size multiply before Q to the step-size multiply after the
  op: they carry integer-valued sums (asymmetric corrections reach 1e5+) and x/delta magnitudes that
  overflow FP16, and keeping them bit-identical to the FP32 graph means the integer levels, the part
  TensorRT runs in INT8, do not change at all;
- the sinusoidal timestep embedding: FP16 cannot even hold timestep 999 to better than 0.5, which
  shifts sin/cos arguments by up to a quarter radian;
- normalisation statistics (GroupNorm/LayerNorm) when `keep_norms_fp32` (the default, for safety; FP16 norms
  are not measured yet);
- any node whose float constants FP16 cannot represent (overflow, or non-zero values that flush to 0).

The graph keeps its FP32 inputs and outputs (Casts at the boundary), so every runner feeds it alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from ..core.errors import UserError
from .graph_passes import add_initializer, ensure_types, remove_unused_initializers
from .onnx_files import read_graph, save_model

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive subnormal: anything smaller flushes to 0
QUANT_OPS = ("Conv", "MatMul", "Gemm")
RESCALE_OPS = ("Mul", "Add", "Sub", "Div", "Max", "Min", "Clip")
NORM_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization")
ALWAYS_FP32 = ("ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike")
# inputs that keep their own type whatever the node's precision (ONNX typing, not compute precision)
FIXED_INPUTS = {"Resize": {1, 2}, "DequantizeLinear": {0, 2}, "QuantizeLinear": {2}}
TIMESTEP = "timestep"  # the graph input the sinusoidal embedding is computed from


@dataclass
class Fp16Options:
    keep_norms_fp32: bool = True


def _op(value: ir.Value | None) -> str | None:
    p = value.producer() if value is not None else None
    return None if p is None else p.op_type


def _is_table_or_constant(value: ir.Value) -> bool:
    """A constant, or a row gathered from a constant table (the per-timestep factors)."""
    if value.is_initializer():
        return True
    p = value.producer()
    return p is not None and p.op_type in ("Gather", "Reshape", "Unsqueeze", "Expand") and bool(p.inputs) \
        and p.inputs[0] is not None and _is_table_or_constant(p.inputs[0])


def _is_step_size(value: ir.Value) -> bool:
    """delta[t_index] gathered from its table, or the single constant delta of a static-scale graph."""
    if value.is_initializer():
        return value.const_value is not None and value.const_value.size == 1
    p = value.producer()
    if p is None or not p.inputs or p.inputs[0] is None:
        return False
    if p.op_type == "Gather":
        return p.inputs[0].is_initializer()
    return p.op_type in ("Reshape", "Unsqueeze", "Expand") and _is_step_size(p.inputs[0])


def _inputs(node: ir.Node) -> list[ir.Value]:
    return [i for i in node.inputs if i is not None]


def _model(model: onnx.ModelProto | ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model


def fp32_nodes(model: onnx.ModelProto | ir.Model, opts: Fp16Options) -> set[str]:
    """Names of the nodes that stay FP32 (see the module docstring for the rules)."""
    return {n.name for n in _fp32_nodes(_model(model), opts)}


def _fp32_nodes(model: ir.Model, opts: Fp16Options) -> set[ir.Node]:
    ensure_types(model)
    keep: set[ir.Node] = set()

    def rescale_chain_back(start: ir.Value) -> None:
        # x -> Mul(F[t]) (-> Add(shift)) -> Max/Min -> Q: nodes with one table/constant operand
        stack = [start]
        while stack:
            n = stack.pop().producer()
            if n is None or n in keep or n.op_type not in RESCALE_OPS:
                continue
            if not any(_is_table_or_constant(i) for i in _inputs(n)):
                continue
            keep.add(n)
            stack += [i for i in _inputs(n) if not _is_table_or_constant(i)]

    def rescale_chain_forward(op: ir.Node) -> None:
        # op -> (+ correction) (* w_scale) * delta[t]: through Add/Mul until the table multiply
        n = op
        while True:
            users = list(n.outputs[0].uses())
            if len(users) != 1 or users[0].node.op_type not in ("Add", "Mul"):
                return
            n = users[0].node
            keep.add(n)
            # the zero-point correction c[t] * op(ones, sum W): integer sums FP16 cannot hold exactly
            stack = [i for i in _inputs(n) if i is not op.outputs[0]]
            while stack:
                p = stack.pop().producer()
                if p is not None and p.op_type in ("Mul",) + QUANT_OPS and p not in keep:
                    keep.add(p)
                    stack += _inputs(p)
            if n.op_type == "Mul" and any(_is_step_size(i) for i in _inputs(n)):
                return

    for n in model.graph:
        if n.op_type == "QuantizeLinear":
            keep.add(n)
            rescale_chain_back(n.inputs[0])
        elif n.op_type == "DequantizeLinear":
            keep.add(n)  # its output type is its scale's: FP32 keeps integer levels and tiny scales exact
        elif n.op_type in QUANT_OPS and any(_op(i) == "DequantizeLinear" for i in n.inputs[:2]):
            keep.add(n)
            rescale_chain_forward(n)
        elif n.op_type in ALWAYS_FP32 or (opts.keep_norms_fp32 and n.op_type in NORM_OPS):
            keep.add(n)
        elif _unsafe_constants(n):
            keep.add(n)
    # the rows gathered from FP32 tables for those nodes stay FP32 too (no FP16 rounding of 1/delta)
    for n in model.graph:
        if n in keep:
            stack = [i for i in _inputs(n) if not i.is_initializer() and _is_table_or_constant(i)]
            while stack:
                p = stack.pop().producer()
                keep.add(p)
                stack += [i for i in _inputs(p)[:1] if not i.is_initializer()]
    # the timestep embedding: nodes computed from `timestep` (and constants) alone, up to the first GEMM
    derived = {v for v in model.graph.inputs if v.name == TIMESTEP}
    for n in model.graph:
        floats = [i for i in _inputs(n) if not i.is_initializer() and i.dtype == FLOAT]
        if n.op_type not in QUANT_OPS and any(i in derived for i in n.inputs) and all(i in derived for i in floats):
            keep.add(n)
            derived.update(n.outputs)
    return keep


def _unsafe_constants(n: ir.Node) -> bool:
    for i in _inputs(n):
        if not i.is_initializer() or i.dtype != FLOAT or i.const_value is None or i.const_value.size == 0:
            continue
        mag = np.abs(i.const_value.numpy().astype(np.float64))
        if mag.max() > FP16_MAX or np.any((mag > 0) & (mag < FP16_TINY)):
            return True
    return False


def to_fp16(model: onnx.ModelProto | ir.Model, opts: Fp16Options | None = None) -> onnx.ModelProto | ir.Model:
    """An FP32 QDQ graph with everything but the FP32-kept nodes in FP16.

    An onnx_ir model is converted in place (no second copy of the weights: what a multi-GB graph needs); a
    ModelProto is left as it is and a converted copy returned.
    """
    if isinstance(model, onnx.ModelProto):
        return ir.serde.serialize_model(to_fp16(ir.serde.deserialize_model(model), opts))
    opts = opts or Fp16Options()
    graph = model.graph
    if any(v.dtype == HALF for v in graph.initializers.values()) or any(v.dtype == HALF for v in graph.inputs):
        raise UserError("the graph already holds FP16 tensors; run the FP16 pass on an FP32 export")
    _constants_to_initializers(graph)
    for k, n in enumerate(graph):
        if not n.name:
            n.name = f"{n.op_type}_{k}"
    keep = _fp32_nodes(model, opts)
    half_inits: dict[ir.Value, ir.Value] = {}
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def as_type(value: ir.Value, want: ir.DataType, reader: ir.Node) -> ir.Value:
        if value.is_initializer():
            if want == FLOAT or value.dtype != FLOAT:
                return value
            if value not in half_inits:
                half_inits[value] = add_initializer(graph, f"{value.name}__fp16",
                                                    value.const_value.numpy().astype(np.float16))
            return half_inits[value]
        if value.dtype == want:
            return value
        key = (value, want)
        if key not in casts:
            name = f"{value.name}__to_{'fp16' if want == HALF else 'fp32'}"
            casts[key] = _cast(value, want, name, f"Cast_{name}")
            graph.insert_before(reader, casts[key].producer())
        return casts[key]

    for n in list(graph):
        prec = FLOAT if n in keep else HALF
        fixed = FIXED_INPUTS.get(n.op_type, set())
        for k, i in enumerate(n.inputs):
            if i is not None and k not in fixed and i.dtype in (FLOAT, HALF):
                n.replace_input_with(k, as_type(i, prec, n))
        if n.op_type == "Cast" and n.attributes.get_int("to") == FLOAT:
            n.attributes["to"] = ir.AttrInt64("to", prec)
        for o in n.outputs:
            if o.dtype in (FLOAT, HALF):
                o.dtype = prec
    for k, out in enumerate(graph.outputs):  # FP32 interface
        if out.dtype == HALF:
            name = out.name
            out.name = f"{name}__fp16"
            fp32 = _cast(out, FLOAT, name, f"Cast_{name}_fp32")
            fp32.metadata_props.update(out.metadata_props)
            out.metadata_props.clear()
            graph.append(fp32.producer())
            graph.outputs[k] = fp32
    remove_unused_initializers(graph)
    model.metadata_props["dilatequant.dtype"] = "fp16"
    model.metadata_props["dilatequant.fp16_fp32_nodes"] = str(len(keep))
    return model


def _constants_to_initializers(graph: ir.Graph) -> None:
    """Constant nodes of tensors and floats become initializers, which the pass converts to FP16 where read so."""
    for n in list(graph):
        out = n.outputs[0] if n.op_type == "Constant" and len(n.attributes) == 1 else None
        if out is None or next(iter(n.attributes)) not in ("value", "value_float", "value_floats") \
                or out.is_graph_output():
            continue
        t = ir.convenience.get_const_tensor(out)
        value = ir.Value(name=out.name, shape=t.shape, type=ir.TensorType(t.dtype), const_value=t,
                         metadata_props=out.metadata_props.copy())
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(n, safe=True)


def _cast(value: ir.Value, to: ir.DataType, out_name: str, node_name: str) -> ir.Value:
    node = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", to)], name=node_name)
    out = node.outputs[0]
    out.name, out.dtype, out.shape = out_name, to, value.shape
    return out


def convert_file(src: str | Path, dst: str | Path, opts: Fp16Options | None = None) -> dict:
    """FP16 fallback of an FP32 QDQ ONNX file (what dq-build-engine --fp16-fallback runs).

    External data is read from beside src as the pass needs it and written beside dst (onnx_files.save_model
    decides by size): the integer weights go from one data file to the other without being held in memory.
    """
    out = to_fp16(read_graph(src), opts)
    written = save_model(out, dst)
    return {"onnx": str(dst), "bytes": written["bytes"], "external_data": written["external_data"],
            "nodes": len(out.graph), "fp32_nodes": int(out.metadata_props["dilatequant.fp16_fp32_nodes"]),
            "cast_nodes": sum(n.op_type == "Cast" for n in out.graph)}
