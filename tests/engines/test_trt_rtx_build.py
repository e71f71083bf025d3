"""Real NVIDIA engines from every graph flavor dq-export emits: TensorRT-RTX's parser and builder (CPU-only ahead of
time, no GPU), through dq-build-engine's own path (rules check, child process, plan, sidecar). No fakes here: a
graph the parser or builder refuses fails its test with TensorRT-RTX's error line."""
import hashlib
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from dilatequant.cli import build_engine_main, triton_main, verify_main
from dilatequant.core.errors import UserError
from dilatequant.dq_export.ort_graph import convert_file as ort_file
from dilatequant.engines.tensorrt import rtx
from dilatequant.engines.tensorrt.backends import choose_backend
from dilatequant.engines.tensorrt.build import BuildConfig, build_engine, sidecar_path
from dilatequant.engines.tensorrt.env import GpuInfo, detect_gpu
from dilatequant.engines.tensorrt.runner import TensorRTRunner

from conftest import assert_clean_error, run_cli
from graph_flavors import ALL, FLAVORS, checkpoint, graph

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is the test extra's: pip install -e '.[test,rtx]'")


def _main(main, capsys, *args) -> SimpleNamespace:
    """A console entry point run in this process (the refusals come before any work): exit code and output."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as ex:
        code = ex.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _qdq_counts(path: Path) -> Counter:
    m = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _inputs(path: Path) -> list[str]:
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in init]


def _check_plan(side: dict, engine: Path, onnx_path: Path) -> None:
    """The plan is on disk as the sidecar says; TensorRT-RTX parsed every input and every Q/DQ node of the graph."""
    assert side["backend"] == "tensorrt-rtx" and side["built_without_gpu"] is True and side["gpu"] is None
    assert side["tensorrt_rtx"].startswith("1.") and side["tensorrt"] is None
    assert engine.stat().st_size == side["engine_bytes"] > 10_000
    assert hashlib.sha256(engine.read_bytes()).hexdigest() == side["engine_sha256"]
    assert side["rules_check"] == "passed" and side["builder"]["network_flags"] == ["STRONGLY_TYPED"]
    net = side["network"]
    assert [i["name"] for i in net["inputs"]] == _inputs(onnx_path) == list(side["inputs"])
    qdq = _qdq_counts(Path(side["built_onnx"]))
    assert qdq["QuantizeLinear"] > 0
    assert (net["layer_types"].get("QUANTIZE", 0), net["layer_types"].get("DEQUANTIZE", 0)) == \
        (qdq["QuantizeLinear"], qdq["DequantizeLinear"])  # every Q/DQ node became a Q/DQ layer: none dropped
    assert side["profiles_from"] == "requested" and side["profiles"][0].keys() == set(side["inputs"])
    assert side["builder"]["read_back"] is True and side["builder"]["optimization_level"] == 3


@pytest.mark.parametrize("flavor", ALL)
def test_every_export_flavor_parses_and_builds(flavor, tmp_path):
    path = graph(flavor)
    engine = tmp_path / "unet.plan"
    side = build_engine(BuildConfig(onnx=path, engine=engine, backend="tensorrt-rtx"))
    _check_plan(side, engine, path)
    assert json.loads(sidecar_path(engine).read_text()) == json.loads(json.dumps(side))
    assert side["targets"] == {"compute_capabilities": None, "source": "TensorRT-RTX's default (8.6, 8.9, 12.0)",
                               "required": None}
    assert side["builder"]["compute_capabilities"] == []  # none set: TensorRT-RTX's portable default
    meta = side["metadata"]
    batch = side["profiles"][0]["sample"]
    if flavor == "fp16_static_shapes":
        assert batch["min"] == batch["max"] == [2, *json.loads(meta["dilatequant.sample_shape"])]
    else:
        assert [batch[lv][0] for lv in ("min", "opt", "max")] == [1, 4, 16]
        assert batch["opt"][1:] == json.loads(meta["dilatequant.sample_shape"])
    assert ("t_index" in side["inputs"]) == (flavor != "static_scales")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.plan", "unet.plan.json"]  # no temporary left


def test_fp16_fallback_builds_the_converted_graph_for_named_targets(tmp_path):
    engine = tmp_path / "unet.plan"
    side = build_engine(BuildConfig(onnx=graph("w8a8_sym"), engine=engine, backend="tensorrt-rtx", fp16_fallback=True,
                                    compute_capabilities="8.6,8.9,12.0", max_shapes="sample:8x1x8x8"))
    _check_plan(side, engine, graph("w8a8_sym"))
    assert side["built_onnx"] == str(tmp_path / "unet.plan.fp16.onnx") and side["fp16_pass"]["graph"]
    assert side["built_onnx_sha256"] != side["source_onnx_sha256"]
    halves = [i for i in side["network"]["inputs"] if i["dtype"] == "HALF"]
    assert not halves  # the FP16 pass keeps the graph's float32 interface and converts inside
    assert side["targets"]["compute_capabilities"] == ["8.6", "8.9", "12.0"] == side["builder"]["compute_capabilities"]
    assert side["profiles"][0]["t_index"] == {"min": [1], "opt": [4], "max": [8], "source": "graph+defaults"}


def test_cli_builds_without_a_gpu_and_names_the_backend(tmp_path):
    """The acceptance command, as a user types it: the default backend here is TensorRT-RTX unless TensorRT 11 and
    a GPU are present."""
    engine = tmp_path / "unet.plan"
    proc = run_cli("build-engine", "--onnx", graph("int4"), "--engine", engine)
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads(sidecar_path(engine).read_text())
    expected = choose_backend("auto").name
    assert side["backend"] == expected
    if expected == "tensorrt-rtx":
        _check_plan(side, engine, graph("int4"))
        assert side["backend_choice"].startswith("auto: TensorRT 11 cannot build here")
        assert f"wrote {engine} (" in proc.stdout and "with TensorRT-RTX 1." in proc.stdout
        assert "without a GPU, for TensorRT-RTX's default (8.6, 8.9, 12.0)" in proc.stdout


def test_ort_target_graph_is_refused_before_any_build(tmp_path, capsys):
    ort = tmp_path / "unet_ort.onnx"
    ort_file(graph("w8a8_sym"), ort)
    proc = _main(build_engine_main, capsys, "--onnx", ort, "--engine", tmp_path / "unet.plan", "--backend",
                 "tensorrt-rtx")
    assert_clean_error(proc, "is a dq-export --target ort graph", "not a TensorRT graph")
    assert not (tmp_path / "unet.plan").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--compute-capability", "9.0"], "9.0: TensorRT-RTX builds for 7.5, 8.0, 8.6, 8.9, 12.0, 12.1 only (Hopper"),
    (["--compute-capability", "8.9,8.9"], "8.9 is given twice"),
    (["--compute-capability", "sm89"], "cannot read 'sm89'"),
    (["--inspect"], "--inspect reads the layer table from the built engine, which takes a GPU"),
    (["--backend", "tensorrt-llm"], "unknown --backend 'tensorrt-llm'"),
])
def test_flags_the_rtx_build_cannot_honour_are_one_line(tmp_path, capsys, flags, needle):
    args = ["--backend", "tensorrt-rtx", *flags] if "--backend" not in flags else flags
    proc = _main(build_engine_main, capsys, "--onnx", graph("w8a8_sym"), "--engine", tmp_path / "unet.plan", *args)
    assert_clean_error(proc, needle)
    assert not (tmp_path / "unet.plan").exists()


def test_fp8_graph_refuses_targets_below_8_9_and_defaults_to_those_above(tmp_path):
    """An FP8 graph (metadata key, or FP8 tensors) cannot build for 8.6: one line before the build; without named
    targets the build keeps the default set's 8.9 and 12.0."""
    m = onnx.load(str(graph("w8a8_sym")))
    m.metadata_props.add(key="dilatequant.min_compute_capability", value="8.9")
    path = tmp_path / "fp8.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UserError, match=r"needs compute capability 8.9 or newer \(the graph's "
                                        r"dilatequant.min_compute_capability\), but the build targets 8.6"):
        build_engine(BuildConfig(onnx=path, engine=tmp_path / "a.plan", backend="tensorrt-rtx",
                                 compute_capabilities="8.6,8.9"))
    side = build_engine(BuildConfig(onnx=path, engine=tmp_path / "b.plan", backend="tensorrt-rtx"))
    assert side["targets"]["compute_capabilities"] == ["8.9", "12.0"] == side["builder"]["compute_capabilities"]
    assert side["targets"]["required"] == {"compute_capability": "8.9",
                                           "reason": "the graph's dilatequant.min_compute_capability"}


