"""Planted defects: small Q/DQ graphs, each with one thing TensorRT (or ONNX) may refuse, and what to hold the
TensorRT rules checker (dq_export.trt_rules) against.

Every case is judged four ways: by the checker; by TensorRT-RTX's parser and CPU-only builder (rtx.run_jobs, a
child process per crash); by ONNX (onnx.checker with full_check, then an ONNX Runtime CPU session run on zeros);
and by TensorRT 11's documentation, written down here per case with its citation (TensorRT 11 itself builds only
on a GPU). `misses` lists the cases the checker passes although one of the other three refuses them: the checker
must catch everything NVIDIA's builder refuses, everything TensorRT 11's documentation rules out, and everything
ONNX Runtime (our parity reference) cannot run. Cases refused only for their build targets (FP8 below compute
capability 8.9) are held against dq-build-engine's target check (engines/tensorrt/targets.py) instead.

The graphs follow the project's export: x -> Mul(1/s) -> Q(scale 1, zero point 0) -> DQ -> Mul(s) -> Conv or MatMul
with a DequantizeLinear'd int8 (int4, fp8) weight. benchmarks/trt_rules_vs_rtx.py writes the table of all four
verdicts; tests/dq_export/test_trt_rules_vs_rtx.py asserts there are no misses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

# ------------------------------------------------------------------ TensorRT 11 documentation, quoted

NVINFER_H = "TensorRT 11.1 include/NvInfer.h (NVIDIA/TensorRT @ a892d222, VERSION 11.1.0.106)"
DOCS = "https://docs.nvidia.com/deeplearning/tensorrt/latest"
CITATIONS = {
    "q-zero-point": (f"{NVINFER_H}, IQuantizeLayer / IDequantizeLayer",
                     "zeroPt must only contain zero-valued coefficients, because only symmetric quantization is "
                     "supported. ... The subgraph which terminates with the zeroPt tensor must be a build-time "
                     "constant containing only zeros."),
    "q-scale-positive": (f"{NVINFER_H}, IQuantizeLayer", "All scale coefficients must have strictly positive values."),
    "q-per-channel": (f"{NVINFER_H}, IQuantizeLayer / IDequantizeLayer",
                      "Per-channel quantization is supported only for weight inputs. Thus, Activations cannot be "
                      "quantized per-channel."),
    "q-block-types": (f"{NVINFER_H}, IQuantizeLayer / IDequantizeLayer",
                      "Block quantization is supported for input types DataType::kFP4, DataType::kFP8 and "
                      "DataType::kINT4. ... scale and zeroPt should have identical dimensions, and rank lower or "
                      "equal to 2."),
    "q-strong-typing": (f"{NVINFER_H}, IQuantizeLayer",
                        "For strongly typed networks, if the scale data type is DataType::kHALF or DataType::kBF16, "
                        "it must match the input data type."),
    "scale-constant": (f"Quantize operator, {DOCS}/_static/operators/Quantize.html",
                       "The scale tensor must be a build-time constant."),
    "int4-weight-only": ("Working with Quantized Types, https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/"
                         "inference-library/work-quantized-types.html",
                         "INT4 (signed 4-bit integer, weight-only quantization)"),
    "int4-blocks": (f"Quantization Schemes, {DOCS}/inference-library/quantized-types-schemes.html",
                    "INT4 quantization requires per-block scales. The supported block sizes are {64, 128}. The block "
                    "dimension should be one of the last two dimensions."),
    "opset-range": (f"ONNX Opset Guide, {DOCS}/reference/onnx-opset-guide.html, its table for TensorRT 11.x",
                    "Maximum opset 25"),
    "opset-axis": (f"Explicit Quantization, {DOCS}/inference-library/quantized-types-explicit-quantization.html",
                   "a quantization-axis attribute was added in opset 13 (required for per-channel quantization)"),
    "fp8-targets": ("TensorRT-RTX Working with Quantized Types, "
                    "https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/inference-library/work-quantized-types.html",
                    "FP8 is only supported for matrix multiplications (GEMM) on Ada and later architectures (compute "
                    "capability 8.9 or later)"),
}

# ------------------------------------------------------------------ graph construction


class G:
    """A tiny ONNX graph builder: initializers, inputs, nodes with generated names."""

    def __init__(self, opset: int = 21):
        self.opset, self.n = opset, 0
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}_{self.n}"

    def init(self, arr, onnx_type: int | None = None) -> str:
        name, a = self._name("c"), np.asarray(arr)
        self.inits.append(numpy_helper.from_array(a, name) if onnx_type is None
                          else helper.make_tensor(name, onnx_type, list(a.shape), a.flatten().tolist()))
        return name

    def inp(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def node(self, op: str, ins: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=self._name(op), **attrs))
        return out

    def model(self, y: str, elem: int, shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        out = helper.make_tensor_value_info("y", elem, shape)
        g = helper.make_graph(self.nodes, "defect", self.inputs, [out], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 10 if self.opset >= 21 else 9
        return m


C_IN, C_OUT, HW = 8, 8, 16
K, N, M = 256, 64, 16


def _rng():
    return np.random.default_rng(0)


FP8_TYPES = {"fp8": TP.FLOAT8E4M3FN, "fp8e5m2": TP.FLOAT8E5M2}  # TensorRT's E4M3 and ONNX's other FP8 type


def _zp(g: G, qtype: str, shape: tuple, value=0) -> str:
    if qtype == "int8":
        return g.init(np.full(shape, value, np.int8))
    if qtype == "uint8":
        return g.init(np.full(shape, value, np.uint8))
    if qtype == "int4":
        return g.init(np.full(shape, value, np.int64), TP.INT4)
    if qtype in FP8_TYPES:
        return g.init(np.full(shape, float(value), np.float32), FP8_TYPES[qtype])
    raise ValueError(qtype)


def act_qdq(g: G, x: str, qtype="int8", zp_value=0, zp="typed", scale: str | None = None, axis=None,
            channels: int | None = None, fdt=np.float32) -> str:
    """Unit-scale Q -> DQ on an activation. zp: 'typed' (of qtype), 'uint8', 'none', or 'runtime' (Cast of an input)."""
    shape = () if channels is None else (channels,)
    scale = scale or g.init(np.ones(shape, fdt))
    if zp == "none":
        ins = [x, scale]
    elif zp == "runtime":
        zero = g.node("Mul", [g.inp("zp_in", TP.FLOAT, [1]), g.init(np.zeros(1, np.float32))])
        ins = [x, scale, g.node("Cast", [zero], to=TP.INT8)]
    else:
        ins = [x, scale, _zp(g, "uint8" if zp == "uint8" else qtype, shape, zp_value)]
    kw = {} if axis is None else {"axis": axis}
    return g.node("DequantizeLinear", [g.node("QuantizeLinear", ins, **kw), *ins[1:]], **kw)


def conv_weight(g: G, wtype="int8", axis=0, n_scales=C_OUT, scale: str | None = None, zp_value=0.0,
                block: int | None = None, c_in=C_IN, no_axis=False) -> str:
    r = _rng()
    if wtype == "float":
        return g.init((r.standard_normal((C_OUT, c_in, 3, 3)) * 0.1).astype(np.float32))
    if wtype == "int8":
        wq, zp = g.init(r.integers(-127, 128, (C_OUT, c_in, 3, 3)).astype(np.int8)), _zp(g, "int8", (n_scales,))
    elif wtype in FP8_TYPES:
        wq = g.init((r.standard_normal((C_OUT, c_in, 3, 3)) * 50).astype(np.float32), FP8_TYPES[wtype])
        zp = _zp(g, wtype, (n_scales,), zp_value)
    elif wtype == "int4":
        wq = g.init(r.integers(-8, 8, (C_OUT, c_in, 3, 3)), TP.INT4)
        if block:
            shape = (C_OUT, c_in // block, 3, 3)
            s = g.init((r.random(shape) * 0.01 + 0.001).astype(np.float32))
            return g.node("DequantizeLinear", [wq, s, _zp(g, "int4", shape)], axis=1, block_size=block)
        zp = _zp(g, "int4", (n_scales,))
    else:
        raise ValueError(wtype)
    scale = scale or g.init((r.random(n_scales) * 0.01 + 0.001).astype(np.float32))
    return g.node("DequantizeLinear", [wq, scale, zp], **({} if no_axis else {"axis": axis}))


def conv_graph(opset=21, act="int8", act_kw=None, mul_gather=False, act_scale_gather=None, weight="int8",
               weight_kw=None, weight_scale_runtime=False, q_to_cast=False, half=False, dynamic=False,
               c_in=C_IN, act_scale_value=None, act_scale_dtype=None) -> onnx.ModelProto:
    """x[1 (or N), c_in, 16, 16] -> Mul(1/s) -> act Q/DQ -> Mul(s) -> Conv(DQ weight) -> y."""
    g = G(opset)
    ft, fdt = (TP.FLOAT16, np.float16) if half else (TP.FLOAT, np.float32)
    x = g.inp("x", ft, ["N" if dynamic else 1, c_in, HW, HW])
    t = g.inp("t_index", TP.INT64, [1]) if mul_gather or act_scale_gather or weight_scale_runtime else None
    if mul_gather:
        s = g.node("Gather", [g.init((_rng().random(10) * 0.1 + 0.01).astype(np.float32)), t], axis=0)
        s_inv = g.node("Reciprocal", [s])
    else:
        s, s_inv = g.init(np.array([0.05], fdt)), g.init(np.array([20.0], fdt))
    h = g.node("Mul", [x, s_inv])
    if q_to_cast:
        h = g.node("Cast", [g.node("QuantizeLinear", [h, g.init(np.array(1.0, np.float32)), _zp(g, "int8", ())])],
                   to=TP.FLOAT)
    elif act is not None:
        scale = None
        if act_scale_gather is not None:  # "scalar": Gather with a 0-d index -> 0-d scale; "vector": [1]
            idx = t if act_scale_gather == "vector" else g.node("Squeeze", [t, g.init(np.array([0], np.int64))])
            scale = g.node("Gather", [g.init(np.linspace(0.5, 2.0, 10).astype(np.float32)), idx], axis=0)
        elif act_scale_value is not None or act_scale_dtype is not None:
            scale = g.init(np.array(1.0 if act_scale_value is None else act_scale_value, act_scale_dtype or fdt))
        h = act_qdq(g, h, act, scale=scale, fdt=fdt, **(act_kw or {}))
    h = g.node("Mul", [h, s])
    wkw = dict(weight_kw or {})
    if weight_scale_runtime:
        base = g.init((_rng().random(C_OUT) * 0.01 + 0.001).astype(np.float32))
        wkw["scale"] = g.node("Mul", [base, g.node("Add", [g.node("Cast", [t], to=TP.FLOAT),
                                                           g.init(np.array([1.0], np.float32))])])
    if half and weight == "int8":
        wkw["scale"] = g.init((_rng().random(C_OUT) * 0.01 + 0.001).astype(np.float16))
    w = conv_weight(g, weight, c_in=c_in, **wkw)
    g.node("Conv", [h, w, g.init(np.zeros(C_OUT, fdt))], pads=[1, 1, 1, 1])
    return g.model("y", ft, ["N" if dynamic else 1, C_OUT, HW, HW])


def matmul_graph(opset=21, act=None, weight="int4", block=128, block_axis=0, scale_shape=None, block_attr=None,
                 k=K, lead: int | None = None) -> onnx.ModelProto:
    """x[16, k] (or [lead, 16, k]) -> Mul -> [act Q/DQ] -> Mul -> MatMul(DQ weight [(lead,) k, 64]) -> y."""
    g = G(opset)
    r = _rng()
    lead = [lead] if lead else []
    x = g.inp("x", TP.FLOAT, [*lead, M, k])
    h = g.node("Mul", [x, g.init(np.array([20.0], np.float32))])
    if act is not None:
        h = act_qdq(g, h, act)
    h = g.node("Mul", [h, g.init(np.array([0.05], np.float32))])
    wshape = (*lead, k, N)
    if weight == "float":
        w = g.init((r.standard_normal(wshape) * 0.1).astype(np.float32))
    elif weight in ("int4", "int8_blocked"):
        axis = block_axis
        shape = scale_shape or tuple(-(-d // block) if i == axis else d for i, d in enumerate(wshape))
        qt = "int4" if weight == "int4" else "int8"
        wq = g.init(r.integers(-8, 8, wshape), TP.INT4) if qt == "int4" else \
            g.init(r.integers(-127, 128, wshape).astype(np.int8))
        s = g.init((r.random(shape) * 0.01 + 0.001).astype(np.float32))
        w = g.node("DequantizeLinear", [wq, s, _zp(g, qt, shape)], axis=axis,
                   block_size=block if block_attr is None else block_attr)
    elif weight in ("int4_channel", "int8", "fp8", "int8_noaxis"):
        qt = {"int4_channel": "int4", "int8": "int8", "fp8": "fp8", "int8_noaxis": "int8"}[weight]
        wq = {"int4": lambda: g.init(r.integers(-8, 8, wshape), TP.INT4),
              "int8": lambda: g.init(r.integers(-127, 128, wshape).astype(np.int8)),
              "fp8": lambda: g.init((r.standard_normal(wshape) * 50).astype(np.float32), TP.FLOAT8E4M3FN)}[qt]()
        s = g.init((r.random(N) * 0.01 + 0.001).astype(np.float32))
        w = g.node("DequantizeLinear", [wq, s, _zp(g, qt, (N,))], **({} if weight == "int8_noaxis" else {"axis": 1}))
    else:
        raise ValueError(weight)
    g.node("MatMul", [h, w])
    return g.model("y", TP.FLOAT, [*lead, M, N])


def qlinear_graph() -> onnx.ModelProto:
    """ONNX's integer operator form (QLinearMatMul), which TensorRT's explicit quantization does not take."""
    g = G(21)
    x = g.inp("x", TP.FLOAT, [M, K])
    one, z = g.init(np.array(0.05, np.float32)), g.init(np.array(0, np.int8))
    xq = g.node("QuantizeLinear", [x, one, z])
    w = g.init(_rng().integers(-127, 128, (K, N)).astype(np.int8))
    yq = g.node("QLinearMatMul", [xq, one, z, w, one, z, one, z])
    g.node("DequantizeLinear", [yq, one, z])
    return g.model("y", TP.FLOAT, [M, N])


def matmul_integer_graph() -> onnx.ModelProto:
    """ONNX's integer GEMM (MatMulInteger, int32 sums) on an int8 input, cast back to float: no Q/DQ at all."""
    g = G(21)
    x = g.inp("x", TP.INT8, [M, K])
    w = g.init(_rng().integers(-127, 128, (K, N)).astype(np.int8))
    g.node("Cast", [g.node("MatMulInteger", [x, w])], to=TP.FLOAT)
    return g.model("y", TP.FLOAT, [M, N])


