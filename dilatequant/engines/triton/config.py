"""config.pbtxt as tritonclient's ModelConfig protobuf: built from messages, validated on write.

Syntax and field names are checked by parsing the text back into ModelConfig (text_format);
semantics Triton would only report at load time are checked here: names, dims against
max_batch_size, dtypes against the model's own I/O, every model input present, files in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...core.errors import UserError
from .unet_spec import TensorSpec

try:  # the `serve` extra
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
except ImportError:  # pragma: no cover - reported by require_tritonclient()
    mc = None
    text_format = None

NP_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
                "object": "TYPE_STRING"}  # object: numpy's bytes/str arrays, Triton's BYTES (prompts)
PLATFORM_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}
BACKEND_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}


class ConfigError(UserError):
    """A config.pbtxt that Triton would reject or that disagrees with the model it describes."""


def require_tritonclient() -> None:
    if mc is None:
        raise UserError("tritonclient is not installed; install the serving extra: pip install 'dilatequant[serve]'")


def triton_dtype(np_name: str) -> int:
    require_tritonclient()
    if np_name not in NP_TO_TRITON:
        raise ConfigError(f"dtype {np_name} has no Triton equivalent here (supported: {', '.join(NP_TO_TRITON)})")
    return mc.DataType.Value(NP_TO_TRITON[np_name])


def tensor_dims(t: TensorSpec, batched: bool) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) for a config entry: the batch dim is implicit when max_batch_size > 0.

    A [B] tensor becomes dims [1] with reshape [] (Triton dims cannot be empty).
    """
    shape = list(t.shape[1:]) if batched else list(t.shape)
    if not shape:
        return [1], []
    return shape, None


def model_input(t: TensorSpec, batched: bool, optional: bool = False):
    dims, reshape = tensor_dims(t, batched)
    msg = mc.ModelInput(name=t.name, data_type=triton_dtype(t.dtype), dims=dims, optional=optional)
    if reshape is not None:
        msg.reshape.shape[:] = reshape
    return msg


def python_model(name: str, ins, outs, optional, instances: int):
    """An unbatched Python-backend model on CPU instances (the pipelines): I/O from TensorSpecs, `optional` names."""
    m = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    m.input.extend(model_input(t, False, optional=t.name in optional) for t in ins)
    m.output.extend(model_output(t, False) for t in outs)
    group = m.instance_group.add()
    group.count = instances
    group.kind = mc.ModelInstanceGroup.KIND_CPU
    return m


def model_output(t: TensorSpec, batched: bool):
    dims, reshape = tensor_dims(t, batched)
    msg = mc.ModelOutput(name=t.name, data_type=triton_dtype(t.dtype), dims=dims)
    if reshape is not None:
        msg.reshape.shape[:] = reshape
    return msg


def to_text(cfg) -> str:
    return text_format.MessageToString(cfg)


def parse(text: str, where: str = "config.pbtxt"):
    require_tritonclient()
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as err:
        raise ConfigError(f"{where}: not a valid Triton ModelConfig: {err}") from err
    return cfg


@dataclass
class Expected:
    """What a config must agree with: the model's I/O (full shapes, batch first) and its files."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    optional_inputs: tuple[str, ...] = ()


def _dtype_name(value: int) -> str:
    return mc.DataType.Name(value)


def check_semantics(cfg, model_dir: Path | None = None, expected: Expected | None = None) -> list[str]:
    """Problems Triton reports only when loading (or never, giving wrong results); empty when fine."""
    problems: list[str] = []
    where = f"model '{cfg.name or '?'}'"
    if not cfg.name:
        problems.append("config has no name")
    elif model_dir is not None and cfg.name != model_dir.name:
        problems.append(f"{where}: name differs from its folder '{model_dir.name}' (Triton requires them equal)")
    if bool(cfg.platform) == bool(cfg.backend):
        problems.append(f"{where}: set exactly one of platform or backend (got platform='{cfg.platform}', "
                        f"backend='{cfg.backend}')")
    if cfg.max_batch_size < 0:
        problems.append(f"{where}: max_batch_size {cfg.max_batch_size} is negative")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0:
        problems.append(f"{where}: dynamic_batching needs max_batch_size > 0")
    for pref in cfg.dynamic_batching.preferred_batch_size:
        if pref > cfg.max_batch_size:
            problems.append(f"{where}: preferred batch size {pref} exceeds max_batch_size {cfg.max_batch_size}")
    for group in cfg.instance_group:
        if group.count < 1:
            problems.append(f"{where}: instance_group count {group.count} must be >= 1")
    seen = set()
    for io in list(cfg.input) + list(cfg.output):
        if io.name in seen:
            problems.append(f"{where}: tensor '{io.name}' is declared twice")
        seen.add(io.name)
        if not io.dims:
            problems.append(f"{where}: tensor '{io.name}' has no dims (use [1] with reshape {{ shape: [] }})")
        if any(d == 0 or d < -1 for d in io.dims):
            problems.append(f"{where}: tensor '{io.name}' dims {list(io.dims)} must be positive or -1")
        if io.data_type == mc.TYPE_INVALID:
            problems.append(f"{where}: tensor '{io.name}' has no data_type")
    if expected is not None:
        batched = cfg.max_batch_size > 0
        for kind, declared, wanted in (("input", cfg.input, expected.inputs), ("output", cfg.output, expected.outputs)):
            by_name = {d.name: d for d in declared}
            for t in wanted:
                d = by_name.pop(t.name, None)
                if d is None:
                    problems.append(f"{where}: missing {kind} '{t.name}' (the model has {', '.join(x.name for x in wanted)})")
                    continue
                want_dims, want_reshape = tensor_dims(t, batched)
                dims = list(d.dims)
                if dims != want_dims:
                    why = (" (with max_batch_size > 0 the batch dimension must be left out of dims)"
                           if batched and dims == list(t.shape) else
                           " (with max_batch_size 0 dims must include the batch dimension)"
                           if not batched and dims == list(t.shape[1:]) else "")
                    problems.append(f"{where}: {kind} '{t.name}' dims {dims} do not match the model's shape "
                                    f"{list(t.shape)} with max_batch_size {cfg.max_batch_size}; expected {want_dims}{why}")
                if want_reshape is not None and list(d.reshape.shape) != want_reshape:
                    problems.append(f"{where}: {kind} '{t.name}' needs reshape {{ shape: {want_reshape} }} "
                                    f"(the model tensor is {list(t.shape)})")
                want_type = triton_dtype(t.dtype)
                if d.data_type != want_type:
                    problems.append(f"{where}: {kind} '{t.name}' is {_dtype_name(d.data_type)} but the model's is "
                                    f"{_dtype_name(want_type)}")
                if kind == "input" and d.optional and t.name not in expected.optional_inputs:
                    problems.append(f"{where}: input '{t.name}' is required by the model but marked optional")
            for extra in by_name:
                problems.append(f"{where}: {kind} '{extra}' is not a tensor of the model")
    if model_dir is not None:
        fname = cfg.default_model_filename or PLATFORM_FILES.get(cfg.platform) or BACKEND_FILES.get(cfg.backend)
        if fname and not (model_dir / "1" / fname).exists():
            problems.append(f"{where}: version file {model_dir / '1' / fname} is missing")
    return problems


def validate(text: str, model_dir: Path | None = None, expected: Expected | None = None):
    """Parse + semantic checks; raises ConfigError naming every problem. Returns the parsed config."""
    cfg = parse(text, str(model_dir / "config.pbtxt") if model_dir else "config.pbtxt")
    problems = check_semantics(cfg, model_dir, expected)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg
