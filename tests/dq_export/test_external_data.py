"""Graphs over the external-data threshold (forced down to a few KB here): written as unet.onnx + one data file,
atomically, and read back by the TensorRT-rules checker, the FP16 pass, the ORT flavor and parity."""
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.core.metrics import sqnr_db
from dilatequant.dq_export import onnx_files
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.fp16 import convert_file as fp16_file
from dilatequant.dq_export.onnx_files import ENV_THRESHOLD, data_path, external_data_threshold, save_model
from dilatequant.dq_export.ort_graph import OrtConfig
from dilatequant.dq_export.ort_graph import convert_file as ort_file
from dilatequant.dq_export.parity import ort_session, parity_inputs, parity_report, run_ort
from dilatequant.dq_export.qdq_graph import export_onnx
from dilatequant.dq_export.trt_rules import check_file, enforce

from conftest import assert_parity, tiny_checkpoint, tiny_uncond

STEPS = 4
THRESHOLD = 4096  # bytes: the tiny UNet's ~50 KB of weights are "over 2 GB" here


def _external(path):
    """{name: (location, offset, length, dtype)} of the graph's external tensors, read without their data."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == TP.EXTERNAL:
            e = {x.key: x.value for x in t.external_data}
            out[t.name] = (e["location"], int(e.get("offset", 0)), int(e["length"]), t.data_type)
    return out


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """A tiny W8A8 export with the threshold forced down (kept down for the module: the passes write too)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_THRESHOLD, str(THRESHOLD))
    tmp = tmp_path_factory.mktemp("external")
    ckpt = tiny_checkpoint(tmp, tiny_uncond(), STEPS, weight_bits=8, act_bits=8, symmetric=True)
    summary = export_onnx(ckpt, tmp / "unet.onnx", ExportConfig())
    yield load_checkpoint(ckpt), tmp / "unet.onnx", summary
    mp.undo()


def test_export_writes_the_graph_and_one_data_file_with_integer_weights(ext):
    _, path, summary = ext
    data = data_path(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["q.pt", "unet.onnx", "unet.onnx.data"]  # no temporaries
    assert summary["external_data"] == str(data)
    assert summary["bytes"] == path.stat().st_size + data.stat().st_size
    tensors = _external(path)
    assert {loc for loc, *_ in tensors.values()} == {"unet.onnx.data"}  # ONE data file, named relative to the graph
    assert all(length > onnx_files.TENSOR_MIN_BYTES // 2 for _, _, length, _ in tensors.values())  # small ones inline
    ends = sorted((off, off + length) for _, off, length, _ in tensors.values())
    assert ends[-1][1] <= data.stat().st_size and all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no overlaps
    # the deployment form: the bulk of the data file is int8 weights (per-timestep tables are the rest)
    int8 = sum(length for _, _, length, dt in tensors.values() if dt == TP.INT8)
    assert int8 >= 0.8 * sum(length for *_, length, _ in tensors.values())
    weights = [t for t in tensors if t.endswith(".w_int")]
    assert len(weights) >= 10 and all(tensors[w][3] == TP.INT8 for w in weights)
    # loading with the data gives the same tensors the file holds, byte for byte
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    raw = data.read_bytes()
    for name, (_, off, length, _) in tensors.items():
        assert full[name].tobytes() == raw[off:off + length], name


def test_parity_runs_ort_from_the_path(ext):
    ck, path, _ = ext
    par = parity_report(path, ck, per_step=2)
    assert [r["t_index"] for r in par["per_t_index"]] == list(range(STEPS))
    assert_parity(par)


def test_rules_checker_reads_the_constants_it_needs_from_the_data_file(ext, tmp_path, monkeypatch):
    _, path, _ = ext
    monkeypatch.chdir(tmp_path)  # the data file is found beside the graph, not in the working folder
    enforce(path)
    # every tensor external, then one weight scale made 0: only a checker that reads external data can see it
    m = onnx.load(str(path))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".w_int"))
    scale = next(i for i in m.graph.initializer if i.name == dq.input[1])
    arr = numpy_helper.to_array(scale).copy()
    arr.reshape(-1)[0] = 0.0
    scale.CopyFrom(numpy_helper.from_array(arr, scale.name))
    monkeypatch.setattr(onnx_files, "TENSOR_MIN_BYTES", 0)
    broken = tmp_path / "g" / "broken.onnx"
    save_model(m, broken, threshold=0)
    assert _external(broken)[scale.name][0] == "broken.onnx.data"
    violations = check_file(broken)
    # the deployment form shares one unit scale among its Q/DQ pairs: every one of them is reported
    users = [n.name for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] == scale.name]
    assert len(users) > 10 and dq.name in users
    assert sorted((v.rule, v.node) for v in violations) == sorted(("positive-scale", u) for u in users), violations[:3]
    assert all(f"scale '{scale.name}'" in v.detail and "min 0.0" in v.detail for v in violations)


