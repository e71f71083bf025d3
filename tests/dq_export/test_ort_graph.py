"""`--target ort`: the integer rewrite is exact, really integer, and still selects scales by t_index."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.core.metrics import sqnr_db
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.ort_graph import OrtConfig, convert_file, to_ort
from dilatequant.dq_export.parity import ort_session, parity_inputs, run_ort
from dilatequant.dq_export.pipeline import export_and_verify
from dilatequant.dq_export.qdq_graph import export_onnx

from conftest import assert_parity, tiny_checkpoint, tiny_cond, tiny_uncond

STEPS = 4
ALL_INTEGER = OrtConfig(min_reduction=0, min_out_channels=0)


def _checkpoint(tmp, model, **cfg):
    return tiny_checkpoint(tmp, model, STEPS, **cfg)


@pytest.fixture(scope="module")
def uncond_sym_ort(tmp_path_factory):
    """The whole pipeline with --target ort: rewrite, TensorRT rules skipped, parity against fake-quant."""
    tmp = tmp_path_factory.mktemp("ort_uncond")
    ck = _checkpoint(tmp, tiny_uncond(), weight_bits=8, act_bits=8, symmetric=True)
    summary = export_and_verify(ck, tmp / "unet.onnx", ExportConfig(target="ort"), per_step=5)
    return ck, tmp / "unet.onnx", summary


@pytest.fixture(scope="module")
def cond_asym_pair(tmp_path_factory):
    """A TensorRT-style graph (asymmetric W4A8, quantized attention) and its ORT rewrite, every layer integer
    (the tiny model's layers are under the default size thresholds)."""
    tmp = tmp_path_factory.mktemp("ort_cond")
    ck = _checkpoint(tmp, tiny_cond(), weight_bits=4, act_bits=8, symmetric=False, attn_matmul=True)
    export_onnx(ck, tmp / "trt.onnx", ExportConfig())
    stats = convert_file(tmp / "trt.onnx", tmp / "ort.onnx", ALL_INTEGER)
    return load_checkpoint(ck), tmp / "trt.onnx", tmp / "ort.onnx", stats


def test_pipeline_parity_with_fake_quant_at_every_t_index(uncond_sym_ort):
    _, path, summary = uncond_sym_ort
    par = summary["parity"]
    assert [r["t_index"] for r in par["per_t_index"]] == list(range(STEPS))
    assert_parity(par)
    assert summary["trt_rules"].startswith("skipped")
    stats = summary["ort_graph"]  # default thresholds: the tiny model's layers all stay float (folded weights)
    assert stats["matched"] > 0 and stats["float_kept"] == stats["matched"]
    # every symmetric layer but the last conv (its chain ends in the graph output) has its rescale chain fused
    assert stats["float_kept_fused_epilogue"] == stats["matched"] - 1
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) > 0 and [n.op_type for n in graph.node].count("Round") == 1
    for n in dqs:  # per-sample step sizes gathered by t_index: never a constant weight DQ
        assert helper.get_attribute_value(n.attribute[0]) == 0 and n.input[1] not in inits and n.input[0] not in inits
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["dilatequant.target"] == "ort" and json.loads(meta["dilatequant.num_steps"]) == STEPS
    written = json.loads((path.parent / "unet.onnx.export.json").read_text())
    assert written["config"]["target"] == "ort"


def test_ort_flavor_equals_trt_graph_at_every_t_index(cond_asym_pair):
    ck, trt_path, ort_path, _ = cond_asym_pair
    inputs = parity_inputs(ck, per_step=2)
    ref = run_ort(ort_session(trt_path), inputs)
    out = run_ort(ort_session(ort_path), inputs)
    for t in range(STEPS):
        m = inputs["t_index"] == t
        # unit weight scales (asymmetric): integer sums, bit-identical or a last-bit difference at most
        assert sqnr_db(out[m], ref[m]) >= 100, t


