"""dq-build-engine without a GPU: profiles, shape checks, sidecar, FP16-pass wiring, the no-TensorRT path, and
a static guard against TensorRT 10-only APIs. The real build runs only where TensorRT 11 and a GPU exist."""
import hashlib
import importlib
import importlib.machinery
import io
import json
import re
import subprocess
import sys
import tokenize
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dilatequant.core.errors import UserError
from dilatequant.engines.tensorrt import build as trt_build
from dilatequant.engines.tensorrt import env as trt_env
from dilatequant.engines.tensorrt.build import (BuildConfig, BuildInfo, TrtBuildResult, build_engine, build_error_message,
                                           error_lines, fp16_graph_path, layer_summary, make_sidecar, sidecar_path)
from dilatequant.engines.tensorrt.env import GpuInfo, parse_nvidia_smi
from dilatequant.engines.tensorrt.profiles import (DEFAULT_BATCH, graph_inputs, graph_metadata, parse_shapes,
                                              profile_from_flags, resolve_profile)

REPO = Path(__file__).resolve().parents[2]
META = {"dilatequant.timesteps": "[750, 500, 250, 0]", "dilatequant.num_steps": "4",
        "dilatequant.sample_shape": "[1, 8, 8]", "dilatequant.dtype": "fp32", "dilatequant.bits": "W8A8"}


def _unet_like(sample_dims=("batch", 1, 8, 8), meta=META, extra_nodes=()) -> onnx.ModelProto:
    """A graph with dq-export's interface (sample, timestep, t_index, encoder_hidden_states -> noise_pred) and a
    Q/DQ pair, so it passes the TensorRT rules; built by hand because a real export takes a minute."""
    ins = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, list(sample_dims)),
           helper.make_tensor_value_info("timestep", TensorProto.INT64, ["batch"]),
           helper.make_tensor_value_info("t_index", TensorProto.INT64, ["batch"]),
           helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", 2, 16])]
    out = helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, list(sample_dims))
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["sample", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["noise_pred"], name="dq"), *extra_nodes]
    m = helper.make_model(helper.make_graph(nodes, "unet", ins, [out], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 21)])
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return m


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "unet.onnx"
    onnx.save(_unet_like(), str(path))
    return path


# ---------------------------------------------------------------- shape flags and profiles


def test_parse_shapes_values_and_syntax_errors():
    assert parse_shapes("sample:4x1x28x28, timestep:4,t_index : 4") == {
        "sample": (4, 1, 28, 28), "timestep": (4,), "t_index": (4,)}
    assert parse_shapes(None) == {} and parse_shapes("  ") == {}
    assert parse_shapes("input:0:2x3 x4") == {"input:0": (2, 3, 4)}
    for bad, needle in [("sample=4x1", "cannot read"), ("sample:4x", "cannot read"), ("sample:4x-1", "cannot read"),
                        ("sample:0x1", "<= 0"), ("a:1,a:2", "twice"), (":4", "cannot read")]:
        with pytest.raises(UserError, match=needle):
            parse_shapes(bad, "--opt-shapes")


def test_profile_from_graph_defaults_batch_1_4_16_and_keeps_static_dims():
    p = profile_from_flags(_unet_like(), None, None, None)
    assert DEFAULT_BATCH == {"min": 1, "opt": 4, "max": 16}
    assert p.shapes["sample"] == {"min": (1, 1, 8, 8), "opt": (4, 1, 8, 8), "max": (16, 1, 8, 8)}
    assert p.shapes["timestep"] == p.shapes["t_index"] == {"min": (1,), "opt": (4,), "max": (16,)}
    assert p.shapes["encoder_hidden_states"]["max"] == (16, 2, 16)
    assert set(p.sources.values()) == {"graph+defaults"}
    assert p.to_json()["sample"] == {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8], "max": [16, 1, 8, 8],
                                     "source": "graph+defaults"}


def test_flag_on_one_input_moves_every_input_sharing_the_batch_symbol():
    p = profile_from_flags(_unet_like(), "sample:2x1x8x8", None, "sample:32x1x8x8")
    for name, rest in [("sample", (1, 8, 8)), ("timestep", ()), ("t_index", ()), ("encoder_hidden_states", (2, 16))]:
        assert p.shapes[name] == {"min": (2, *rest), "opt": (4, *rest), "max": (32, *rest)}, name
    assert p.sources["sample"] == "flags" and p.sources["timestep"] == "graph+defaults"


def test_static_graph_needs_no_flags_and_rejects_other_sizes():
    m = _unet_like(sample_dims=(2, 1, 8, 8))
    p = profile_from_flags(m, None, None, None)
    assert p.shapes["sample"] == {"min": (2, 1, 8, 8), "opt": (2, 1, 8, 8), "max": (2, 1, 8, 8)}
    with pytest.raises(UserError, match="dimension 0 is fixed to 2 in the graph, got 4"):
        profile_from_flags(m, None, "sample:4x1x8x8", None)


