"""Shared by the Triton tests: tiny conditional and SDXL exports, an ORT NoisePredictor, dq-generate's image."""
from pathlib import Path

import numpy as np
import pytest
import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.checkpoint import save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.core.sampling import sampling_timesteps
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.qdq_graph import export_onnx

from conftest import call_cli, tiny_cond

STEPS = 4


def tiny_cond_export(tmp_path_factory) -> tuple[Path, Path]:
    """(q.pt, unet.onnx) of a tiny random class-conditional UNet, W8A8 symmetric, 4 calibrated steps.

    Made once per test session (the export is the slow part) in the session's base temp folder.
    """
    tmp = tmp_path_factory.getbasetemp() / "tiny-cond-export"
    if (tmp / "unet.onnx").is_file():
        return tmp / "q.pt", tmp / "unet.onnx"
    tmp.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = tiny_cond()
    data = build_calibration_set(model, 16, STEPS, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8, symmetric=True), data)
    ckpt = save_checkpoint(tmp / "q.pt", q, model, sampling_timesteps(model, STEPS), "fp", {})
    export_onnx(ckpt, tmp / "unet.onnx", ExportConfig())
    return ckpt, tmp / "unet.onnx"


def ort_predictor(session, timesteps: list[int] | None = None):
    """A NoisePredictor over an ORT session; with `timesteps`, t_index = nearest calibrated timestep."""
    names = {i.name for i in session.get_inputs()}
    table = None if timesteps is None else np.asarray(timesteps)

    def predict(x, timestep, t_index, cond=None):
        if table is not None:
            t_index = torch.tensor([int(np.abs(table - int(t)).argmin()) for t in timestep])
        feeds = {"sample": x.numpy(), "timestep": timestep.numpy(), "t_index": t_index.numpy()}
        feeds.update({name: v.numpy() for name, v in (cond or {}).items()})
        return torch.from_numpy(session.run(None, {k: v for k, v in feeds.items() if k in names})[0])

    return predict


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1,1] -> [N,H,W,C] uint8, the pipeline's conversion."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def dq_generate_image(model, graph, out: Path, prompt: str, **settings) -> np.ndarray:
    """dq-generate's own PNG for these settings (flags named as the keyword arguments), read back as uint8."""
    from PIL import Image

    from dilatequant.cli import generate_main

    args = ["--model", model, "--onnx", graph, "--prompt", prompt, "--out", out]
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", v]
    assert call_cli(generate_main, *args) == 0
    return np.array(Image.open(out))


def tiny_sdxl_export(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(pipeline folder, q.pt, unet.onnx) of the tiny random SDXL pipeline (sd_pipelines.tiny_sdxl), W8A8 symmetric
    PTQ (min/max activation ranges, 8 samples, 4 calibrated steps): made once per session, as tiny_cond_export."""
    from sd_pipelines import save, tiny_sdxl

    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration

    tmp = tmp_path_factory.getbasetemp() / "tiny-sdxl-export"
    if (tmp / "unet.onnx").is_file():
        return tmp / "pipe", tmp / "q.pt", tmp / "unet.onnx"
    tmp.mkdir(exist_ok=True)
    folder = save(tiny_sdxl(), tmp / "pipe")
    config = QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8, symmetric=True, act_init="minmax")
    run_calibration(CalibrationJob(model=str(folder), config=config, calib_samples=8, bkd=False, out=tmp / "q.pt",
                                   prompts=["a red cat", "a blue dog"]))
    export_onnx(tmp / "q.pt", tmp / "unet.onnx", ExportConfig())
    return folder, tmp / "q.pt", tmp / "unet.onnx"


def serve_prompt_pipeline(folder: Path, graph: Path, tmp: Path, request, pipeline_class: str, models: set[str]):
    """A real Triton server on the CPU prompt repository of this pipeline folder and graph, stopped after the
    module; the repository is checked for the pipeline class and its models first."""
    from dilatequant.engines.triton.repository import RepositoryConfig, validate_repository, write_repository
    from dilatequant.engines.triton.server import TritonServer, unavailable_reason

    if unavailable_reason():
        pytest.skip(f"no Triton server can start here: {unavailable_reason()}")
    s = write_repository(RepositoryConfig(repo=tmp / "repo", onnx=graph, model=str(folder), kind="cpu", max_batch=8,
                                          intra_op_threads=1))
    assert s["pipeline_class"] == pipeline_class
    assert set(s["models"]) == models
    assert validate_repository(tmp / "repo") == []
    server = TritonServer(tmp / "repo", log_path=tmp / "server.log", exit_timeout_s=3)
    request.addfinalizer(server.stop)
    server.start(timeout_s=240)
    return server
