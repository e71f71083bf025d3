"""Stable Diffusion through Triton: the shipped sd-digits pipeline, quantized W8A8 (PTQ, 4 calibrated steps), served
as text_encoder + unet + vae_decoder + a prompt `pipeline` by a real server (pytriton's bundled tritonserver, CPU
repository, 127.0.0.1 only). Its images must EQUAL dq-generate's for the same seed and settings, pixel for pixel:
same latents, scheduler, t_index mapping and CFG batching; the served text encoder and VAE are ONNX graphs, whose
float differences from the PyTorch modules dq-generate runs (~5e-7) do not reach the uint8 images here."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.cli import client_main, triton_main  # noqa: E402
from dilatequant.engines.triton.client import (InferenceFailed, generate_from_prompt, prompt_inputs,  # noqa: E402
                                               request_images)
from dilatequant.engines.triton.repository import validate_repository, write_repository  # noqa: E402
from dilatequant.engines.triton.repository_config import RepositoryConfig  # noqa: E402
from dilatequant.engines.triton.server import TritonServer, unavailable_reason  # noqa: E402

from conftest import call_cli  # noqa: E402
from triton_fixtures import dq_generate_image  # noqa: E402

TIMEOUT_S = 120
STEPS = 4
PROMPT = "a handwritten digit seven"

_cli = call_cli


def _one_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    """sd-digits calibrated W8A8 symmetric (PTQ, 8 calibration samples, 4 steps) and exported: (q.pt, unet.onnx)."""
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
    from dilatequant.dq_export.export_config import ExportConfig
    from dilatequant.dq_export.qdq_graph import export_onnx

    tmp = tmp_path_factory.mktemp("sd-export")
    ckpt = tmp / "q.pt"
    run_calibration(CalibrationJob(model="sd-digits", config=QuantConfig(num_steps=STEPS, weight_bits=8, act_bits=8,
                                                                          symmetric=True),
                                   calib_samples=8, bkd=False, out=ckpt))
    export_onnx(ckpt, tmp / "unet.onnx", ExportConfig())
    return ckpt, tmp / "unet.onnx"


@pytest.fixture(scope="module")
def served(sd_export, tmp_path_factory, request):
    if unavailable_reason():
        pytest.skip(f"no Triton server can start here: {unavailable_reason()}")
    tmp = tmp_path_factory.mktemp("sd-triton")
    _, graph = sd_export
    # two pipeline instances and a 50 ms queue delay: concurrent prompts' unet steps meet in one dynamic batch
    s = write_repository(RepositoryConfig(repo=tmp / "repo", onnx=graph, kind="cpu", max_batch=8,
                                          intra_op_threads=1, pipeline_instances=2, max_queue_delay_us=50_000))
    assert s["prompts"] and set(s["models"]) == {"unet", "pipeline", "text_encoder", "vae_decoder"}
    server = TritonServer(tmp / "repo", log_path=tmp / "server.log")
    request.addfinalizer(server.stop)
    server.start(timeout_s=240)
    return server, graph, tmp


def _dq_generate(graph, tmp, name, **settings) -> np.ndarray:
    """dq-generate's own PNG, read back as uint8 [H, W]."""
    return dq_generate_image("sd-digits", graph, tmp / f"{name}.png", settings.pop("prompt", PROMPT), **settings)


