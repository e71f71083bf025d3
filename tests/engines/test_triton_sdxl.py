"""SDXL through Triton: a tiny random StableDiffusionXLPipeline folder (tests/sd_pipelines.py), quantized W8A8 (PTQ,
4 calibrated steps), served as text_encoder + text_encoder_2 + unet + vae_decoder + a prompt `pipeline` by a real
server (CPU repository, 127.0.0.1 only). Both encoders' penultimate hidden states, the pooled text_embeds and the
time_ids are made by the served pipeline; its images must EQUAL dq-generate's (diffusers' StableDiffusionXLPipeline
with the quantized UNet in it) pixel for pixel at the same seed and settings."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.engines.triton.client import InferenceFailed, generate_from_prompt  # noqa: E402
from dilatequant.engines.triton.repository import RepositoryConfig, validate_repository, write_repository  # noqa: E402

from triton_fixtures import dq_generate_image, serve_prompt_pipeline, tiny_sdxl_export  # noqa: E402

TIMEOUT_S = 120
PROMPT = "a red cat"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_export(tmp_path_factory)


@pytest.fixture(scope="module")
def served(sdxl, tmp_path_factory, request):
    folder, _, graph = sdxl
    tmp = tmp_path_factory.mktemp("sdxl-triton")
    server = serve_prompt_pipeline(folder, graph, tmp, request, "StableDiffusionXLPipeline",
                                   {"unet", "pipeline", "text_encoder", "text_encoder_2", "vae_decoder"})
    return server, tmp


CASES = [  # (id, protocol, dq-generate flags); the client sends the same settings
    ("guided-no-negative-zero-embeddings", "http", dict(seed=3, steps=4)),
    ("negative-prompt-mapped-steps", "grpc", dict(seed=11, steps=5, guidance=2.0, negative_prompt="a blue dog")),
    ("euler-no-guidance", "http", dict(seed=5, steps=4, guidance=1.0, scheduler="euler", prompt="a green tree")),
    ("other-size-time-ids-follow", "http", dict(seed=2, steps=4, size=(24, 16))),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,protocol,settings", CASES, ids=[c[0] for c in CASES])
def test_sdxl_prompt_images_equal_dq_generate(served, sdxl, case, protocol, settings):
    server, tmp = served
    folder, _, graph = sdxl
    s = dict(settings)
    prompt, seed = s.pop("prompt", PROMPT), s.pop("seed")
    flags = {k: (f"{v[0]}x{v[1]}" if k == "size" else v) for k, v in s.items()}
    want = dq_generate_image(folder, graph, tmp / f"{case}.png", prompt, seed=seed, **flags)
    url = server.http_url if protocol == "http" else server.grpc_url
    got = generate_from_prompt(url, prompt, seed, protocol=protocol, timeout_s=TIMEOUT_S, **s)
    h, w = s.get("size", (16, 16))
    assert got.shape == (1, h, w, 3) and got.dtype == np.uint8
    diff = np.abs(got[0].astype(int) - want.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} pixels differ, by up to {diff.max()}"
    assert want.std() > 10  # a real image, not a blank one both sides could agree on


def _diffusers_sdxl(folder, graph, seed, **kwargs) -> np.ndarray:
    """StableDiffusionXLPipeline itself with the quantized UNet, as uint8 [H, W, 3] (what dq-generate saves)."""
    from dilatequant.core.models import load_model
    from dilatequant.core.schedulers import resolve_scheduler
    from dilatequant.engines.onnxruntime.runner import OrtRunner
    from dilatequant.engines.pytorch.diffusers_unet import QuantizedUNet

    model = load_model(str(folder))
    pipe = model.pipeline
    pipe.unet = QuantizedUNet(OrtRunner(graph), model.unet.config)
    pipe.scheduler = resolve_scheduler(model)  # what the Triton pipeline samples with when SCHEDULER is not sent
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=4, height=16, width=16, generator=torch.Generator().manual_seed(seed),
                   output_type="pt", **kwargs).images
    return (out[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.slow
def test_sdxl_original_size_and_crop_make_the_pipelines_time_ids(served, sdxl):
    """ORIGINAL_SIZE and CROPS_COORDS_TOP_LEFT reach time_ids as StableDiffusionXLPipeline's original_size and
    crops_coords_top_left do (dq-generate keeps their defaults, so the pipeline class is the reference here)."""
    server, _ = served
    folder, _, graph = sdxl
    micro = dict(original_size=(32, 48), crops_coords_top_left=(4, 0))
    got = generate_from_prompt(server.http_url, PROMPT, 7, timeout_s=TIMEOUT_S, steps=4, **micro)
    # the server's text encoders and VAE are ONNX graphs, the pipeline's are torch modules: a last-bit difference
    # may round a pixel the other way, never more than one level and in a handful of pixels
    off = np.abs(got[0].astype(int) - _diffusers_sdxl(folder, graph, 7, **micro).astype(int))
    assert off.max() <= 1 and (off > 0).mean() <= 0.01, f"{int((off > 0).sum())} pixels differ, by up to {off.max()}"
    default = generate_from_prompt(server.http_url, PROMPT, 7, timeout_s=TIMEOUT_S, steps=4)
    moved = np.abs(default.astype(int) - got.astype(int))
    assert moved.max() > 5 and (moved > 1).mean() > 0.05  # the micro-conditioning changes the image, far beyond that
    with pytest.raises(InferenceFailed, match=r"ORIGINAL_SIZE.*two non-negative integers"):
        generate_from_prompt(server.http_url, PROMPT, 7, timeout_s=TIMEOUT_S, steps=1, original_size=(-1, 16))


def test_sdxl_repository_has_both_encoders_and_an_fp32_vae_on_gpu(sdxl, tmp_path):
    folder, _, graph = sdxl
    write_repository(RepositoryConfig(repo=tmp_path / "gpu", onnx=graph, model=str(folder), kind="gpu"))
    assert validate_repository(tmp_path / "gpu") == []
    te2 = (tmp_path / "gpu" / "text_encoder_2" / "config.pbtxt").read_text()
    assert 'name: "penultimate_hidden_state"' in te2 and 'name: "text_embeds"' in te2
    header = (tmp_path / "gpu" / "pipeline" / "config.pbtxt").read_text()
    assert "SDXL prompt pipeline" in header and "ORIGINAL_SIZE" in header and "zero embeddings" in header
    assert sorted(p.name for p in (tmp_path / "gpu" / "pipeline" / "1").iterdir()) == [
        "dq_bls.py", "model.py", "schedulers.json", "tokenizer", "tokenizer_2"]
    floats = {}
    for name in ("text_encoder", "text_encoder_2", "vae_decoder"):
        g = onnx.load(str(tmp_path / "gpu" / name / "1" / "model.onnx"))
        floats[name] = {i.data_type for i in g.graph.initializer if i.data_type in (1, 10)}
    # the text encoders compute in FP16; SDXL's VAE config says force_upcast, so diffusers decodes in FP32: so do we
    assert floats == {"text_encoder": {onnx.TensorProto.FLOAT16}, "text_encoder_2": {onnx.TensorProto.FLOAT16},
                      "vae_decoder": {onnx.TensorProto.FLOAT}}
    assert 'string_value: "fp32"' in (tmp_path / "gpu" / "vae_decoder" / "config.pbtxt").read_text()