def int4_odd_graph() -> onnx.ModelProto:
    """An INT4 weight whose last dimension is odd (N=15), blocked along K by 64."""
    g = G(21)
    x = g.inp("x", TP.FLOAT, [M, 128])
    r = _rng()
    wq = g.init(r.integers(-8, 8, (128, 15)), TP.INT4)
    s = g.init((r.random((2, 15)) * 0.01 + 0.001).astype(np.float32))
    w = g.node("DequantizeLinear", [wq, s, _zp(g, "int4", (2, 15))], axis=0, block_size=64)
    g.node("MatMul", [x, w])
    return g.model("y", TP.FLOAT, [M, 15])


def halfmix_graph() -> onnx.ModelProto:
    """fp16 activations quantized with float32 (unit) scales: under strong typing the DQ emits float32."""
    m = conv_graph(half=True)
    for i, t in enumerate(m.graph.initializer):
        if len(t.dims) == 0 and t.data_type == TP.FLOAT16:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), t.name))
    return m


# ------------------------------------------------------------------ the corpus


@dataclass(frozen=True)
class Defect:
    id: str
    what: str
    make: Callable[[], onnx.ModelProto]
    targets: tuple[tuple[int, int], ...] | None = ((8, 9),)   # compute capabilities to build for (None: default set)
    docs: str | None = None            # key of CITATIONS: TensorRT 11's documentation refuses this graph
    differs: str = ""                  # why ONNX (our reference) and TensorRT compute different values, if they do
    note: str = ""                     # what the case shows, for the table
    profile: dict | None = None        # optimization profile for dynamic inputs

    @property
    def is_reference(self) -> bool:
        """A clean graph: everyone should accept it (the checker's false positives show here)."""
        return self.id.startswith("ok_")


