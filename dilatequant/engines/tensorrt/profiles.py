"""TensorRT optimization profiles (min/opt/max shape per input) from command-line flags and the ONNX graph.

Pure Python, no TensorRT: bad flags are reported before anything is built or even before TensorRT is looked for.
Dimensions are resolved by their ONNX symbol, so `--max-shapes sample:32x1x28x28` also raises the batch of
`timestep`, `t_index` and `encoder_hidden_states`, which share the symbol `batch`; a dimension no flag names
keeps its static size, or gets a default (batch: 1/4/16; spatial: the graph's `dilatequant.sample_shape`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...core.errors import UserError

if TYPE_CHECKING:  # onnx is imported where a graph is read: dq-triton's and dq-serve's --help stay light
    import onnx

LEVELS = ("min", "opt", "max")
DEFAULT_BATCH = {"min": 1, "opt": 4, "max": 16}
Shape = tuple[int, ...]
_DIMS = re.compile(r"^\d+(?:x\d+)*$")


@dataclass(frozen=True)
class GraphInput:
    """One graph input: name, ONNX element type name, and per axis an int (static) or a symbol name (dynamic)."""
    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass
class ProfileShapes:
    """One optimization profile; `sources` says per input whether flags or the graph decided it."""
    shapes: dict[str, dict[str, Shape]]  # input -> {"min": shape, "opt": shape, "max": shape}
    sources: dict[str, str] = field(default_factory=dict)

    def level(self, level: str) -> dict[str, Shape]:
        return {name: s[level] for name, s in self.shapes.items()}

    def to_json(self) -> dict:
        return {name: {lv: list(s[lv]) for lv in LEVELS} | {"source": self.sources.get(name, "graph")}
                for name, s in self.shapes.items()}


def load_onnx(path: str | Path) -> onnx.ModelProto:
    import onnx

    """The graph structure only (no external weights): enough for inputs and metadata, cheap for big models."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file '{path}' does not exist; pass the graph written by dq-export --onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable ONNX model ({type(err).__name__}: {err}); "
                        "pass the graph written by dq-export") from err


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """Real inputs (initializers listed as inputs by old exporters excluded); unnamed dynamic axes get a symbol."""
    from onnx import TensorProto

    inits = {i.name for i in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            raise UserError(f"graph input '{inp.name}' has no shape (unknown rank); re-export the graph with dq-export")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{inp.name}[{axis}]")
                     for axis, d in enumerate(tt.shape.dim))
        out.append(GraphInput(inp.name, TensorProto.DataType.Name(tt.elem_type), dims))
    if not out:
        raise UserError("the graph has no inputs; pass the UNet graph written by dq-export")
    return out


def graph_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """metadata_props as written, e.g. {"dilatequant.timesteps": "[981, ...]"}: kept verbatim in the sidecar."""
    return {p.key: p.value for p in model.metadata_props}


def parse_shapes(text: str | None, flag: str = "--opt-shapes") -> dict[str, Shape]:
    """'sample:4x1x28x28,timestep:4' -> {"sample": (4, 1, 28, 28), "timestep": (4,)}."""
    if text is None or not text.strip():
        return {}
    out: dict[str, Shape] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, spec = entry.rpartition(":")  # rpartition: tensor names may contain ':' themselves
        name, spec = name.strip(), spec.replace(" ", "")
        if not name or not _DIMS.match(spec):
            raise UserError(f"{flag}: cannot read '{entry}'; write name:BxCxHxW entries separated by commas, "
                            "e.g. sample:4x1x28x28,timestep:4")
        dims = tuple(int(d) for d in spec.split("x"))
        if name in out:
            raise UserError(f"{flag}: input '{name}' is given twice; give each input once")
        if any(d <= 0 for d in dims):
            raise UserError(f"{flag}: {name}:{spec} has a dimension <= 0; every dimension must be >= 1")
        out[name] = dims
    return out