def test_fp16_pass_reads_and_writes_external_data(ext, tmp_path):
    ck, path, _ = ext
    out = tmp_path / "unet.fp16.onnx"
    s = fp16_file(path, out)
    assert s["external_data"] == str(data_path(out)) and s["bytes"] == out.stat().st_size + data_path(out).stat().st_size
    tensors = _external(out)
    assert {loc for loc, *_ in tensors.values()} == {"unet.fp16.onnx.data"}
    assert set(tensors) >= {w for w in _external(path) if w.endswith(".w_int")}  # integer weights: in the new file
    half = [i for i in onnx.load(str(out)).graph.initializer if i.data_type == TP.FLOAT16]
    assert len(half) > 10  # (the tiny model's FP16 tensors are all under 1 KB: they stay in the graph file)
    assert all(tensors[w][3] == TP.INT8 for w in tensors if w.endswith(".w_int"))  # integer weights untouched
    assert check_file(out) == []
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["dilatequant.dtype"] == "fp16"
    inputs = parity_inputs(ck, per_step=2)
    ref, got = run_ort(ort_session(path), inputs), run_ort(ort_session(out), inputs)
    assert got.dtype == ref.dtype and sqnr_db(got, ref) >= FP16_SQNR_DB, sqnr_db(got, ref)


# FP16 norms/attention/residuals around exact integer layers, against the FP32 graph: 28-30 dB measured (a quantized
# UNet is discontinuous: FP16 rounding flips some integer levels); weights read wrong from the data file give ~0 dB
FP16_SQNR_DB = 20.0


def test_ort_flavor_rewrites_an_external_data_graph_in_place(ext, tmp_path):
    ck, path, _ = ext
    work = tmp_path / "unet.onnx"
    shutil.copyfile(path, work)
    shutil.copyfile(data_path(path), data_path(work))
    s = ort_file(work, work, OrtConfig(min_reduction=0, min_out_channels=0))  # every layer integer
    assert s["integer_convs"] > 0 and s["external_data"] == str(data_path(work))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    tensors = _external(work)
    assert {loc for loc, *_ in tensors.values()} == {"unet.onnx.data"}
    assert any(n.startswith("ort_int/weight_u8") and dt == TP.UINT8 for n, (*_, dt) in tensors.items())
    inputs = parity_inputs(ck, per_step=2)
    ref, got = run_ort(ort_session(path), inputs), run_ort(ort_session(work), inputs)
    for t in range(STEPS):
        m = inputs["t_index"] == t
        assert sqnr_db(got[m], ref[m]) >= ORT_SQNR_DB, (t, sqnr_db(got[m], ref[m]))


ORT_SQNR_DB = 100.0  # bit-identical here (inf dB measured); ort_graph.py allows float rounding at most


# ---------------------------------------------------------------- the writer itself, on a small graph

