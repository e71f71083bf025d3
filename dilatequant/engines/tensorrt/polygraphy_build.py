"""The Polygraphy calls both builders share (TensorRT 11 in process, TensorRT-RTX in its child process): the
optimization profile, the config loader that keeps what it made, the settings read back, the errors collected.

Nothing here imports TensorRT or Polygraphy at module level, nor torch: the TensorRT-RTX child imports this module
after choosing its TensorRT (Polygraphy reads POLYGRAPHY_USE_TENSORRT_RTX once, at its own import).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Sequence


class KeptConfig:
    """A Polygraphy config loader that keeps the IBuilderConfig it made, so its settings can be read back, and
    (with `summarize`) what it makes of the network it was called with, the parsed graph TensorRT builds."""

    def __init__(self, create: Callable, summarize: Callable | None = None) -> None:
        self.create, self.summarize, self.config, self.network = create, summarize, None, None

    def __call__(self, builder, network):
        self.config = self.create(builder, network)
        if self.summarize is not None:
            self.network = self.summarize(network)
        return self.config


def _enum_name(value) -> str:
    return str(getattr(value, "name", value)).rpartition(".")[2]


def builder_settings(trt: ModuleType, config) -> dict:
    """What the IBuilderConfig holds after the build: level, memory pools (TensorRT's own default where none was
    set), flags (TF32 among them), profiling verbosity, profile count, preview features; TensorRT-RTX's config adds
    the target compute capabilities (none set: its portable default)."""
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
            "num_optimization_profiles": int(config.num_optimization_profiles), "preview_features": preview,
            **compute_capability_settings(config)}


def compute_capability_settings(config) -> dict:
    """TensorRT-RTX's targets as its IBuilderConfig holds them ("SM89" -> "8.9"); {} for TensorRT 11's."""
    if not hasattr(config, "num_compute_capabilities"):
        return {}
    names = [_enum_name(config.get_compute_capability(i)) for i in range(int(config.num_compute_capabilities))]
    return {"compute_capabilities": [f"{n[2:-1]}.{n[-1]}" if n.startswith("SM") else n for n in names]}


def polygraphy_profile(shapes: dict[str, dict[str, Sequence[int]]]):
    """{input: {"min", "opt", "max"}} (ProfileShapes.shapes, or its JSON) -> one Polygraphy Profile."""
    from polygraphy.backend.trt import Profile

    p = Profile()
    for name, s in shapes.items():
        p.add(name, min=list(s["min"]), opt=list(s["opt"]), max=list(s["max"]))
    return p


def network_summary(network) -> dict:
    """The parsed network TensorRT builds: its inputs and outputs (name, type, shape; -1 is dynamic) and layer
    counts by type (how many Quantize/Dequantize layers the parser made, for one)."""
    def tensors(count, get):
        return [{"name": t.name, "dtype": _enum_name(t.dtype), "shape": [int(d) for d in t.shape]}
                for t in (get(i) for i in range(count))]

    types = Counter(_enum_name(network.get_layer(i).type) for i in range(network.num_layers))
    return {"layers": int(network.num_layers), "layer_types": dict(types.most_common()),
            "inputs": tensors(network.num_inputs, network.get_input),
            "outputs": tensors(network.num_outputs, network.get_output)}


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


def build_error_message(onnx_path: Path, errors: list[str], err: BaseException | None, limit: int = 4,
                        builder: str = "TensorRT") -> str:
    """One line: what failed, the first TensorRT/parser errors, what to do."""
    details = [e for e in errors if e]
    if err is not None and str(err) and all(str(err) not in e for e in details):
        details.append(f"{type(err).__name__}: {err}")
    shown = " | ".join(details[:limit]) or f"no error message from {builder}"
    more = f" (+{len(details) - limit} more, see the log above)" if len(details) > limit else ""
    msg = (f"{builder} could not build an engine from '{onnx_path}': {shown}{more}; check the graph with "
           "`dq-export --check` and the shapes passed with --min/--opt/--max-shapes")
    return " ".join(msg.split())


# the parser's frame lines around the error, and the generic lines Polygraphy adds after the specific ones
_FRAME = re.compile(r"^ModelImporter\.cpp:\d+: (While parsing node|--- (Begin|End) node)")
_GENERIC = ("Could not parse ONNX correctly", "Invalid Engine. Please ensure the engine was built correctly")


def key_errors(errors: list[str]) -> list[str]:
    """The errors that say what is wrong: the parser's "In node ..." lines first, frame lines and Polygraphy's
    generic "could not parse" / "invalid engine" lines dropped (kept only when nothing else was logged)."""
    specific = [e for e in errors if not _FRAME.match(e) and e.removeprefix("PolygraphyException: ") not in _GENERIC]
    if not specific:
        return list(dict.fromkeys(errors))
    return list(dict.fromkeys(sorted(specific, key=lambda e: not e.startswith("In node"))))
