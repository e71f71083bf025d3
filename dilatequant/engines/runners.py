"""One entry point over every runtime: `open_runner` picks the backend's runner from the file type.

The runner interface itself is `engines/base.py`; the runners live per backend as Polygraphy groups them
(`pytorch/`, `onnxruntime/`, `tensorrt/`).
"""
from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError
from ..core.models import DiffusionModel
from .base import Runner
from .onnxruntime.runner import OrtRunner
from .pytorch.runner import TorchRunner
from .tensorrt.runner import TensorRTRunner

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def open_runner(path_or_spec: str | Path, device: str = "cpu", dtype: str = "fp32", provider: str | None = None,
                threads: int = 0, fp_model: DiffusionModel | None = None) -> Runner:
    """Pick the runner from the file type: .onnx -> ONNX Runtime, .plan/.engine -> TensorRT, .pt -> fake-quant.

    `fp:<q.pt>` gives the FP model the checkpoint was calibrated from (or `fp_model`) on its schedule.
    """
    spec = str(path_or_spec)
    if spec.startswith("fp:"):
        from ..calibrate.checkpoint import load_checkpoint

        ck = load_checkpoint(spec[3:])
        return TorchRunner.fp(fp_model or fp_model_of(ck), ck.timesteps, device, dtype)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtRunner(path, provider or ("cpu" if device == "cpu" else "cuda"), threads)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(path)
    if suffix == ".pt":
        return TorchRunner.fake_quant(path, device, dtype)
    raise UserError(f"cannot tell the runtime of '{spec}' from its suffix: pass a .onnx graph, a "
                    f"{'/'.join(ENGINE_SUFFIXES)} TensorRT engine, a q.pt checkpoint or fp:<q.pt>")


def fp_model_of(ck) -> DiffusionModel:
    """The FP model a checkpoint was calibrated from (embedded name or diffusers folder)."""
    from ..calibrate.checkpoint import source_model

    try:
        return source_model(ck)
    except UserError as err:
        raise UserError(f"cannot load the checkpoint's FP model '{ck.source}' ({err}); pass --model with the "
                        "FP model it was calibrated from") from err
