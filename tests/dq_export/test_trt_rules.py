"""One hand-built bad graph per TensorRT rule, plus a clean one."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dilatequant.dq_export.trt_rules import check_graph


def _graph(nodes, inits, inputs=None, opset=21, outputs=("y",)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _conv_qdq(w_scale=None, act_scale=1.0, act_zp=0, axis=0, with_axis=True, qnode_extra=(), w_shape=(8, 4, 3, 3)):
    w = numpy_helper.from_array(np.ones(w_shape, np.int8), "w")
    ws = numpy_helper.from_array(np.full(w_shape[0], 0.1, np.float32) if w_scale is None else w_scale, "ws")
    s = numpy_helper.from_array(np.array(act_scale, np.float32), "s")
    z = numpy_helper.from_array(np.array(act_zp, np.int8), "z")
    dq_w = helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], name="dq_w", **({"axis": axis} if with_axis else {}))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"], name="dq_x"), dq_w,
             helper.make_node("Conv", ["xd", "wf"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w_shape[1], 8, 8])]
    return _graph(nodes + list(qnode_extra), [w, ws, s, z], inputs)


def _linear_qdq(op, w_shape, axis, scale_len, attrs):
    """x -> Q/DQ -> op(x, DQ(int8 W, per-channel scale)); x is [2, K] with K the weight's input size."""
    k = w_shape[1] if attrs.get("transB") else w_shape[0]
    w = numpy_helper.from_array(np.ones(w_shape, np.int8), "w")
    ws = numpy_helper.from_array(np.full(scale_len, 0.1, np.float32), "ws")
    s = numpy_helper.from_array(np.array(1.0, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], name="dq_w",
                              **({} if axis is None else {"axis": axis})),
             helper.make_node(op, ["xd", "wf"], ["y"], name=op.lower(), **attrs)]
    return _graph(nodes, [w, ws, s, z], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])])


def _matmul_qdq(axis=1, w_shape=(32, 16), scale_len=None):
    channels = w_shape[1] if axis is None else w_shape[axis]
    return _linear_qdq("MatMul", w_shape, axis, scale_len or channels, {})


def _gemm_qdq(trans_b=1, axis=0, w_shape=(16, 32)):
    return _linear_qdq("Gemm", w_shape, axis, w_shape[axis], {"transB": trans_b})


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


def test_default_axis_1_is_wrong_for_conv_weights_but_right_for_matmul_in_out():
    """ONNX's default axis is 1: for a Conv weight [Cout, Cin, kh, kw] that is the input channels."""
    conv = [v for v in check_graph(_conv_qdq(with_axis=False)) if v.rule == "default-axis"]
    assert [(v.node, "axis=0" in v.detail) for v in conv] == [("dq_w", True)]
    # a [Cin, Cout] = [8, 8] Conv weight: the default axis has the right length, only the axis rule can see it
    assert "default-axis" in rules(_conv_qdq(with_axis=False, w_shape=(8, 8, 3, 3)))
    assert "default-axis" not in rules(_matmul_qdq(axis=None))  # MatMul [in, out]: axis 1 is the channel axis
    assert "explicit-axis" in rules(_matmul_qdq(axis=None))


def test_channel_axis_per_op_type():
    assert rules(_conv_qdq(axis=0)) == set()
    assert rules(_conv_qdq(axis=1, w_shape=(8, 8, 3, 3))) == {"channel-axis"}
    assert rules(_matmul_qdq(axis=1)) == set()
    assert rules(_matmul_qdq(axis=0, w_shape=(16, 16))) == {"channel-axis"}  # MatMul [in, out] needs axis 1
    assert rules(_gemm_qdq(trans_b=1, axis=0)) == set()  # nn.Linear [out, in]: axis 0
    assert rules(_gemm_qdq(trans_b=1, axis=1, w_shape=(16, 16))) == {"channel-axis"}
    assert rules(_gemm_qdq(trans_b=0, axis=1, w_shape=(32, 16))) == set()  # [in, out]: axis 1


def test_per_channel_scale_length_matches_the_channel_count():
    assert rules(_conv_qdq(w_scale=np.full(4, 0.1, np.float32))) == {"scale-length"}  # 8 output channels
    assert rules(_matmul_qdq(axis=1, scale_len=32)) == {"scale-length"}  # 16 output channels


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


def _int4_model(consumer="MatMul", block=64, opset=21, scale_rows=2):
    import ml_dtypes

    w = numpy_helper.from_array(np.ones((128, 16), np.int8).astype(ml_dtypes.int4), "w4")
    ws = numpy_helper.from_array(np.full((scale_rows, 16), 0.1, np.float32), "ws4")
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["w4", "ws4"], ["wf"], name="dq_w4", **attrs)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Add", ["x", "wf"], ["y"], name="add"))
    return _graph(nodes, [w, ws], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])], opset=opset)