@pytest.mark.parametrize("flags, needle", [
    ({"opt": "samples:4x1x8x8"}, "no input 'samples'; its inputs are sample, timestep, t_index, encoder_hidden_states"),
    ({"max": "sample:4x1x8"}, "rank 4 (batchx1x8x8) but 3 dimension(s) were given (4x1x8)"),
    ({"min": "sample:1x3x8x8"}, "dimension 1 is fixed to 1 in the graph, got 3"),
    ({"min": "sample:8x1x8x8"}, "dimension 0: min 8, opt 4, max 16 is not ordered"),
    ({"opt": "timestep:32"}, "min 1, opt 32, max 16 is not ordered"),
    ({"max": "sample:32x1x8x8,t_index:16"}, "'sample' and 't_index' share dimension 'batch' but were given 32 and 16"),
])
def test_profile_validation_errors_name_input_dimension_and_fix(flags, needle):
    with pytest.raises(UserError) as err:
        profile_from_flags(_unet_like(), flags.get("min"), flags.get("opt"), flags.get("max"))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_dynamic_spatial_dims_come_from_metadata_or_must_be_given():
    m = _unet_like(sample_dims=("batch", 1, "height", "width"))
    p = profile_from_flags(m, None, None, None)
    assert p.shapes["sample"]["opt"] == (4, 1, 8, 8)  # dilatequant.sample_shape
    p = profile_from_flags(m, None, "sample:4x1x16x16", "sample:8x1x32x32")
    assert p.shapes["sample"] == {"min": (1, 1, 8, 8), "opt": (4, 1, 16, 16), "max": (8, 1, 32, 32)}
    bare = _unet_like(sample_dims=("batch", 1, "height", "width"), meta={})
    with pytest.raises(UserError, match=r"input 'sample' dimension 2 \('height'\) is dynamic and has no default.*"
                                        r"sample:Nx1xNxN"):
        profile_from_flags(bare, None, None, None)
    p = resolve_profile(graph_inputs(bare), {lv: {"sample": (4, 1, 8, 8)} for lv in ("min", "opt", "max")})
    assert p.shapes["sample"]["min"] == (4, 1, 8, 8) and p.shapes["timestep"]["max"] == (4,)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real dq-export graph of a tiny conditional UNet (about a minute on a loaded 2-core machine)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_cond
    from dq_export.test_qdq_export import _checkpoint

    from dilatequant.dq_export.qdq_graph import export_onnx

    from dilatequant.dq_export.export_config import ExportConfig

    tmp = tmp_path_factory.mktemp("exported")
    ck = _checkpoint(tmp, tiny_cond(), weight_bits=8, act_bits=8, symmetric=True)
    export_onnx(ck, tmp / "unet.onnx", ExportConfig())
    return ck, tmp / "unet.onnx"


@pytest.mark.slow
def test_profile_and_metadata_of_an_exported_graph(exported):
    _, path = exported
    m = onnx.load(str(path), load_external_data=False)
    ins = {i.name: (i.dtype, i.dims) for i in graph_inputs(m)}
    # batch and spatial sizes are dynamic (H, W multiples of the UNet's downsampling factor 2)
    assert ins == {"sample": ("FLOAT", ("batch", 1, "2*h_blocks", "2*w_blocks")), "timestep": ("INT64", ("batch",)),
                   "t_index": ("INT64", ("batch",)), "encoder_hidden_states": ("FLOAT", ("batch", 2, 16))}
    p = profile_from_flags(m, None, "sample:8x1x8x8", None)
    assert p.shapes["encoder_hidden_states"] == {"min": (1, 2, 16), "opt": (8, 2, 16), "max": (16, 2, 16)}
    assert p.shapes["t_index"] == {"min": (1,), "opt": (8,), "max": (16,)}
    assert p.shapes["sample"] == {"min": (1, 1, 8, 8), "opt": (8, 1, 8, 8), "max": (16, 1, 8, 8)}
    meta = graph_metadata(m)
    assert json.loads(meta["dilatequant.timesteps"]) == [750, 500, 250, 0]
    assert meta["dilatequant.t_index_input"] == "true"


# ---------------------------------------------------------------- sidecar and helpers


def _info(tmp_path, **kw):
    cfg = BuildConfig(onnx=tmp_path / "unet.onnx", engine=tmp_path / "unet.plan", workspace_gb=2, inspect=True,
                      timing_cache=tmp_path / "tc.bin", opt_level=4)
    base = dict(cfg=cfg, trt_version="11.1.0", gpu=GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "nvidia-smi"),
                profile=profile_from_flags(_unet_like(), None, None, None),
                inputs={"sample": {"dtype": "FLOAT", "dims": ["batch", 1, 8, 8]}}, metadata=dict(META),
                onnx_sha256="a" * 64, built_onnx=tmp_path / "unet.onnx", built_onnx_sha256="a" * 64,
                engine_sha256="b" * 64, engine_bytes=1234, build_s=12.5,
                timing_cache={"path": str(tmp_path / "tc.bin"), "bytes_before": None, "bytes_after": 99},
                layer_summary={"layers": 3, "layer_types": {}, "output_formats": {}}, env={"python": "3.11"},
                built_at="2026-11-27T05:00:00+00:00",
                settings={"optimization_level": 4, "workspace_bytes": 2 * 2**30, "profiling_verbosity": "DETAILED",
                          "builder_flags": [], "tf32": False, "num_optimization_profiles": 1},
                engine_profiles=[{"sample": {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8], "max": [16, 1, 8, 8]},
                                  "t_index": {"min": [1], "opt": [4], "max": [16]}}])
    base.update(kw)
    return BuildInfo(**base)


