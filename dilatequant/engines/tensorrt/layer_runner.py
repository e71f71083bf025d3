"""Runners for the teacher-forced layer model (dq_export/layer_parity.py) on TensorRT, through Polygraphy.

The comparison stays in layer_parity.py; this only runs. TensorRT gets the same teacher-forced ONNX model that
ONNX Runtime runs (every quantized layer's subgraph, each fed the fake-quant model's input to it): the parser
marks the model's outputs - every layer's levels and output - as network outputs, so the engine computes each
layer with TensorRT's own kernels and fusions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .env import require_trt_and_gpu


class TrtLayerRunner:
    """feeds -> outputs on a TensorRT engine built, on the first call, from the teacher-forced model.

    One optimization profile: batch 1 up to the first call's batch (later calls may be smaller, as the last
    batch of a set is); every other dimension as fed. Outputs are copied out of Polygraphy's host buffers,
    which TrtRunner may reuse between calls.
    """

    name = "tensorrt"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)  # parsed from the file: its external data is found beside it (graphs over 2 GB)
        self._runner = None

    def _build(self, feeds: dict[str, np.ndarray]) -> None:
        require_trt_and_gpu()
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner

        profile = Profile()
        for name, arr in feeds.items():
            shape = tuple(arr.shape)
            low = (1, *shape[1:]) if shape else shape
            profile.add(name, min=low, opt=shape, max=shape)
        engine = EngineFromNetwork(NetworkFromOnnxPath(str(self.path)), config=CreateConfig(profiles=[profile]))
        self._runner = TrtRunner(engine, name="layer-parity")
        self._runner.activate()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            self._build(feeds)
        out = self._runner.infer(feeds, copy_outputs_to_host=True)
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None


def trt_layer_runner(path: Path) -> TrtLayerRunner:
    return TrtLayerRunner(path)
