"""What a repository needs to know about an exported UNet: its I/O tensors and calibrated schedule.

Read from the ONNX graph itself (inputs, outputs, metadata_props "dilatequant.*") or, for a
TensorRT plan, from its sidecar `<plan>.json` whose "metadata" key holds the ONNX metadata_props
verbatim (and optionally "inputs"/"outputs" lists of {name, dtype, shape}).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...core.errors import UserError

BATCH = -1  # a dynamic dimension


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str               # numpy dtype name: float32, float16, int64, ...
    shape: tuple[int, ...]   # -1 for a dynamic dimension; shape[0] is the batch


@dataclass
class UnetSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def timesteps(self) -> list[int | float]:
        """The calibrated timesteps (floats where the calibration sampler's are: Euler-type schedules)."""
        return [int(t) if float(t).is_integer() else float(t) for t in json.loads(self.metadata["dilatequant.timesteps"])]

    @property
    def conditional(self) -> bool:
        return self.metadata.get("dilatequant.conditional", "false") == "true"

    @property
    def has_t_index(self) -> bool:
        return any(t.name == "t_index" for t in self.inputs)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(json.loads(self.metadata["dilatequant.sample_shape"]))

    @property
    def base_model(self) -> str:
        return self.metadata.get("dilatequant.base_model", "")

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


REQUIRED_METADATA = ("dilatequant.timesteps", "dilatequant.sample_shape", "dilatequant.conditional")
EXPECTED_INPUTS = ("sample", "timestep")


def _check(spec: UnetSpec, source: Path) -> UnetSpec:
    missing = [k for k in REQUIRED_METADATA if k not in spec.metadata]
    if missing:
        raise UserError(f"'{source}' lacks DilateQuant metadata ({', '.join(missing)}); export it with dq-export")
    names = [t.name for t in spec.inputs]
    for n in EXPECTED_INPUTS + (("encoder_hidden_states",) if spec.conditional else ()):
        if n not in names:
            raise UserError(f"'{source}' has no '{n}' input (inputs: {', '.join(names)}); export it with dq-export")
    for t in spec.inputs + spec.outputs:
        if not t.shape or t.shape[0] not in (BATCH,):
            raise UserError(f"'{source}': tensor '{t.name}' has shape {list(t.shape)} without a dynamic batch "
                            "dimension; Triton batching needs one: export without --static-shapes")
    if len(spec.outputs) != 1:
        raise UserError(f"'{source}' has {len(spec.outputs)} outputs; a DilateQuant UNet has one (noise_pred)")
    return spec


def _onnx_dims(value_info) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else BATCH for d in dims)


def spec_from_onnx(path: str | Path) -> UnetSpec:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file '{path}' does not exist; write it with dq-export --onnx {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise UserError(f"'{path}' is not a readable ONNX file ({type(err).__name__}); re-export it") from err
    init_names = {i.name for i in model.graph.initializer}

    def tensors(values):
        return [TensorSpec(v.name, np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name, _onnx_dims(v))
                for v in values if v.name not in init_names]

    meta = {p.key: p.value for p in model.metadata_props}
    ins, outs = tensors(model.graph.input), tensors(model.graph.output)
    if "dilatequant.sample_shape" in meta:  # the graph takes any H, W; the served model is its calibrated size
        shape = tuple(json.loads(meta["dilatequant.sample_shape"]))
        ins, outs = ([TensorSpec(t.name, t.dtype, (t.shape[0], *shape)) if t.name in ("sample", "noise_pred") else t
                      for t in ts] for ts in (ins, outs))
    return _check(UnetSpec(ins, outs, meta), path)


def spec_from_plan(path: str | Path, encoder_tokens: tuple[int, int] | None = None) -> UnetSpec:
    """I/O of a plan from its sidecar; without explicit "inputs" they follow the dq-export interface.

    encoder_tokens: (tokens, dim) of encoder_hidden_states when the sidecar does not list inputs.
    """
    path = Path(path)
    side = Path(str(path) + ".json")
    if not path.is_file():
        raise UserError(f"engine '{path}' does not exist; build it from the ONNX graph first")
    if not side.is_file():
        raise UserError(f"engine '{path}' has no sidecar '{side}' with the ONNX metadata; build the engine with "
                        "dilatequant (it writes one) or write {\"metadata\": {...the ONNX metadata_props...}}")
    try:
        data = json.loads(side.read_text())
        meta = {str(k): str(v) for k, v in data["metadata"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise UserError(f"sidecar '{side}' is not JSON with a 'metadata' object ({err}); rebuild the engine") from err

    def listed(key):
        return [TensorSpec(t["name"], np.dtype(t["dtype"]).name, tuple(int(d) for d in t["shape"])) for t in data[key]]

    if "inputs" in data and "outputs" in data:
        return _check(UnetSpec(listed("inputs"), listed("outputs"), meta), side)
    shape = tuple(json.loads(meta.get("dilatequant.sample_shape", "[]")))
    float_t = "float16" if meta.get("dilatequant.dtype") == "fp16" and data.get("fp16_io") else "float32"
    ins = [TensorSpec("sample", float_t, (BATCH, *shape)), TensorSpec("timestep", "int64", (BATCH,))]
    if meta.get("dilatequant.t_index_input", "true") == "true":
        ins.append(TensorSpec("t_index", "int64", (BATCH,)))
    if meta.get("dilatequant.conditional") == "true":
        if encoder_tokens is None:
            raise UserError(f"sidecar '{side}' lists no inputs and the class encoder is unknown; pass --ckpt q.pt")
        ins.append(TensorSpec("encoder_hidden_states", float_t, (BATCH, *encoder_tokens)))
    return _check(UnetSpec(ins, [TensorSpec("noise_pred", float_t, (BATCH, *shape))], meta), side)