CASES = [  # (id, protocol, dq-generate flags); the client sends the same settings
    ("calibrated-steps-default-guidance", "http", dict(seed=3, steps=STEPS)),
    ("mapped-steps-negative-prompt", "grpc", dict(seed=11, steps=7, guidance=2.0,
                                                   negative_prompt="a handwritten digit one")),
    ("euler-no-guidance", "http", dict(seed=5, steps=5, guidance=1.0, scheduler="euler",
                                       prompt="a handwritten digit two")),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,protocol,settings", CASES, ids=[c[0] for c in CASES])
def test_prompt_images_equal_dq_generate(served, case, protocol, settings):
    server, graph, tmp = served
    want = _dq_generate(graph, tmp, case, **dict(settings))
    s = dict(settings)
    got = generate_from_prompt(server.http_url if protocol == "http" else server.grpc_url, s.pop("prompt", PROMPT),
                               s.pop("seed"), protocol=protocol, timeout_s=TIMEOUT_S, **s)
    assert got.shape == (1, 32, 32, 1) and got.dtype == np.uint8
    diff = np.abs(got[0, ..., 0].astype(int) - want.astype(int))
    assert diff.max() == 0, f"{int((diff > 0).sum())} pixels differ, by up to {diff.max()}"
    assert want.std() > 10  # a real image, not a blank one both sides could agree on


@pytest.mark.slow
def test_seed_steps_and_prompt_change_the_images(served):
    """Equality above is not trivial: each setting the pipeline forwards changes the image."""
    server, _, _ = served
    base = generate_from_prompt(server.http_url, PROMPT, 3, timeout_s=TIMEOUT_S, steps=STEPS)
    for changed in (dict(seed=4), dict(steps=STEPS + 1), dict(prompt="a handwritten digit zero"),
                    dict(guidance=1.0), dict(negative_prompt="a handwritten digit seven")):
        s = {"prompt": PROMPT, "seed": 3, "steps": STEPS, **changed}
        other = generate_from_prompt(server.http_url, s.pop("prompt"), s.pop("seed"), timeout_s=TIMEOUT_S, **s)
        assert np.abs(other.astype(int) - base.astype(int)).max() > 0, changed


@pytest.mark.slow
def test_num_images_and_size(served):
    server, _, _ = served
    two = generate_from_prompt(server.grpc_url, PROMPT, 8, protocol="grpc", timeout_s=TIMEOUT_S, steps=STEPS,
                               num_images=2)
    assert two.shape == (2, 32, 32, 1) and np.abs(two[0].astype(int) - two[1].astype(int)).max() > 0
    big = generate_from_prompt(server.http_url, PROMPT, 8, timeout_s=TIMEOUT_S, steps=STEPS, size=(48, 64))
    assert big.shape == (1, 48, 64, 1)


def _unet_stats(server) -> tuple[int, int]:
    import tritonclient.http as http

    c = http.InferenceServerClient(server.http_url)
    try:
        st = c.get_inference_statistics("unet")["model_stats"][0]
    finally:
        c.close()
    return int(st["inference_count"]), int(st["execution_count"])


@pytest.mark.slow
def test_concurrent_prompts_share_unet_batches_and_equal_separate_requests(served):
    import concurrent.futures as cf

    server, _, _ = served
    jobs = [("a handwritten digit four", 21), ("a handwritten digit nine", 22)]

    def ask(job):
        return generate_from_prompt(server.http_url, job[0], job[1], timeout_s=TIMEOUT_S, steps=STEPS)

    alone = [ask(j) for j in jobs]
    inf0, exe0 = _unet_stats(server)
    with cf.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(ask, jobs))
    inf1, exe1 = _unet_stats(server)
    assert exe1 - exe0 < inf1 - inf0, "no unet execution merged the two pipelines' requests"
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


BAD = [
    (dict(steps=0), "STEPS 0 out of range"),
    (dict(size=(30, 30)), "HEIGHT x WIDTH 30x30 cannot be taken: both must be multiples of 16"),
    (dict(scheduler="pndm"), "unknown SCHEDULER 'pndm'"),
    (dict(num_images=0), "NUM_IMAGES 0 out of range"),
    (dict(guidance=float("nan")), "GUIDANCE_SCALE must be a finite number"),
]


