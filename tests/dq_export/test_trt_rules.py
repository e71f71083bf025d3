"""One hand-built bad graph per TensorRT rule, plus a clean one."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dilatequant.dq_export.trt_rules import check_graph


def _graph(nodes, inits, inputs=None, opset=21, outputs=("y",)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _conv_qdq(w_scale=None, act_scale=1.0, act_zp=0, axis=0, with_axis=True, qnode_extra=()):
    w = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.int8), "w")
    ws = numpy_helper.from_array(np.full(8, 0.1, np.float32) if w_scale is None else w_scale, "ws")
    s = numpy_helper.from_array(np.array(act_scale, np.float32), "s")
    z = numpy_helper.from_array(np.array(act_zp, np.int8), "z")
    dq_w = helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], name="dq_w", **({"axis": axis} if with_axis else {}))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"], name="dq_x"), dq_w,
             helper.make_node("Conv", ["xd", "wf"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _graph(nodes + list(qnode_extra), [w, ws, s, z])


def rules(model):
    return {v.rule for v in check_graph(model)}


def test_clean_graph_passes():
    assert check_graph(_conv_qdq()) == []


def test_runtime_scale_is_rejected():
    m = _conv_qdq()
    table = numpy_helper.from_array(np.ones((4,), np.float32), "table")
    m.graph.initializer.append(table)
    m.graph.input.append(helper.make_tensor_value_info("t_index", TensorProto.INT64, []))
    m.graph.node.insert(0, helper.make_node("Gather", ["table", "t_index"], ["s_rt"], name="gather"))
    m.graph.node[1].input[1] = "s_rt"
    assert "constant-scale" in rules(m)


def test_non_positive_scale():
    assert "positive-scale" in rules(_conv_qdq(act_scale=0.0))
    assert "positive-scale" in rules(_conv_qdq(w_scale=np.array([0.1] * 7 + [-1.0], np.float32)))


def test_nonzero_zero_point():
    assert "zero-point" in rules(_conv_qdq(act_zp=3))


def test_missing_axis_on_per_channel_weights():
    assert "explicit-axis" in rules(_conv_qdq(with_axis=False))


def test_per_channel_scale_on_activations():
    m = _conv_qdq()
    m.graph.initializer.append(numpy_helper.from_array(np.full(4, 0.5, np.float32), "s4"))
    m.graph.node[0].input[1] = "s4"
    m.graph.node[0].attribute.append(helper.make_attribute("axis", 1))
    assert "per-tensor-activations" in rules(m)


def test_forbidden_ops():
    m = _conv_qdq()
    m.graph.node.append(helper.make_node("ConvInteger", ["q", "w"], ["y2"], name="convint"))
    assert "unsupported-op" in rules(m)


def _int4_model(consumer="MatMul", block=32, opset=21, scale_rows=2):
    import ml_dtypes

    w = numpy_helper.from_array(np.ones((64, 16), np.int8).astype(ml_dtypes.int4), "w4")
    ws = numpy_helper.from_array(np.full((scale_rows, 16), 0.1, np.float32), "ws4")
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["w4", "ws4"], ["wf"], name="dq_w4", **attrs)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Add", ["x", "wf"], ["y"], name="add"))
    return _graph(nodes, [w, ws], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])], opset=opset)


def test_int4_rules():
    assert check_graph(_int4_model()) == []
    assert "int4" in rules(_int4_model(consumer="Add"))
    assert "int4" in rules(_int4_model(block=0, scale_rows=1))
    assert "int4" in rules(_int4_model(block=16))  # 64 / 16 = 4 blocks, but the scale has 2 rows


def test_mixed_float_types():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT16, [2])
    m = _graph([helper.make_node("Add", ["a", "b"], ["y"], name="mixed_add")], [], [a, b])
    assert "strong-typing" in rules(m)


def test_unsupported_opset():
    ok = _conv_qdq()
    assert "opset" in rules(_graph(list(ok.graph.node), list(ok.graph.initializer), opset=11))
