"""QDQ ONNX -> TensorRT engine (`dq-build-engine`), with a sidecar JSON that says what was built, how and where.

Two builders behind one interface (backends.py): TensorRT 11 on the GPU the plan will run on, and TensorRT-RTX,
which builds CPU-only ahead of time for the compute capabilities it is given (rtx.py; its build runs in a child
process, where a crash is one line instead of the end of the command). Both are strongly typed: precision comes
from the graph alone (INT8/INT4/FP8 from Q/DQ nodes, FP16 from FP16 tensors), so there are no precision builder
flags. "FP16 fallback" is a graph pass that runs before the build (dq_export.fp16), followed by the TensorRT rules
check on the graph that is actually built. The build goes through Polygraphy's loaders (NetworkFromOnnxPath ->
CreateConfig / CreateConfigRTX -> EngineBytesFromNetwork). The builder is checked for before any work, after the
cheap checks of the flags and the graph, so bad input is reported first on any machine.

The sidecar records what the builder reports, not what was asked for: the builder settings are read back from the
IBuilderConfig the build used (optimization level, memory pool limits, flags, profiling verbosity, target compute
capabilities). TensorRT 11's optimization profile is read from the built engine itself (get_tensor_profile_shape),
which is what runners and dq-triton then check their batch and sizes against; a TensorRT-RTX plan cannot be
deserialized without a GPU, so its sidecar records the requested profile and the network TensorRT-RTX parsed.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from ...calibrate.checkpoint import checkpoint_hash as sha256_file
from ...core.errors import UserError
from ...core.reporting import atomic_write_bytes, ensure_writable_dir, environment, write_json
from ...dq_export.onnx_files import data_path, load_onnx
from ...dq_export.trt_rules import enforce
from .backends import BACKENDS, TENSORRT, TENSORRT_RTX, Backend, choose_backend
from .env import GpuInfo, explain_cuda_failure
from .plan_files import fp16_graph_path, layers_path, sidecar_path
from .polygraphy_build import KeptConfig, build_error_message, builder_settings, polygraphy_errors, polygraphy_profile
from .profiles import ProfileShapes, graph_inputs, graph_metadata, profile_from_flags
from .rtx import RtxJob, build_with_tensorrt_rtx, supported_targets
from .targets import Requirement, check_targets, format_cc, graph_requirement, parse_cc, parse_cc_list, rtx_targets

SIDECAR_FORMAT = "dilatequant.trt_engine/1"
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; NVIDIA's SDXL QDQ recipe uses 4 (more tactics, slower build)
RULES_PASSED = "passed"


@dataclass
class BuildConfig:
    onnx: Path
    engine: Path
    fp16_fallback: bool = False          # run the Q/DQ-aware FP16 pass on the graph first
    min_shapes: str | None = None        # "name:BxCxHxW,..." (see trt_profiles)
    opt_shapes: str | None = None
    max_shapes: str | None = None
    timing_cache: Path | None = None     # TensorRT 11: loaded when present, saved back (merged) after the build
    opt_level: int = DEFAULT_OPT_LEVEL   # builder_optimization_level 0..5
    workspace_gb: float | None = None    # workspace memory pool limit; None: TensorRT's default (device memory)
    inspect: bool = False                # DETAILED profiling verbosity + <engine>.layers.json (TensorRT 11)
    backend: str = "auto"                # auto | tensorrt | tensorrt-rtx (backends.py)
    compute_capabilities: str | None = None  # TensorRT-RTX targets, "8.6,8.9,12.0"; None: its default set

    def __post_init__(self) -> None:
        self.onnx, self.engine = Path(self.onnx), Path(self.engine)
        self.timing_cache = Path(self.timing_cache) if self.timing_cache else None
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --backend '{self.backend}': choose one of {', '.join(BACKENDS)}")
        parse_cc_list(self.compute_capabilities)  # syntax now; the installed TensorRT-RTX's targets at the build
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

    def check_for(self, backend: Backend) -> list[str]:
        """Flags the chosen builder cannot honour: one line each, or a note (returned) for a harmless no-op."""
        notes = []
        if backend.name == TENSORRT and self.compute_capabilities:
            raise UserError(f"--compute-capability names TensorRT-RTX targets, but the builder is TensorRT 11 "
                            f"({backend.chosen}), which builds for the GPU it runs on; drop the flag, or pass "
                            "--backend tensorrt-rtx")
        if backend.name == TENSORRT_RTX and self.inspect:
            raise UserError("--inspect reads the layer table from the built engine, which takes a GPU to deserialize; "
                            "TensorRT-RTX builds without one (its kernels are compiled on the GPU that runs the plan): "
                            "drop --inspect, or build with --backend tensorrt on a GPU")
        if backend.name == TENSORRT_RTX and self.timing_cache:
            notes.append(f"--timing-cache {self.timing_cache} is not used: timing caches are no-ops in TensorRT-RTX "
                         "and would make its build look for a GPU")
        return notes


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
    gpu: GpuInfo | None
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
    backend: str = TENSORRT
    targets: dict | None = None          # {"compute_capabilities": [...] | None, "source": ..., "required": ...}
    network: dict | None = None          # the parsed network (TensorRT-RTX: what it built, in place of the engine)
    notes: list[str] = field(default_factory=list)
    chosen: str = ""                     # why this backend


def build_engine(cfg: BuildConfig) -> dict:
    """Check flags and graph, then the builder, then FP16 pass -> rules -> build -> plan + sidecar."""
    model = load_onnx(cfg.onnx, with_data=False)  # structure: inputs and metadata
    metadata = graph_metadata(model)
    if metadata.get("dilatequant.target") == "ort":
        raise UserError(f"'{cfg.onnx}' is a dq-export --target ort graph (ONNX Runtime integer ops), not a TensorRT "
                        "graph; build the engine from the default export (dq-export without --target ort)")
    profile = profile_from_flags(model, cfg.min_shapes, cfg.opt_shapes, cfg.max_shapes)
    inputs = {i.name: {"dtype": i.dtype, "dims": list(i.dims)} for i in graph_inputs(model)}
    need = graph_requirement(model, metadata)
    del model
    ensure_writable_dir(cfg.engine.parent)
    if cfg.timing_cache:
        ensure_writable_dir(cfg.timing_cache.parent)
    backend = choose_backend(cfg.backend)
    notes = cfg.check_for(backend)
    targets = build_targets(backend, cfg, need)

    built, fp16 = cfg.onnx, None
    if cfg.fp16_fallback:
        built, fp16 = fp16_pass(cfg.onnx, fp16_graph_path(cfg.engine), metadata)
    enforce(built)  # the graph TensorRT gets must pass every explicit-quantization rule
    if backend.name == TENSORRT_RTX:
        cc = targets["compute_capabilities"]
        pool = int(cfg.workspace_gb * 2**30) if cfg.workspace_gb else None
        job = RtxJob(built, profile=profile.to_json(), compute_capabilities=cc and tuple(map(parse_cc, cc)),
                     opt_level=cfg.opt_level, workspace_bytes=pool)
        rtx = build_with_tensorrt_rtx(job, cfg.engine, RULES_PASSED)
        result = TrtBuildResult(b"", rtx.version, rtx.build_s, settings=rtx.settings)
        engine_sha256, engine_bytes, network = rtx.engine_sha256, rtx.engine_bytes, rtx.network
    else:
        result = build_with_tensorrt(backend.module, built, profile, cfg)
        atomic_write_bytes(cfg.engine, result.engine_bytes)
        engine_sha256 = hashlib.sha256(result.engine_bytes).hexdigest()
        engine_bytes, network = len(result.engine_bytes), None
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
    env["tensorrt_rtx" if backend.name == TENSORRT_RTX else "tensorrt"] = result.trt_version
    info = BuildInfo(cfg=cfg, trt_version=result.trt_version, gpu=backend.gpu, profile=profile, inputs=inputs,
                     metadata=metadata, onnx_sha256=sha256_file(cfg.onnx), built_onnx=built,
                     built_onnx_sha256=sha256_file(built), engine_sha256=engine_sha256, engine_bytes=engine_bytes,
                     build_s=result.build_s, fp16_pass=fp16, timing_cache=result.timing_cache, layer_summary=summary,
                     env=env, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     settings=result.settings, engine_profiles=result.profiles, backend=backend.name, targets=targets,
                     network=network, notes=notes, chosen=backend.chosen)
    sidecar = make_sidecar(info)
    write_json(sidecar_path(cfg.engine), sidecar)
    return sidecar


def build_targets(backend: Backend, cfg: BuildConfig, need: Requirement) -> dict:
    """The compute capabilities the plan is for, checked against what the graph needs (FP8: 8.9)."""
    if backend.name == TENSORRT_RTX:
        named = parse_cc_list(cfg.compute_capabilities)
        ccs, source = rtx_targets(named, supported_targets(backend.module), need, str(cfg.onnx))
        listed = [format_cc(c) for c in ccs] if ccs else None
    else:
        cc = parse_cc(backend.gpu.compute_capability, "the GPU's compute capability")
        fix = f"build it on a GPU of compute capability {format_cc(need.cc)} or newer" if need.cc else ""
        if "FP8" in (need.reason or ""):
            fix += ", or calibrate and export an INT8 graph for this GPU (dq-calibrate --format int)"
        check_targets((cc,), need, str(cfg.onnx), fix)
        listed, source = [format_cc(cc)], f"the build GPU ({backend.gpu.name})"
    return {"compute_capabilities": listed, "source": source, "required": need.to_json()}


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
    config = KeptConfig(CreateConfig(profiles=[polygraphy_profile(profile.shapes)],
                                     builder_optimization_level=cfg.opt_level,
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


def make_sidecar(info: BuildInfo) -> dict[str, Any]:
    """The sidecar JSON: enough to know what the plan is, which builder (and GPU, or targets) made it, how to feed
    it. `tensorrt` holds TensorRT 11's version and `tensorrt_rtx` TensorRT-RTX's: the other one is null."""
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
    rtx = info.backend == TENSORRT_RTX
    return {
        "format": SIDECAR_FORMAT,
        "engine": str(cfg.engine),
        "engine_sha256": info.engine_sha256,
        "engine_bytes": info.engine_bytes,
        "backend": info.backend,
        "backend_choice": info.chosen,
        "tensorrt": None if rtx else info.trt_version,
        "tensorrt_rtx": info.trt_version if rtx else None,
        "gpu": info.gpu.to_json() if info.gpu else None,
        "built_without_gpu": rtx,  # TensorRT-RTX's CPU-only ahead-of-time build
        "targets": info.targets,
        "inputs": info.inputs,
        "profiles": profiles,
        "profiles_from": "engine" if info.engine_profiles else "requested",
        "network": info.network,
        "rules_check": RULES_PASSED,  # enforce() ran on the built graph before the builder
        "notes": info.notes,
        "builder": {
            "strongly_typed": True,  # always on in TensorRT 11; TensorRT-RTX takes it as a flag
            "network_flags": ["STRONGLY_TYPED"] if rtx else [],
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


def describe(sidecar: dict) -> list[str]:
    """What dq-build-engine prints after a build: the plan, its builder and targets, its profile, its notes."""
    prof = sidecar["profiles"][0]
    shapes = ", ".join(f"{n} {'/'.join('x'.join(map(str, v[lv])) for lv in ('min', 'opt', 'max'))}"
                       for n, v in prof.items())
    size = f"{sidecar['engine']} ({sidecar['engine_bytes'] / 1e6:.2f} MB)"
    if sidecar.get("backend") == TENSORRT_RTX:
        t = sidecar["targets"]
        where = (f"without a GPU, for compute capabilities {', '.join(t['compute_capabilities'])}"
                 if t["compute_capabilities"] else "without a GPU, for " + t["source"])
        head = f"wrote {size} with TensorRT-RTX {sidecar['tensorrt_rtx']} {where}"
    else:
        gpu = sidecar["gpu"]
        head = (f"wrote {size} with TensorRT {sidecar['tensorrt']} on {gpu['name']} "
                f"(compute {gpu['compute_capability']})")
    lines = [f"{head} in {sidecar['build_s']} s; fp16 fallback: {sidecar['fp16_fallback']}",
             f"  profile min/opt/max: {shapes}"]
    if sidecar.get("network"):
        lines.append(f"  {sidecar['network']['layers']} network layers parsed")
    if sidecar.get("layers"):
        lay = sidecar["layers"]
        lines.append(f"  {lay['layers']} engine layers, output formats {lay['output_formats']}; "
                     f"layer table: {lay['file']}")
    lines.append(f"  sidecar: {sidecar_path(sidecar['engine'])}")
    return lines + [f"note: {n}" for n in sidecar.get("notes", [])]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False