def test_sidecar_records_versions_gpu_profile_settings_and_metadata_verbatim(tmp_path):
    s = make_sidecar(_info(tmp_path))
    json.dumps(s)  # serializable as is
    assert s["tensorrt"] == "11.1.0"
    assert s["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "source": "nvidia-smi"}
    assert s["metadata"] == META and s["metadata"] is not META
    assert json.loads(s["metadata"]["dilatequant.timesteps"]) == s["timesteps"] == [750, 500, 250, 0]
    assert s["profiles"][0]["t_index"] == {"min": [1], "opt": [4], "max": [16], "source": "graph+defaults"}
    assert s["profiles_from"] == "engine" and set(s["profiles"][0]) == {"sample", "t_index"}
    b = s["builder"]
    assert (b["optimization_level"], b["workspace_bytes"], b["profiling_verbosity"]) == (4, 2 * 2**30, "DETAILED")
    assert b["read_back"] is True and b["requested"] == {"optimization_level": 4, "workspace_bytes": 2 * 2**30,
                                                          "profiling_verbosity": "DETAILED"}
    assert b["strongly_typed"] is True and b["network_flags"] == [] and b["timing_cache"]["bytes_after"] == 99
    assert s["source_onnx_sha256"] == "a" * 64 and s["engine_sha256"] == "b" * 64 and s["engine_bytes"] == 1234
    assert s["fp16_fallback"] is False and s["build_s"] == 12.5 and s["environment"] == {"python": "3.11"}
    assert s["layers"]["file"].endswith("unet.plan.layers.json") and s["layers"]["layers"] == 3
    s = make_sidecar(_info(tmp_path, metadata={}, layer_summary=None, settings=None, engine_profiles=None))
    assert s["timesteps"] is None and s["metadata"] == {} and s["layers"] is None
    # nothing read back: no setting is made up from the arguments, and the profile says it is the requested one
    assert s["builder"]["read_back"] is False and "optimization_level" not in s["builder"]
    assert s["profiles_from"] == "requested" and s["profiles"][0]["sample"]["max"] == [16, 1, 8, 8]


def test_layer_summary_counts_types_and_output_formats():
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Channel major Int8"}]},
        {"Name": "conv2", "LayerType": "CaskConvolution", "Outputs": [{"Format/Datatype": "Channel major Int8"}]},
        {"Name": "gn", "LayerType": "Normalization", "Outputs": [{"DataType": "Half"}]}, "names-only-entry"]}
    assert layer_summary(info) == {"layers": 3, "layer_types": {"CaskConvolution": 2, "Normalization": 1},
                                   "output_formats": {"Channel major Int8": 2, "Half": 1}}
    assert layer_summary({})["layers"] == 0


def test_polygraphy_error_lines_become_one_line_message():
    log = ("[I] Loading model\n\x1b[91m[E] In node 12 (parseGraph): INVALID_NODE: Gather scale\x1b[0m\n"
           "    is not a constant\n[W] something\n[E] [network.cpp::validate] Error Code 4: min > max\n"
           "[!] Could not parse ONNX correctly\n")
    errs = error_lines(log)
    assert errs == ["In node 12 (parseGraph): INVALID_NODE: Gather scale is not a constant",
                    "[network.cpp::validate] Error Code 4: min > max", "Could not parse ONNX correctly"]
    msg = build_error_message(Path("u.onnx"), errs, RuntimeError("Could not parse ONNX correctly"), limit=2)
    assert "\n" not in msg and msg.count(" | ") == 1 and "(+1 more" in msg and "dq-export --check" in msg
    assert "no error message from TensorRT" in build_error_message(Path("u.onnx"), [], None)


def test_build_config_rejects_bad_settings(tmp_path):
    with pytest.raises(UserError, match="0..5"):
        BuildConfig(onnx=tmp_path / "u.onnx", engine=tmp_path / "u.plan", opt_level=6)
    with pytest.raises(UserError, match="must be > 0"):
        BuildConfig(onnx=tmp_path / "u.onnx", engine=tmp_path / "u.plan", workspace_gb=0)
    with pytest.raises(UserError, match="overwrite the ONNX graph"):
        BuildConfig(onnx=tmp_path / "u.onnx", engine=tmp_path / "u.onnx")
    assert sidecar_path("x/unet.plan") == Path("x/unet.plan.json")
    assert fp16_graph_path("x/unet.plan") == Path("x/unet.plan.fp16.onnx")


def test_nvidia_smi_parsing():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n") == GpuInfo(
        "NVIDIA H100 80GB HBM3", "9.0", "nvidia-smi")
    assert parse_nvidia_smi("") is None


# ---------------------------------------------------------------- build wiring without TensorRT


