"""The TensorRT runner: a serialized engine through Polygraphy, with its sidecar's schedule and profile."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...core.errors import UserError
from ..base import Runner, metadata_from_props
from .env import detect_gpu, explain_cuda_failure, plan_mismatch, require_trt_and_gpu
from .plan_files import sidecar_path
from .profiles import EngineProfile
from .rtx import plan_refusal


class TensorRTRunner(Runner):
    """A serialized TensorRT engine through Polygraphy (EngineFromBytes + TrtRunner), imported lazily.

    Metadata comes from the engine's sidecar `<engine>.json` (written by engines/tensorrt/build.py), whose
    "metadata" key holds the source ONNX's metadata_props verbatim, "profiles" the plan's optimization profile
    (sizes outside it are refused before TensorRT sees them; a batch above its maximum, e.g. a classifier-free
    guidance batch of 2 x images, is run as several calls and concatenated, so every sampler can use any plan),
    and "tensorrt"/"gpu" what built it (a plan from another TensorRT release or GPU architecture is refused in
    one line before it is deserialized).
    """

    FEED_DEVICE = "cuda"  # where the inputs go: the plan's bindings are on the GPU

    def __init__(self, path: str | Path, name: str = "tensorrt"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"engine '{self.path}' does not exist; build one with dq-build-engine --engine {self.path}")
        sidecar = sidecar_path(self.path)
        if not sidecar.is_file():
            raise UserError(f"engine '{self.path}' has no sidecar '{sidecar.name}' (calibrated schedule, shapes); "
                            "rebuild it with dq-build-engine, which writes both")
        try:
            side = json.loads(sidecar.read_text())
            props = side["metadata"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"sidecar '{sidecar}' is not valid engine metadata ({err}); rebuild with dq-build-engine") from err
        if side.get("backend") == "tensorrt-rtx":  # before anything else: it cannot run here, whatever else holds
            raise UserError(plan_refusal(self.path, side, detect_gpu()))
        meta = metadata_from_props(props, name, "tensorrt", "cuda", str(sidecar))
        super().__init__(meta)
        self.profile = EngineProfile.from_sidecar(side, str(sidecar))  # None: an old sidecar, nothing to check
        self._built_with = (side.get("tensorrt"), side.get("gpu"))
        from ...dq_export.qdq_graph import input_names

        self.input_names = input_names(meta.cond_inputs, meta.has_t_index)
        self._runner, self._dtypes = None, {}

    def validate(self, sample, timestep, t_index, cond=None):
        """The base checks, then the plan's optimization profile (sizes; a batch above its maximum is split)."""
        args = super().validate(sample, timestep, t_index, cond)
        if self.profile is not None:
            c = args[3]
            conds = c if isinstance(c, dict) else ({} if c is None else {"encoder_hidden_states": c})
            self.profile.check({"sample": tuple(args[0].shape), **{k: tuple(v.shape) for k, v in conds.items()}})
        return args

    def _load(self) -> None:
        trt, gpu = require_trt_and_gpu()
        problem = plan_mismatch(str(self.path), *self._built_with, str(trt.__version__), gpu)
        if problem:
            raise UserError(problem)
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.datatype import DataType
        from polygraphy.exception import PolygraphyException

        try:
            self._runner = TrtRunner(EngineFromBytes(self.path.read_bytes()), name=self.metadata.name)
            self._runner.activate()
        except (PolygraphyException, RuntimeError, TypeError) as err:
            self._runner = None
            raise UserError(explain_cuda_failure(str(err)) or
                            f"TensorRT could not load engine '{self.path}' ({type(err).__name__}: {err}); rebuild it "
                            "here with dq-build-engine") from err
        for name, (dtype, _shape) in self._runner.get_input_metadata(use_numpy_dtypes=False).items():
            self._dtypes[name] = DataType.to_dtype(DataType.from_dtype(dtype), "torch")

    def _run(self, sample, timestep, t_index, cond):
        values = {"sample": sample, "timestep": timestep, "t_index": t_index, **(cond or {})}
        feeds = {n: values[n].to(self.FEED_DEVICE, self._dtypes.get(n, values[n].dtype)).contiguous()
                 for n in self.input_names}
        batch = sample.shape[0]
        spans = self.profile.chunks(batch) if self.profile is not None else [(0, batch)]
        outs = [self._infer({n: v[a:b] for n, v in feeds.items()}) for a, b in spans]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _infer(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine call. Its output is copied: Polygraphy's TrtRunner returns views of host buffers it reuses,
        so the next call (or the next chunk of this one) would overwrite a result kept as it is."""
        out = self._runner.infer(feeds, copy_outputs_to_host=True)
        out = out["noise_pred"] if "noise_pred" in out else next(iter(out.values()))
        return torch.as_tensor(out).clone()

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner, self._active = None, False
