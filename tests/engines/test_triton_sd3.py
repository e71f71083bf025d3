"""SD3 through Triton: a tiny random StableDiffusion3Pipeline folder (tests/dit_pipelines.py: two CLIP towers and a T5
encoder), quantized W8A8 (PTQ, 4 calibrated FlowMatchEuler steps), served as text_encoder + text_encoder_2 +
text_encoder_3 + the transformer (as `unet`) + vae_decoder + a prompt `pipeline` by a real server (CPU repository,
127.0.0.1 only). The joint prompt tokens, the pooled projections, the flow-matching loop with float timesteps and
the shifted decode are made by the served pipeline; its images must EQUAL dq-generate's (diffusers'
StableDiffusion3Pipeline with the quantized transformer in it) pixel for pixel at the same seed and settings."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.engines.triton.client import InferenceFailed, generate_from_prompt  # noqa: E402

from triton_fixtures import dq_generate_image, serve_prompt_pipeline  # noqa: E402

TIMEOUT_S = 120
PROMPT = "a red cat"
STEPS = 4


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(folder, q.pt, graph): the tiny SD3 folder calibrated W8A8 symmetric (PTQ, min/max, 8 samples, 4 steps)."""
    from dit_pipelines import IMAGE_SIZE, make

    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
    from dilatequant.dq_export.export_config import ExportConfig
    from dilatequant.dq_export.qdq_graph import export_onnx

    tmp = tmp_path_factory.mktemp("sd3-export")
    folder = make("sd3", tmp / "pipe")
    config = QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8, symmetric=True, act_init="minmax")
    run_calibration(CalibrationJob(model=str(folder), config=config, calib_samples=8, bkd=False, out=tmp / "q.pt",
                                   prompts=["a red cat", "a blue dog"], resolution=(IMAGE_SIZE, IMAGE_SIZE)))
    export_onnx(tmp / "q.pt", tmp / "transformer.onnx", ExportConfig())
    return folder, tmp / "q.pt", tmp / "transformer.onnx"


@pytest.fixture(scope="module")
def served(sd3, tmp_path_factory, request):
    folder, _, graph = sd3
    tmp = tmp_path_factory.mktemp("sd3-triton")
    server = serve_prompt_pipeline(folder, graph, tmp, request, "StableDiffusion3Pipeline",
                                   {"unet", "pipeline", "text_encoder", "text_encoder_2", "text_encoder_3",
                                    "vae_decoder"})
    header = (tmp / "repo" / "pipeline" / "config.pbtxt").read_text()
    assert "SD3 prompt pipeline" in header and "8 T5 tokens (text_encoder_3)" in header
    return server, tmp


CASES = [  # (id, dq-generate flags); the client sends the same settings
    ("calibrated-steps-default-guidance", dict(seed=3, steps=STEPS)),
    ("negative-prompt-other-steps", dict(seed=11, steps=6, guidance=2.0, negative_prompt="a blue dog")),
    ("no-guidance", dict(seed=5, steps=STEPS, guidance=1.0, prompt="a green tree")),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,settings", CASES, ids=[c[0] for c in CASES])
def test_sd3_prompt_images_equal_dq_generate(served, sd3, case, settings):
    server, tmp = served
    folder, _, graph = sd3
    s = dict(settings)
    prompt, seed = s.pop("prompt", PROMPT), s.pop("seed")
    want = dq_generate_image(folder, graph, tmp / f"{case}.png", prompt, seed=seed, **s)
    got = generate_from_prompt(server.http_url, prompt, seed, timeout_s=TIMEOUT_S, **s)
    assert got.shape == (1, 16, 16, 3) and got.dtype == np.uint8
    diff = np.abs(got[0].astype(int) - want.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} pixels differ, by up to {diff.max()}"
    assert want.std() > 10  # a real image, not a blank one both sides could agree on


@pytest.mark.slow
def test_sd3_refuses_another_scheduler(served):
    server, _ = served
    with pytest.raises(InferenceFailed, match="own scheduler"):
        generate_from_prompt(server.http_url, PROMPT, 1, timeout_s=TIMEOUT_S, steps=1, scheduler="euler")