def _module(name, **attrs):
    """A stand-in module with a spec (torch._dynamo's import scan calls find_spec on 'tensorrt')."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


@pytest.fixture
def fake_trt(monkeypatch):
    """A stand-in TensorRT 11 and GPU, and a recording stand-in for the Polygraphy build."""
    mod = _module("tensorrt", __version__="11.1.0")
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setattr(trt_env, "detect_gpu", lambda: GpuInfo("Fake GPU", "9.0", "test"))
    calls = []

    def fake_build(trt, onnx_path, profile, cfg):
        calls.append({"onnx": Path(onnx_path), "profile": profile, "cfg": cfg, "trt": trt})
        return TrtBuildResult(b"PLAN" * 10, trt.__version__, 0.5, layers={"Layers": []} if cfg.inspect else None)

    monkeypatch.setattr(trt_build, "build_with_tensorrt", fake_build)
    return calls


def _fake_fp16_module(monkeypatch, writes_graph):
    calls = []

    def convert_file(src, dst):
        calls.append((Path(src), Path(dst)))
        onnx.save(writes_graph, str(dst))
        return {"converted_initializers": 7, "casts_inserted": 3}

    mod = _module("dilatequant.dq_export.fp16", convert_file=convert_file)
    monkeypatch.setitem(sys.modules, "dilatequant.dq_export.fp16", mod)
    return calls


def test_fp16_fallback_runs_the_pass_then_builds_the_converted_graph(tmp_path, onnx_file, fake_trt, monkeypatch):
    converted = _unet_like()
    converted.graph.node[0].name = "q_after_fp16_pass"
    fp16_calls = _fake_fp16_module(monkeypatch, converted)
    engine = tmp_path / "out" / "unet.plan"
    s = build_engine(BuildConfig(onnx=onnx_file, engine=engine, fp16_fallback=True, max_shapes="sample:8x1x8x8",
                                 inspect=True))
    assert fp16_calls == [(onnx_file, fp16_graph_path(engine))]
    assert [c["onnx"] for c in fake_trt] == [fp16_graph_path(engine)]  # TensorRT got the converted graph
    assert fake_trt[0]["profile"].shapes["t_index"]["max"] == (8,)
    assert engine.read_bytes() == b"PLAN" * 10
    side = json.loads(sidecar_path(engine).read_text())
    assert side == json.loads(json.dumps(s))
    assert side["fp16_fallback"] is True
    assert side["fp16_pass"] == {"converted_initializers": 7, "casts_inserted": 3,
                                 "graph": str(fp16_graph_path(engine))}
    assert side["source_onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert side["built_onnx_sha256"] == hashlib.sha256(fp16_graph_path(engine).read_bytes()).hexdigest()
    assert side["built_onnx_sha256"] != side["source_onnx_sha256"]
    assert side["engine_sha256"] == hashlib.sha256(b"PLAN" * 10).hexdigest() and side["engine_bytes"] == 40
    assert side["metadata"] == META and side["timesteps"] == [750, 500, 250, 0]
    assert side["gpu"]["name"] == "Fake GPU" and side["tensorrt"] == "11.1.0"
    assert json.loads((tmp_path / "out" / "unet.plan.layers.json").read_text()) == {"Layers": []}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "unet.plan", "unet.plan.fp16.onnx", "unet.plan.json", "unet.plan.layers.json"]  # no temp files left


def test_fp16_pass_output_is_checked_against_the_trt_rules(tmp_path, onnx_file, fake_trt, monkeypatch):
    bad = _unet_like(extra_nodes=[helper.make_node("ConvInteger", ["q", "q"], ["ci"], name="int_conv")])
    _fake_fp16_module(monkeypatch, bad)
    with pytest.raises(UserError, match=r"\[unsupported-op\] node 'int_conv'"):
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan", fp16_fallback=True))
    assert fake_trt == [] and not (tmp_path / "unet.plan").exists()


def test_without_fp16_fallback_the_source_graph_is_built(tmp_path, onnx_file, fake_trt, monkeypatch):
    fp16_calls = _fake_fp16_module(monkeypatch, _unet_like())
    for stale in ("unet.plan.layers.json", "unet.plan.fp16.onnx"):  # left by an earlier --inspect --fp16-fallback
        (tmp_path / stale).write_text("old")
    s = build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    assert fp16_calls == [] and [c["onnx"] for c in fake_trt] == [onnx_file]
    assert s["fp16_fallback"] is False and s["fp16_pass"] is None and s["built_onnx"] == str(onnx_file)
    assert s["builder"]["requested"]["profiling_verbosity"] == "LAYER_NAMES_ONLY" and s["layers"] is None
    assert not (tmp_path / "unet.plan.layers.json").exists() and not (tmp_path / "unet.plan.fp16.onnx").exists()


def test_fp16_graph_from_export_is_not_converted_twice(tmp_path, fake_trt, monkeypatch):
    path = tmp_path / "unet.onnx"
    onnx.save(_unet_like(meta=META | {"dilatequant.dtype": "fp16"}), str(path))
    fp16_calls = _fake_fp16_module(monkeypatch, _unet_like())
    s = build_engine(BuildConfig(onnx=path, engine=tmp_path / "unet.plan", fp16_fallback=True))
    assert fp16_calls == [] and fake_trt[0]["onnx"] == path and "already" in s["fp16_pass"]["skipped"]


def test_fp16_fallback_without_the_fp16_pass_module_is_a_clear_error(tmp_path, onnx_file, fake_trt, monkeypatch):
    monkeypatch.setitem(sys.modules, "dilatequant.dq_export.fp16", None)  # as if this install lacked the pass
    with pytest.raises(UserError, match="needs the Q/DQ-aware FP16 pass"):
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan", fp16_fallback=True))
    assert fake_trt == [] and not (tmp_path / "unet.plan").exists()


def test_old_polygraphy_is_refused_before_the_build(tmp_path, onnx_file, fake_trt, monkeypatch):
    import polygraphy

    monkeypatch.setattr(polygraphy, "__version__", "0.49.26")
    with pytest.raises(UserError) as err:
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    msg = str(err.value)
    assert msg.startswith("Polygraphy 0.49.26 is installed, but TensorRT 11 needs Polygraphy >= 0.53") and "\n" not in msg
    assert "precision_is_set" in msg and 'pip install -U "polygraphy>=0.53"' in msg
    assert fake_trt == [] and not (tmp_path / "unet.plan").exists()
    monkeypatch.setattr(polygraphy, "__version__", "0.53.0")
    assert trt_env.require_polygraphy() == "0.53.0"


def test_pyproject_pins_polygraphy_and_offers_both_cuda_builds():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "polygraphy>=0.53" in [d.split(";")[0].strip() for d in project["dependencies"]]
    extras = project["optional-dependencies"]
    assert extras["trt"] == ["tensorrt>=11"] and extras["trt-cu12"] == ["tensorrt-cu12>=11"]
    assert extras["trt-cu13"] == ["tensorrt-cu13>=11"]


@pytest.mark.parametrize("dists, major", [(["tensorrt_cu13_bindings"], 13), (["tensorrt-cu12-bindings"], 12),
                                          ([], None), (["tensorrt"], None)])
def test_tensorrt_cuda_build_is_read_from_the_installed_distribution(monkeypatch, dists, major):
    from importlib import metadata

    monkeypatch.setattr(metadata, "packages_distributions", lambda: {"tensorrt": dists, "numpy": ["numpy"]})
    assert trt_env.tensorrt_cuda_major() == major


def test_both_cuda_builds_installed_is_one_line(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "packages_distributions",
                        lambda: {"tensorrt": ["tensorrt_cu12_bindings", "tensorrt_cu13_bindings"]})
    with pytest.raises(UserError, match=r"both the CUDA 12 and the CUDA 13 builds of TensorRT are installed.*keep one"):
        trt_env.tensorrt_cuda_major()


def test_cuda13_tensorrt_on_a_cuda12_driver_is_one_line_before_any_work(tmp_path, onnx_file, fake_trt, monkeypatch):
    monkeypatch.setattr(trt_env, "tensorrt_cuda_major", lambda: 13)
    monkeypatch.setattr(trt_env, "driver_cuda_version", lambda: (12, 4))
    with pytest.raises(UserError) as err:
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    msg = str(err.value)
    assert msg.startswith("TensorRT 11.1.0 is the CUDA 13 build (tensorrt-cu13) but the NVIDIA driver here supports "
                          "CUDA up to 12.4; install the build for your driver: ") and "\n" not in msg
    assert 'pip install "dilatequant[trt-cu12]" --extra-index-url https://pypi.nvidia.com' in msg
    assert fake_trt == [] and not (tmp_path / "unet.plan").exists()
    for driver in ((13, 0), (13, 1), None):  # a CUDA 13 driver, or one that cannot be read: no objection
        monkeypatch.setattr(trt_env, "driver_cuda_version", lambda d=driver: d)
        trt_env.check_cuda_build(13, driver, "11.4.0")
    trt_env.check_cuda_build(12, (13, 0))  # a CUDA 12 build runs on a CUDA 13 driver


def test_cli_cuda_mismatch_with_tensorrt_failing_to_import_is_one_line(tmp_path, onnx_file):
    code = ("import sys; sys.modules['tensorrt'] = None\n"  # the import fails, as a CUDA 13 build's can
            "from dilatequant.engines.tensorrt import env as trt_env\n"
            "trt_env.tensorrt_cuda_major = lambda: 13; trt_env.driver_cuda_version = lambda: (12, 2)\n"
            "from dilatequant.cli import build_engine_main; build_engine_main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "--onnx", str(onnx_file), "--engine", str(tmp_path / "u.plan")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is the CUDA 13 build (tensorrt-cu13) but the "
                                                   "NVIDIA driver here supports CUDA up to 12.2"), proc.stderr


def test_missing_gpu_and_old_tensorrt_are_one_clear_error(tmp_path, onnx_file, monkeypatch):
    mod = _module("tensorrt", __version__="11.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setattr(trt_env, "detect_gpu", lambda: None)
    with pytest.raises(UserError, match="no CUDA GPU found.*NVIDIA GPU"):
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    mod.__version__ = "10.13.0"
    with pytest.raises(UserError, match=r"TensorRT 10.13.0 is installed.*TensorRT 11.*pip install -U"):
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    assert not (tmp_path / "unet.plan").exists()


def _cli(*args):
    code = ("import sys; sys.modules['tensorrt'] = None\n"  # as if TensorRT were not installed, on any machine
            "from dilatequant.cli import build_engine_main; build_engine_main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_cli_without_tensorrt_prints_one_line_and_exits_nonzero(tmp_path, onnx_file):
    proc = _cli("--onnx", onnx_file, "--engine", tmp_path / "unet.plan", "--fp16-fallback")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: TensorRT 11 is not installed")
    assert 'pip install "dilatequant[trt]" --extra-index-url https://pypi.nvidia.com' in lines[0]
    assert "NVIDIA GPU" in lines[0]
    assert not (tmp_path / "unet.plan").exists() and not (tmp_path / "unet.plan.fp16.onnx").exists()


def test_cli_reports_bad_flags_before_looking_for_tensorrt(tmp_path, onnx_file, capsys, monkeypatch):
    from dilatequant.cli import build_engine_main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cases = [(["--max-shapes", "sample:4x1x9x8"], "fixed to 8 in the graph, got 9"),
             (["--opt-level", "9"], "0..5"),
             (["--onnx", tmp_path / "missing.onnx"], "does not exist"),
             ([], None)]
    for extra, needle in cases:
        args = ["--onnx", onnx_file, "--engine", tmp_path / "unet.plan", *extra]
        with pytest.raises(SystemExit) as ex:
            build_engine_main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert ex.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
        assert (needle or "TensorRT 11 is not installed") in err, err


# ---------------------------------------------------------------- Polygraphy path, recording fake TensorRT 11


class _Enum:
    """A TensorRT-style enum namespace: attribute per member, `__members__`, int() of a member."""

    def __init__(self, name, members):
        self.__members__ = {}
        for i, m in enumerate(members):
            val = type(f"{name}.{m}", (), {"name": m, "__int__": lambda self, i=i: i,
                                           "__repr__": lambda self, n=f"{name}.{m}": n})()
            setattr(self, m, val)
            self.__members__[m] = val


class _HostMemory(bytes):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake_tensorrt(record, fail=None):
    """Enough of TensorRT 11's Python API for Polygraphy's loaders, recording every call that matters.

    What TensorRT 11 removed is absent here too (no FP16/INT8 builder flags, no EXPLICIT_BATCH, no int8_calibrator),
    so using it fails the way it would on a real TensorRT 11."""
    trt = _module("tensorrt", __version__="11.1.0")
    trt.BuilderFlag = _Enum("BuilderFlag", ["TF32", "REFIT", "SPARSE_WEIGHTS", "STRIP_PLAN"])
    trt.NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"])
    trt.MemoryPoolType = _Enum("MemoryPoolType", ["WORKSPACE", "TACTIC_SHARED_MEMORY"])
    trt.ProfilingVerbosity = _Enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"])
    trt.LayerInformationFormat = _Enum("LayerInformationFormat", ["ONELINE", "JSON"])
    trt.DeviceType = _Enum("DeviceType", ["GPU", "DLA"])
    trt.LayerType = _Enum("LayerType", ["SHAPE", "QUANTIZE", "DEQUANTIZE"])
    trt.OnnxParserFlag = _Enum("OnnxParserFlag", ["NATIVE_INSTANCENORM"])
    trt.TensorIOMode = _Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.init_libnvinfer_plugins = lambda logger, ns: True

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype, self.is_shape_tensor = name, tuple(shape), dtype, False

    class Layer:
        """A TensorRT 11 layer: ILayer.precision / precision_is_set are gone (Polygraphy < 0.53 reads them unguarded)."""
        name, type = "q", trt.LayerType.QUANTIZE

    class Network:
        def __init__(self):
            self.inputs = []

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_flag(self, flag):
            return False

        def __iter__(self):
            record["layers_iterated"] = True
            return iter([Layer()])

    class Parser:
        def __init__(self, network, logger):
            self.network, self.flags, self.num_errors = network, 0, 0

        def parse_from_file(self, path):
            record["parsed"] = path
            if fail == "parse":
                self.num_errors = 1
                return False
            m = onnx.load(path, load_external_data=False)
            for i in m.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(i.name, dims, i.type.tensor_type.elem_type))
            return True

        def get_error(self, i):
            return "In node 3 (importQuantizeLinear): UNSUPPORTED_NODE: scale must be a build-time constant"

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def combine(self, other, ignore_mismatch):
            self.data = other.data + b"+" + self.data
            return True

        def serialize(self):
            return _HostMemory(self.data)

    class OptimizationProfile:
        def set_shape(self, name, min, opt, max):
            record.setdefault("shapes", {})[name] = (tuple(min), tuple(opt), tuple(max))

    class Config:
        DLA_core, num_optimization_profiles = -1, 0
        default_device_type = trt.DeviceType.GPU
        DEVICE_MEMORY = 80 * 2**30  # TensorRT's workspace default: the device's memory

        def __init__(self):
            self.flags, self.cache = set(), None
            self.builder_optimization_level = 3  # TensorRT's defaults, as a real IBuilderConfig reports them
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            record["config"] = self

        def set_flag(self, flag):
            record.setdefault("set_flag", []).append(flag.name)
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            self.flags.discard(flag.name)

        def get_flag(self, flag):
            return flag.name in self.flags

        def add_optimization_profile(self, profile):
            self.num_optimization_profiles += 1

        def set_memory_pool_limit(self, pool, size):
            record["pools"] = {pool.name: size}

        def get_memory_pool_limit(self, pool):
            default = self.DEVICE_MEMORY if pool.name == "WORKSPACE" else 48 * 2**10
            return record.get("pools", {}).get(pool.name, default)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            record["cache_loaded"] = cache.data
            self.cache = cache

        def get_timing_cache(self):
            self.cache.data += b"new-tactics"
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            if fail == "cuda":  # what a CUDA 13 TensorRT does on a CUDA 12 driver
                logger.log(Logger.ERROR, "[TRT] createInferBuilder: Error Code 6: API Usage Error (CUDA "
                                         "initialization failure with error: 35.)")
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags=0):
            record["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            record["built"] = {"verbosity": config.profiling_verbosity.name,
                               "level": config.builder_optimization_level}
            if fail == "build":
                self.logger.log(Logger.ERROR, "[builder.cpp::build] Error Code 2: no implementation for QLinearConv")
                return None
            return _HostMemory(b"SERIALIZED-PLAN")

    class Inspector:
        def get_engine_information(self, fmt):
            record["inspector_format"] = fmt.name
            return json.dumps({"Layers": [{"Name": "conv", "LayerType": "CaskConvolution",
                                           "Outputs": [{"Format/Datatype": "Int8"}]}]})

    class Engine:
        """The built plan: its inputs and profile are what the builder was given (record["shapes"])."""

        def __init__(self):
            self.shapes = dict(record.get("shapes", {}))
            self.num_optimization_profiles, self.num_io_tensors = 1, len(self.shapes) + 1
            self.names = [*self.shapes, "noise_pred"]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.shapes else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return [list(s) for s in self.shapes[name]]

        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            record["deserialized"] = bytes(data)
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def polygraphy_on_fake_trt(monkeypatch):
    """Point Polygraphy's TensorRT modules at a fake (restored afterwards, so a real TensorRT is not shadowed)."""
    def install(fail=None):
        record = {}
        trt = _fake_tensorrt(record, fail)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        for name in ("polygraphy.backend.trt.loader", "polygraphy.backend.trt.config", "polygraphy.backend.trt.util",
                     "polygraphy.util.util"):
            monkeypatch.setattr(importlib.import_module(name), "trt", trt)
        monkeypatch.setattr(importlib.import_module("polygraphy.backend.trt.util"), "TRT_LOGGER", None)
        monkeypatch.setattr(trt_env, "detect_gpu", lambda: GpuInfo("Fake GPU", "9.0", "test"))
        return record

    return install