def test_a_builder_that_dies_is_one_line_naming_the_signal_the_graph_and_the_rules_verdict(tmp_path, monkeypatch):
    """The real child process, sent the signal a builder crash raises: no plan, no temporary file, one line."""
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(rtx.subprocess, "Popen", popen)

    def segfault_the_child():
        while not started:
            time.sleep(0.01)
        time.sleep(0.3)  # inside Python's start-up or the build: either way the child dies of it
        started[0].send_signal(signal.SIGSEGV)

    threading.Thread(target=segfault_the_child, daemon=True).start()
    with pytest.raises(UserError) as err:
        build_engine(BuildConfig(onnx=graph("w8a8_sym"), engine=tmp_path / "unet.plan", backend="tensorrt-rtx"))
    msg = str(err.value)
    assert msg.startswith("TensorRT-RTX's builder died (signal SIGSEGV, a segmentation fault) while building '")
    assert str(graph("w8a8_sym")) in msg and "a graph the TensorRT rules check passed; no plan was written" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_parser_refusal_is_one_line_with_tensorrt_rtx_s_reason(tmp_path):
    """A graph the rules check would stop, sent past it to the real parser: its error, not a traceback."""
    m = onnx.load(str(graph("w8a8_sym")))
    zp = next(n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear")
    t = next(t for t in m.graph.initializer if t.name == zp)
    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) + 3, zp))
    path = tmp_path / "zp3.onnx"
    onnx.save(m, str(path))
    (outcome,) = rtx.run_jobs([rtx.RtxJob(path)])
    assert outcome.verdict == "parser refused"
    assert "Non-zero zero point is not supported" in outcome.reason and outcome.reason.startswith("In node")
    with pytest.raises(UserError, match="TensorRT-RTX could not build an engine from .*Non-zero zero point"):
        rtx.build_with_tensorrt_rtx(rtx.RtxJob(path), tmp_path / "unet.plan", "was not run on")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zp3.onnx"]


