"""Which GPUs a plan is built for: compute capabilities, what a graph needs, and what TensorRT-RTX targets.

A TensorRT 11 plan runs on the GPU architecture that built it; a TensorRT-RTX plan on the compute capabilities
its build named (`--compute-capability 8.6,8.9,12.0`), or on TensorRT-RTX's portable default when none are named.
Some graphs need a newer GPU than others: FP8 Q/DQ needs 8.9 (Ada) and FP4 12.0 (Blackwell), which the graph's
tensor types say and its `dilatequant.min_compute_capability` metadata may say too. Targets below that are
refused here, in one line, before any build: TensorRT-RTX's builder would stop on them with "Cannot compile for
target(s) sm86, because the model contains HW-specific datatypes: fp8_e4m3".

Pure Python and onnx: no TensorRT is imported here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from ...core.errors import UserError

ComputeCapability = tuple[int, int]
MIN_CC_KEY = "dilatequant.min_compute_capability"
# TensorRT-RTX's portable default (its support matrix: "Engines built with TensorRT-RTX are by default portable
# across devices with compute capabilities 8.6, 8.9, and 12.0")
RTX_DEFAULT_TARGETS: tuple[ComputeCapability, ...] = ((8, 6), (8, 9), (12, 0))
# the lowest GPU generation each quantized tensor type needs (TensorRT's support matrices)
TYPE_MIN_CC: dict[int, tuple[ComputeCapability, str]] = {
    onnx.TensorProto.FLOAT8E4M3FN: ((8, 9), "FP8 (E4M3)"),
    onnx.TensorProto.FLOAT4E2M1: ((12, 0), "FP4 (E2M1)"),
}
_CC = re.compile(r"^(\d+)\.(\d)$")


def format_cc(cc: ComputeCapability) -> str:
    return f"{cc[0]}.{cc[1]}"


def parse_cc(text: str, flag: str = "--compute-capability") -> ComputeCapability:
    m = _CC.match(text.strip())
    if not m:
        raise UserError(f"{flag}: cannot read '{text.strip()}'; write compute capabilities as major.minor, "
                        "e.g. 8.6,8.9,12.0")
    return int(m.group(1)), int(m.group(2))


def parse_cc_list(text: str | None, flag: str = "--compute-capability") -> tuple[ComputeCapability, ...] | None:
    """'8.6,8.9,12.0' -> ((8, 6), (8, 9), (12, 0)); None or blank: no targets named."""
    if text is None or not text.strip():
        return None
    out: list[ComputeCapability] = []
    for part in (p for p in text.split(",") if p.strip()):
        cc = parse_cc(part, flag)
        if cc in out:
            raise UserError(f"{flag}: {format_cc(cc)} is given twice; name each compute capability once")
        out.append(cc)
    return tuple(out)


@dataclass(frozen=True)
class Requirement:
    """The lowest compute capability a graph runs on, and why (None: any GPU TensorRT supports)."""
    cc: ComputeCapability | None
    reason: str = ""

    def to_json(self) -> dict | None:
        return None if self.cc is None else {"compute_capability": format_cc(self.cc), "reason": self.reason}


def graph_requirement(model: onnx.ModelProto, metadata: dict[str, str]) -> Requirement:
    """The highest of: what the graph's metadata says (dilatequant.min_compute_capability), what its quantized
    tensor types need (FP8: 8.9, FP4: 12.0). Reads types from initializers, Constant nodes, Q/DQ zero points and
    output_dtype attributes, and value infos: no weights are loaded."""
    found: list[tuple[ComputeCapability, str]] = []
    if metadata.get(MIN_CC_KEY):
        found.append((parse_cc(metadata[MIN_CC_KEY], f"the graph's {MIN_CC_KEY}"), f"the graph's {MIN_CC_KEY}"))
    types = {t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        for a in n.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                types.add(a.t.data_type)
            if a.name == "output_dtype" and a.type == onnx.AttributeProto.INT:
                types.add(a.i)
    for v in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        types.add(v.type.tensor_type.elem_type)
    for t, (cc, what) in TYPE_MIN_CC.items():
        if t in types:
            found.append((cc, f"its {what} tensors"))
    if not found:
        return Requirement(None)
    cc = max(c for c, _ in found)
    return Requirement(cc, " and ".join(why for c, why in found if c == cc))


def check_targets(targets: tuple[ComputeCapability, ...], need: Requirement, graph: str, fix: str) -> None:
    """One line when a target is below what the graph needs; `fix` says how to choose other targets."""
    if need.cc is None:
        return
    low = [t for t in targets if t < need.cc]
    if low:
        raise UserError(f"'{graph}' needs compute capability {format_cc(need.cc)} or newer ({need.reason}), but "
                        f"the build targets {', '.join(map(format_cc, low))}; {fix}")


def rtx_targets(named: tuple[ComputeCapability, ...] | None, supported: tuple[ComputeCapability, ...],
                need: Requirement, graph: str) -> tuple[tuple[ComputeCapability, ...] | None, str]:
    """The compute capabilities a TensorRT-RTX build names (None: TensorRT-RTX's own default) and where they came
    from. Named ones must be in `supported` (the installed TensorRT-RTX's ComputeCapability enum); a graph that
    needs a newer GPU than the default set's oldest gets the default set's members it can run on."""
    ok = ", ".join(map(format_cc, supported))
    if named is not None:
        unknown = [c for c in named if c not in supported]
        if unknown:
            hopper = " (Hopper 9.0 and Blackwell 10.0 data-center GPUs are TensorRT 11's: --backend tensorrt)" \
                if any(c[0] in (9, 10) for c in unknown) else ""
            raise UserError(f"--compute-capability {', '.join(map(format_cc, unknown))}: TensorRT-RTX builds for "
                            f"{ok} only{hopper}")
        check_targets(named, need, graph, f"pass --compute-capability with targets from "
                                          f"{', '.join(format_cc(c) for c in supported if need.cc and c >= need.cc)}")
        return named, "--compute-capability"
    if need.cc is None or all(c >= need.cc for c in RTX_DEFAULT_TARGETS):
        return None, "TensorRT-RTX's default (" + ", ".join(map(format_cc, RTX_DEFAULT_TARGETS)) + ")"
    kept = tuple(c for c in RTX_DEFAULT_TARGETS if c >= need.cc and c in supported)
    if not kept:
        raise UserError(f"'{graph}' needs compute capability {format_cc(need.cc)} or newer ({need.reason}), which no "
                        f"target of TensorRT-RTX's default set reaches; pass --compute-capability from {ok}")
    return kept, (f"TensorRT-RTX's default ({', '.join(map(format_cc, RTX_DEFAULT_TARGETS))}) less the targets "
                  f"below {format_cc(need.cc)}, which {need.reason} need")