def test_polygraphy_build_sets_profile_cache_level_pool_and_verbosity_without_precision_flags(
        tmp_path, onnx_file, polygraphy_on_fake_trt):
    record = polygraphy_on_fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    engine = tmp_path / "unet.plan"
    s = build_engine(BuildConfig(onnx=onnx_file, engine=engine, max_shapes="sample:8x1x8x8", timing_cache=cache,
                                 opt_level=5, workspace_gb=1.5, inspect=True))
    assert record["parsed"] == str(onnx_file) and record["network_flags"] == 0  # create_network() with no flags
    assert record["shapes"] == {"sample": ((1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8)), "timestep": ((1,), (4,), (8,)),
                                "t_index": ((1,), (4,), (8,)),
                                "encoder_hidden_states": ((1, 2, 16), (4, 2, 16), (8, 2, 16))}
    assert record["built"] == {"verbosity": "DETAILED", "level": 5}
    assert record["pools"] == {"WORKSPACE": int(1.5 * 2**30)}
    assert record.get("set_flag", []) == [] and not record["config"].flags  # no precision (or TF32) flags
    assert record["cache_loaded"] == b"old" and cache.read_bytes() == b"old+oldnew-tactics"  # loaded, merged, saved
    assert s["builder"]["timing_cache"] == {"path": str(cache), "bytes_before": 3, "bytes_after": 18}
    assert engine.read_bytes() == b"SERIALIZED-PLAN" == record["deserialized"]
    assert record["inspector_format"] == "JSON"
    assert s["layers"]["layers"] == 1 and s["layers"]["output_formats"] == {"Int8": 1}
    assert json.loads((tmp_path / "unet.plan.layers.json").read_text())["Layers"][0]["Name"] == "conv"
    # the sidecar reads the settings back from the builder config and the profile from the built engine
    b = s["builder"]
    assert b["read_back"] is True and (b["optimization_level"], b["profiling_verbosity"]) == (5, "DETAILED")
    assert b["workspace_bytes"] == int(1.5 * 2**30) and b["memory_pools"]["TACTIC_SHARED_MEMORY"] == 48 * 2**10
    assert b["tf32"] is False and b["builder_flags"] == [] and b["num_optimization_profiles"] == 1
    assert s["profiles_from"] == "engine"
    assert s["profiles"][0]["sample"] == {"min": [1, 1, 8, 8], "opt": [4, 1, 8, 8], "max": [8, 1, 8, 8],
                                          "source": "flags"}


