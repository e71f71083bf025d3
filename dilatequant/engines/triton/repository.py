"""dq-triton: a Triton model repository for an exported UNet plus a DDIM `pipeline` model.

    <repo>/unet/config.pbtxt      tensorrt_plan | onnxruntime_onnx (--kind gpu) or python+ORT (--kind cpu)
    <repo>/unet/1/model.plan | model.onnx (a folder model.onnx/ when weights are external) | model.py+model.onnx
    <repo>/pipeline/config.pbtxt  python backend: seed, steps, labels, guidance -> uint8 images
    <repo>/pipeline/1/model.py, dq_bls.py, scheduler_config.json, class_tokens.npy (conditional models)

A graph calibrated from a StableDiffusionPipeline gets, instead, `text_encoder` and `vae_decoder` models and a
prompt `pipeline` (sd_repository.py); one from a StableDiffusionXLPipeline also `text_encoder_2`, and its pipeline
adds the pooled embedding and time_ids.

Every config is built as a tritonclient ModelConfig message, written as text, parsed back and
checked against the UNet's I/O before the repository is renamed into place.

A plan is checked against its sidecar's optimization profile (--max-batch may not exceed the profile's maximum
batch, its minimum must be 1, the served sizes must lie inside it), and the TensorRT release and GPU that built it
are recorded as parameters of the unet model: a plan runs only with that TensorRT release and GPU architecture, so
`plan_environment_problems` (and `--serving-tensorrt` when writing) compares them with the serving side before
Triton loads anything.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ...core.errors import UserError
from ...core.guidance import DEFAULT_GUIDANCE
from ...core.reporting import atomic_write_bytes, write_text
from ..tensorrt.env import GpuInfo, plan_mismatch
from ..tensorrt.plan_files import plan_backend
from ..tensorrt.profiles import EngineProfile
from . import config as C
from .repository_config import PIPELINE, RepositoryConfig
from .unet_spec import TensorSpec, UnetSpec, spec_from_onnx, spec_from_plan

@dataclass
class Conditioning:
    """What the pipeline needs from the model beyond the graph: schedule and class-token table."""

    scheduler_config: dict
    class_tokens: np.ndarray | None = None   # [num_classes + 1, tokens * dim]; the last row is the null label
    token_shape: tuple[int, int] | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)


def load_conditioning(spec_meta: dict[str, str], ckpt: Path | None) -> Conditioning:
    """From the q.pt when given (checked against the graph's checkpoint hash), else the base model."""
    if ckpt is not None:
        from ...calibrate.checkpoint import load_checkpoint

        check_checkpoint(spec_meta, ckpt)
        model, source = load_checkpoint(ckpt).model, str(ckpt)
    else:
        from ...core.models import load_model

        base = spec_meta.get("dilatequant.base_model", "")
        try:
            model = load_model(base)
        except UserError as err:
            raise UserError(f"the graph names base model '{base}', which cannot be loaded here ({err}); pass --ckpt "
                            "q.pt (the checkpoint it was exported from)") from err
        source = base
    cfg = {k: v for k, v in dict(model.scheduler.config).items() if not k.startswith("_")}
    cond = Conditioning(json.loads(json.dumps(cfg, default=list)), source=source)
    if model.class_encoder is not None:
        enc = model.class_encoder
        cond.class_tokens = enc.table.weight.detach().float().numpy().copy()
        cond.token_shape = (int(enc.config.num_tokens), int(enc.config.dim))
    return cond


def check_checkpoint(spec_meta: dict[str, str], ckpt: Path) -> None:
    """--ckpt must be the q.pt the graph was exported from (its sha256 is in the graph's metadata)."""
    from ...calibrate.checkpoint import checkpoint_hash

    if not Path(ckpt).is_file():
        raise UserError(f"checkpoint '{ckpt}' does not exist; pass the q.pt given to dq-export (or leave --ckpt out)")
    want = spec_meta.get("dilatequant.source_checkpoint_sha256")
    if want and checkpoint_hash(ckpt) != want:
        raise UserError(f"'{ckpt}' is not the checkpoint this graph was exported from (sha256 differs from the "
                        "graph's dilatequant.source_checkpoint_sha256); pass the q.pt given to dq-export")


def plan_record(engine: Path, spec: UnetSpec, max_batch: int) -> dict[str, str]:
    """Check --max-batch and the served sizes against the plan's profile; what built the plan, as config parameters."""
    side_path = Path(str(engine) + ".json")
    try:
        side = json.loads(side_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the sidecar '{side_path}' of '{engine}' ({err}); rebuild the engine") from err
    profile = EngineProfile.from_sidecar(side, str(side_path))
    record = {}
    if profile is not None:
        lo, hi = profile.batch_range
        if max_batch > hi:
            raise UserError(f"--max-batch {max_batch} exceeds the plan's optimization profile (batch {lo}..{hi} in "
                            f"'{side_path}'): Triton would send batches the plan refuses; pass --max-batch {hi} or "
                            f"rebuild with dq-build-engine --max-shapes sample:{max_batch}x...")
        if lo > 1:
            raise UserError(f"the plan's optimization profile starts at batch {lo} ('{side_path}'), but Triton sends "
                            "batches from 1; rebuild with dq-build-engine --min-shapes sample:1x...")
        profile.check({t.name: (1, *t.shape[1:]) for t in spec.inputs if all(d > 0 for d in t.shape[1:])},
                      split_batch=False)
        record["profile_batch"] = f"{lo}..{hi}"
    gpu = side.get("gpu") or {}
    record.update({"tensorrt_version": str(side.get("tensorrt") or ""), "gpu_name": str(gpu.get("name", "")),
                   "gpu_compute_capability": str(gpu.get("compute_capability", ""))})
    return record


def _unet_config(cfg: RepositoryConfig, spec: UnetSpec, plan: dict[str, str] | None = None):
    batched = cfg.max_batch > 0
    m = C.mc.ModelConfig(name=cfg.name, max_batch_size=cfg.max_batch)
    if cfg.kind == "cpu":
        m.backend = "python"
    else:
        m.platform = "tensorrt_plan" if cfg.engine else "onnxruntime_onnx"
    m.input.extend(C.model_input(t, batched) for t in spec.inputs)
    m.output.extend(C.model_output(t, batched) for t in spec.outputs)
    m.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = m.instance_group.add()
    group.count = cfg.instances
    group.kind = C.mc.ModelInstanceGroup.KIND_CPU if cfg.kind == "cpu" else C.mc.ModelInstanceGroup.KIND_GPU
    params = {"num_steps": str(len(spec.timesteps)), "timesteps": json.dumps(spec.timesteps)}
    if cfg.kind == "cpu":
        params["intra_op_threads"] = str(cfg.intra_op_threads)
    params.update(plan or {})
    for k, v in params.items():
        m.parameters[k].string_value = v
    return m


def _t(name, dtype, shape):
    return TensorSpec(name, dtype, shape)


def pipeline_io(spec: UnetSpec) -> tuple[list[TensorSpec], list[TensorSpec], tuple[str, ...]]:
    """The pipeline's tensors (max_batch_size 0, so shapes are complete)."""
    c, h, w = spec.sample_shape
    ins = [_t("SEED", "int64", (1,)), _t("STEPS", "int32", (1,))]
    optional = ("STEPS",)
    if spec.conditional:
        ins += [_t("CLASS_LABELS", "int64", (-1,)), _t("GUIDANCE_SCALE", "float32", (1,))]
        optional += ("GUIDANCE_SCALE",)
    else:
        ins.append(_t("NUM_IMAGES", "int32", (1,)))
        optional += ("NUM_IMAGES",)
    return ins, [_t("IMAGES", "uint8", (-1, h, w, c))], optional


PIPELINE_DOC = """\
# DDIM sampling pipeline (Python backend) calling model '{unet}' through BLS.
# Inputs:
#   SEED            INT64 [1]   initial noise = torch.randn((N, {shape}), Generator().manual_seed(SEED))
#   STEPS           INT32 [1]   optional; DDIM steps (default {steps}, the calibrated count; other counts use the
#                               t_index of the nearest calibrated timestep)
{cond_doc}# Output:
#   IMAGES          UINT8 [N, H, W, C]
# Parameters: timesteps = the calibrated schedule (t_index i <-> timesteps[i]); max_images per request.
"""
COND_DOC = """\
#   CLASS_LABELS    INT64 [N]   one class label per image, 0..{last}
#   GUIDANCE_SCALE  FP32  [1]   optional; classifier-free guidance (default {guidance}; 1.0 turns it off)
"""
UNCOND_DOC = "#   NUM_IMAGES      INT32 [1]   optional; images to generate (default 1)\n"


def _pipeline_config(cfg: RepositoryConfig, spec: UnetSpec, cond: Conditioning):
    ins, outs, optional = pipeline_io(spec)
    m = C.python_model(PIPELINE, ins, outs, optional, cfg.pipeline_instances)
    params = {"unet_model": cfg.name, "unet_output": spec.outputs[0].name, "unet_max_batch": str(cfg.max_batch), "timesteps": json.dumps(spec.timesteps),
              "sample_shape": json.dumps(list(spec.sample_shape)), "conditional": str(spec.conditional).lower(),
              "t_index_input": str(spec.has_t_index).lower(), "default_guidance": str(DEFAULT_GUIDANCE),
              "max_images": str(cfg.max_images), "torch_threads": "1", "source": cond.source}
    if spec.conditional:
        params["num_classes"] = str(len(cond.class_tokens) - 1)
        params["token_shape"] = json.dumps(list(cond.token_shape))
    for k, v in params.items():
        m.parameters[k].string_value = v
    doc = PIPELINE_DOC.format(
        unet=cfg.name, shape=", ".join(map(str, spec.sample_shape)), steps=len(spec.timesteps),
        cond_doc=COND_DOC.format(last=len(cond.class_tokens) - 2, guidance=DEFAULT_GUIDANCE)
        if spec.conditional else UNCOND_DOC)
    return m, doc, (ins, outs, optional)


def _copy_onnx(src: Path, version_dir: Path, as_folder: bool) -> None:
    """model.onnx in place; with external data, a folder `model.onnx/` holding the graph and its data files.

    Triton's onnxruntime backend loads `<version>/model.onnx/model.onnx` when model.onnx is a folder, and
    ONNX Runtime finds the data file beside it by the location the graph names (e.g. unet.onnx.data).
    """
    from ...dq_export.onnx_files import external_files

    extra = external_files(src)
    for f in extra:
        if not f.is_file():
            raise UserError(f"'{src}' refers to external data '{f}', which is missing; keep it beside the graph")
    if extra and as_folder:
        target = version_dir / "model.onnx"
        target.mkdir()
        shutil.copyfile(src, target / "model.onnx")
    else:
        target = version_dir
        shutil.copyfile(src, version_dir / "model.onnx")
    for f in extra:
        (target / f.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target / f.name)


def _write_config(model_dir: Path, message, expected: C.Expected, header: str = "") -> None:
    text = header + C.to_text(message)
    write_text(model_dir / "config.pbtxt", text)
    C.validate(text, model_dir, expected)


def _backend_source(name: str) -> bytes:
    return (resources.files("dilatequant.engines.triton.backends") / f"{name}.py").read_bytes()


def refuse_tensorrt_rtx_plan(engine: Path) -> None:
    """Triton's tensorrt_plan backend deserializes a plan with TensorRT's own runtime (triton-inference-server/
    tensorrt_backend: CMakeLists.txt links nvinfer, src/loader.cc calls nvinfer1::createInferRuntime and
    deserializeCudaEngine; no TensorRT-RTX anywhere in Triton's sources), which cannot read a TensorRT-RTX plan."""
    if plan_backend(engine) == "tensorrt-rtx":
        raise UserError(f"'{engine}' is a TensorRT-RTX plan, and Triton's tensorrt_plan backend loads plans with "
                        "TensorRT's libnvinfer, which cannot read it; serve the ONNX graph (dq-triton --onnx), or build "
                        "the plan on the serving GPU with dq-build-engine --backend tensorrt")


def write_repository(cfg: RepositoryConfig) -> dict:
    """Write and validate the repository; returns a summary. The folder appears complete or not at all."""
    if cfg.engine is not None:
        refuse_tensorrt_rtx_plan(cfg.engine)
    C.require_tritonclient()
    if cfg.onnx is not None:
        spec = spec_from_onnx(cfg.onnx)
    else:
        spec = None
    cond_meta = spec.metadata if spec else _sidecar_metadata(cfg.engine)
    sd = None
    if cond_meta.get("dilatequant.pipeline_class"):  # a Stable Diffusion graph: prompts, not class tokens
        from .sd_parts import PART_NAMES, load_parts
        from .sd_repository import dynamic_spatial

        if cfg.name in PART_NAMES:
            raise UserError(f"--name '{cfg.name}' is taken by the Stable Diffusion parts; choose another name")
        if cfg.ckpt is not None:  # not needed (prompts, not class tokens), but a wrong one is still an error
            check_checkpoint(cond_meta, cfg.ckpt)
        sd = load_parts(cond_meta, cfg.model)
        cond = Conditioning(sd.schedulers["pipeline"], token_shape=(sd.prompt_tokens, sd.text_dim), source=sd.source)
        if spec is None:
            spec = spec_from_plan(cfg.engine, cond.token_shape)
            sd.size_multiple = 0  # a plan serves the sizes of its profile; keep to the calibrated one
        elif sd.size_multiple:
            spec = dynamic_spatial(spec)
        ehs = spec.input("encoder_hidden_states").shape[1:]
        if any(d not in (-1, want) for d, want in zip(ehs, cond.token_shape)):
            raise UserError(f"encoder_hidden_states is {list(ehs)} per sample in the graph but the text encoder of "
                            f"'{sd.source}' makes {list(cond.token_shape)}; pass --model, the pipeline it came from")
    else:
        cond = load_conditioning(cond_meta, cfg.ckpt)
    if spec is None:
        spec = spec_from_plan(cfg.engine, cond.token_shape)
    if spec.conditional and sd is None:
        if cond.class_tokens is None:
            raise UserError(f"the graph is conditional but '{cond.source}' has no class encoder; pass --ckpt q.pt")
        ehs = spec.input("encoder_hidden_states").shape[1:]
        if tuple(ehs) != tuple(cond.token_shape):
            raise UserError(f"encoder_hidden_states is {list(ehs)} per sample in the graph but the class encoder of "
                            f"'{cond.source}' makes {list(cond.token_shape)}; pass the matching --ckpt")
    plan = plan_record(cfg.engine, spec, cfg.max_batch) if cfg.engine is not None else None
    if plan and cfg.serving_tensorrt:
        problem = plan_mismatch(str(cfg.engine), plan["tensorrt_version"], None, cfg.serving_tensorrt, None)
        if problem:
            raise UserError(f"{problem.replace('cannot run here', 'cannot run in the serving container')} "
                            f"(--serving-tensorrt {cfg.serving_tensorrt})")
    if cfg.repo.exists() and any(cfg.repo.iterdir()) and not cfg.overwrite:
        raise UserError(f"'{cfg.repo}' exists and is not empty; choose a new folder or pass --overwrite")
    cfg.repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cfg.repo.parent, prefix=f".{cfg.repo.name}."))
    try:
        unet_dir = staging / cfg.name
        (unet_dir / "1").mkdir(parents=True)
        if cfg.engine is not None:
            shutil.copyfile(cfg.engine, unet_dir / "1" / "model.plan")
        else:
            _copy_onnx(cfg.onnx, unet_dir / "1", as_folder=cfg.kind == "gpu")
            if cfg.kind == "cpu":
                atomic_write_bytes(unet_dir / "1" / "model.py", _backend_source("unet_ort"))
        _write_config(unet_dir, _unet_config(cfg, spec, plan), C.Expected(spec.inputs, spec.outputs))

        if sd is not None:
            from .sd_repository import write_sd_models

            write_sd_models(cfg, spec, sd, staging, _write_config, _backend_source)
        else:
            _write_class_pipeline(cfg, spec, cond, staging / PIPELINE)
        if cfg.repo.exists():
            shutil.rmtree(cfg.repo)
        staging.rename(cfg.repo)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"repo": str(cfg.repo), "kind": cfg.kind,
            "models": [cfg.name, PIPELINE] + ([*sd.encoders, "vae_decoder"] if sd is not None else []),
            "prompts": sd is not None, "pipeline_class": sd.pipeline_class if sd is not None else None,
            "unet_backend": "python (ONNX Runtime)" if cfg.kind == "cpu" else
            ("tensorrt_plan" if cfg.engine else "onnxruntime_onnx"),
            "inputs": [t.name for t in spec.inputs], "timesteps": spec.timesteps, "conditional": spec.conditional,
            "max_batch": cfg.max_batch, "source": cond.source, "plan": plan}