def _matmul_graph(n_out: int = 64) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(64 * n_out, dtype=np.float32).reshape(64, n_out) / 100, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [1, n_out])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _fail_midway(monkeypatch):
    real = onnx.external_data_helper.save_external_data

    def write_then_fail(tensor, base_path):
        real(tensor, base_path)  # part of the data is on disk ...
        raise OSError(28, "No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(onnx.external_data_helper, "save_external_data", write_then_fail)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    _fail_midway(monkeypatch)
    with pytest.raises(UserError, match="cannot write .*unet.onnx.* with external data .*No space left"):
        save_model(_matmul_graph(), tmp_path / "unet.onnx", threshold=0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_graph_and_data(tmp_path, monkeypatch):
    path = tmp_path / "unet.onnx"
    save_model(_matmul_graph(64), path, threshold=0)
    before = path.read_bytes(), data_path(path).read_bytes()
    _fail_midway(monkeypatch)
    with pytest.raises(UserError):
        save_model(_matmul_graph(32), path, threshold=0)
    assert (path.read_bytes(), data_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    m = onnx.load(str(path))
    assert numpy_helper.to_array(m.graph.initializer[0]).shape == (64, 64)


def test_threshold_decides_the_form_and_a_stale_data_file_goes(tmp_path, monkeypatch):
    path = tmp_path / "unet.onnx"
    model_bytes = 64 * 64 * 4
    assert save_model(_matmul_graph(), path, threshold=model_bytes - 1)["external_data"] == str(data_path(path))
    assert save_model(_matmul_graph(), path, threshold=model_bytes)["external_data"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]  # the single-file graph needs no data file
    assert onnx.load(str(path)).graph.initializer[0].data_location == TP.DEFAULT
    monkeypatch.delenv(ENV_THRESHOLD, raising=False)
    assert external_data_threshold() == onnx_files.DEFAULT_EXTERNAL_DATA_BYTES == 2**31 - 2**26
    monkeypatch.setenv(ENV_THRESHOLD, "2k")
    with pytest.raises(UserError, match=f"{ENV_THRESHOLD}='2k' is not a byte count"):
        external_data_threshold()


def test_missing_data_file_is_one_clear_error(tmp_path):
    path = tmp_path / "unet.onnx"
    save_model(_matmul_graph(), path, threshold=0)
    os.remove(data_path(path))
    with pytest.raises(UserError, match=r"external data .*unet.onnx.data is missing: keep it beside the graph"):
        fp16_file(path, tmp_path / "out.onnx")


def test_deployment_copy_shares_the_float_tensors_and_holds_integer_weights(ext):
    """The export's memory bound: deploy_unet copies modules, not tensors (a deepcopy of the tensors is a second
    full-precision copy of every weight until the quantized layers are swapped out), and adds int8 weights."""
    import torch

    from dilatequant.dq_export.fold import deploy_unet

    ck, _, _ = ext
    source = {t.data_ptr() for t in (*ck.qunet.unet.parameters(), *ck.qunet.unet.buffers())}
    fp32 = sum(t.numel() * 4 for t in ck.qunet.unet.parameters())
    unet, _ = deploy_unet(ck.qunet)
    params = list(unet.parameters())
    assert len(params) > 20 and all(p.data_ptr() in source for p in params)  # norms, float layers: shared
    new_int8 = sum(t.numel() for t in unet.buffers() if t.dtype == torch.int8 and t.data_ptr() not in source)
    assert new_int8 > 0.8 * fp32 / 4  # the integer weights: about a quarter of the FP32 bytes


# ---------------------------------------------------------------- layer parity and dq-verify on external data


def test_layer_parity_runs_the_teacher_forced_graph_from_a_file_with_external_data(ext):
    """The teacher-forced model holds every weight of the UNet: past 2 GB no serialized bytes can carry it, so the
    runtime gets it as a file, with external data over the threshold, in a scratch folder removed afterwards."""
    from dilatequant.dq_export.layer_parity import layer_parity_report, ort_layer_runner

    ck, path, _ = ext
    before = sorted(p.name for p in path.parent.iterdir())
    seen = {}

    def runner(teacher):
        seen["path"], seen["external"] = teacher, _external(teacher)
        seen["data"] = data_path(teacher).stat().st_size
        return ort_layer_runner(teacher)

    rep = layer_parity_report(path, ck, per_step=2, runner_factory=runner)
    assert rep["passed"] and rep["layers"] > 10 and not rep["unmatched"], rep.get("failures")
    weights = {n for n in _external(path) if n.endswith(".w_int")}
    assert weights <= set(seen["external"]) and seen["data"] > 0  # the graph's integer weights, in a data file
    assert not seen["path"].exists()
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing left beside the graph


def test_dq_verify_runs_an_external_data_graph(ext, tmp_path):
    from dilatequant.engines.verify import VerifyConfig, run_verify

    ck, path, _ = ext
    cfg = VerifyConfig(ckpt=path.parent / "q.pt", runtime=path, report_dir=tmp_path / "r", batches=(1, 2), num_samples=2,
                       traj_samples=2, mapped_steps=(2,), warmup=0, repeats=1)
    r = run_verify(cfg, fp_model=tiny_uncond())
    assert r["layer_parity"]["passed"] and r["layer_parity"]["layers"] > 10, r["layer_parity"]
    per_step = sorted(row["runtime_vs_fake_quant_sqnr_db"] for row in r["accuracy"]["per_step"])
    assert per_step[len(per_step) // 2] >= 80, per_step
    assert r["memory"]["runtime_weight_bytes"] == path.stat().st_size + data_path(path).stat().st_size