def test_sidecar_records_tensorrts_own_defaults_not_the_arguments(tmp_path, onnx_file, polygraphy_on_fake_trt):
    """No --workspace-gb: the sidecar says what TensorRT then uses (the device's memory), not None; the level
    and verbosity are TensorRT's defaults as its config reports them."""
    record = polygraphy_on_fake_trt()
    s = build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    b = s["builder"]
    assert b["workspace_bytes"] == type(record["config"]).DEVICE_MEMORY == 80 * 2**30
    assert b["requested"]["workspace_bytes"] is None
    assert (b["optimization_level"], b["profiling_verbosity"]) == (3, "LAYER_NAMES_ONLY")
    assert s["profiles"][0]["t_index"] == {"min": [1], "opt": [4], "max": [16], "source": "graph+defaults"}
    # Polygraphy walked the network's layers, which (as on TensorRT 11) have no precision_is_set: 0.53 guards it
    assert record["layers_iterated"]


def test_cuda_init_failure_inside_tensorrt_is_the_driver_mismatch_line(tmp_path, onnx_file, polygraphy_on_fake_trt,
                                                                        monkeypatch):
    polygraphy_on_fake_trt(fail="cuda")
    monkeypatch.setattr(trt_env, "tensorrt_cuda_major", lambda: 13)
    monkeypatch.setattr(trt_env, "driver_cuda_version", lambda: None)  # not readable up front: caught at the builder
    with pytest.raises(UserError) as err:
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    msg = str(err.value)
    assert msg.startswith("TensorRT is the CUDA 13 build (tensorrt-cu13) but the NVIDIA driver here is too old"), msg
    assert "\n" not in msg and "CUDA 13 needs driver 580 or newer" in msg
    assert not (tmp_path / "unet.plan").exists()


