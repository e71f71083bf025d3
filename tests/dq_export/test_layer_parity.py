"""Teacher-forced layer-wise parity: passes on correct exports, and a planted wrong scale, zero point or t_index
table each make it - and dq-export - fail. INT4 runs weight-only (W4A16)."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.dq_export import pipeline
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.fold import w4a16_reference
from dilatequant.dq_export.layer_parity import LayerParityError, layer_parity_report
from dilatequant.dq_export.pipeline import export_and_verify
from dilatequant.dq_export.qdq_graph import export_onnx
from dilatequant.dq_export.trt_rules import check_graph

from conftest import tiny_checkpoint, tiny_cond, tiny_uncond
from graph_faults import plant_fault

STEPS = 4
PLANT_LAYER = "down_blocks.0.resnets.0.conv1"


def _export(tmp, model, precision="int8", **cfg):
    ck = tiny_checkpoint(tmp, model, STEPS, **cfg)
    s = export_and_verify(ck, tmp / f"{precision}.onnx", ExportConfig(precision=precision), per_step=2,
                          fp_model=model)
    return ck, tmp / f"{precision}.onnx", s, model


@pytest.fixture(scope="module")
def w8a8_sym(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("w8a8"), tiny_uncond(), weight_bits=8, act_bits=8, symmetric=True,
                   float_layers=())


@pytest.fixture(scope="module")
def w4a8_asym(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("w4a8"), tiny_cond(), weight_bits=4, act_bits=8, symmetric=False,
                   attn_matmul=True)


@pytest.fixture(scope="module")
def w4a8_asym_int4(w4a8_asym):
    ck, path, _, model = w4a8_asym
    s = export_and_verify(ck, path.parent / "int4.onnx", ExportConfig(precision="int4"), per_step=2, fp_model=model)
    return ck, path.parent / "int4.onnx", s, model


def _assert_exact_layers(s, weight_only: int = 0):
    lp = s["layer_parity"]
    assert lp["passed"] and not lp["failures"] and not lp["unmatched"], lp["failures"]
    assert lp["t_index_values"] == STEPS and all(e["t_index_covered"] == STEPS for e in lp["per_layer"])
    assert lp["max_level_diff"] <= 1 and lp["differing_share"] < 1e-4
    assert lp["min_layer_sqnr_db"] >= 60
    assert lp["levels_compared"] > 10_000
    assert sum(e["mode"] == "w4a16" for e in lp["per_layer"]) == weight_only
    assert lp["inputs"].startswith("calibration set")  # real calibration inputs, from the FP model's trajectories


def test_layer_parity_passes_w8a8_symmetric_int8(w8a8_sym):
    ck, _, s, _ = w8a8_sym
    _assert_exact_layers(s)
    assert s["layer_parity"]["layers"] == len(load_checkpoint(ck).qunet.layers())  # every quantized layer, conv_in too


def test_layer_parity_passes_w4a8_asymmetric_int8(w4a8_asym):
    ck, _, s, _ = w4a8_asym
    _assert_exact_layers(s)
    q = load_checkpoint(ck).qunet
    operands = [e["layer"] for e in s["layer_parity"]["per_layer"] if ":" in e["layer"]]
    # every per-head table of the attention matmuls (q, k, v, softmax output) is checked too
    assert len(operands) == sum(k.rsplit("/", 1)[-1].startswith("attn_") for k in q.act_quantizers) > 0
    assert s["layer_parity"]["layers"] == len(q.layers()) + len(operands)


def test_int4_runs_weight_only_gemms_with_float_activations(w4a8_asym_int4):
    ck, path, s, _ = w4a8_asym_int4
    assert s["int4_layers"], "4-bit linear layers whose input splits into 32-blocks run as INT4 GEMMs"
    _assert_exact_layers(s, weight_only=len(s["int4_layers"]))
    m = onnx.load(str(path))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    int4_gemms = 0
    for n in m.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in producers:
            continue
        w = producers[n.input[1]]
        if w.op_type == "DequantizeLinear" and inits.get(w.input[0]) is not None \
                and inits[w.input[0]].data_type == onnx.TensorProto.INT4:
            int4_gemms += 1
            act = producers.get(n.input[0])
            assert act is None or act.op_type != "DequantizeLinear", "INT4 GEMM activation must stay float (W4A16)"
    assert int4_gemms == len(s["int4_layers"])
    assert not check_graph(m)


def test_int4_on_a_checkpoint_without_4bit_weights_is_a_clear_error(w8a8_sym, tmp_path):
    ck, _, _, _ = w8a8_sym
    with pytest.raises(UserError, match="--precision int4 needs 4-bit weights.*W8A8"):
        export_onnx(ck, tmp_path / "x.onnx", ExportConfig(precision="int4"))
    assert not (tmp_path / "x.onnx").exists()


def test_trt_rule_int4_gemm_activation_must_not_pass_int8_qdq(w4a8_asym_int4, tmp_path):
    _, path, _, _ = w4a8_asym_int4
    m = onnx.load(str(path))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    gemm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in producers
                and producers[n.input[1]].op_type == "DequantizeLinear"
                and inits[producers[n.input[1]].input[0]].data_type == onnx.TensorProto.INT4)
    # put an INT8 Q/DQ (scale 1, zero point 0) in front of the INT4 GEMM: W4A8, which TensorRT has no kernel for
    m.graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), "t_s"),
                                numpy_helper.from_array(np.array(0, np.int8), "t_z")])
    m.graph.node.extend([onnx.helper.make_node("QuantizeLinear", [gemm.input[0], "t_s", "t_z"], ["t_q"]),
                         onnx.helper.make_node("DequantizeLinear", ["t_q", "t_s", "t_z"], ["t_dq"])])
    gemm.input[0] = "t_dq"
    onnx.save(m, str(tmp_path / "w4a8.onnx"))
    rules = [v.rule for v in check_graph(onnx.load(str(tmp_path / "w4a8.onnx")))]
    assert rules.count("int4-activation") == 1, rules


# ---------------------------------------------------------------- planted faults


def _plant(src, dst, kind: str, t: int = 1) -> None:
    plant_fault(src, dst, kind, PLANT_LAYER, STEPS, t)


@pytest.fixture(scope="module")
def reference(w4a8_asym):
    ck, _, _, _ = w4a8_asym
    return load_checkpoint(ck)


@pytest.mark.parametrize("kind", ["scale", "zero_point", "t_index"])
def test_planted_fault_fails_layer_parity_at_that_layer(w4a8_asym, reference, tmp_path, kind):
    _, path, _, model = w4a8_asym
    bad = tmp_path / f"{kind}.onnx"
    _plant(path, bad, kind)
    rep = layer_parity_report(bad, reference, per_step=2, fp_model=model)
    assert not rep["passed"]
    failing = {f.split(":")[0] for f in rep["failures"]}
    assert failing == {PLANT_LAYER}, rep["failures"]  # the other layers are still exact
    e = next(e for e in rep["per_layer"] if e["layer"] == PLANT_LAYER)
    assert e["differing_share"] >= 1e-4
    if kind == "zero_point":  # every level of that row moves by exactly one: the share catches it
        assert e["max_level_diff"] == 1 and e["differing_levels"] >= e["levels"] // STEPS // 2
    else:
        assert e["max_level_diff"] > 1 and e["min_sqnr_db"] < 60
    assert rep["max_level_diff"] == e["max_level_diff"]


@pytest.mark.parametrize("kind", ["scale", "zero_point", "t_index"])
def test_planted_fault_makes_dq_export_fail(w4a8_asym, tmp_path, monkeypatch, capsys, kind):
    """dq-export (the CLI, in process) exits 2 with one line naming the layer; the report is still written."""
    ck, path, s, model = w4a8_asym

    def export_with_fault(ckpt, onnx_path, cfg):  # the fixture's real export, with the fault planted in its tables
        _plant(path, onnx_path, kind)
        return dict(s, onnx=str(onnx_path))

    monkeypatch.setattr(pipeline, "export_onnx", export_with_fault)
    from dilatequant.core import models

    monkeypatch.setattr(models, "load_model", lambda source: model)
    from dilatequant.cli import export_main

    with pytest.raises(SystemExit) as ex:
        export_main(["--ckpt", str(ck), "--onnx", str(tmp_path / "unet.onnx")])
    err = capsys.readouterr().err
    assert ex.value.code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "layer-wise parity failed" in lines[0] and PLANT_LAYER in lines[0], err
    assert "Traceback" not in err
    assert (tmp_path / "unet.onnx.export.json").is_file()


def test_layer_parity_error_is_a_user_error():
    assert issubclass(LayerParityError, UserError)


def test_w4a16_reference_switches_only_the_int4_layers_inputs_off(w4a8_asym_int4):
    ck, _, s, _ = w4a8_asym_int4
    c = load_checkpoint(ck)
    w4a16_reference(c.qunet, s["int4_layers"])
    layers = c.qunet.layers()
    off = {n for n, m in layers.items() if m.input_quantizer.mode == "off"}
    assert off == set(s["int4_layers"])


# ---------------------------------------------------------------- dq-verify's section, and TensorRT through Polygraphy


def test_verify_reports_layer_parity_and_fp_agreement(w4a8_asym, tmp_path):
    from dilatequant.engines.onnxruntime.runner import OrtRunner
    from dilatequant.engines.verify import VerifyConfig, _layer_parity, fp_agreement, layer_parity_markdown

    ck, path, _, model = w4a8_asym
    cfg = VerifyConfig(ckpt=ck, runtime=path, report_dir=tmp_path)
    lp = _layer_parity(cfg, load_checkpoint(ck), OrtRunner(path), [], model)
    assert lp["passed"] and lp["layers"] > 50
    rows = [{"t_index": 0, "runtime_vs_fp_sqnr_db": 20.0, "fake_quant_vs_fp_sqnr_db": 20.05},
            {"t_index": 1, "runtime_vs_fp_sqnr_db": 18.0, "fake_quant_vs_fp_sqnr_db": 18.3}]
    agree = fp_agreement(rows)
    assert agree["worst_t_index"] == 1 and not agree["within"] and abs(agree["max_sqnr_gap_db"] - 0.3) < 1e-9
    md = "\n".join(layer_parity_markdown(lp, agree))
    assert "**passed**" in md and "NOT within 0.1 dB" in md and f"{lp['layers']} layers" in md
    _plant(path, tmp_path / "bad.onnx", "scale")
    bad = _layer_parity(VerifyConfig(ckpt=ck, runtime=tmp_path / "bad.onnx"), load_checkpoint(ck),
                        OrtRunner(tmp_path / "bad.onnx"), [], model)
    assert not bad["passed"] and "**FAILED**" in "\n".join(layer_parity_markdown(bad, None))


def test_tensorrt_layer_runner_through_polygraphy_on_a_fake(w4a8_asym, monkeypatch):
    """The Polygraphy path: profile from batch 1 to the first batch, marked outputs, outputs copied out of host
    buffers TrtRunner reuses. The fake TrtRunner runs the ONNX in ONNX Runtime and reuses its output arrays."""
    import polygraphy.backend.trt as ptrt

    from dilatequant.dq_export.parity import ort_session_from_bytes
    from dilatequant.engines.tensorrt import layer_runner as layer_runners

    record = {"profiles": None, "infer": 0}

    class FakeConfig:
        def __init__(self, profiles=None, **kw):
            record["profiles"] = profiles

    class FakeRunner:
        def __init__(self, engine, name=None):
            self.path = engine[0].path
            self.buffers = {}

        def activate(self):
            self.sess = ort_session_from_bytes(self.path)

        def infer(self, feeds, copy_outputs_to_host=True):
            record["infer"] += 1
            names = [o.name for o in self.sess.get_outputs()]
            for n, v in zip(names, self.sess.run(names, feeds)):
                buf = self.buffers.get(n)
                if buf is None or buf.shape[0] < v.shape[0]:
                    buf = self.buffers[n] = np.empty_like(v)
                buf[: v.shape[0]] = v  # the same host buffer every call
            return {n: self.buffers[n][: len(feeds["t_index"])] for n in names}

        def deactivate(self):
            pass

    class FakeNetwork:
        def __init__(self, path):  # the teacher-forced graph is parsed from its file (external data beside it)
            self.path = path

    monkeypatch.setattr(layer_runners, "require_trt_and_gpu", lambda: (None, None))
    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", FakeNetwork)
    monkeypatch.setattr(ptrt, "EngineFromNetwork", lambda net, config=None: (net, config))
    monkeypatch.setattr(ptrt, "CreateConfig", FakeConfig)
    monkeypatch.setattr(ptrt, "TrtRunner", FakeRunner)
    ck, path, _, model = w4a8_asym
    rep = layer_parity_report(path, load_checkpoint(ck), per_step=3, batch=8, fp_model=model,
                              runner_factory=layer_runners.trt_layer_runner)
    assert rep["runtime"] == "tensorrt" and rep["passed"], rep["failures"]
    assert record["infer"] == 2  # 12 inputs: a batch of 8, then 4
    prof = record["profiles"][0]
    assert prof["t_index"].min == (1,) and prof["t_index"].max == (8,)
    _plant(path, path.parent / "trt_bad.onnx", "t_index")
    bad = layer_parity_report(path.parent / "trt_bad.onnx", load_checkpoint(ck), per_step=3, batch=8, fp_model=model,
                              runner_factory=layer_runners.trt_layer_runner)
    assert not bad["passed"]


def test_data_dependence_walks_a_graph_deeper_than_the_recursion_limit():
    """An SDXL graph's data path is thousands of nodes deep: the walk uses a stack, not Python recursion."""
    import sys

    import onnx_ir as ir

    from dilatequant.dq_export.layer_parity import _is_data

    depth = 3 * sys.getrecursionlimit()
    x = ir.Value(name="sample", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    t = ir.Value(name="t_index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    nodes, v, table = [], x, t
    for i in range(depth):
        relu = ir.Node("", "Relu", [v], name=f"r{i}")
        shape = ir.Node("", "Shape", [v], name=f"s{i}")  # shapes of data are not data
        cast = ir.Node("", "Cast", [table], attributes=[ir.AttrInt64("to", 1)], name=f"c{i}")
        nodes += [relu, shape, cast]
        v, table = relu.outputs[0], cast.outputs[0]
    ir.Graph([x, t], [v, table, shape.outputs[0]], nodes=nodes, name="deep")
    memo = {}
    assert _is_data(v, memo, {"sample"}) is True
    assert _is_data(table, memo, {"sample"}) is False and _is_data(shape.outputs[0], memo, {"sample"}) is False
    assert _is_data(nodes[0].outputs[0], memo, {"sample"}) is True and _is_data(None, memo, {"sample"}) is False
