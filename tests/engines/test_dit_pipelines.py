"""Diffusion-transformer pipeline folders end to end: dq-calibrate with prompts -> dq-export (TensorRT rules,
layer-wise parity at every t_index) -> the graph as pipe.transformer inside diffusers' own StableDiffusion3Pipeline,
FluxPipeline and PixArtSigmaPipeline (dq-generate), on tiny random SD3, FLUX.1-dev and PixArt-Sigma folders."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import call_cli
from dit_pipelines import IMAGE_SIZE, make

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.cli import calibrate_main, export_main, generate_main
from dilatequant.core.models import load_model
from dilatequant.engines.generate import GenerateConfig, pipeline_call_kwargs, run_pipeline
from dilatequant.engines.onnxruntime.runner import OrtRunner
from dilatequant.engines.pytorch.diffusers_transformer import QuantizedTransformer
from dilatequant.engines.pytorch.runner import TorchRunner

PROMPTS = "a red cat\na blue dog\na green tree\na yellow car\n"
FAMILIES = ("sd3", "flux", "pixart")
STEPS = 4
SIZE = f"{IMAGE_SIZE}x{IMAGE_SIZE}"
COND = {"sd3": ("encoder_hidden_states", "pooled_projections"),
        "flux": ("encoder_hidden_states", "pooled_projections", "guidance"),
        "pixart": ("encoder_hidden_states", "encoder_attention_mask")}


_cli = call_cli


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Each folder calibrated at W8A8 (SD3 with one BKD iteration per block, FLUX and PixArt PTQ) and exported."""
    root = tmp_path_factory.mktemp("dit-chain")
    (root / "prompts.txt").write_text(PROMPTS)
    out = {"root": root}
    for name in FAMILIES:
        folder = make(name, root / name)
        ckpt, onnx = root / f"{name}.q.pt", root / f"{name}.onnx"
        bkd = ["--iters", "1"] if name == "sd3" else ["--no-bkd"]
        assert _cli(calibrate_main, "--model", folder, "--bits", "W8A8", "--sym", "--steps", STEPS, "--calib-samples",
                    16, "--prompts", root / "prompts.txt", "--resolution", SIZE, "--out", ckpt, *bkd) == 0
        assert _cli(export_main, "--ckpt", ckpt, "--onnx", onnx) == 0  # rules + layer-wise and end-to-end parity
        out[name] = (folder, ckpt, onnx)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_export_takes_each_family_inputs_and_matches_layer_by_layer_at_every_t_index(chain, name):
    folder, ckpt, onnx = chain[name]
    report = json.loads(onnx.with_suffix(".onnx.export.json").read_text())
    assert report["trt_rules"] == "passed"
    lp = report["layer_parity"]
    assert lp["passed"] and lp["max_level_diff"] <= 1 and not lp["unmatched"], lp["failures"]
    assert lp["t_index_values"] == STEPS and all(row["t_index_covered"] == STEPS for row in lp["per_layer"])
    ck = load_checkpoint(ckpt)
    assert lp["layers"] == len(ck.qunet.layers())  # every quantized Linear found in the graph
    runner = OrtRunner(onnx)
    model = load_model(folder, (IMAGE_SIZE, IMAGE_SIZE))
    assert runner.metadata.pipeline_class == model.pipeline_class and runner.metadata.cond_inputs == COND[name]
    assert runner.input_names == ["sample", "timestep", "t_index", *COND[name]]
    assert len(set(ck.timesteps)) == STEPS and list(runner.metadata.timesteps) == list(ck.timesteps)
    # SD3 and FLUX graphs take any latent size of their patch multiple; PixArt's exporter fixes the calibrated one
    assert runner.metadata.spatial_multiple == (0 if name == "pixart" else 2)


