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
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import UserError
from .onnx_files import load_model, save_model, without_weights

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive subnormal: anything smaller flushes to 0
QUANT_OPS = ("Conv", "MatMul", "Gemm")
RESCALE_OPS = ("Mul", "Add", "Sub", "Div", "Max", "Min", "Clip")
NORM_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization")
ALWAYS_FP32 = ("ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike")
# inputs that keep their own type whatever the node's precision (ONNX typing, not compute precision)
FIXED_INPUTS = {"Resize": {1, 2}, "DequantizeLinear": {0, 2}, "QuantizeLinear": {2}}


@dataclass
class Fp16Options:
    keep_norms_fp32: bool = True


class _Graph:
    """Index of one graph: producers, consumers, constants, float tensor types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        # inferred on a weightless copy: shape inference serializes the model, which fails past 2 GiB
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
        ig = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type for v in list(ig.value_info) + list(ig.input) + list(ig.output)}
        self.types.update({i.name: i.data_type for i in g.initializer})

    def is_table_or_constant(self, name: str) -> bool:
        """A constant, or a row gathered from a constant table (the per-timestep factors)."""
        if name in self.inits:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type in ("Gather", "Reshape", "Unsqueeze", "Expand") and bool(p.input) \
            and self.is_table_or_constant(p.input[0])

    def is_step_size(self, name: str) -> bool:
        """delta[t_index] gathered from its table, or the single constant delta of a static-scale graph."""
        if name in self.inits:
            return int(np.prod(self.inits[name].dims)) == 1
        p = self.producer.get(name)
        if p is None or not p.input:
            return False
        if p.op_type == "Gather":
            return p.input[0] in self.inits
        return p.op_type in ("Reshape", "Unsqueeze", "Expand") and self.is_step_size(p.input[0])

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    keep = []
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name in ("value", "value_float",
                                                                                          "value_floats"):
            a = n.attribute[0]
            if a.name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(a.t)
            else:
                t = numpy_helper.from_array(np.array(helper.get_attribute_value(a), dtype=np.float32))
            t.name = n.output[0]
            model.graph.initializer.append(t)
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def fp32_nodes(model: onnx.ModelProto, opts: Fp16Options) -> set[str]:
    """Names of the nodes that stay FP32 (see the module docstring for the rules)."""
    g = _Graph(model)
    keep: set[str] = set()

    def rescale_chain_back(start: str) -> None:
        # x -> Mul(F[t]) (-> Add(shift)) -> Max/Min -> Q: nodes with one table/constant operand
        stack = [start]
        while stack:
            n = g.producer.get(stack.pop())
            if n is None or n.name in keep or n.op_type not in RESCALE_OPS:
                continue
            if not any(g.is_table_or_constant(i) for i in n.input if i):
                continue
            keep.add(n.name)
            stack += [i for i in n.input if i and not g.is_table_or_constant(i)]

    def rescale_chain_forward(op: onnx.NodeProto) -> None:
        # op -> (+ correction) (* w_scale) * delta[t]: through Add/Mul until the table multiply
        n = op
        while True:
            users = g.consumers.get(n.output[0], [])
            if len(users) != 1 or users[0].op_type not in ("Add", "Mul"):
                return
            n = users[0]
            keep.add(n.name)
            # the zero-point correction c[t] * op(ones, sum W): integer sums FP16 cannot hold exactly
            stack = [i for i in n.input if i != op.output[0]]
            while stack:
                p = g.producer.get(stack.pop())
                if p is not None and p.op_type in ("Mul",) + QUANT_OPS and p.name not in keep:
                    keep.add(p.name)
                    stack += list(p.input)
            if n.op_type == "Mul" and any(g.is_step_size(i) for i in n.input):
                return

    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            keep.add(n.name)
            rescale_chain_back(n.input[0])
        elif n.op_type == "DequantizeLinear":
            keep.add(n.name)  # its output type is its scale's: FP32 keeps integer levels and tiny scales exact
        elif n.op_type in QUANT_OPS and any(
                (p := g.producer.get(i)) is not None and p.op_type == "DequantizeLinear" for i in n.input[:2]):
            keep.add(n.name)
            rescale_chain_forward(n)
        elif n.op_type in ALWAYS_FP32 or (opts.keep_norms_fp32 and n.op_type in NORM_OPS):
            keep.add(n.name)
        elif _unsafe_constants(n, g):
            keep.add(n.name)
    # the rows gathered from FP32 tables for those nodes stay FP32 too (no FP16 rounding of 1/delta)
    for n in model.graph.node:
        if n.name in keep:
            stack = [i for i in n.input if i and i not in g.inits and g.is_table_or_constant(i)]
            while stack:
                p = g.producer[stack.pop()]
                keep.add(p.name)
                stack += [i for i in p.input[:1] if i not in g.inits]
    # the timestep embedding: nodes computed from `timestep` (and constants) alone, up to the first GEMM
    derived = {"timestep"}
    for n in model.graph.node:
        floats = [i for i in n.input if i and i not in g.inits and g.types.get(i) == FLOAT]
        if n.op_type not in QUANT_OPS and any(i in derived for i in n.input) and all(i in derived for i in floats):
            keep.add(n.name)
            derived.update(n.output)
    return keep


def _unsafe_constants(n: onnx.NodeProto, g: _Graph) -> bool:
    for i in n.input:
        a = g.array(i) if i and g.types.get(i) == FLOAT else None
        if a is None or a.size == 0:
            continue
        mag = np.abs(a.astype(np.float64))
        if mag.max() > FP16_MAX or np.any((mag > 0) & (mag < FP16_TINY)):
            return True
    return False


def to_fp16(model: onnx.ModelProto, opts: Fp16Options | None = None, inplace: bool = False) -> onnx.ModelProto:
    """A copy of an FP32 QDQ graph with everything but the FP32-kept nodes in FP16.

    inplace=True converts `model` itself (no second copy of the weights: what a multi-GB graph needs).
    """
    opts = opts or Fp16Options()
    if inplace:
        m = model
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    if any(i.data_type == HALF for i in m.graph.initializer) or any(
            i.type.tensor_type.elem_type == HALF for i in m.graph.input):
        raise UserError("the graph already holds FP16 tensors; run the FP16 pass on an FP32 export")
    _constants_to_initializers(m)
    for k, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{k}"
    keep = fp32_nodes(m, opts)
    g = _Graph(m)
    dtype = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}  # runtime tensors' new types
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def as_type(name: str, want: int) -> str:
        if name in g.inits:
            if want == FLOAT or g.inits[name].data_type != FLOAT:
                return name
            if name not in half_inits:
                arr = numpy_helper.to_array(g.inits[name]).astype(np.float16)
                half_inits[name] = f"{name}__fp16"
                m.graph.initializer.append(numpy_helper.from_array(arr, half_inits[name]))
            return half_inits[name]
        if dtype.get(name, FLOAT) == want:
            return name
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}__to_{'fp16' if want == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=f"Cast_{casts[key]}"))
            dtype[casts[key]] = want
        return casts[key]

    for n in m.graph.node:
        prec = FLOAT if n.name in keep else HALF
        fixed = FIXED_INPUTS.get(n.op_type, set())
        for k, i in enumerate(n.input):
            if i and k not in fixed and g.types.get(i) in (FLOAT, HALF):
                n.input[k] = as_type(i, prec)
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == FLOAT:
                to.i = prec
        for o in n.output:
            if g.types.get(o) in (FLOAT, HALF):
                dtype[o] = prec
            elif o not in dtype:
                dtype[o] = g.types.get(o, 0)
        nodes.append(n)
    for out in m.graph.output:  # FP32 interface
        if dtype.get(out.name) == HALF:
            inner = f"{out.name}__fp16"
            for n in nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"Cast_{out.name}_fp32"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    kept_inits = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    for v in m.graph.value_info:  # keep the exporter's shapes (GroupNormalization has no shape inference)
        if v.name in dtype and v.type.tensor_type.elem_type in (FLOAT, HALF):
            v.type.tensor_type.elem_type = dtype[v.name]
    _set_metadata(m, "dilatequant.dtype", "fp16")
    _set_metadata(m, "dilatequant.fp16_fp32_nodes", str(len(keep)))
    return _infer_shapes(m)


def _infer_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes(m, strict_mode=True), run on a weightless copy at any model size."""
    inferred = onnx.shape_inference.infer_shapes(without_weights(m), strict_mode=True).graph
    del m.graph.value_info[:]
    m.graph.value_info.extend(inferred.value_info)
    del m.graph.output[:]
    m.graph.output.extend(inferred.output)
    return m


def _set_metadata(m: onnx.ModelProto, key: str, value: str) -> None:
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
            return
    m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def convert_file(src: str | Path, dst: str | Path, opts: Fp16Options | None = None) -> dict:
    """FP16 fallback of an FP32 QDQ ONNX file (what dq-build-engine --fp16-fallback runs).

    External data is read from beside src and written beside dst (onnx_files.save_model decides by size).
    """
    out = to_fp16(load_model(src), opts, inplace=True)
    written = save_model(out, dst)
    nodes = len(out.graph.node)
    fp32 = int(next(p.value for p in out.metadata_props if p.key == "dilatequant.fp16_fp32_nodes"))
    return {"onnx": str(dst), "bytes": written["bytes"], "external_data": written["external_data"], "nodes": nodes,
            "fp32_nodes": fp32, "cast_nodes": sum(n.op_type == "Cast" for n in out.graph.node)}