DYN_PROFILE = {"x": {"min": [1, C_IN, HW, HW], "opt": [2, C_IN, HW, HW], "max": [4, C_IN, HW, HW]}}
CC86, CC89 = ((8, 6),), ((8, 9),)

DEFECTS: list[Defect] = [
    # references: the project's own patterns
    Defect("ok_conv_int8", "clean: unit-scale int8 Q/DQ, int8 Conv weight per output channel (axis 0)", conv_graph),
    Defect("ok_conv_int8_sm75", "clean int8 Conv, built for 7.5 (Turing)", conv_graph, targets=((7, 5),)),
    Defect("ok_conv_default_targets", "clean int8 Conv, TensorRT-RTX's default targets", conv_graph, targets=None),
    Defect("ok_step_in_mul", "clean, step sizes Gather(table, t_index) in the Mul nodes, the Q/DQ scale constant",
           lambda: conv_graph(mul_gather=True)),
    Defect("ok_dynamic_batch", "clean, dynamic batch with an optimization profile 1..4",
           lambda: conv_graph(dynamic=True), profile=DYN_PROFILE),
    Defect("ok_float_weight", "int8 activation Q/DQ before a float Conv weight", lambda: conv_graph(weight="float")),
    Defect("ok_matmul_int8", "clean int8 GEMM: int8 activation, int8 weight per output channel (axis 1)",
           lambda: matmul_graph(act="int8", weight="int8")),
    Defect("ok_w4a16", "clean weight-only INT4 GEMM: blocks of 128 along K (axis 0)", lambda: matmul_graph()),
    Defect("ok_w4a16_64", "clean weight-only INT4 GEMM: blocks of 64 along K, built for 8.6",
           lambda: matmul_graph(block=64), targets=CC86),
    Defect("ok_fp16", "clean FP16 graph: fp16 input, fp16 Q/DQ and weight scales", lambda: conv_graph(half=True)),
    Defect("ok_fp8_gemm", "clean FP8 GEMM (E4M3 activation and weight), built for 8.9",
           lambda: matmul_graph(act="fp8", weight="fp8")),
    Defect("ok_fp8_conv", "clean FP8 Conv, built for 8.9 and 12.0", lambda: conv_graph(act="fp8", weight="fp8"),
           targets=((8, 9), (12, 0)), note="TensorRT-RTX's docs list FP8 for GEMMs only: whether this Conv runs in "
           "FP8 needs a GPU to see"),
    Defect("ok_opset17", "clean int8 Conv at opset 17", lambda: conv_graph(opset=17)),
    # scales
    Defect("scale_gather_vector", "activation Q/DQ scale = Gather(table, t_index) ([1]): a runtime scale",
           lambda: conv_graph(act_scale_gather="vector"), docs="scale-constant",
           note="the naive per-timestep design the export's Mul hoisting avoids"),
    Defect("scale_gather_scalar", "activation Q/DQ scale = Gather(table, t_index[0]) (0-d): a runtime scale",
           lambda: conv_graph(act_scale_gather="scalar"), docs="scale-constant"),
    Defect("weight_scale_runtime", "Conv weight DQ scale computed from t_index",
           lambda: conv_graph(weight_scale_runtime=True), docs="scale-constant"),
    Defect("scale_zero", "activation Q scale 0", lambda: conv_graph(act_scale_value=0.0), docs="q-scale-positive"),
    Defect("scale_negative", "activation Q scale -1", lambda: conv_graph(act_scale_value=-1.0),
           docs="q-scale-positive"),
    Defect("scale_fp16_in_fp32", "activation Q/DQ scale stored as float16 in a float32 graph",
           lambda: conv_graph(act_scale_dtype=np.float16), docs="q-strong-typing"),
    Defect("scale_fp32_in_fp16", "fp16 graph whose activation Q/DQ scale is float32", halfmix_graph,
           docs="q-strong-typing"),
    Defect("scale_count", "Conv int8 weight DQ with 7 scales for 8 output channels",
           lambda: conv_graph(weight_kw={"n_scales": 7})),
    # zero points
    Defect("zp_nonzero", "activation int8 zero point 3", lambda: conv_graph(act_kw={"zp_value": 3}),
           docs="q-zero-point"),
    Defect("zp_uint8_128", "activation uint8 zero point 128 (ONNX Runtime's asymmetric default)",
           lambda: conv_graph(act_kw={"zp": "uint8", "zp_value": 128}), docs="q-zero-point"),
    Defect("zp_uint8_0", "activation uint8 zero point 0", lambda: conv_graph(act_kw={"zp": "uint8"}),
           differs="TensorRT reads a UINT8 zero point as INT8 (its parser warns 'Defaulting to INT8'), ONNX quantizes "
           "to UINT8 (0..255): negative activations clip to 0 in ONNX Runtime only"),
    Defect("zp_missing", "activation Q/DQ without a zero point", lambda: conv_graph(act_kw={"zp": "none"}),
           differs="without a zero point ONNX quantizes to UINT8, TensorRT's parser to INT8 (silently): negative "
           "activations clip to 0 in ONNX Runtime only"),
    Defect("zp_runtime", "activation zero point computed at run time (Cast of an input)",
           lambda: conv_graph(act_kw={"zp": "runtime"}), docs="q-zero-point"),
    Defect("zp_fp8_act", "FP8 activation Q/DQ with zero point 0.5", lambda: conv_graph(
        act="fp8", weight="fp8", act_kw={"zp_value": 0.5}), docs="q-zero-point",
           note="TensorRT-RTX's parser checks zero points only for integer types"),
    Defect("zp_fp8_weight", "FP8 weight DQ with zero point 1.0", lambda: conv_graph(
        act="fp8", weight="fp8", weight_kw={"zp_value": 1.0}), docs="q-zero-point"),
    # per-channel and axes
    Defect("act_per_channel", "activation Q/DQ per channel (axis 1, 8 scales)",
           lambda: conv_graph(act_kw={"axis": 1, "channels": C_IN}), docs="q-per-channel"),
    Defect("weight_axis_cin", "Conv int8 weight DQ per input channel (axis 1)",
           lambda: conv_graph(weight_kw={"axis": 1}),
           note="a per-input-channel scale cannot be applied after the integer sum: no INT8 Conv kernel can use it"),
    Defect("weight_no_axis", "Conv int8 weight DQ per channel without an axis (ONNX's default axis 1 = input "
           "channels, 4 of them, for 8 scales)", lambda: conv_graph(c_in=4, weight_kw={"no_axis": True})),
    Defect("matmul_no_axis", "MatMul int8 weight per output channel without an axis (ONNX's default 1 is right)",
           lambda: matmul_graph(act="int8", weight="int8_noaxis"),
           note="correct as ONNX reads it; the checker asks for the axis to be written out"),
    # INT4
    Defect("int4_act_conv", "INT4 activation Q/DQ before an int8 Conv weight", lambda: conv_graph(act="int4"),
           docs="int4-weight-only"),
    Defect("int4_act_float", "INT4 activation Q/DQ before a float Conv weight",
           lambda: conv_graph(act="int4", weight="float"), docs="int4-weight-only"),
    Defect("int4_act_gemm", "INT4 activation Q/DQ before an INT4 GEMM weight (W4A4)", lambda: matmul_graph(act="int4"),
           docs="int4-weight-only"),
    Defect("w4a8_gemm", "int8 activation Q/DQ before an INT4 GEMM weight (W4A8)", lambda: matmul_graph(act="int8"),
           docs="int4-weight-only", note="TensorRT-RTX's builder takes it; TensorRT documents INT4 as weight-only: "
           "no W4A8 kernel (int4_conv_a8 is the same pattern on a Conv)"),
    Defect("w4_fp8_gemm", "FP8 activation Q/DQ before an INT4 GEMM weight", lambda: matmul_graph(act="fp8")),
    Defect("int4_conv_channel", "INT4 Conv weight per output channel, weight-only", lambda: conv_graph(
        act=None, weight="int4"), docs="int4-blocks"),
    Defect("int4_conv_a8", "int8 activation Q/DQ before an INT4 Conv weight", lambda: conv_graph(weight="int4"),
           docs="int4-weight-only"),
    Defect("int4_conv_blocked", "INT4 Conv weight blocked along input channels (axis 1 of 4)",
           lambda: conv_graph(act=None, weight="int4", weight_kw={"block": 4}), docs="int4-blocks"),
    Defect("int4_gemm_channel", "INT4 GEMM weight per output channel (no blocks)",
           lambda: matmul_graph(weight="int4_channel"), docs="int4-blocks"),
    Defect("int4_block_32", "INT4 GEMM weight in blocks of 32", lambda: matmul_graph(block=32), docs="int4-blocks"),
    Defect("int4_block_96", "INT4 GEMM weight in blocks of 96 (K = 256)", lambda: matmul_graph(block=96),
           docs="int4-blocks"),
    Defect("int4_block_not_dividing", "INT4 GEMM weight in blocks of 64 along K = 96", lambda: matmul_graph(
        block=64, k=96), differs="TensorRT infers blocks of 48 from the scale's 2 rows; ONNX reads blocks of 64 (the "
           "last one 32 long): rows 48..63 get another scale"),
    Defect("int4_block_n", "INT4 GEMM weight blocked along N (axis 1) by 64", lambda: matmul_graph(
        block=64, block_axis=1), note="accepted by all: the blocking dimension may be either of the last two"),
    Defect("int4_block_attr", "INT4 block_size attribute 64, scale shaped for blocks of 128",
           lambda: matmul_graph(block=128, block_attr=64),
           note="TensorRT-RTX's parser infers blocks from the scale's shape and ignores the attribute"),
    Defect("int4_block_rank", "INT4 blocked DQ (block_size 128) with a 1-D scale", lambda: matmul_graph(
        block=128, scale_shape=(N,))),
    Defect("int4_block_3d_axis0", "INT4 batched GEMM weight [128, 64, 64] blocked by 64 along axis 0",
           lambda: matmul_graph(block=64, k=64, lead=128, block_axis=0), docs="q-block-types"),
    Defect("int4_odd", "INT4 GEMM weight with an odd last dimension (15)", int4_odd_graph),
    Defect("int8_blocked", "int8 GEMM weight in blocks of 128 along K (opset 21)",
           lambda: matmul_graph(weight="int8_blocked"), docs="q-block-types"),
    # FP8
    Defect("fp8_e5m2", "FP8 Conv in E5M2 (activation and weight), not E4M3", lambda: conv_graph(
        act="fp8e5m2", weight="fp8e5m2"), note="valid ONNX; TensorRT-RTX's parser cannot import an E5M2 tensor"),
    Defect("fp8_opset18", "clean FP8 (E4M3) Conv in an opset 18 graph", lambda: conv_graph(
        opset=18, act="fp8", weight="fp8"), note="ONNX has FP8 Q/DQ from opset 19; TensorRT-RTX builds it anyway"),
    Defect("fp8_act_int8_weight", "FP8 activation Q/DQ (then the step-size Mul) before an int8 Conv weight",
           lambda: conv_graph(act="fp8", weight="int8")),
    # opsets and operators
    Defect("opset20_int4", "INT4 GEMM weight in an opset 20 graph", lambda: matmul_graph(opset=20)),
    Defect("opset20_blocked", "blocked int8 DQ in an opset 20 graph", lambda: matmul_graph(
        opset=20, weight="int8_blocked"), docs="q-block-types"),
    Defect("opset12_per_channel", "per-channel weight DQ (axis) in an opset 12 graph", lambda: conv_graph(opset=12),
           docs="opset-axis"),
    Defect("opset26", "clean int8 Conv at opset 26", lambda: conv_graph(opset=26), docs="opset-range"),
    Defect("qlinear_op", "QLinearMatMul (ONNX's integer operator form)", qlinear_graph),
    Defect("matmul_integer", "MatMulInteger on an int8 input (ONNX's integer GEMM)", matmul_integer_graph),
    Defect("q_to_cast", "Q output read by a Cast instead of a DQ", lambda: conv_graph(q_to_cast=True),
           note="valid ONNX, and TensorRT-RTX builds it; the checker keeps every Q paired with a DQ"),
    # targets
    Defect("fp8_gemm_sm86", "clean FP8 GEMM built for 8.6", lambda: matmul_graph(act="fp8", weight="fp8"),
           targets=CC86, docs="fp8-targets"),
    Defect("fp8_conv_sm86", "clean FP8 Conv built for 8.6", lambda: conv_graph(act="fp8", weight="fp8"),
           targets=CC86, docs="fp8-targets"),
    Defect("fp8_default_targets", "clean FP8 GEMM built for TensorRT-RTX's default targets (8.6 among them)",
           lambda: matmul_graph(act="fp8", weight="fp8"), targets=None, docs="fp8-targets",
           note="TensorRT-RTX builds it; on which default target the plan then runs is not known without those GPUs"),
]
BY_ID = {d.id: d for d in DEFECTS}