def resolve_profile(inputs: list[GraphInput], flags: dict[str, dict[str, Shape]],
                    metadata: dict[str, str] | None = None,
                    default_batch: dict[str, int] | None = None) -> ProfileShapes:
    """Min/opt/max per input from parsed flags ({"min": {...}, "opt": {...}, "max": {...}}) and the graph.

    Checks: every named input exists, ranks match, static dimensions are not changed, inputs that share a
    dimension symbol agree on it, and min <= opt <= max for every dimension.
    """
    default_batch = default_batch or DEFAULT_BATCH
    by_name = {i.name: i for i in inputs}
    bound: dict[str, dict[str, int]] = {lv: {} for lv in LEVELS}   # level -> symbol -> value
    bound_by: dict[tuple[str, str], str] = {}
    named = set()
    for lv in LEVELS:
        for name, shape in flags.get(lv, {}).items():
            flag = f"--{lv}-shapes"
            inp = by_name.get(name)
            if inp is None:
                raise UserError(f"{flag}: the graph has no input '{name}'; its inputs are "
                                f"{', '.join(by_name)}")
            if len(shape) != len(inp.dims):
                raise UserError(f"{flag}: input '{name}' has rank {len(inp.dims)} ({_fmt_dims(inp.dims)}) but "
                                f"{len(shape)} dimension(s) were given ({_fmt(shape)})")
            named.add(name)
            for axis, (want, got) in enumerate(zip(inp.dims, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise UserError(f"{flag}: input '{name}' dimension {axis} is fixed to {want} in the graph, "
                                        f"got {got}; keep it at {want} (or re-export with other shapes)")
                    continue
                prev = bound[lv].get(want)
                if prev is not None and prev != got:
                    raise UserError(f"{flag}: inputs '{bound_by[(lv, want)]}' and '{name}' share dimension "
                                    f"'{want}' but were given {prev} and {got}; give them the same value")
                bound[lv][want] = got
                bound_by.setdefault((lv, want), name)
    defaults = _symbol_defaults(inputs, metadata or {}, default_batch)
    shapes: dict[str, dict[str, Shape]] = {}
    for inp in inputs:
        per = {}
        for lv in LEVELS:
            dims = []
            for axis, d in enumerate(inp.dims):
                if isinstance(d, int):
                    dims.append(d)
                elif d in bound[lv]:
                    dims.append(bound[lv][d])
                elif d in defaults:
                    dims.append(defaults[d][lv])
                else:
                    raise UserError(f"input '{inp.name}' dimension {axis} ('{d}') is dynamic and has no default; "
                                    f"pass it in --min-shapes, --opt-shapes and --max-shapes, e.g. "
                                    f"{inp.name}:{_example(inp.dims)}")
            per[lv] = tuple(dims)
        _check_order(inp.name, per)
        shapes[inp.name] = per
    sources = {i.name: "flags" if i.name in named else ("graph" if all(isinstance(d, int) for d in i.dims)
                                                        else "graph+defaults") for i in inputs}
    return ProfileShapes(shapes, sources)


def _symbol_defaults(inputs: list[GraphInput], metadata: dict[str, str],
                     default_batch: dict[str, int]) -> dict[str, dict[str, int]]:
    """Batch symbols (axis 0) -> 1/4/16; the sample's other dynamic axes -> dilatequant.sample_shape."""
    out: dict[str, dict[str, int]] = {}
    sample_shape = None
    if "dilatequant.sample_shape" in metadata:
        try:
            sample_shape = [int(v) for v in json.loads(metadata["dilatequant.sample_shape"])]
        except (ValueError, TypeError):
            sample_shape = None
    for inp in inputs:
        for axis, d in enumerate(inp.dims):
            if isinstance(d, int) or d in out:
                continue
            if axis == 0:
                out[d] = dict(default_batch)
            elif inp.name == "sample" and sample_shape and len(sample_shape) == len(inp.dims) - 1:
                v = sample_shape[axis - 1]
                out[d] = {lv: v for lv in LEVELS}
    return out


def _check_order(name: str, per: dict[str, Shape]) -> None:
    for axis, (lo, mid, hi) in enumerate(zip(per["min"], per["opt"], per["max"])):
        if not lo <= mid <= hi:
            raise UserError(f"input '{name}' dimension {axis}: min {lo}, opt {mid}, max {hi} is not ordered "
                            f"(need min <= opt <= max; shapes min {_fmt(per['min'])}, opt {_fmt(per['opt'])}, "
                            f"max {_fmt(per['max'])}); adjust --min/--opt/--max-shapes")


def profile_from_flags(model: onnx.ModelProto, min_shapes: str | None, opt_shapes: str | None,
                       max_shapes: str | None) -> ProfileShapes:
    """The one call the builder uses: parse the three flags and resolve them against the graph."""
    flags = {"min": parse_shapes(min_shapes, "--min-shapes"), "opt": parse_shapes(opt_shapes, "--opt-shapes"),
             "max": parse_shapes(max_shapes, "--max-shapes")}
    return resolve_profile(graph_inputs(model), flags, graph_metadata(model))


def _fmt(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def _fmt_dims(dims: tuple[int | str, ...]) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def _example(dims: tuple[int | str, ...]) -> str:
    return "x".join(str(d) if isinstance(d, int) else "N" for d in dims)


@dataclass(frozen=True)
class EngineProfile:
    """The optimization profile a built plan accepts (profile 0 of its sidecar, read back from the engine).

    TensorRT rejects a shape outside [min, max] deep in `set_input_shape`; checked here first it is one line that
    names the input, the dimension and the range. A batch above the maximum is not an error for a runner: it splits
    the batch into calls that fit (`chunks`), so a classifier-free-guidance batch (2 x images) runs on any plan.
    """
    shapes: dict[str, dict[str, Shape]]   # input -> {"min", "opt", "max"}
    source: str = ""                      # the sidecar, for messages

    @classmethod
    def from_sidecar(cls, sidecar: dict, source: str = "") -> "EngineProfile | None":
        """None when the sidecar has no profile (written before profiles were recorded): nothing to check."""
        profiles = sidecar.get("profiles") if isinstance(sidecar, dict) else None
        if not profiles:
            return None
        try:
            shapes = {str(name): {lv: tuple(int(d) for d in s[lv]) for lv in LEVELS}
                      for name, s in dict(profiles[0]).items()}
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"sidecar '{source}' has a malformed optimization profile ({err}); rebuild the engine "
                            "with dq-build-engine") from err
        return cls(shapes, source)

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch every input accepts (inputs share the batch dimension)."""
        batched = [s for s in self.shapes.values() if len(s["min"])]
        if not batched:
            return 1, 1
        return max(s["min"][0] for s in batched), min(s["max"][0] for s in batched)

    def check(self, shapes: dict[str, tuple[int, ...]], split_batch: bool = True) -> None:
        """UserError for an input whose non-batch dimensions (H, W, tokens) or batch fall outside the profile; with
        `split_batch` a batch above the maximum passes (the caller splits it with `chunks`)."""
        lo_b, hi_b = self.batch_range
        where = f" (profile of '{self.source}')" if self.source else ""
        for name, shape in shapes.items():
            prof = self.shapes.get(name)
            if prof is None:
                continue
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(prof["min"]):
                raise UserError(f"input '{name}' has shape {_fmt(shape)} but the engine takes rank {len(prof['min'])} "
                                f"({_fmt(prof['min'])} to {_fmt(prof['max'])}){where}")
            for axis, (d, lo, hi) in enumerate(zip(shape, prof["min"], prof["max"])):
                if axis == 0 and (d >= lo_b and (split_batch or d <= hi_b)):
                    continue
                if axis > 0 and lo <= d <= hi:
                    continue
                what = "batch" if axis == 0 else f"dimension {axis}"
                rng = f"{lo_b}..{hi_b}" if axis == 0 else f"{lo}..{hi}"
                raise UserError(f"input '{name}' {what} is {d}, outside the engine's optimization profile {rng} "
                                f"(shapes {_fmt(prof['min'])} to {_fmt(prof['max'])}){where}; pass sizes within it or "
                                "rebuild the engine with dq-build-engine --min-shapes/--max-shapes covering "
                                f"{name}:{_fmt(shape)}")

    def chunks(self, batch: int) -> list[tuple[int, int]]:
        """[start, stop) slices of a batch, as even as possible, each within the profile's batch range."""
        lo, hi = self.batch_range
        n = -(-batch // hi)
        base, extra = divmod(batch, n)
        if base < lo:
            raise UserError(f"a batch of {batch} cannot be split into calls of {lo}..{hi} (the engine's profile "
                            f"batch range{f' in {self.source!r}' if self.source else ''}); rebuild the engine with a "
                            "smaller minimum batch (dq-build-engine --min-shapes sample:1x...)")
        out, start = [], 0
        for i in range(n):
            size = base + (1 if i < extra else 0)
            out.append((start, start + size))
            start += size
        return out