def _write_class_pipeline(cfg: RepositoryConfig, spec: UnetSpec, cond: Conditioning, pipe_dir: Path) -> None:
    (pipe_dir / "1").mkdir(parents=True)
    atomic_write_bytes(pipe_dir / "1" / "model.py", _backend_source("pipeline"))
    atomic_write_bytes(pipe_dir / "1" / "dq_bls.py", _backend_source("dq_bls"))
    (pipe_dir / "1" / "scheduler_config.json").write_text(json.dumps(cond.scheduler_config, indent=2) + "\n")
    if spec.conditional:
        np.save(pipe_dir / "1" / "class_tokens.npy", cond.class_tokens.astype(np.float32))
    message, doc, (ins, outs, optional) = _pipeline_config(cfg, spec, cond)
    _write_config(pipe_dir, message, C.Expected(ins, outs, optional), header=doc)


def _sidecar_metadata(engine: Path) -> dict[str, str]:
    side = Path(str(engine) + ".json")
    try:
        return {str(k): str(v) for k, v in json.loads(side.read_text())["metadata"].items()}
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return spec_from_plan(engine).metadata  # raises the detailed error


def validate_repository(repo: str | Path) -> list[str]:
    """Parse and sanity-check every config.pbtxt under repo (no model I/O to compare with); problems found."""
    repo = Path(repo)
    problems = []
    for cfg_file in sorted(repo.glob("*/config.pbtxt")):
        try:
            parsed = C.parse(cfg_file.read_text(), str(cfg_file))
        except C.ConfigError as err:
            problems.append(str(err))
            continue
        problems += C.check_semantics(parsed, cfg_file.parent)
    return problems