def write(defect: Defect, folder: Path) -> Path:
    path = folder / f"{defect.id}.onnx"
    onnx.save(defect.make(), str(path))
    return path


def onnx_verdict(path: Path) -> str:
    """'ok', or why onnx.checker (full_check) or an ONNX Runtime CPU session run on zeros refuses the graph."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as err:  # the checker's own exception types vary by version
        return "onnx.checker: " + str(err).strip().splitlines()[0][:200]
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the refusal comes back as the exception; keep ORT's own log quiet
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 2 for d in i.shape]
            dtype = np.int64 if "int64" in i.type else np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros(shape, dtype)
        sess.run(None, feeds)
    except Exception as err:
        return "onnxruntime: " + " ".join(str(err).split())[:200]
    return "ok"


# ------------------------------------------------------------------ judging


@dataclass
class Row:
    """One case, judged: the checker's violations and target check, TensorRT-RTX's outcome, ONNX's verdict."""
    defect: Defect
    path: Path
    builder: object                    # rtx.RtxOutcome
    onnx: str
    violations: list[str]              # "[rule] detail" from trt_rules.check_file
    target_check: str                  # "passes" | "refuses: ..." | "retargets to ..."

    @property
    def rules(self) -> list[str]:
        return sorted({v[1:v.index("]")] for v in self.violations})

    @property
    def refused_by(self) -> list[str]:
        """Who refuses the graph (for its targets): NVIDIA's builder, TensorRT 11's docs, ONNX, or the fact that
        ONNX and TensorRT would compute different values."""
        who = []
        if self.builder.verdict != "built":
            who.append(f"TensorRT-RTX ({self.builder.verdict})")
        if self.defect.docs:
            who.append("TensorRT 11 docs" if self.defect.docs != "fp8-targets" else "TensorRT-RTX docs")
        if self.onnx != "ok":
            who.append("ONNX")
        if self.defect.differs:
            who.append("ONNX and TensorRT differ")
        return who

    @property
    def checker_refuses(self) -> bool:
        return bool(self.violations) or self.target_check != "passes"


