"""Faults planted in an exported graph's per-timestep tables: what layer-wise parity (dq-export, dq-verify) must catch."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
from onnx import numpy_helper


def plant_fault(src, dst, kind: str, layer: str, steps: int, t: int = 1) -> None:
    """One layer's per-timestep tables edited in the ONNX: a row x1.25 ('scale'), a zero point off by one
    ('zero_point'), rows 0 and 1 swapped ('t_index'); 'none' copies the graph unchanged."""
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    prefix = f"unet.{layer}.tables."

    def edit(name, fn):
        arr = numpy_helper.to_array(inits[prefix + name]).copy()
        inits[prefix + name].CopyFrom(numpy_helper.from_array(fn(arr), prefix + name))

    if kind == "scale":
        edit("mult", lambda a: np.concatenate([a[:t], a[t:t + 1] * np.float32(1.25), a[t + 1:]]))
    elif kind == "zero_point":
        edit("shift", lambda a: np.concatenate([a[:t], a[t:t + 1] + np.float32(1), a[t + 1:]]))
    elif kind == "t_index":
        order = [1, 0] + list(range(2, steps))
        for name in ("mult", "shift", "correction", "delta"):
            edit(name, lambda a: a[order])
    shutil.copy(src, dst) if kind == "none" else onnx.save(m, str(dst))