@pytest.mark.slow
@pytest.mark.parametrize("settings,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_request_gets_one_clear_error_and_server_keeps_serving(served, settings, message):
    server, _, _ = served
    with pytest.raises(InferenceFailed, match=message.replace("(", r"\(")):
        generate_from_prompt(server.http_url, PROMPT, 0, timeout_s=TIMEOUT_S, **settings)
    blank = prompt_inputs(PROMPT, 0)
    blank["PROMPT"] = np.array([b"   "], dtype=object)
    with pytest.raises(InferenceFailed, match="PROMPT is empty"):
        request_images(server.http_url, blank, timeout_s=TIMEOUT_S)
    assert generate_from_prompt(server.http_url, PROMPT, 1, timeout_s=TIMEOUT_S, steps=2).shape == (1, 32, 32, 1)


@pytest.mark.slow
def test_dq_client_prompt_writes_the_png(served, capsys):
    from PIL import Image

    server, graph, tmp = served
    out = tmp / "client.png"
    assert _cli(client_main, "--url", server.http_url, "--prompt", PROMPT, "--seed", 3, "--steps", STEPS,
                "--out", out) == 0
    assert "1 image(s) 32x32" in capsys.readouterr().out
    png = np.array(Image.open(out))[::4, ::4]  # saved 4x enlarged
    np.testing.assert_array_equal(png, _dq_generate(graph, tmp, "client-ref", seed=3, steps=STEPS))
    assert _cli(client_main, "--url", server.http_url, "--prompt", PROMPT, "--size", "30x30", "--out", out) == 2
    _one_error(capsys, "server rejected the request to 'pipeline'", "multiples of 16")
    assert _cli(client_main, "--url", server.http_url, "--prompt", PROMPT, "--label", 3, "--out", out) == 2
    _one_error(capsys, "--prompt", "--label", "not both")
    assert _cli(client_main, "--url", server.http_url, "--label", 3, "--size", "32", "--out", out) == 2
    _one_error(capsys, "--size goes with --prompt")
    assert _cli(client_main, "--url", server.http_url, "--label", 3, "--out", out) == 2  # a class-label request
    _one_error(capsys, "unexpected inference input 'CLASS_LABELS'", "pass --prompt TEXT")
    assert _cli(client_main, "--url", server.grpc_url, "--protocol", "grpc", "--out", out) == 2  # no prompt at all
    _one_error(capsys, "'PROMPT'", "pass --prompt TEXT")


# --- the repository itself (no server) ------------------------------------------------------------------------
def test_gpu_kind_has_fp16_encoder_and_decoder_with_fp32_io(sd_export, tmp_path):
    import onnxruntime as ort

    _, graph = sd_export
    write_repository(RepositoryConfig(repo=tmp_path / "cpu", onnx=graph, kind="cpu"))
    write_repository(RepositoryConfig(repo=tmp_path / "gpu", onnx=graph, kind="gpu"))
    assert validate_repository(tmp_path / "gpu") == []
    feeds = {"text_encoder": {"input_ids": np.array([[571, 320, 532, 533, 560] + [572] * 11], np.int64)},
             "vae_decoder": {"latent": np.random.RandomState(0).randn(1, 4, 8, 8).astype(np.float32)}}
    for name, feed in feeds.items():
        cfg = (tmp_path / "gpu" / name / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in cfg and "KIND_GPU" in cfg
        g16 = onnx.load(str(tmp_path / "gpu" / name / "1" / "model.onnx"))
        g32 = onnx.load(str(tmp_path / "cpu" / name / "1" / "model.onnx"))
        assert {i.data_type for i in g16.graph.initializer if i.data_type in (1, 10)} == {onnx.TensorProto.FLOAT16}
        assert {i.data_type for i in g32.graph.initializer if i.data_type in (1, 10)} == {onnx.TensorProto.FLOAT}
        io32 = [(v.name, v.type.tensor_type.elem_type) for v in list(g32.graph.input) + list(g32.graph.output)]
        assert [(v.name, v.type.tensor_type.elem_type) for v in list(g16.graph.input) + list(g16.graph.output)] == io32
        a, b = (ort.InferenceSession(str(tmp_path / k / name / "1" / "model.onnx"),
                                     providers=["CPUExecutionProvider"]).run(None, feed)[0] for k in ("gpu", "cpu"))
        sqnr = 10 * np.log10((b ** 2).mean() / ((a - b) ** 2).mean())
        assert sqnr > 55, f"{name}: FP16 vs FP32 SQNR {sqnr:.1f} dB"  # measured 68 (text encoder), 75 (VAE)
        assert (tmp_path / "cpu" / name / "1" / "model.py").is_file()


def _with_metadata(graph, dest, **props):
    model = onnx.load(str(graph))
    for p in model.metadata_props:
        if p.key in props:
            p.value = props[p.key]
    onnx.save(model, str(dest))
    return dest


def test_other_pipeline_class_is_refused_in_one_line_and_nothing_is_written(sd_export, tmp_path, capsys):
    _, graph = sd_export
    flux = _with_metadata(graph, tmp_path / "flux.onnx", **{"dilatequant.pipeline_class": "FluxPipeline"})
    assert _cli(triton_main, "--onnx", flux, "--repo", tmp_path / "repo", "--kind", "cpu") == 2
    _one_error(capsys, "'FluxPipeline'", "StableDiffusionPipeline and StableDiffusionXLPipeline")
    # an SDXL graph with an SD 1.x folder: the folder must be the pipeline class the graph was calibrated on
    xl = _with_metadata(graph, tmp_path / "xl.onnx", **{"dilatequant.pipeline_class": "StableDiffusionXLPipeline"})
    assert _cli(triton_main, "--onnx", xl, "--repo", tmp_path / "repo", "--kind", "cpu") == 2
    _one_error(capsys, "is not a StableDiffusionXLPipeline folder", "--model FOLDER")
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo.*"))


def test_other_pipeline_weights_are_refused(sd_export, tmp_path, capsys):
    from sd_pipelines import save, tiny_sd2

    _, graph = sd_export
    other = save(tiny_sd2(), tmp_path / "tiny-sd2")
    assert _cli(triton_main, "--onnx", graph, "--repo", tmp_path / "repo", "--kind", "cpu", "--model", other) == 2
    _one_error(capsys, "calibrated on other weights", "--model FOLDER")
    unmarked = _with_metadata(graph, tmp_path / "unmarked.onnx", **{"dilatequant.fp_fingerprint": ""})
    assert _cli(triton_main, "--onnx", unmarked, "--repo", tmp_path / "repo", "--kind", "cpu", "--model", other) == 2
    _one_error(capsys, "encoder_hidden_states is [16, 64] per sample", "makes [16, 32]")
    assert _cli(triton_main, "--onnx", graph, "--repo", tmp_path / "repo", "--kind", "cpu", "--model",
                tmp_path / "missing") == 2
    _one_error(capsys, "cannot load the pipeline folder", "--model FOLDER")
    (tmp_path / "other.pt").write_bytes(b"not the q.pt")
    assert _cli(triton_main, "--onnx", graph, "--repo", tmp_path / "repo", "--kind", "cpu", "--ckpt",
                tmp_path / "other.pt") == 2
    _one_error(capsys, "is not the checkpoint this graph was exported from")
    assert _cli(triton_main, "--onnx", graph, "--repo", tmp_path / "repo", "--kind", "cpu", "--ckpt",
                tmp_path / "missing.pt") == 2
    _one_error(capsys, "does not exist")
    assert not (tmp_path / "repo").exists()


def test_a_failure_while_writing_leaves_nothing(sd_export, tmp_path, monkeypatch):
    from dilatequant.core.errors import UserError
    from dilatequant.engines.triton import sd_repository

    _, graph = sd_export

    def broken(*a, **k):
        raise UserError("planted failure in the VAE export")

    monkeypatch.setattr(sd_repository, "export_vae_decoder", broken)
    with pytest.raises(UserError, match="planted"):
        write_repository(RepositoryConfig(repo=tmp_path / "repo", onnx=graph, kind="cpu"))
    assert list(tmp_path.iterdir()) == []


def test_cli_summary_names_the_prompt_models(sd_export, tmp_path, capsys):
    _, graph = sd_export
    assert _cli(triton_main, "--onnx", graph, "--repo", tmp_path / "repo", "--kind", "cpu") == 0
    out = capsys.readouterr().out
    assert "prompts: text_encoder -> unet -> vae_decoder" in out
    header = (tmp_path / "repo" / "pipeline" / "config.pbtxt").read_text()
    for name in ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "GUIDANCE_SCALE", "NUM_IMAGES", "HEIGHT", "WIDTH",
                 "SCHEDULER", "IMAGES"):
        assert f"#   {name}" in header or f", {name}" in header, name
    assert "default 3.0" in header  # sd-digits' own guidance (dilatequant.json), as dq-generate's default
    from dilatequant.core.models import embedded_model_dir

    copied = tmp_path / "repo" / "pipeline" / "1" / "tokenizer"
    shipped = embedded_model_dir("sd-digits") / "tokenizer"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert all((copied / p.name).read_bytes() == p.read_bytes() for p in shipped.iterdir())