def plan_environment_problems(repo: str | Path, tensorrt_version: str | None = None,
                              gpu: GpuInfo | dict | None = None) -> list[str]:
    """One line per tensorrt_plan model whose recorded TensorRT release or GPU architecture differs from the
    serving side's (given, or else this machine's TensorRT and GPU when present): caught before Triton loads it."""
    if tensorrt_version is None:
        try:
            import tensorrt

            tensorrt_version = str(tensorrt.__version__)
        except (ImportError, OSError):
            tensorrt_version = None
    if gpu is None:
        from ..tensorrt.env import detect_gpu

        gpu = detect_gpu()
    problems = []
    for cfg_file in sorted(Path(repo).glob("*/config.pbtxt")):
        try:
            parsed = C.parse(cfg_file.read_text(), str(cfg_file))
        except C.ConfigError:
            continue  # validate_repository reports it
        if parsed.platform != "tensorrt_plan":
            continue
        par = {k: v.string_value for k, v in parsed.parameters.items()}
        built_gpu = {"name": par.get("gpu_name", ""), "compute_capability": par.get("gpu_compute_capability", "")}
        problem = plan_mismatch(str(cfg_file.parent / "1" / "model.plan"), par.get("tensorrt_version") or None,
                                built_gpu, tensorrt_version, gpu)
        if problem:
            problems.append(problem)
    return problems
