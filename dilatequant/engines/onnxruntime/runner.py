"""The ONNX Runtime runner: an exported graph on ORT's CPU, CUDA or TensorRT execution provider."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...core.errors import UserError
from ..base import Runner, metadata_from_props


class OrtRunner(Runner):
    """An exported ONNX graph in ONNX Runtime. providers: cpu, cuda, tensorrt (ORT's execution providers)."""

    PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int = 0, name: str | None = None):
        import onnx

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"ONNX graph '{self.path}' does not exist; write one with dq-export --onnx {self.path}")
        if provider not in self.PROVIDERS:
            raise UserError(f"unknown ONNX Runtime provider '{provider}': choose one of {', '.join(self.PROVIDERS)}")
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for a bad file
            raise UserError(f"'{self.path}' is not a readable ONNX model ({type(err).__name__}); "
                            "pass a graph written by dq-export") from err
        props = {p.key: p.value for p in proto.metadata_props}
        self.input_names = [i.name for i in proto.graph.input]
        self._input_types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        cond_dim = None
        for i in proto.graph.input:
            if i.name == "encoder_hidden_states" and len(i.type.tensor_type.shape.dim) == 3:
                cond_dim = i.type.tensor_type.shape.dim[2].dim_value or None
        device = "cpu" if provider == "cpu" else "cuda"
        meta = metadata_from_props(props, name or f"onnxruntime-{provider}", "onnxruntime", device, str(self.path))
        super().__init__(replace(meta, cond_dim=cond_dim))
        self.provider, self.threads, self.session = provider, threads, None

    def _load(self) -> None:
        import onnxruntime as ort

        from ...dq_export.parity import ORT_DISABLED_OPTIMIZERS

        available = ort.get_available_providers()
        wanted = self.PROVIDERS[self.provider]
        if wanted[0] not in available:
            raise UserError(f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(available)}); install "
                            f"onnxruntime-gpu for cuda/tensorrt providers or use provider cpu")
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), so, providers=[p for p in wanted if p in available],
                                            disabled_optimizers=ORT_DISABLED_OPTIMIZERS)

    def _feeds(self, sample, timestep, t_index, cond) -> dict[str, np.ndarray]:
        import onnx

        values = {"sample": sample, "timestep": timestep, "t_index": t_index, **(cond or {})}
        feeds = {}
        for name in self.input_names:
            v = values[name]
            np_type = onnx.helper.tensor_dtype_to_np_dtype(self._input_types[name])
            feeds[name] = v.detach().cpu().numpy().astype(np_type, copy=False)
        return feeds

    def _run(self, sample, timestep, t_index, cond):
        return torch.from_numpy(self.session.run(None, self._feeds(sample, timestep, t_index, cond))[0])
