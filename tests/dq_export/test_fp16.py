"""The Q/DQ-aware FP16 fallback pass: what becomes FP16, what must stay FP32, and that it stays TensorRT-legal."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from dilatequant.core.errors import UserError
from dilatequant.dq_export.fp16 import Fp16Options, fp32_nodes, to_fp16
from dilatequant.dq_export.trt_rules import check_graph


def _toy_graph() -> onnx.ModelProto:
    """timestep -> sinusoid; x -> quantizer chain (Mul table row, clip, Q/DQ) -> MatMul(DQ W) -> *delta -> +b -> Softmax."""
    inits = [
        numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "mult"),
        numpy_helper.from_array(np.array([0.002, 0.004], np.float32), "delta"),
        numpy_helper.from_array(np.array(-128, np.float32), "lo"), numpy_helper.from_array(np.array(127, np.float32), "hi"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "w_int"),
        numpy_helper.from_array(np.array([1e-3, 2e-3, 3e-3, 1e-9], np.float32), "w_scale"),  # 1e-9 would flush to 0 in FP16
        numpy_helper.from_array(np.array([0.1, -0.2, 0.3, 0.0], np.float32), "bias"),
        numpy_helper.from_array(np.array(1e-4, np.float32), "freq"),
        numpy_helper.from_array(np.array(1e6, np.float32), "huge"),
    ]
    nodes = [
        helper.make_node("Cast", ["timestep"], ["tf"], to=TP.FLOAT, name="cast_t"),
        helper.make_node("Mul", ["tf", "freq"], ["targ"], name="t_mul"),
        helper.make_node("Sin", ["targ"], ["tsin1"], name="t_sin"),
        helper.make_node("Unsqueeze", ["tsin1", "ax"], ["tsin"], name="t_unsq"),
        helper.make_node("Gather", ["mult", "t_index"], ["m_row"], name="g_mult"),
        helper.make_node("Unsqueeze", ["m_row", "ax"], ["m_b"], name="u_mult"),
        helper.make_node("Mul", ["x", "m_b"], ["u"], name="q_mul"),
        helper.make_node("Clip", ["u", "lo", "hi"], ["uc"], name="q_clip"),
        helper.make_node("QuantizeLinear", ["uc", "one", "zp"], ["uq"], name="q"),
        helper.make_node("DequantizeLinear", ["uq", "one", "zp"], ["v"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_int", "w_scale"], ["w"], axis=1, name="dq_w"),
        helper.make_node("MatMul", ["v", "w"], ["y"], name="mm"),
        helper.make_node("Gather", ["delta", "t_index"], ["d_row"], name="g_delta"),
        helper.make_node("Unsqueeze", ["d_row", "ax"], ["d_b"], name="u_delta"),
        helper.make_node("Mul", ["y", "d_b"], ["yd"], name="mm_delta"),
        helper.make_node("Add", ["yd", "bias"], ["yb"], name="add_bias"),
        helper.make_node("Add", ["yb", "tsin"], ["yt"], name="add_t"),
        helper.make_node("Softmax", ["yt"], ["s"], name="softmax"),
        helper.make_node("Mul", ["s", "huge"], ["out"], name="mul_huge"),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    g = helper.make_graph(nodes, "toy", [
        helper.make_tensor_value_info("x", TP.FLOAT, ["b", 4]), helper.make_tensor_value_info("timestep", TP.INT64, ["b"]),
        helper.make_tensor_value_info("t_index", TP.INT64, ["b"])], [helper.make_tensor_value_info("out", TP.FLOAT, ["b", 4])],
        inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fp32_is_kept_exactly_where_fp16_is_unsafe():
    m = _toy_graph()
    keep = fp32_nodes(m, Fp16Options())
    # quantizer chain, Q/DQ, the quantized GEMM up to its step-size multiply, the gathered rows, the timestep sinusoid,
    # and the node whose constant overflows FP16
    assert {"q_mul", "q_clip", "q", "dq", "dq_w", "mm", "mm_delta", "g_mult", "u_mult", "g_delta", "u_delta",
            "cast_t", "t_mul", "t_sin", "mul_huge"} <= keep
    assert not {"add_bias", "softmax"} & keep, "non-quantized computation goes to FP16"


def test_converted_graph_is_strongly_typed_trt_legal_and_close():
    m = _toy_graph()
    h = to_fp16(m)
    assert check_graph(h) == [], "one float type per node, positive constant scales"
    assert h.graph.input[0].type.tensor_type.elem_type == TP.FLOAT and h.graph.output[0].type.tensor_type.elem_type == TP.FLOAT
    half = [i.name for i in h.graph.initializer if i.data_type == TP.FLOAT16]
    assert "bias__fp16" in half and not any(n.startswith(("w_scale", "mult", "delta")) for n in half)
    scales = {i.name: numpy_helper.to_array(i) for i in h.graph.initializer}
    assert scales["w_scale"].min() > 0, "no scale underflows to 0"
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32) * 0.2, "timestep": np.array([999, 500, 1]),
             "t_index": np.array([0, 1, 0])}
    a, b = _run(m, feeds), _run(h, feeds)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * np.abs(a).max())


def test_norms_follow_the_option():
    x = helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TP.FLOAT, [1, 4, 2, 2])
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    g = helper.make_graph([helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, name="gn")],
                          "gn", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert "gn" in fp32_nodes(m, Fp16Options(keep_norms_fp32=True))
    assert "gn" not in fp32_nodes(m, Fp16Options(keep_norms_fp32=False))


def test_refuses_a_graph_that_is_already_fp16():
    h = to_fp16(_toy_graph())
    h.graph.input[0].type.tensor_type.elem_type = TP.FLOAT16
    with pytest.raises(UserError, match="already holds FP16"):
        to_fp16(h)
