"""FP8 (E4M3) export: the graph's FP8 Q/DQ form and metadata, layer-wise parity at every t_index within the stated
float32 summation bound (and its failure on a planted 1.25x scale row or on tables that ignore t_index), the FP8
TensorRT rules, the FP16 fallback, and a TensorRT-RTX build for compute capability 8.9 (refused for 8.6)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.layer_parity import layer_parity_report
from dilatequant.dq_export.pipeline import export_and_verify
from dilatequant.dq_export.qdq_graph import export_onnx
from dilatequant.dq_export.trt_rules import check_graph

from conftest import assert_parity, rtx_build, tiny_checkpoint, tiny_cond
from graph_faults import plant_fault

STEPS = 4
PLANT_LAYER = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """An FP8 q.pt of the conditional tiny model, every layer and the attention matmuls quantized, exported."""
    tmp = tmp_path_factory.mktemp("fp8")
    model = tiny_cond()
    ck = tiny_checkpoint(tmp, model, STEPS, weight_bits=8, act_bits=8, symmetric=True, format="fp8",
                         attn_matmul=True, float_layers=())
    s = export_and_verify(ck, tmp / "fp8.onnx", ExportConfig(), per_step=2, fp_model=model)
    return ck, tmp / "fp8.onnx", s, model


@pytest.fixture(scope="module")
def reference(fp8):
    return load_checkpoint(fp8[0])


def _initializers(m):
    return {i.name: i for i in m.graph.initializer}


def test_graph_is_fp8_qdq_with_unit_scales_and_zero_points(fp8):
    _, path, s, _ = fp8
    m = onnx.load(str(path))
    inits = _initializers(m)
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant"}
    value = lambda name: numpy_helper.to_array(inits.get(name) or consts[name])  # noqa: E731
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and s["precision"] == "fp8"
    for n in qdq:
        assert float(value(n.input[1])) == 1.0  # constant unit scale: the step size lives in the Mul before the Q
        zp = inits.get(n.input[2]) or consts[n.input[2]]
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and float(numpy_helper.to_array(zp).astype(np.float32)) == 0.0
    weights = [inits[n.input[0]] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == len(load_checkpoint(fp8[0]).qunet.layers())
    assert all(w.data_type == TensorProto.FLOAT8E4M3FN for w in weights)
    assert not any(i.data_type in (TensorProto.INT8, TensorProto.UINT8) for i in m.graph.initializer)
    props = {p.key: p.value for p in m.metadata_props}
    assert props["dilatequant.format"] == "fp8" and props["dilatequant.precision"] == "fp8"
    assert props["dilatequant.min_compute_capability"] == "8.9"
    assert check_graph(m) == [] and s["trt_rules"] == "passed"


def test_layer_parity_within_the_summation_bound_at_every_t_index(fp8, reference):
    _, _, s, _ = fp8
    lp = s["layer_parity"]
    assert lp["passed"] and not lp["failures"] and not lp["unmatched"], lp["failures"]
    assert all(e["t_index_covered"] == STEPS for e in lp["per_layer"])
    assert {e["mode"] for e in lp["per_layer"]} == {"fp8"}
    operands = [e for e in lp["per_layer"] if ":" in e["layer"]]  # q, k, v, softmax output of every attention
    assert lp["layers"] == len(reference.qunet.layers()) + len(operands) and operands
    assert lp["max_level_diff"] == 0 and lp["levels_compared"] > 10_000  # the same E4M3 levels, bit for bit
    assert 0 < lp["max_error_over_bound"] <= 1.0  # sums differ (order), always within the bound
    assert lp["min_layer_sqnr_db"] >= 60
    assert_parity(s["parity"])  # end to end, ONNX Runtime against the PyTorch fake-quant at every t_index


@pytest.mark.parametrize("kind,factor", [("scale", 1.25), ("same_rows", 1.0), ("step", 1.25), ("step", 1.0003)])
def test_planted_scale_row_or_ignored_t_index_fails_at_that_layer(fp8, reference, tmp_path, kind, factor):
    """scale: row 1 of the multiplier before the Q x1.25; same_rows: every row is row 0 (t_index ignored); step: row
    1 of the step size after the op x factor (the levels stay right: the summation bound catches the output, at
    1.0003 where the output SQNR, ~70 dB, would still pass its 60 dB threshold)."""
    _, path, _, model = fp8
    bad = tmp_path / f"{kind}.onnx"
    plant_fault(path, bad, kind, PLANT_LAYER, STEPS, factor=factor)
    rep = layer_parity_report(bad, reference, per_step=2, fp_model=model)
    assert not rep["passed"]
    assert {f.split(":")[0] for f in rep["failures"]} == {PLANT_LAYER}, rep["failures"]
    e = next(e for e in rep["per_layer"] if e["layer"] == PLANT_LAYER)
    wrong = [r for r in e["per_t_index"] if r["differing_levels"]]
    if kind == "scale":  # about two E4M3 steps (3 mantissa bits: 1.25 = 1 + 2/8) on nearly every level of row 1
        assert [r["t_index"] for r in wrong] == [1] and max(r["max_level_diff"] for r in wrong) >= 2
        assert wrong[0]["differing_levels"] > 0.9 * wrong[0]["levels"] and wrong[0]["sqnr_db"] < 30
    elif kind == "same_rows":  # t_index 0 is still right, every other step is wrong
        assert [r["t_index"] for r in wrong] == list(range(1, STEPS))
        assert all(r["differing_levels"] >= 1e-4 * r["levels"] for r in wrong)
    else:
        assert not wrong and e["max_error_over_bound"] > 1.0
        bad_t = [r["t_index"] for r in e["per_t_index"] if r["error_over_bound"] > 1.0]
        assert bad_t == [1] and "summation bound at t_index 1" in " ".join(rep["failures"])
        if factor < 1.001:
            assert min(r["sqnr_db"] for r in e["per_t_index"]) > 60  # SQNR alone would have passed it


def test_target_ort_and_precision_mismatches_are_one_line_errors(fp8, tmp_path):
    ck, _, _, _ = fp8
    with pytest.raises(UserError, match="--target ort has no FP8 flavor"):
        export_onnx(ck, tmp_path / "x.onnx", ExportConfig(target="ort"))
    with pytest.raises(UserError, match="this q.pt is FP8"):
        export_onnx(ck, tmp_path / "x.onnx", ExportConfig(precision="int8"))
    with pytest.raises(UserError, match="--precision fp8 needs a q.pt calibrated with --format fp8"):
        ExportConfig(precision="fp8").for_checkpoint("int")
    assert not (tmp_path / "x.onnx").exists()


def test_fp16_fallback_keeps_the_fp8_layers_and_passes_the_rules(fp8, tmp_path):
    from dilatequant.dq_export.fp16 import convert_file
    from dilatequant.dq_export.parity import ort_session

    _, path, _, _ = fp8
    out = tmp_path / "fp16.onnx"
    convert_file(path, out)
    m = onnx.load(str(out))
    assert check_graph(m) == []
    halves = sum(1 for v in m.graph.initializer if v.data_type == TensorProto.FLOAT16)
    assert halves > 0  # the float parts run in FP16 ...
    fp8_weights = [v for v in m.graph.initializer if v.data_type == TensorProto.FLOAT8E4M3FN]
    assert len(fp8_weights) == len(list(_fp8_weights(onnx.load(str(path)))))  # ... every FP8 weight stays FP8
    feeds = {i.name: _example(i) for i in ort_session(path).get_inputs()}
    a, b = ort_session(path).run(None, feeds)[0], ort_session(out).run(None, feeds)[0]
    # FP16 rounding of the float parts moves E4M3 levels more often than INT8 ones (E4M3's levels are dense near
    # zero): rounding every quantized layer's input to FP16 in PyTorch alone costs this tiny random UNet ~22 dB
    # against FP32 for FP8 and ~33 dB for INT8 (docs/fp8.md); a broken pass lands far below
    assert 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2)) > 15


def _fp8_weights(m):
    return (v for v in m.graph.initializer if v.data_type == TensorProto.FLOAT8E4M3FN)


def _example(inp):
    shape = [2 if not isinstance(d, int) else d for d in inp.shape]
    if inp.name == "t_index":
        return np.array([0, STEPS - 1][: shape[0]], dtype=np.int64)
    if inp.name == "timestep":
        return np.array([999, 10][: shape[0]], dtype=np.int64)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_tensorrt_rtx_builds_the_fp8_graph_for_ada_and_refuses_ampere(fp8):
    _, path, _, _ = fp8
    ada = rtx_build(path, (8, 9))
    assert ada.verdict == "built" and ada.details["plan_bytes"] > 0, ada.errors
    ampere = rtx_build(path, (8, 6))  # NVIDIA's builder itself (dq-build-engine refuses before it: test_trt_rtx_build)
    assert ampere.verdict == "builder refused"
    assert any("fp8" in e.lower() and "sm86" in e for e in ampere.errors), ampere.errors


def _fp8_conv_graph(zp=0.0, act_type=TensorProto.FLOAT8E4M3FN, weight_type=TensorProto.FLOAT8E4M3FN, opset=21,
                    metadata=True):
    """x * 0.5 -> Q/DQ (unit scale) -> Conv(DQ(W)): the exported FP8 layer's form, built by hand."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "mult"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             helper.make_tensor("zp_a", act_type, [], [zp]),
             helper.make_tensor("w", weight_type, list(w.shape), w.flatten().tolist()),
             helper.make_tensor("zp_w", weight_type, [], [0])]
    nodes = [helper.make_node("Mul", ["x", "mult"], ["u"], name="mul"),
             helper.make_node("QuantizeLinear", ["u", "one", "zp_a"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "one", "zp_a"], ["v"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "one", "zp_w"], ["wd"], name="dq_w"),
             helper.make_node("Conv", ["v", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if metadata:
        m.metadata_props.add(key="dilatequant.format_version", value="1")
        m.metadata_props.add(key="dilatequant.min_compute_capability", value="8.9")
    return m


@pytest.mark.parametrize("graph,rule", [
    (dict(), None),
    (dict(zp=0.5), "zero-point"),  # TensorRT's parser would ignore it and build something else than ONNX computes
    (dict(act_type=TensorProto.FLOAT8E5M2, weight_type=TensorProto.FLOAT8E5M2), "fp8-type"),
    (dict(weight_type=TensorProto.INT8), "fp8-mixed"),  # FP8 activation, INT8 weight: no kernel
    (dict(opset=18), "fp8-opset"),
    (dict(metadata=False), None),  # a graph from another tool: no dilatequant metadata asked for
])
def test_fp8_rules(graph, rule):
    m = _fp8_conv_graph(**graph)
    assert {v.rule for v in check_graph(m)} == ({rule} if rule else set())


def test_fp8_graph_without_its_metadata_still_needs_compute_capability_8_9():
    """The builders read the requirement from the tensor types too: a graph from another tool, or one whose
    metadata was stripped, is not built for a GPU without FP8."""
    from dilatequant.engines.tensorrt.targets import graph_requirement

    m = _fp8_conv_graph()
    del m.metadata_props[1]  # dilatequant.min_compute_capability
    assert check_graph(m) == []
    need = graph_requirement(m, {})
    assert need.cc == (8, 9) and "FP8" in need.reason, need
