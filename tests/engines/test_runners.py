"""Runners: outputs against the PyTorch models, metadata, and every input check."""
import json

import pytest
import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.core.metrics import psnr_db, sqnr_db
from dilatequant.core.sampling import sample, sampling_timesteps
from dilatequant.engines.onnxruntime.runner import OrtRunner
from dilatequant.engines.pytorch.runner import TorchRunner
from dilatequant.engines.runners import open_runner
from dilatequant.engines.tensorrt.env import require_trt_and_gpu
from dilatequant.engines.tensorrt.plan_files import sidecar_path
from dilatequant.engines.tensorrt.runner import TensorRTRunner

from tiny_runtime import STEPS, get


@pytest.fixture(scope="module")
def uncond():
    return get("uncond")


@pytest.fixture(scope="module")
def cond():
    return get("cond")


def _inputs(meta, batch=3, seed=0, cond_model=None):
    g = torch.Generator().manual_seed(seed)
    ti = torch.arange(batch) % meta.num_steps
    ts = torch.tensor([meta.timesteps[i] for i in ti])
    c = None
    if cond_model is not None:
        with torch.no_grad():
            c = cond_model.class_encoder(torch.arange(batch) % 10)
    return torch.randn(batch, *meta.sample_shape, generator=g), ts, ti, c


def test_ort_matches_fake_quant_and_reads_graph_metadata(uncond):
    model, ck, onnx_path = uncond
    ort, fq = open_runner(onnx_path), open_runner(ck)
    assert isinstance(ort, OrtRunner) and isinstance(fq, TorchRunner)
    m = ort.metadata
    assert (m.runtime, m.device, m.dtype, m.num_steps, m.conditional, m.has_t_index) == \
        ("onnxruntime", "cpu", "fp32", STEPS, False, True)
    assert list(m.timesteps) == sampling_timesteps(model, STEPS) == [750, 500, 250, 0]
    assert m.sample_shape == (1, 8, 8) and fq.metadata.timesteps == m.timesteps
    assert ort.session is None  # lazy: nothing loaded until the first call
    x, ts, ti, _ = _inputs(m, batch=8)
    out, ref = ort.infer(x, ts, ti), fq.infer(x, ts, ti)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (8, 1, 8, 8)
    # end to end a quantized UNet is discontinuous: another kernel's last bit can flip a rounding tie in one
    # sample (30.8 dB in 1 of 8 on a CPU without VNNI, where ORT runs the graph in float); most samples are
    # exact, and a wrong t_index puts every sample under 25 dB
    per_sample = sorted(sqnr_db(out[i], ref[i]) for i in range(len(out)))
    assert per_sample[len(out) // 2] >= 50 and per_sample[0] >= 25, per_sample


def test_conditional_fake_quant_runner_is_close_to_fp(cond):
    model, ck, _ = cond
    fq = open_runner(ck)
    fp = TorchRunner.fp(model, fq.metadata.timesteps)
    assert fq.metadata.conditional and fq.metadata.cond_dim == 16 and fq.metadata.has_t_index
    args = _inputs(fq.metadata, batch=4, cond_model=model)
    with torch.no_grad():
        ref = model.unet(args[0], args[1], encoder_hidden_states=args[3]).sample
    assert torch.equal(fp(*args), ref)
    assert 10 < sqnr_db(fq(*args), ref) < 60  # W8A8 fake-quant: close to FP, not equal


def test_fp_runner_equals_unet_and_ignores_t_index(uncond):
    model, ck, _ = uncond
    fp = TorchRunner.fp(model, load_checkpoint(ck).timesteps)
    x, ts, ti, _ = _inputs(fp.metadata)
    with torch.no_grad():
        ref = model.unet(x, ts).sample
    assert torch.equal(fp.infer(x, ts, ti), ref)
    assert torch.equal(fp.infer(x, ts, torch.zeros_like(ti)), ref)
    assert not fp.metadata.has_t_index and fp.metadata.name == "torch-fp"


def test_fp16_runner_is_close_to_fp32(uncond):
    model, ck, _ = uncond
    fp32 = TorchRunner.fp(model, load_checkpoint(ck).timesteps)
    fp16 = TorchRunner.fp(model, load_checkpoint(ck).timesteps, dtype="fp16")
    args = _inputs(fp32.metadata)
    out = fp16(*args)
    assert out.dtype == torch.float32 and sqnr_db(out, fp32(*args)) > 25
    assert next(model.unet.parameters()).dtype == torch.float32  # the shared model was not cast


def test_sampler_runs_on_any_runner(uncond):
    model, ck, onnx_path = uncond
    ort, fq = open_runner(onnx_path), open_runner(ck)
    a = sample(load_checkpoint(ck).model, ort, num_samples=3, steps=STEPS, progress=False).images
    b = sample(load_checkpoint(ck).model, fq, num_samples=3, steps=STEPS, progress=False).images
    # DDIM amplifies single rounding flips over the steps; per-step parity is asserted at >= 50 dB above
    assert a.shape == (3, 1, 8, 8) and psnr_db(a, b) >= 30


@pytest.mark.parametrize("bad, needle", [
    (dict(t_index=torch.tensor([0, 1, 4])), "t_index in [0, 4)"),
    (dict(t_index=torch.tensor([-1, 0, 0])), "t_index out of range"),
    (dict(t_index=torch.tensor([0.0, 1.0, 2.0])), "t_index must be an integer"),
    (dict(timestep=torch.tensor([750.0, 500.0, 250.0])), "timestep must be an integer"),
    (dict(timestep=torch.tensor([750, 500])), "batch mismatch"),
    (dict(sample=torch.randn(3, 1, 9, 9)), "[B, 1, 8, 8] (or H, W multiples of 2)"),
    (dict(sample=torch.randn(3, 2, 8, 8)), "[B, 1, 8, 8]"),
    (dict(sample=torch.randn(1, 8, 8)), "[B, 1, 8, 8]"),
    (dict(sample=torch.zeros(3, 1, 8, 8, dtype=torch.int64)), "float"),
    (dict(cond=torch.randn(3, 2, 16)), "unconditional"),
])
def test_every_runner_rejects_bad_inputs(uncond, bad, needle):
    model, ck, onnx_path = uncond
    for runner in (open_runner(onnx_path), open_runner(ck), TorchRunner.fp(model, [750, 500, 250, 0])):
        x, ts, ti, c = _inputs(runner.metadata)
        args = dict(sample=x, timestep=ts, t_index=ti, cond=c) | bad
        with pytest.raises(UserError, match=None) as err:
            runner.infer(args["sample"], args["timestep"], args["t_index"], args["cond"])
        assert needle in str(err.value), (runner, str(err.value))


def test_conditional_runner_needs_cond_of_right_shape(cond):
    model, ck, _ = cond
    for runner in (open_runner(ck), TorchRunner.fp(model, [750, 500, 250, 0])):
        x, ts, ti, c = _inputs(runner.metadata, cond_model=model)
        with pytest.raises(UserError, match="is conditional: pass cond"):
            runner.infer(x, ts, ti)
        with pytest.raises(UserError, match="batch mismatch"):
            runner.infer(x, ts, ti, c[:2])
        with pytest.raises(UserError, match=r"\[B, L, D\]"):
            runner.infer(x, ts, ti, c[0])
        with pytest.raises(UserError, match="last dimension 16"):
            runner.infer(x, ts, ti, torch.randn(3, 2, 8))


def test_open_runner_errors(tmp_path, uncond):
    with pytest.raises(UserError, match="cannot tell the runtime"):
        open_runner(tmp_path / "model.bin")
    with pytest.raises(UserError, match="does not exist; write one with dq-export"):
        open_runner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x01not a protobuf at all")
    with pytest.raises(UserError, match="not a readable ONNX model|not written by dq-export"):
        open_runner(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="unknown device"):
        open_runner(uncond[1], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            open_runner(uncond[1], device="cuda")


def test_onnx_without_dilatequant_metadata_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["sample"], ["noise_pred"])], "g",
                          [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, [1, 1, 8, 8])])
    onnx.save(helper.make_model(g), str(tmp_path / "plain.onnx"))
    with pytest.raises(UserError, match="dilatequant.timesteps.*dq-export"):
        open_runner(tmp_path / "plain.onnx")