@pytest.mark.parametrize("fail, needle", [
    ("build", "[builder.cpp::build] Error Code 2: no implementation for QLinearConv"),
    ("parse", "In node 3 (importQuantizeLinear): UNSUPPORTED_NODE: scale must be a build-time constant"),
])
def test_polygraphy_failure_is_one_userror_with_the_tensorrt_errors(tmp_path, onnx_file, polygraphy_on_fake_trt,
                                                                    fail, needle):
    record = polygraphy_on_fake_trt(fail=fail)
    with pytest.raises(UserError) as err:
        build_engine(BuildConfig(onnx=onnx_file, engine=tmp_path / "unet.plan"))
    msg = str(err.value)
    assert msg.startswith(f"TensorRT could not build an engine from '{onnx_file}': ") and needle in msg, msg
    assert "\n" not in msg and "dq-export --check" in msg
    assert ("built" in record) == (fail == "build")
    assert not (tmp_path / "unet.plan").exists() and not (tmp_path / "unet.plan.json").exists()


# ---------------------------------------------------------------- no TensorRT 10-only API in the code

REMOVED_TRT10_API = [
    ("BuilderFlag precision", re.compile(r"BuilderFlag\s*\.\s*(FP16|INT8|BF16|FP8|INT4|FP4)\b")),
    ("set_flag precision", re.compile(r"set_flag\s*\([^)]*\b(FP16|INT8|BF16|FP8|INT4|FP4)\b")),
    ("int8 calibrator", re.compile(r"\bint8_calibrator\b|\bIInt8\w*Calibrator\w*|set_calibration_profile")),
    ("EXPLICIT_BATCH", re.compile(r"\bEXPLICIT_BATCH\b")),
    ("precision constraints", re.compile(r"\b(OBEY|PREFER)_PRECISION_CONSTRAINTS\b")),
    ("layer precision setter", re.compile(r"\.\s*precision\s*=(?!=)|\bset_output_type\s*\(")),
    ("platform_has_fast_*", re.compile(r"\bplatform_has_fast_(fp16|int8)\b")),
]
CREATE_CONFIG_PRECISION = re.compile(r"\b(fp16|int8|tf32|bf16|fp8)\s*=(?!=)")


