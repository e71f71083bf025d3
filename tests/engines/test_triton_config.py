"""Generated repositories (ONNX/plan, gpu/cpu) parse as ModelConfig and agree with the UNet; broken configs are caught."""
import json
import onnx
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.cli import triton_main  # noqa: E402
from dilatequant.core.errors import UserError  # noqa: E402
from dilatequant.engines.triton import config as C  # noqa: E402
from dilatequant.engines.triton.repository import validate_repository, write_repository  # noqa: E402
from dilatequant.engines.triton.repository_config import RepositoryConfig  # noqa: E402
from dilatequant.engines.triton.unet_spec import spec_from_onnx  # noqa: E402

from triton_fixtures import tiny_cond_export  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt, graph = tiny_cond_export(tmp_path_factory)
    plan = tmp / "unet.plan"
    plan.write_bytes(b"not a real engine: configs only")
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    (tmp / "unet.plan.json").write_text(json.dumps({"metadata": meta}))
    return tmp, ckpt, graph, plan


def _configs(repo):
    return {d.name: C.parse((d / "config.pbtxt").read_text()) for d in repo.iterdir() if (d / "config.pbtxt").exists()}


@pytest.mark.parametrize("source,kind", [("onnx", "gpu"), ("onnx", "cpu"), ("plan", "gpu")])
def test_generated_repository_parses_and_matches_the_unet(exported, source, kind):
    tmp, ckpt, graph, plan = exported
    repo = tmp / f"repo-{source}-{kind}"
    src = {"onnx": graph} if source == "onnx" else {"engine": plan}
    s = write_repository(RepositoryConfig(repo=repo, ckpt=ckpt, kind=kind, max_batch=8, instances=2, **src))
    assert s["timesteps"] == [750, 500, 250, 0] and s["conditional"]
    cfgs = _configs(repo)
    assert set(cfgs) == {"unet", "pipeline"}
    unet = cfgs["unet"]
    want = {("onnx", "gpu"): ("onnxruntime_onnx", ""), ("onnx", "cpu"): ("", "python"), ("plan", "gpu"): ("tensorrt_plan", "")}
    assert (unet.platform, unet.backend) == want[(source, kind)]
    assert unet.max_batch_size == 8 and unet.HasField("dynamic_batching")
    assert unet.instance_group[0].count == 2
    assert unet.instance_group[0].kind == (C.mc.ModelInstanceGroup.KIND_CPU if kind == "cpu" else C.mc.ModelInstanceGroup.KIND_GPU)
    ins = {i.name: i for i in unet.input}
    assert list(ins) == ["sample", "timestep", "t_index", "encoder_hidden_states"]
    assert list(ins["sample"].dims) == [1, 8, 8] and ins["sample"].data_type == C.mc.TYPE_FP32
    for n in ("timestep", "t_index"):  # [B] tensors: dims [1] + reshape [] so the batch dim is theirs
        assert list(ins[n].dims) == [1] and ins[n].HasField("reshape") and list(ins[n].reshape.shape) == []
        assert ins[n].data_type == C.mc.TYPE_INT64
    assert list(ins["encoder_hidden_states"].dims) == [2, 16]
    assert [(o.name, list(o.dims)) for o in unet.output] == [("noise_pred", [1, 8, 8])]
    assert json.loads(unet.parameters["timesteps"].string_value) == [750, 500, 250, 0]
    pipe = cfgs["pipeline"]
    assert pipe.backend == "python" and pipe.max_batch_size == 0
    assert {i.name: i.optional for i in pipe.input} == {"SEED": False, "STEPS": True, "CLASS_LABELS": False,
                                                       "GUIDANCE_SCALE": True}
    assert pipe.parameters["unet_model"].string_value == "unet" and pipe.parameters["num_classes"].string_value == "10"
    assert (repo / "pipeline" / "1" / "class_tokens.npy").is_file()
    assert validate_repository(repo) == []
    files = {"onnx-gpu": "model.onnx", "onnx-cpu": "model.py", "plan-gpu": "model.plan"}
    assert (repo / "unet" / "1" / files[f"{source}-{kind}"]).is_file()


def test_external_weights_become_a_model_onnx_folder(exported):
    tmp, ckpt, graph, _ = exported
    ext = tmp / "ext" / "unet.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(graph)), str(ext), save_as_external_data=True, location="unet.onnx.data", size_threshold=0)
    write_repository(RepositoryConfig(repo=tmp / "repo-ext", onnx=ext, ckpt=ckpt, kind="gpu"))
    folder = tmp / "repo-ext" / "unet" / "1" / "model.onnx"
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "unet.onnx.data"]
    write_repository(RepositoryConfig(repo=tmp / "repo-ext-cpu", onnx=ext, ckpt=ckpt, kind="cpu"))
    assert (tmp / "repo-ext-cpu" / "unet" / "1" / "unet.onnx.data").is_file()