def test_engine_runner_reads_sidecar_and_needs_tensorrt(tmp_path, uncond):
    import onnx

    _, _, onnx_path = uncond
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"not a real engine")
    with pytest.raises(UserError, match="no sidecar"):
        open_runner(plan)
    sidecar_path(plan).write_text(json.dumps({"metadata": props, "tensorrt_version": "11.0"}))
    runner = open_runner(plan)
    assert isinstance(runner, TensorRTRunner)
    assert runner.metadata.timesteps == (750, 500, 250, 0) and runner.metadata.device == "cuda"
    assert runner.input_names == ["sample", "timestep", "t_index"]
    x, ts, ti, _ = _inputs(runner.metadata)
    with pytest.raises(UserError, match=r"t_index in \[0, 4\)"):  # validated before TensorRT is touched
        runner.infer(x, ts, ti + 4)
    try:
        require_trt_and_gpu()
    except UserError as err:
        assert "dilatequant[trt]" in str(err) or "GPU" in str(err)
        with pytest.raises(UserError, match="dilatequant\\[trt\\]|GPU"):
            runner.infer(x, ts, ti)


def test_tensorrt_engine_inference(tmp_path, uncond):
    try:
        require_trt_and_gpu()
    except UserError as err:
        pytest.skip(f"needs TensorRT 11 and a GPU: {err}")
    # On a GPU machine: build the tiny graph with Polygraphy and compare with ONNX Runtime.
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    import onnx

    _, _, onnx_path = uncond
    profile = Profile()
    for name, shape in (("sample", (1, 1, 8, 8)), ("timestep", (1,)), ("t_index", (1,))):
        profile.add(name, min=shape, opt=(4, *shape[1:]), max=(8, *shape[1:]))
    data = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), CreateConfig(profiles=[profile]))()
    plan = tmp_path / "unet.plan"
    plan.write_bytes(bytes(data))
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    sidecar_path(plan).write_text(json.dumps({"metadata": props}))
    trt, ort = open_runner(plan), open_runner(onnx_path)
    args = _inputs(ort.metadata, batch=4)
    assert sqnr_db(trt(*args), ort(*args)) >= 30