def test_cli_flag_help_names_both_backends(capsys):
    proc = _main(build_engine_main, capsys, "--help")
    assert proc.returncode == 0 and "auto | tensorrt | tensorrt-rtx" in proc.stdout
    assert "--compute-capability" in proc.stdout


@pytest.fixture(scope="module")
def rtx_plan(tmp_path_factory):
    engine = tmp_path_factory.mktemp("rtx-plan") / "unet.plan"
    build_engine(BuildConfig(onnx=graph("w8a8_sym"), engine=engine, backend="tensorrt-rtx",
                             compute_capabilities="8.6,8.9"))
    return engine


@pytest.mark.skipif(detect_gpu() is not None, reason="the no-GPU refusal; a GPU machine answers differently")
def test_dq_verify_and_the_runner_refuse_a_tensorrt_rtx_plan_in_one_line_without_a_gpu(rtx_plan, tmp_path, capsys):
    f = FLAVORS["w8a8_sym"]
    proc = _main(verify_main, capsys, "--engine", rtx_plan, "--ckpt", checkpoint(f.model, f.quant), "--report",
                 tmp_path / "r")
    assert_clean_error(proc, f"engine '{rtx_plan}' is a TensorRT-RTX 1.", "for compute capabilities 8.6, 8.9",
                       "there is none here", f"dq-verify --onnx {graph('w8a8_sym')}")
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="is a TensorRT-RTX .* plan, built without a GPU"):
        TensorRTRunner(rtx_plan)


def test_the_refusal_names_what_a_gpu_machine_lacks(rtx_plan):
    """The two answers a GPU machine gets (its GPU is not a target; it is, but dilatequant has no RTX runtime)."""
    side = json.loads(sidecar_path(rtx_plan).read_text())
    h100 = rtx.plan_refusal(rtx_plan, side, GpuInfo("NVIDIA H100", "9.0", "test"))
    assert "this GPU (NVIDIA H100) is compute capability 9.0; build a plan for it with dq-build-engine " \
           "--backend tensorrt" in h100
    ada = rtx.plan_refusal(rtx_plan, side, GpuInfo("NVIDIA L4", "8.9", "test"))
    assert "dilatequant runs TensorRT 11 plans and has no TensorRT-RTX runtime" in ada and "(NVIDIA L4)" in ada


def test_dq_triton_refuses_a_tensorrt_rtx_plan_with_the_reason(rtx_plan, tmp_path, capsys):
    f = FLAVORS["w8a8_sym"]
    proc = _main(triton_main, capsys, "--engine", rtx_plan, "--ckpt", checkpoint(f.model, f.quant), "--repo",
                 tmp_path / "repo")
    assert_clean_error(proc, "is a TensorRT-RTX plan", "Triton's tensorrt_plan backend loads plans with TensorRT's "
                       "libnvinfer", "dq-triton --onnx")
    assert not (tmp_path / "repo").exists()