def check(defect: Defect, path: Path, supported) -> tuple[list[str], str]:
    """The checker's verdict on a case: trt_rules' violations, and dq-build-engine's target check for its targets."""
    from dilatequant.core.errors import UserError
    from dilatequant.dq_export import trt_rules
    from dilatequant.engines.tensorrt.targets import format_cc, graph_requirement, rtx_targets

    violations = [f"[{v.rule}] {v.detail}" for v in trt_rules.check_file(path)]
    model = onnx.load(str(path), load_external_data=False)
    try:
        chosen, _ = rtx_targets(defect.targets, supported, graph_requirement(model, {}), path.name)
    except UserError as err:
        return violations, "refuses: " + str(err).split("; ")[0].split(", but ")[-1]
    if chosen != defect.targets:
        return violations, "retargets to " + ", ".join(map(format_cc, chosen))
    return violations, "passes"


def judge(folder: Path, defects: list[Defect] = DEFECTS, timeout_s: float = 120) -> list[Row]:
    """Write every case to `folder`, build them all with TensorRT-RTX (rtx.run_jobs), and judge each."""
    from dilatequant.engines.tensorrt.rtx import RtxJob, require_tensorrt_rtx, run_jobs, supported_targets

    supported = supported_targets(require_tensorrt_rtx())
    paths = [write(d, folder) for d in defects]
    outcomes = run_jobs([RtxJob(p, profile=d.profile, compute_capabilities=d.targets) for d, p in zip(defects, paths)],
                        timeout_s=timeout_s)
    return [Row(d, p, o, onnx_verdict(p), *check(d, p, supported)) for d, p, o in zip(defects, paths, outcomes)]


def rejudge(rows: list[Row]) -> list[Row]:
    """The same rows with the checker's verdict taken again (after a rule was switched off, say)."""
    from dilatequant.engines.tensorrt.rtx import require_tensorrt_rtx, supported_targets

    supported = supported_targets(require_tensorrt_rtx())
    return [Row(r.defect, r.path, r.builder, r.onnx, *check(r.defect, r.path, supported)) for r in rows]


def misses(rows: list[Row]) -> list[str]:
    """The cases someone refuses and the checker lets through (references excepted: they must pass everyone)."""
    return [f"{r.defect.id}: refused by {', '.join(r.refused_by)}, passed by the checker"
            for r in rows if r.refused_by and not r.checker_refuses]


def false_alarms(rows: list[Row]) -> list[str]:
    """References (clean graphs) that anyone refuses, the checker included."""
    out = []
    for r in rows:
        if r.defect.is_reference and (r.refused_by or r.checker_refuses):
            checker = [f"the checker: {'; '.join(r.violations) or r.target_check}"] if r.checker_refuses else []
            out.append(f"{r.defect.id}: {', '.join(r.refused_by + checker)}")
    return out
