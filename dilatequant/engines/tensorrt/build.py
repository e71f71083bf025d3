"""QDQ ONNX -> TensorRT 11 engine (`dq-build-engine`), with a sidecar JSON that says what was built, how and where.

TensorRT 11 is strongly typed: precision comes from the graph alone (INT8/INT4 from Q/DQ nodes, FP16 from FP16
tensors), so there are no precision builder flags here. "FP16 fallback" is therefore a graph pass that runs
before the build (dq_export.fp16), followed by the TensorRT rules check on the graph that is actually built.
The build itself goes through Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig ->
EngineBytesFromNetwork), which handle the optimization profile, the timing cache (loaded, then merged and saved
back) and the builder settings. TensorRT and a GPU are checked for before any work, after the cheap checks of
the flags and the graph, so bad input is reported first on any machine.

The sidecar records what TensorRT reports, not what was asked for: the builder settings are read back from the
IBuilderConfig the build used (optimization level, memory pool limits, flags, profiling verbosity) and the
optimization profile from the built engine itself (get_tensor_profile_shape), which is what runners and dq-triton
then check their batch and sizes against.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from ...calibrate.checkpoint import checkpoint_hash as sha256_file
from ...core.errors import UserError
from ...core.reporting import atomic_write_bytes, ensure_writable_dir, environment, write_json
from ...dq_export.onnx_files import data_path
from ...dq_export.trt_rules import enforce
from .env import GpuInfo, explain_cuda_failure, require_trt_and_gpu
from .plan_files import fp16_graph_path, layers_path, sidecar_path
from .profiles import ProfileShapes, graph_inputs, graph_metadata, load_onnx, profile_from_flags

SIDECAR_FORMAT = "dilatequant.trt_engine/1"
MIN_COMPUTE_CAPABILITY = "dilatequant.min_compute_capability"  # graph metadata an FP8 export writes (8.9)
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; NVIDIA's SDXL QDQ recipe uses 4 (more tactics, slower build)


@dataclass
class BuildConfig:
    onnx: Path
    engine: Path
    fp16_fallback: bool = False          # run the Q/DQ-aware FP16 pass on the graph first
    min_shapes: str | None = None        # "name:BxCxHxW,..." (see trt_profiles)
    opt_shapes: str | None = None
    max_shapes: str | None = None
    timing_cache: Path | None = None     # loaded when present, saved back (merged) after the build
    opt_level: int = DEFAULT_OPT_LEVEL   # builder_optimization_level 0..5
    workspace_gb: float | None = None    # workspace memory pool limit; None: TensorRT's default (device memory)
    inspect: bool = False                # DETAILED profiling verbosity + <engine>.layers.json

    def __post_init__(self) -> None:
        self.onnx, self.engine = Path(self.onnx), Path(self.engine)
        self.timing_cache = Path(self.timing_cache) if self.timing_cache else None
        if not 0 <= self.opt_level <= 5:
            raise UserError(f"--opt-level {self.opt_level} is out of range; TensorRT's builder optimization level "
                            "is 0..5 (3 is TensorRT's default, 4-5 search more tactics)")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise UserError(f"--workspace-gb {self.workspace_gb} must be > 0 (GiB of GPU memory for tactics); "
                            "omit it to let TensorRT use what the device has")
        if self.engine.suffix == ".onnx" or _same_file(self.engine, self.onnx):
            raise UserError(f"--engine '{self.engine}' would overwrite the ONNX graph; name the plan e.g. unet.plan")
        if self.engine.is_dir():
            raise UserError(f"--engine '{self.engine}' is a folder; pass a file name such as {self.engine}/unet.plan")


@dataclass
class TrtBuildResult:
    engine_bytes: bytes
    trt_version: str
    build_s: float
    layers: dict | None = None           # engine inspector JSON (--inspect)
    timing_cache: dict | None = None
    settings: dict | None = None         # read back from the IBuilderConfig (builder_settings)
    profiles: list[dict] | None = None   # read back from the built engine (engine_profiles)


@dataclass
class BuildInfo:
    """Everything the sidecar records; `make_sidecar` turns it into JSON without touching TensorRT."""
    cfg: BuildConfig
    trt_version: str
    gpu: GpuInfo
    profile: ProfileShapes
    inputs: dict[str, dict]
    metadata: dict[str, str]
    onnx_sha256: str
    built_onnx: Path
    built_onnx_sha256: str
    engine_sha256: str
    engine_bytes: int
    build_s: float
    fp16_pass: dict | None = None
    timing_cache: dict | None = None
    layer_summary: dict | None = None
    env: dict = field(default_factory=dict)
    built_at: str = ""
    settings: dict | None = None         # the builder config as TensorRT reports it after the build
    engine_profiles: list[dict] | None = None  # the plan's own profiles; None: the requested one is recorded


def build_engine(cfg: BuildConfig) -> dict:
    """Check flags and graph, then TensorRT and GPU, then FP16 pass -> rules -> build -> plan + sidecar."""
    model = load_onnx(cfg.onnx)
    profile = profile_from_flags(model, cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    metadata = graph_metadata(model)
    inputs = {i.name: {"dtype": i.dtype, "dims": list(i.dims)} for i in graph_inputs(model)}
    ensure_writable_dir(cfg.engine.parent)
    if cfg.timing_cache:
        ensure_writable_dir(cfg.timing_cache.parent)
    trt, gpu = require_trt_and_gpu()
    require_compute_capability(metadata, gpu)

    built, fp16 = cfg.onnx, None
    if cfg.fp16_fallback:
        built, fp16 = fp16_pass(cfg.onnx, fp16_graph_path(cfg.engine), metadata)
    enforce(built)  # the graph TensorRT gets must pass every explicit-quantization rule
    result = build_with_tensorrt(trt, built, profile, cfg)

    atomic_write_bytes(cfg.engine, result.engine_bytes)
    summary = None
    if cfg.inspect and result.layers is not None:
        write_json(layers_path(cfg.engine), result.layers)
        summary = layer_summary(result.layers)
    else:  # a layer table or FP16 graph from an earlier build of this plan would now describe another engine
        layers_path(cfg.engine).unlink(missing_ok=True)
    if built != fp16_graph_path(cfg.engine):
        fp16_graph_path(cfg.engine).unlink(missing_ok=True)
        data_path(fp16_graph_path(cfg.engine)).unlink(missing_ok=True)  # its external data, if it had any
    env = environment()
    env["tensorrt"] = result.trt_version
    info = BuildInfo(cfg=cfg, trt_version=result.trt_version, gpu=gpu, profile=profile, inputs=inputs,
                     metadata=metadata, onnx_sha256=sha256_file(cfg.onnx), built_onnx=built,
                     built_onnx_sha256=sha256_file(built),
                     engine_sha256=hashlib.sha256(result.engine_bytes).hexdigest(),
                     engine_bytes=len(result.engine_bytes), build_s=result.build_s, fp16_pass=fp16,
                     timing_cache=result.timing_cache, layer_summary=summary, env=env,
                     built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=result.settings,
                     engine_profiles=result.profiles)
    sidecar = make_sidecar(info)
    write_json(sidecar_path(cfg.engine), sidecar)
    return sidecar


def require_compute_capability(metadata: dict[str, str], gpu: GpuInfo) -> None:
    """An FP8 graph (dilatequant.min_compute_capability 8.9) on an older GPU is one line, before the build."""
    need = metadata.get(MIN_COMPUTE_CAPABILITY)
    if not need or not gpu.compute_capability:
        return
    as_tuple = lambda cc: tuple(int(p) for p in cc.split("."))  # noqa: E731
    if as_tuple(gpu.compute_capability) < as_tuple(need):
        raise UserError(f"this graph is FP8 (E4M3): it needs compute capability {need} or newer (Ada, Hopper, "
                        f"Blackwell), and {gpu.name} is {gpu.compute_capability}; calibrate and export an INT8 graph "
                        "for this GPU (dq-calibrate --format int)")


def fp16_pass(src: Path, dst: Path, metadata: dict[str, str]) -> tuple[Path, dict]:
    """Run dq_export.fp16.convert_file(src, dst); a graph exported as FP16 already is built as it is."""
    if metadata.get("dilatequant.dtype") == "fp16":
        return src, {"skipped": "the graph is FP16 already (dilatequant.dtype=fp16)"}
    try:
        from ...dq_export.fp16 import convert_file
    except ImportError as err:
        if err.name not in ("dilatequant.dq_export.fp16", None):
            raise
        raise UserError("--fp16-fallback needs the Q/DQ-aware FP16 pass (dilatequant.dq_export.fp16), which this "
                        "install lacks; update dilatequant, or export with dq-export --dtype fp16") from err
    summary = convert_file(Path(src), Path(dst))
    if not Path(dst).is_file():
        raise UserError(f"the FP16 pass wrote no graph at '{dst}'; check that the folder is writable")
    return Path(dst), dict(summary or {}) | {"graph": str(dst)}


def build_with_tensorrt(trt: ModuleType, onnx_path: Path, profile: ProfileShapes, cfg: BuildConfig) -> TrtBuildResult:
    """Polygraphy loaders around TensorRT 11's build; parser and builder errors come back as one UserError."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    pools = {trt.MemoryPoolType.WORKSPACE: int(cfg.workspace_gb * 2**30)} if cfg.workspace_gb else None
    verbosity = trt.ProfilingVerbosity.DETAILED if cfg.inspect else trt.ProfilingVerbosity.LAYER_NAMES_ONLY
    cache = str(cfg.timing_cache) if cfg.timing_cache else None
    cache_before = cfg.timing_cache.stat().st_size if cfg.timing_cache and cfg.timing_cache.is_file() else None
    # No precision arguments: the network's types come from the ONNX graph (strong typing is always on in 11).
    config = KeptConfig(CreateConfig(profiles=[polygraphy_profile(profile)], builder_optimization_level=cfg.opt_level,
                                     memory_pool_limits=pools, profiling_verbosity=verbosity, load_timing_cache=cache))
    network = NetworkFromOnnxPath(str(onnx_path))  # parse_from_file: external weights resolve beside the graph
    build = EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)
    start = time.perf_counter()
    with polygraphy_errors() as errors:
        try:
            data = build()
        except (PolygraphyException, RuntimeError, TypeError) as err:
            raise UserError(explain_cuda_failure(" ".join([*errors(), str(err)]))
                            or build_error_message(onnx_path, errors(), err)) from err
        if not data:
            raise UserError(build_error_message(onnx_path, errors(), None))
    build_s = time.perf_counter() - start
    engine_bytes = bytes(data)
    settings = builder_settings(trt, config.config) if config.config is not None else None
    engine = deserialize(engine_bytes)
    profiles = engine_profiles(trt, engine)
    layers = inspect_engine(trt, engine) if cfg.inspect else None
    tc = None
    if cfg.timing_cache:
        tc = {"path": str(cfg.timing_cache), "bytes_before": cache_before,
              "bytes_after": cfg.timing_cache.stat().st_size if cfg.timing_cache.is_file() else None}
    return TrtBuildResult(engine_bytes, str(trt.__version__), round(build_s, 2), layers, tc, settings, profiles)