def _unet_text(exported, tmp_name="repo-broken"):
    tmp, ckpt, graph, _ = exported
    repo = tmp / tmp_name
    if not repo.exists():
        write_repository(RepositoryConfig(repo=repo, onnx=graph, ckpt=ckpt, kind="gpu", max_batch=8))
    spec = spec_from_onnx(graph)
    return (repo / "unet" / "config.pbtxt").read_text(), repo / "unet", C.Expected(spec.inputs, spec.outputs)


def test_unknown_field_is_caught(exported):
    text, folder, expected = _unet_text(exported)
    with pytest.raises(C.ConfigError, match="max_batch_sizes"):
        C.validate(text.replace("max_batch_size", "max_batch_sizes"), folder, expected)


def test_dims_inconsistent_with_max_batch_size_are_caught(exported):
    text, folder, expected = _unet_text(exported)
    cfg = C.parse(text)
    cfg.input[0].dims[:] = [-1, 1, 8, 8]  # batch dim repeated although max_batch_size > 0
    with pytest.raises(C.ConfigError, match=r"input 'sample' dims \[-1, 1, 8, 8\].*batch dimension must be left out"):
        C.validate(C.to_text(cfg), folder, expected)
    cfg = C.parse(text)
    cfg.max_batch_size = 0  # now the dims lack the batch dimension, and dynamic batching is impossible
    with pytest.raises(C.ConfigError, match="dynamic_batching needs max_batch_size > 0") as err:
        C.validate(C.to_text(cfg), folder, expected)
    assert "must include the batch dimension" in str(err.value)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.input[0].__setattr__("data_type", C.mc.TYPE_FP16), "input 'sample' is TYPE_FP16 but the model's is TYPE_FP32"),
    (lambda c: c.input.pop(2), "missing input 't_index'"),
    (lambda c: c.output[0].__setattr__("name", "noise"), "output 'noise' is not a tensor of the model"),
    (lambda c: c.__setattr__("name", "other"), "name differs from its folder 'unet'"),
    (lambda c: c.__setattr__("backend", "python"), "set exactly one of platform or backend"),
])
def test_semantic_problems_are_named(exported, edit, message):
    text, folder, expected = _unet_text(exported)
    cfg = C.parse(text)
    edit(cfg)
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        C.validate(C.to_text(cfg), folder, expected)


def test_bad_arguments_are_user_errors(exported, capsys):
    tmp, ckpt, graph, plan = exported
    with pytest.raises(UserError, match="--kind cpu runs ONNX Runtime"):
        RepositoryConfig(repo=tmp / "x", engine=plan, kind="cpu")
    with pytest.raises(UserError, match="not the checkpoint this graph was exported from"):
        other = tmp / "other.pt"
        other.write_bytes(ckpt.read_bytes() + b"x")
        write_repository(RepositoryConfig(repo=tmp / "y", onnx=graph, ckpt=other))
    with pytest.raises(UserError, match="exists and is not empty"):
        write_repository(RepositoryConfig(repo=tmp / "repo-onnx-gpu", onnx=graph, ckpt=ckpt))
    # base model named in the graph ("tiny-random") cannot be loaded: the message says to pass --ckpt
    with pytest.raises(SystemExit) as exit_info:
        triton_main(["--onnx", str(graph), "--repo", str(tmp / "z")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "--ckpt" in err and err.count("\n") == 1
    assert not (tmp / "z").exists()


def test_unconditional_pipeline_config_takes_num_images(tmp_path):
    from dilatequant.engines.triton.repository import Conditioning, _pipeline_config, pipeline_io
    from dilatequant.engines.triton.repository_config import RepositoryConfig
    from dilatequant.engines.triton.unet_spec import TensorSpec, UnetSpec

    spec = UnetSpec([TensorSpec("sample", "float32", (-1, 1, 32, 32)), TensorSpec("timestep", "int64", (-1,)),
                     TensorSpec("t_index", "int64", (-1,))], [TensorSpec("noise_pred", "float32", (-1, 1, 32, 32))],
                    {"dilatequant.timesteps": "[900, 450, 0]", "dilatequant.sample_shape": "[1, 32, 32]",
                     "dilatequant.conditional": "false"})
    msg, doc, (ins, outs, optional) = _pipeline_config(RepositoryConfig(repo=tmp_path, onnx=tmp_path / "u.onnx"), spec,
                                                       Conditioning({"num_train_timesteps": 1000}))
    text = doc + C.to_text(msg)
    cfg = C.validate(text, None, C.Expected(ins, outs, optional))
    assert [(i.name, i.optional) for i in cfg.input] == [("SEED", False), ("STEPS", True), ("NUM_IMAGES", True)]
    assert list(cfg.output[0].dims) == [-1, 32, 32, 1] and cfg.output[0].data_type == C.mc.TYPE_UINT8
    assert cfg.parameters["conditional"].string_value == "false" and "NUM_IMAGES" in doc
    assert [t.name for t in pipeline_io(spec)[0]] == ["SEED", "STEPS", "NUM_IMAGES"]


def test_pipeline_default_guidance_is_the_samplers():
    """The repository module keeps its own copy (no torch import); the two must not drift apart."""
    from dilatequant.core.guidance import DEFAULT_GUIDANCE
    from dilatequant.engines.triton import repository

    assert repository.DEFAULT_GUIDANCE == DEFAULT_GUIDANCE


def _profiled_plan(exported, name, lo=1, hi=8, spatial=(1, 8, 8), tensorrt="11.4.0.106", cc="9.0"):
    """A plan whose sidecar records its optimization profile and what built it, as dq-build-engine writes it."""
    tmp, _, graph, _ = exported
    plan = tmp / f"{name}.plan"
    plan.write_bytes(b"not a real engine: configs only")
    meta = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    prof = {"sample": {"min": [lo, *spatial], "opt": [hi, *spatial], "max": [hi, *spatial]},
            "timestep": {"min": [lo], "opt": [hi], "max": [hi]}, "t_index": {"min": [lo], "opt": [hi], "max": [hi]},
            "encoder_hidden_states": {"min": [lo, 2, 16], "opt": [hi, 2, 16], "max": [hi, 2, 16]}}
    (tmp / f"{name}.plan.json").write_text(json.dumps({
        "metadata": meta, "profiles": [prof], "tensorrt": tensorrt,
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": cc, "source": "nvidia-smi"}}))
    return plan


def test_max_batch_and_sizes_are_checked_against_the_plans_profile(exported):
    tmp, ckpt, _, _ = exported
    plan = _profiled_plan(exported, "p8")
    with pytest.raises(UserError) as err:
        write_repository(RepositoryConfig(repo=tmp / "r16", engine=plan, ckpt=ckpt, max_batch=16))
    msg = str(err.value)
    assert msg.startswith("--max-batch 16 exceeds the plan's optimization profile (batch 1..8 in ") and "\n" not in msg
    assert "pass --max-batch 8" in msg and not (tmp / "r16").exists()
    s = write_repository(RepositoryConfig(repo=tmp / "r8", engine=plan, ckpt=ckpt, max_batch=8))
    unet = _configs(tmp / "r8")["unet"]
    par = {k: v.string_value for k, v in unet.parameters.items()}
    assert (par["tensorrt_version"], par["gpu_name"], par["gpu_compute_capability"], par["profile_batch"]) == (
        "11.4.0.106", "NVIDIA H100 80GB HBM3", "9.0", "1..8")
    assert s["plan"]["tensorrt_version"] == "11.4.0.106" and validate_repository(tmp / "r8") == []
    assert _configs(tmp / "r8")["pipeline"].parameters["unet_max_batch"].string_value == "8"
    with pytest.raises(UserError, match=r"starts at batch 2 .*Triton sends batches from 1"):
        write_repository(RepositoryConfig(repo=tmp / "rmin", engine=_profiled_plan(exported, "min2", lo=2), ckpt=ckpt,
                                          max_batch=8))
    with pytest.raises(UserError, match=r"input 'sample' dimension 2 is 8, outside the engine's optimization profile "
                                        r"16\.\.16"):
        write_repository(RepositoryConfig(repo=tmp / "rhw", engine=_profiled_plan(exported, "hw", spatial=(1, 16, 16)),
                                          ckpt=ckpt, max_batch=8))


def test_a_plan_from_another_tensorrt_or_gpu_is_caught_before_load(exported, capsys):
    from dilatequant.engines.tensorrt.env import GpuInfo
    from dilatequant.engines.triton.repository import plan_environment_problems
    from dilatequant.engines.triton.repository_config import RepositoryConfig

    tmp, ckpt, graph, _ = exported
    plan = _profiled_plan(exported, "env")
    with pytest.raises(SystemExit) as exit_info:
        triton_main(["--engine", str(plan), "--repo", str(tmp / "renv-bad"), "--ckpt", str(ckpt), "--max-batch", "8",
                     "--serving-tensorrt", "11.3.0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot run in the serving container: it was built with TensorRT 11.4.0.106 and this is TensorRT 11.3.0" in err
    assert not (tmp / "renv-bad").exists()
    write_repository(RepositoryConfig(repo=tmp / "renv", engine=plan, ckpt=ckpt, max_batch=8,
                                      serving_tensorrt="11.4.0"))
    h100, l40s = GpuInfo("NVIDIA H100 NVL", "9.0", "test"), GpuInfo("NVIDIA L40S", "8.9", "test")
    assert plan_environment_problems(tmp / "renv", "11.4.0.106", h100) == []
    [gpu_problem] = plan_environment_problems(tmp / "renv", "11.4.0.106", l40s)
    assert "built on NVIDIA H100 80GB HBM3 (compute capability 9.0) and this is NVIDIA L40S (compute capability 8.9)" \
        in gpu_problem and "unet/1/model.plan" in gpu_problem
    [trt_problem] = plan_environment_problems(tmp / "renv", "10.13.0", h100)
    assert "built with TensorRT 11.4.0.106 and this is TensorRT 10.13.0" in trt_problem
    write_repository(RepositoryConfig(repo=tmp / "renv-onnx", onnx=graph, ckpt=ckpt, max_batch=8))
    assert plan_environment_problems(tmp / "renv-onnx", "10.13.0", l40s) == []  # no plan, nothing to compare