def _int4_blocks(w_shape=(128, 16), scale_shape=(2, 16), axis=0, block=64):
    import ml_dtypes

    w = numpy_helper.from_array(np.ones(w_shape, np.int8).astype(ml_dtypes.int4), "w4")
    ws = numpy_helper.from_array(np.full(scale_shape, 0.1, np.float32), "ws4")
    nodes = [helper.make_node("DequantizeLinear", ["w4", "ws4"], ["wf"], name="dq_w4", axis=axis, block_size=block),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, *w_shape[:-1]])
    return _graph(nodes, [w, ws], [x])


def test_block_size_must_divide_the_blocked_dimension():
    assert rules(_int4_blocks(w_shape=(96, 16), scale_shape=(2, 16))) == {"block-size"}  # ONNX: ceil(96/64) = 2
    assert rules(_int4_blocks(w_shape=(128, 16), scale_shape=(2, 16))) == set()


def test_int4_blocks_are_64_or_128():
    assert rules(_int4_blocks(w_shape=(128, 16), scale_shape=(4, 16), block=32)) == {"int4-block-size"}
    assert rules(_int4_blocks(w_shape=(128, 16), scale_shape=(1, 16), block=128)) == set()


def test_block_scale_has_the_weight_rank_and_blocks_a_last_axis():
    assert rules(_int4_blocks(scale_shape=(32,))) == {"block-scale-rank"}
    assert rules(_int4_blocks(w_shape=(4, 128, 16), scale_shape=(2, 128, 16), axis=0)) == {"block-axis"}
    assert rules(_int4_blocks(w_shape=(4, 128, 16), scale_shape=(4, 2, 16), axis=1)) == set()  # second-to-last
    assert rules(_int4_blocks(w_shape=(16, 128), scale_shape=(16, 2), axis=1)) == set()  # last


def test_int4_weights_need_an_even_last_dimension():
    assert rules(_int4_blocks(w_shape=(128, 15), scale_shape=(2, 15))) == {"int4-even"}


def test_zero_points_are_present_and_of_the_quantized_type():
    m = _conv_qdq()
    del m.graph.node[0].input[2]  # Q without a zero point: UINT8 in ONNX, INT8 in TensorRT
    # (so the DQ's INT8 zero point no longer matches the UINT8 levels it reads)
    assert {(v.rule, v.node) for v in check_graph(m)} == {("zero-point-missing", "q_x"), ("zero-point-type", "dq_x")}
    m = _conv_qdq()
    del m.graph.node[1].input[2]  # DQ of a runtime tensor without one: the same ambiguity
    assert rules(m) == {"zero-point-missing"}
    m = _conv_qdq()
    m.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), "z"))
    assert {(v.rule, v.node) for v in check_graph(m)} == {("zero-point-type", "q_x"), ("zero-point-type", "dq_x")}
    m = _conv_qdq()
    m.graph.node[0].attribute.append(helper.make_attribute("output_dtype", TensorProto.INT4))
    assert rules(m) == {"zero-point-type", "int4-activation"}  # and an INT4 activation: TensorRT's INT4 is weight-only
    assert check_graph(_int4_model()) == []  # DQ of a constant int4/int8 weight: its own type, no zero point needed


def test_a_q_feeds_only_dqs():
    m = _conv_qdq()
    m.graph.node.append(helper.make_node("Cast", ["q"], ["qf"], name="reads_levels", to=TensorProto.FLOAT))
    violations = [v for v in check_graph(m) if v.rule == "q-feeds-dq"]
    assert [(v.node, "reads_levels" in v.detail) for v in violations] == [("q_x", True)]
    m = _conv_qdq()
    m.graph.output.append(helper.make_tensor_value_info("q", TensorProto.INT8, None))
    assert rules(m) == {"q-feeds-dq"}


def test_int4_rules():
    assert check_graph(_int4_model()) == []
    assert "int4" in rules(_int4_model(consumer="Add"))
    assert "int4" in rules(_int4_model(block=0, scale_rows=1))
    assert rules(_int4_model(block=128)) == {"block-scale-shape"}  # 128 / 128 = 1 block, but the scale has 2 rows


def test_mixed_float_types():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT16, [2])
    m = _graph([helper.make_node("Add", ["a", "b"], ["y"], name="mixed_add")], [], [a, b])
    assert "strong-typing" in rules(m)


def test_unsupported_opset():
    ok = _conv_qdq()
    assert "opset" in rules(_graph(list(ok.graph.node), list(ok.graph.initializer), opset=11))


def test_opset_range_is_tensorrt_11s_13_to_25():
    ok = _conv_qdq()
    for opset, bad in [(13, False), (21, False), (25, False), (12, True), (26, True)]:
        m = _graph(list(ok.graph.node), list(ok.graph.initializer), list(ok.graph.input), opset=opset)
        assert ("opset" in rules(m)) == bad, opset