class KeptConfig:
    """A Polygraphy config loader that keeps the IBuilderConfig it made, so its settings can be read back."""

    def __init__(self, create: Callable) -> None:
        self.create, self.config = create, None

    def __call__(self, builder, network):
        self.config = self.create(builder, network)
        return self.config


def _enum_name(value) -> str:
    return str(getattr(value, "name", value)).rpartition(".")[2]


def builder_settings(trt: ModuleType, config) -> dict:
    """What the IBuilderConfig holds after the build: level, memory pools (TensorRT's own default where none was
    set), flags (TF32 among them), profiling verbosity, profile count, preview features."""
    pools = {}
    for name, pool in trt.MemoryPoolType.__members__.items():
        if not name.startswith("DLA"):
            with contextlib.suppress(AttributeError, RuntimeError, TypeError):
                pools[name] = int(config.get_memory_pool_limit(pool))
    flags = [name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag)]
    preview = []
    if hasattr(trt, "PreviewFeature") and hasattr(config, "get_preview_feature"):
        preview = [name for name, f in trt.PreviewFeature.__members__.items() if config.get_preview_feature(f)]
    return {"optimization_level": int(config.builder_optimization_level),
            "workspace_bytes": pools.get("WORKSPACE"), "memory_pools": pools,
            "profiling_verbosity": _enum_name(config.profiling_verbosity),
            "builder_flags": flags, "tf32": "TF32" in flags,
            "num_optimization_profiles": int(config.num_optimization_profiles), "preview_features": preview}


