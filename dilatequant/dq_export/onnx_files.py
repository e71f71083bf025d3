"""ONNX graphs on disk: one `.onnx` file, plus one external-data file when the weights pass ~2 GB.

Protobuf cannot hold a message over 2 GiB, so an SD-XL-sized graph keeps its tensors in ONNX's own
external-data format: `unet.onnx` names `unet.onnx.data` (beside it) and an offset per tensor. Every
writer here goes through `save_model`, which writes both files under temporary names in the same folder
and renames the data first and the graph last: a reader never sees a graph without its data, and a
failed write leaves nothing behind (or the previous files, untouched). `read_graph` gives the graph as an
onnx_ir model whose external tensors stay on disk until a pass reads one (memory-mapped): a rule that
needs the scales of an SDXL graph does not read its 2.6 GB of weights. ONNX Runtime and TensorRT's parser
take the path and find the data beside the graph themselves.

The size that switches to external data comes from DILATEQUANT_EXTERNAL_DATA_BYTES (tests force it down
to a few KB), else DEFAULT_EXTERNAL_DATA_BYTES.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

from ..core.errors import UserError
from ..core.reporting import atomic_write_bytes

ENV_THRESHOLD = "DILATEQUANT_EXTERNAL_DATA_BYTES"
# protobuf's 2 GiB limit less 64 MiB of headroom for nodes, names and metadata (not counted in the estimate)
DEFAULT_EXTERNAL_DATA_BYTES = 2**31 - 2**26
# tensors smaller than this stay in the graph file (scales, tables, shapes): structure-only readers see them
TENSOR_MIN_BYTES = 1024
DATA_SUFFIX = ".data"


def external_data_threshold() -> int:
    """Tensor bytes above which a graph is written with external data."""
    raw = os.environ.get(ENV_THRESHOLD, "").strip()
    if not raw:
        return DEFAULT_EXTERNAL_DATA_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{ENV_THRESHOLD}='{raw}' is not a byte count; set a whole number >= 0 or unset it "
                        f"(default {DEFAULT_EXTERNAL_DATA_BYTES})")
    return value


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in t.external_data if e.key == "length"), 0)
    if t.HasField("raw_data"):
        return len(t.raw_data)
    bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else \
        8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return (int(np.prod(t.dims, dtype=np.int64)) * bits + 7) // 8


def tensor_bytes(model: onnx.ModelProto | ir.Model) -> int:
    """Bytes of every tensor in the model (initializers and Constant attributes), without serializing it.

    ModelProto.ByteSize() would answer exactly but walks the whole message (45 s for 2.4 GB, measured).
    """
    if isinstance(model, onnx.ModelProto):
        return sum(_nbytes(t) for t in external_data_helper._get_all_tensors(model))
    constants = [n.attributes["value"].value for n in model.graph if n.op_type == "Constant" and "value" in n.attributes]
    return sum(t.nbytes for t in [v.const_value for v in model.graph.initializers.values()] + constants
               if t is not None)


def data_path(graph: str | Path) -> Path:
    """The one external-data file of a graph written here: `unet.onnx` -> `unet.onnx.data`."""
    graph = Path(graph)
    return graph.with_name(graph.name + DATA_SUFFIX)


def save_model(model: onnx.ModelProto | ir.Model, path: str | Path, threshold: int | None = None) -> dict:
    """Write `model` to `path` atomically; over `threshold` tensor bytes, with its weights in `<path>.data`.

    A ModelProto's tensors move into the data file as they are written (the proto's raw_data is cleared, so
    memory falls while writing): do not use its weights afterwards. An onnx_ir model is streamed tensor by
    tensor (external tensors it read from another graph's data file included) and left as it was.
    Returns {"bytes": graph + data bytes, "external_data": the data file or None}.
    """
    path = Path(path)
    threshold = external_data_threshold() if threshold is None else threshold
    stale = data_path(path)
    if tensor_bytes(model) <= threshold:
        if isinstance(model, ir.Model):
            model = ir.to_proto(ir.external_data.load_to_model(model))
        data = model.SerializeToString()
        atomic_write_bytes(path, data)
        stale.unlink(missing_ok=True)  # an earlier external-data export of this name, no longer referred to
        return {"bytes": len(data), "external_data": None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise UserError(f"cannot write '{path}' ({err.strerror or err}); choose a writable location") from err
    try:
        if isinstance(model, ir.Model):
            ir.save(model, tmp / path.name, external_data=stale.name, size_threshold_bytes=TENSOR_MIN_BYTES - 1)
        else:
            onnx.save_model(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=stale.name, size_threshold=TENSOR_MIN_BYTES, convert_attribute=False)
        mode = 0o666 & ~_umask()  # mkdtemp's files get the permissions a plain open() would give
        for f in (tmp / stale.name, tmp / path.name):
            os.chmod(f, mode)
        size = (tmp / stale.name).stat().st_size + (tmp / path.name).stat().st_size
        os.replace(tmp / stale.name, stale)   # data first: the old graph never points at a missing file,
        os.replace(tmp / path.name, path)     # graph last: the new graph appears with its data in place
    except OSError as err:
        raise UserError(f"cannot write '{path}' with external data ({err.strerror or err}); "
                        "check free disk space and that the folder is writable") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes": size, "external_data": str(stale)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_model(path: str | Path, with_data: bool = True) -> onnx.ModelProto:
    """The graph at `path`; with_data=False reads the structure only (external tensors stay on disk)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX graph '{path}' does not exist; write one with dq-export --onnx {path}")
    try:
        return onnx.load(str(path), load_external_data=with_data)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValidationError, ...
        try:
            missing = _missing_data(path)
        except Exception:  # noqa: BLE001 - the graph itself is unreadable
            missing = []
        raise UserError(f"'{path}' is not a readable ONNX model{_missing_hint(missing)} "
                        f"({type(err).__name__}: {err})") from err


def read_graph(path: str | Path) -> ir.Model:
    """The graph at `path` as an onnx_ir model; its external tensors are read from beside it when used."""
    path = Path(path)
    proto = load_model(path, with_data=False)
    missing = _missing_data(path, proto)
    if missing:
        raise UserError(f"'{path}' is not a readable ONNX model{_missing_hint(missing)}")
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def _missing_data(path: Path, model: onnx.ModelProto | None = None) -> list[str]:
    return [str(f) for f in external_files(path, model) if not f.is_file()]


def _missing_hint(missing: list[str]) -> str:
    return f" (its external data {', '.join(missing)} is missing: keep it beside the graph)" if missing else ""


def external_files(path: str | Path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The external-data files a graph refers to, resolved beside it (a location leaving the folder is refused)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False) if model is None else model
    names = {e.value for t in external_data_helper._get_all_tensors(model)
             if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    out = []
    for name in sorted(names):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(f"'{path}' refers to external data '{name}' outside its folder; re-export it so the "
                            "data file sits beside the graph")
        out.append(path.parent / rel)
    return out