def _code_only(source: str) -> str:
    """The source with comments and string literals blanked (same line/column layout): prose may name the APIs."""
    lines = source.splitlines(keepends=True)
    blank = {tokenize.COMMENT, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    chars = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = chars[r - 1]
            lo, hi = (c0 if r == r0 else 0), (c1 if r == r1 else len(row))
            for c in range(lo, min(hi, len(row))):
                if row[c] != "\n":
                    row[c] = " "
    return "".join("".join(r) for r in chars)


def removed_api_uses(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what: match' for every removed-API use in the code (not in comments or strings), in line order."""
    code = _code_only(source)
    line_of = lambda pos: code.count("\n", 0, pos) + 1  # noqa: E731
    hits = [(line_of(m.start()), what, m.group(0)) for what, rx in REMOVED_TRT10_API for m in rx.finditer(code)]
    for m in re.finditer(r"CreateConfig\s*\(", code):
        depth, end = 1, m.end()
        while end < len(code) and depth:
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        hits += [(line_of(k.start()), "CreateConfig precision flag", k.group(0))
                 for k in CREATE_CONFIG_PRECISION.finditer(code, m.end(), end)]
    return [f"{filename}:{line}: {what}: {text}" for line, what, text in sorted(hits)]


def test_scanner_finds_removed_apis_in_code_but_not_in_prose():
    src = '''"""Docs may say config.set_flag(trt.BuilderFlag.FP16) is gone, and EXPLICIT_BATCH too."""
import tensorrt as trt  # no BuilderFlag.INT8 here either
config.set_flag(trt.BuilderFlag.FP16)
config.set_flag(getattr(trt.BuilderFlag, "INT8"))
net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
config.int8_calibrator = MyCal()
class Cal(trt.IInt8EntropyCalibrator2): pass
layer.precision = trt.float16
layer.set_output_type(0, trt.float16)
ok = cfg.precision == "int4"
fast = builder.platform_has_fast_fp16
cfg = CreateConfig(
    profiles=[p], memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(2e9)},
    fp16=True)
good = CreateConfig(profiles=[p], builder_optimization_level=3)
x = "CreateConfig(int8=True)"
'''
    hits = removed_api_uses(src, "f.py")
    assert [int(h.split(":")[1]) for h in hits] == [3, 3, 5, 6, 7, 8, 9, 11, 14], hits
    assert any("CreateConfig precision flag: fp16=" in h for h in hits)


def test_no_removed_tensorrt10_api_in_the_package():
    files = sorted((REPO / "dilatequant").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    assert any(f.parts[-2:] == ("tensorrt", "build.py") for f in files)
    hits = [h for f in files for h in removed_api_uses(f.read_text(), str(f.relative_to(REPO)))]
    assert hits == [], "TensorRT 10-only API (removed in TensorRT 11) found:\n" + "\n".join(hits)


# ---------------------------------------------------------------- the real build (TensorRT 11 + GPU only)


def _trt_or_skip():
    try:
        import tensorrt
    except (ImportError, OSError):
        pytest.skip("TensorRT 11 is not installed (pip install \"dilatequant[trt]\" --extra-index-url "
                    "https://pypi.nvidia.com)")
    if int(tensorrt.__version__.split(".")[0]) < 11:
        pytest.skip(f"TensorRT 11 is not installed (found {tensorrt.__version__})")
    if trt_env.detect_gpu() is None:
        pytest.skip("no CUDA GPU")
    return tensorrt


@pytest.mark.slow
def test_real_build_inspect_timing_cache_and_parity_with_ort(tmp_path, request):
    _trt_or_skip()
    ck_path, onnx_path = request.getfixturevalue("exported")
    engine, cache = tmp_path / "unet.plan", tmp_path / "timing.cache"
    s = build_engine(BuildConfig(onnx=onnx_path, engine=engine, inspect=True, timing_cache=cache,
                                 max_shapes="sample:8x1x8x8"))
    assert engine.stat().st_size == s["engine_bytes"] > 0 and cache.stat().st_size > 0
    assert int(s["tensorrt"].split(".")[0]) >= 11 and s["timesteps"] == [750, 500, 250, 0]
    layers = json.loads((tmp_path / "unet.plan.layers.json").read_text())
    assert len(layers["Layers"]) == s["layers"]["layers"] > 0
    # a second build reuses and keeps the cache
    s2 = build_engine(BuildConfig(onnx=onnx_path, engine=tmp_path / "again.plan", timing_cache=cache,
                                  max_shapes="sample:8x1x8x8"))
    assert s2["builder"]["timing_cache"]["bytes_before"] > 0

    import torch
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from dilatequant.calibrate.checkpoint import load_checkpoint
    from dilatequant.core.metrics import sqnr_db
    from dilatequant.dq_export.parity import ort_session, parity_inputs, run_ort

    ins = {k: v[:8] for k, v in parity_inputs(load_checkpoint(ck_path), per_step=2).items()}
    ref = run_ort(ort_session(onnx_path), ins)
    with TrtRunner(EngineFromBytes(engine.read_bytes())) as runner:
        out = runner.infer({k: v.numpy() for k, v in ins.items()})["noise_pred"]
    got = torch.as_tensor(np.asarray(out)).float()
    assert got.shape == ref.shape
    assert sqnr_db(got, ref) >= 30.0  # INT8 kernels vs ORT's float-simulated Q/DQ: rounding-level only