def deserialize(engine_bytes: bytes):
    from polygraphy.backend.trt import EngineFromBytes

    return EngineFromBytes(engine_bytes)()


def engine_profiles(trt: ModuleType, engine) -> list[dict]:
    """Per optimization profile of the built engine, {input: {"min", "opt", "max"}} from get_tensor_profile_shape."""
    out = []
    for index in range(int(engine.num_optimization_profiles)):
        shapes = {}
        for i in range(int(engine.num_io_tensors)):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                continue
            lo, opt, hi = engine.get_tensor_profile_shape(name, index)
            shapes[name] = {"min": [int(d) for d in lo], "opt": [int(d) for d in opt], "max": [int(d) for d in hi]}
        out.append(shapes)
    return out


def polygraphy_profile(profile: ProfileShapes):
    from polygraphy.backend.trt import Profile

    p = Profile()
    for name, s in profile.shapes.items():
        p.add(name, min=list(s["min"]), opt=list(s["opt"]), max=list(s["max"]))
    return p


def inspect_engine(trt: ModuleType, engine) -> dict:
    """The engine inspector's JSON (layers, their precisions/formats, fusions, tactics): needs DETAILED verbosity."""
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"raw": text}


def layer_summary(info: dict) -> dict:
    """Counts from the inspector JSON: layers, layer types, output formats (e.g. how many run in Int8)."""
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]
    types, formats = Counter(), Counter()
    for layer in layers:
        types[str(layer.get("LayerType", "unknown"))] += 1
        for out in layer.get("Outputs", []) or []:
            if isinstance(out, dict):
                fmt = out.get("Format/Datatype") or out.get("DataType") or out.get("Format")
                if fmt:
                    formats[str(fmt)] += 1
    return {"layers": len(layers), "layer_types": dict(types.most_common()),
            "output_formats": dict(formats.most_common())}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def polygraphy_errors() -> Iterator[Callable[[], list[str]]]:
    """Record Polygraphy's log (TensorRT's messages go through it) while a build runs; yields a reader that
    returns the error lines logged so far."""
    from polygraphy.logger import G_LOGGER

    if G_LOGGER.log_file:  # someone else's log file: leave it alone, report the exception text only
        yield lambda: []
        return
    fd, path = tempfile.mkstemp(prefix="dq-trt-", suffix=".log")
    os.close(fd)
    G_LOGGER.log_file = path
    try:
        yield lambda: error_lines(Path(path).read_text(errors="replace"))
    finally:
        G_LOGGER.log_file = None
        Path(path).unlink(missing_ok=True)