class Recording(TorchRunner):
    """The fake-quant runner, recording the t_index of every call (or answering every call with t_index 0)."""

    def __init__(self, base: TorchRunner, freeze: bool = False):
        super().__init__(base.metadata, base._build, False)
        self.freeze, self.seen = freeze, []

    def _run(self, sample, timestep, t_index, cond):
        self.seen.append(t_index.tolist())
        return super()._run(sample, timestep, torch.zeros_like(t_index) if self.freeze else t_index, cond)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_graph_as_pipe_transformer_tracks_fake_quant_and_fp(chain, name, tmp_path):
    """The graph replaces pipe.transformer in the family's own pipeline: on the calibrated schedule every call gets
    its step's t_index, the images equal the fake-quant model's (same pipeline, same seed) to float precision, and
    dq-generate's stay close to the FP pipeline's. Calling every step with t_index 0 gives other images."""
    folder, ckpt, onnx = chain[name]
    model = load_model(folder, (IMAGE_SIZE, IMAGE_SIZE))
    cfg = GenerateConfig(model=str(folder), runtime=onnx, prompt="a red cat", steps=STEPS, seed=3)
    graph = run_pipeline(model, QuantizedTransformer(OrtRunner(onnx), model.denoiser.config, model.pipeline_class), cfg)
    recorded = Recording(TorchRunner.fake_quant(ckpt))
    fake = run_pipeline(model, QuantizedTransformer(recorded, model.denoiser.config, model.pipeline_class), cfg)
    batch = 1 if name == "flux" else 2  # FLUX-dev: embedded guidance, no unconditional batch
    assert recorded.seen == [[i] * batch for i in range(STEPS)]
    from dilatequant.core.metrics import psnr_db

    assert psnr_db(graph, fake) >= 60, psnr_db(graph, fake)
    frozen = Recording(TorchRunner.fake_quant(ckpt), freeze=True)
    stale = run_pipeline(model, QuantizedTransformer(frozen, model.denoiser.config, model.pipeline_class), cfg)
    assert psnr_db(stale, fake) < psnr_db(graph, fake) - 20, (psnr_db(stale, fake), psnr_db(graph, fake))
    out = tmp_path / "img.png"
    assert _cli(generate_main, "--model", folder, "--onnx", onnx, "--prompt", "a red cat", "--steps", STEPS,
                "--size", SIZE, "--seed", 3, "--compare-fp", "--out", out) == 0
    r = json.loads(out.with_suffix(".png.json").read_text())
    assert r["denoiser_calls"] == STEPS and out.is_file()
    assert r["vs_fp"]["image_psnr_db"] >= 25, r["vs_fp"]


@pytest.mark.slow
def test_quantized_transformer_answers_what_pipelines_read(chain):
    for name in FAMILIES:
        folder, _, onnx = chain[name]
        model = load_model(folder, (IMAGE_SIZE, IMAGE_SIZE))
        t = QuantizedTransformer(OrtRunner(onnx), model.denoiser.config, model.pipeline_class)
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.config.in_channels == model.denoiser.config.in_channels
        assert t.config.out_channels == (4 if name == "pixart" else model.denoiser.config.out_channels)  # no sigma half
        with t.cache_context("cond"):  # FluxPipeline wraps every call in it
            pass
        assert pipeline_call_kwargs(model)["max_sequence_length"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_tensorrt_rtx_parses_and_builds_each_family(chain, name, tmp_path):
    """NVIDIA's parser and builder (TensorRT-RTX, CPU-only ahead of time) take each family's graph through
    dq-build-engine: every Q/DQ node becomes a Q/DQ layer, a plan is written for compute capability 8.9."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is the test extra's: pip install -e '.[test,rtx]'")
    import onnx as onnx_lib

    from dilatequant.engines.tensorrt.build import BuildConfig, build_engine

    _, _, graph = chain[name]
    engine = tmp_path / "transformer.plan"
    side = build_engine(BuildConfig(onnx=graph, engine=engine, backend="tensorrt-rtx", compute_capabilities="8.9"))
    assert side["backend"] == "tensorrt-rtx" and side["rules_check"] == "passed"
    assert engine.stat().st_size == side["engine_bytes"] > 10_000
    nodes = [n.op_type for n in onnx_lib.load(str(graph), load_external_data=False).graph.node]
    layers = side["network"]["layer_types"]
    assert (layers.get("QUANTIZE", 0), layers.get("DEQUANTIZE", 0)) == \
        (nodes.count("QuantizeLinear"), nodes.count("DequantizeLinear")) and nodes.count("QuantizeLinear") > 0
    assert [i["name"] for i in side["network"]["inputs"]] == ["sample", "timestep", "t_index", *COND[name]]