def test_integer_ops_replace_every_quantized_layer(cond_asym_pair):
    _, trt_path, ort_path, stats = cond_asym_pair
    trt, m = onnx.load(str(trt_path)), onnx.load(str(ort_path))
    ops = [n.op_type for n in m.graph.node]
    trt_producers = {o: n for n in trt.graph.node for o in n.output}
    n_conv = sum(n.op_type == "Conv" and getattr(trt_producers.get(n.input[1]), "op_type", "") == "DequantizeLinear"
                 for n in trt.graph.node)
    # what stays a float Conv: only the asymmetric zero-point responses Conv(ones, sum_c W) ([Cout, 1, kh, kw])
    w_sums = {i.name for i in m.graph.initializer if len(i.dims) == 4 and i.dims[1] == 1}
    assert stats["integer_convs"] == n_conv > 0
    assert all(n.input[1] in w_sums for n in m.graph.node if n.op_type == "Conv")
    assert ops.count("MatMulIntegerToFloat") == stats["integer_convs"] + stats["integer_matmuls"]
    inits = {i.name for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:  # what is left in float: only activation x activation attention matmuls
        if n.op_type == "MatMul":
            for i in n.input:
                p = producers.get(i)
                assert not (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits), n.name
    # and ONNX Runtime keeps them integer after its own optimizations
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(ort_path.parent / "optimized.onnx")
    ort.InferenceSession(str(ort_path), so, providers=["CPUExecutionProvider"])
    opt_ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    integer = sum(o in ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul") for o in opt_ops)
    assert integer >= ops.count("MatMulIntegerToFloat") and opt_ops.count("Conv") <= ops.count("Conv")


def test_symmetric_integer_layers_take_the_weight_scale_in_the_gemm(tmp_path):
    """Symmetric layers: the per-channel weight-scale Mul after the op becomes MatMulIntegerToFloat's b_scale."""
    ck = _checkpoint(tmp_path, tiny_uncond(), weight_bits=8, act_bits=8, symmetric=True)
    export_onnx(ck, tmp_path / "trt.onnx", ExportConfig())
    stats = convert_file(tmp_path / "trt.onnx", tmp_path / "ort.onnx", ALL_INTEGER)
    graph = onnx.load(str(tmp_path / "ort.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == stats["integer_convs"] + stats["integer_matmuls"] > 0
    assert not any(np.all(inits[n.input[3]] == 1) for n in gemms)  # the weight scales, not the unit scale
    inputs = parity_inputs(load_checkpoint(ck), per_step=2)
    ref, out = run_ort(ort_session(tmp_path / "trt.onnx"), inputs), run_ort(ort_session(tmp_path / "ort.onnx"), inputs)
    for t in range(STEPS):
        m = inputs["t_index"] == t
        assert sqnr_db(out[m], ref[m]) >= 100, t


@pytest.mark.parametrize("graphs", ["cond_asym_pair", "uncond_sym_ort"])
def test_wrong_t_index_changes_the_output(graphs, request):
    if graphs == "cond_asym_pair":
        ck, _, ort_path, _ = request.getfixturevalue(graphs)
    else:  # symmetric: the fused per-sample DequantizeLinear carries the step sizes
        ck_path, ort_path, _ = request.getfixturevalue(graphs)
        ck = load_checkpoint(ck_path)
    inputs = parity_inputs(ck, per_step=2)
    right = run_ort(ort_session(ort_path), inputs)
    wrong = run_ort(ort_session(ort_path), {**inputs, "t_index": (inputs["t_index"] + 1) % STEPS})
    assert sqnr_db(wrong, right) < 40  # the per-timestep tables still act; parity is >= 100 dB


def _trt_style_conv(x_shape, w, scale, **attrs):
    """fold.py's unit-grid pattern around a single Conv."""
    c = lambda a, n: numpy_helper.from_array(np.asarray(a), n)  # noqa: E731
    inits = [c(w, "w"), c(scale, "ws"), c(np.array(1.0, np.float32), "one"), c(np.array(0, np.int8), "z"),
             c(np.zeros(len(scale), np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "one", "z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["dq", "wd"], ["conv"], **attrs),
             helper.make_node("Relu", ["conv"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("kernel,attrs", [
    (3, dict(pads=[1, 1, 1, 1], strides=[2, 2])),     # diffusers' downsampler
    (3, dict(pads=[0, 1, 2, 1], strides=[1, 2])),     # uneven pads and strides
    (1, dict()),                                      # 1x1 shortcut / proj conv
    (2, dict(pads=[1, 0, 0, 1], strides=[1, 1])),
])
def test_conv_rewrite_is_exact_for_pads_and_strides(kernel, attrs):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 5, kernel, kernel)).astype(np.int8)
    scale = (0.5 ** rng.integers(0, 4, 6)).astype(np.float32)  # powers of two: every product exact
    x = rng.uniform(-140, 140, (2, 5, 7, 9)).astype(np.float32)    # outside the int8 grid too: saturation
    trt = _trt_style_conv(list(x.shape), w, scale, **attrs)
    new, stats = to_ort(trt, ALL_INTEGER)
    assert stats["integer_convs"] == 1 and "Conv" not in [n.op_type for n in new.graph.node]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    ref, out = run(trt), run(new)
    assert out.shape == ref.shape and np.array_equal(out, ref)


def test_thresholds_keep_small_layers_in_float():
    rng = np.random.default_rng(0)
    trt = _trt_style_conv([1, 5, 4, 4], rng.integers(-127, 128, (6, 5, 3, 3)).astype(np.int8),
                          np.ones(6, np.float32), pads=[1, 1, 1, 1])
    x = rng.uniform(-140, 140, (1, 5, 4, 4)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    kept, stats = to_ort(trt, OrtConfig(min_reduction=46, min_out_channels=0))
    assert stats["integer_convs"] == 0 and stats["float_kept"] == 1
    assert np.array_equal(run(kept), run(trt))  # folded float weight: DequantizeLinear's own values
    _, stats = to_ort(trt, OrtConfig(min_reduction=45, min_out_channels=6))
    assert stats["integer_convs"] == 1
    _, stats = to_ort(trt, OrtConfig(min_reduction=45, min_out_channels=7))
    assert stats["integer_convs"] == 0


def test_target_is_validated():
    with pytest.raises(UserError, match="unknown target"):
        ExportConfig(target="openvino")
    with pytest.raises(UserError, match="fp16"):
        ExportConfig(target="ort", dtype="fp16")
    assert ExportConfig().target == "tensorrt"


def test_int8_gemm_counts_as_exact_only_with_vnni_on_x86(monkeypatch, tmp_path):
    """Without VNNI, MLAS's uint8 x int8 kernel saturates: ORT sessions must not fuse DQ -> MatMul into it."""
    from dilatequant.dq_export import parity

    on_this_cpu = "QDQSelectorActionTransformer" in parity.ORT_DISABLED_OPTIMIZERS
    assert on_this_cpu == (not parity.int8_gemm_is_exact())
    cpuinfo = tmp_path / "cpuinfo"
    real_path = parity.Path
    monkeypatch.setattr(parity, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    monkeypatch.setattr(parity.platform, "machine", lambda: "x86_64")
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 fma\n")                  # AMD EPYC (Zen 2/3), Haswell..Skylake client
    assert not parity.int8_gemm_is_exact()
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")  # Cascade Lake and newer Xeons
    assert parity.int8_gemm_is_exact()
    cpuinfo.write_text("flags\t\t: fpu avx2 avx_vnni\n")                  # Alder Lake
    assert parity.int8_gemm_is_exact()
    cpuinfo.unlink()                                                     # cannot tell: the exact path
    assert not parity.int8_gemm_is_exact()
    monkeypatch.setattr(parity.platform, "machine", lambda: "aarch64")
    assert parity.int8_gemm_is_exact()