def error_lines(log: str) -> list[str]:
    """'[E] ...' and '[!] ...' lines of a Polygraphy log, colour codes removed, continuation lines joined."""
    out: list[str] = []
    current: list[str] | None = None
    for raw in _ANSI.sub("", log).splitlines():
        line = raw.strip()
        if line.startswith(("[E]", "[!]")):
            current = [line[3:].strip()]
            out.append("")
        elif re.match(r"^\[[A-Z!]\]", line):
            current = None
            continue
        elif current is not None and line:
            current.append(line)
        if current is not None:
            out[-1] = " ".join(current)
    return [e for e in out if e]


def build_error_message(onnx_path: Path, errors: list[str], err: BaseException | None, limit: int = 4) -> str:
    """One line: what failed, the first TensorRT/parser errors, what to do."""
    details = [e for e in errors if e]
    if err is not None and str(err) and all(str(err) not in e for e in details):
        details.append(f"{type(err).__name__}: {err}")
    shown = " | ".join(details[:limit]) or "no error message from TensorRT"
    more = f" (+{len(details) - limit} more, see the log above)" if len(details) > limit else ""
    msg = (f"TensorRT could not build an engine from '{onnx_path}': {shown}{more}; check the graph with "
           "`dq-export --check` and the shapes passed with --min/--opt/--max-shapes")
    return " ".join(msg.split())


def make_sidecar(info: BuildInfo) -> dict[str, Any]:
    """The sidecar JSON: enough to know what the plan is, which TensorRT/GPU made it, and how to feed it."""
    cfg = info.cfg
    requested = info.profile.to_json()
    if info.engine_profiles:  # the plan's own profiles; "source" says where the requested shapes came from
        profiles = [{name: s | {"source": requested.get(name, {}).get("source", "engine")} for name, s in p.items()}
                    for p in info.engine_profiles]
    else:
        profiles = [requested]
    settings = info.settings or {}
    timesteps = None
    if "dilatequant.timesteps" in info.metadata:
        try:
            timesteps = json.loads(info.metadata["dilatequant.timesteps"])
        except json.JSONDecodeError:
            timesteps = None
    return {
        "format": SIDECAR_FORMAT,
        "engine": str(cfg.engine),
        "engine_sha256": info.engine_sha256,
        "engine_bytes": info.engine_bytes,
        "tensorrt": info.trt_version,
        "gpu": info.gpu.to_json(),
        "min_compute_capability": info.metadata.get(MIN_COMPUTE_CAPABILITY),  # FP8 graphs: "8.9"
        "inputs": info.inputs,
        "profiles": profiles,
        "profiles_from": "engine" if info.engine_profiles else "requested",
        "builder": {
            "strongly_typed": True,
            "network_flags": [],
            **settings,  # read back from the IBuilderConfig after the build; absent when TensorRT gave none
            "read_back": bool(info.settings),
            "requested": {"optimization_level": cfg.opt_level,
                          "workspace_bytes": int(cfg.workspace_gb * 2**30) if cfg.workspace_gb else None,
                          "profiling_verbosity": "DETAILED" if cfg.inspect else "LAYER_NAMES_ONLY"},
            "timing_cache": info.timing_cache,
            "tool": "polygraphy",
        },
        "source_onnx": str(cfg.onnx),
        "source_onnx_sha256": info.onnx_sha256,
        "built_onnx": str(info.built_onnx),
        "built_onnx_sha256": info.built_onnx_sha256,
        "fp16_fallback": cfg.fp16_fallback,
        "fp16_pass": info.fp16_pass,
        "metadata": dict(info.metadata),
        "timesteps": timesteps,
        "layers": {"file": str(layers_path(cfg.engine)), **info.layer_summary} if info.layer_summary else None,
        "build_s": info.build_s,
        "built_at": info.built_at,
        "environment": info.env,
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False

