"""TensorRTRunner on a stand-in for Polygraphy's TrtRunner (no GPU): copied outputs, the plan's optimization profile
(sizes refused, over-size batches split), and plans from another TensorRT release or GPU refused in one line."""
import json
import types

import pytest
import torch

from dilatequant.core.errors import UserError
from dilatequant.engines.tensorrt import runner as trt_runner
from dilatequant.engines.tensorrt.env import GpuInfo, plan_mismatch
from dilatequant.engines.tensorrt.plan_files import sidecar_path
from dilatequant.engines.tensorrt.profiles import EngineProfile
from dilatequant.engines.tensorrt.runner import TensorRTRunner

TIMESTEPS = [750, 500, 250, 0]


def _props(conditional=False, sample_shape=(1, 8, 8)):
    return {"dilatequant.timesteps": json.dumps(TIMESTEPS), "dilatequant.num_steps": "4",
            "dilatequant.conditional": str(conditional).lower(), "dilatequant.sample_shape": json.dumps(sample_shape),
            "dilatequant.t_index_input": "true"}


def _profile(lo, hi, spatial=(1, 8, 8), cond=False):
    p = {"sample": {"min": [lo, *spatial], "opt": [hi, *spatial], "max": [hi, *spatial], "source": "flags"},
         "timestep": {"min": [lo], "opt": [hi], "max": [hi]}, "t_index": {"min": [lo], "opt": [hi], "max": [hi]}}
    if cond:
        p["encoder_hidden_states"] = {"min": [lo, 2, 16], "opt": [hi, 2, 16], "max": [hi, 2, 16]}
    return p


def _plan(tmp_path, profile=None, conditional=False, tensorrt="11.4.0.106", gpu=None, sample_shape=(1, 8, 8)):
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"PLAN")
    side = {"metadata": _props(conditional, sample_shape), "tensorrt": tensorrt,
            "gpu": gpu or {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "source": "nvidia-smi"}}
    if profile is not None:
        side["profiles"] = [profile]
    sidecar_path(plan).write_text(json.dumps(side))
    return plan


def _expected(sample, t_index):
    return sample * 2 + t_index.float().view(-1, 1, 1, 1)


class FakeTrtRunner:
    """Polygraphy 0.53's TrtRunner as far as TensorRTRunner sees it: infer() with torch inputs copies each output into
    one host buffer per output name (`host_output_buffers`, reused and resized from call to call) and returns a
    view of it, exactly as `_get_array_on_cpu` + `util.array.view` do."""

    def __init__(self, engine, name=None):
        self.engine, self.name, self.calls, self.returned = engine, name, [], []
        self.host_output_buffers = {}
        FakeTrtRunner.last = self

    def activate(self):
        self.engine()  # EngineFromBytes is a loader: called on activation

    def deactivate(self):
        pass

    def get_input_metadata(self, use_numpy_dtypes=None):
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        assert use_numpy_dtypes is False, "the numpy-dtype form is deprecated in Polygraphy 0.53"
        return (TensorMetadata().add("sample", DataType.FLOAT32, (-1, 1, 8, 8))
                .add("timestep", DataType.INT64, (-1,)).add("t_index", DataType.INT64, (-1,)))

    def infer(self, feeds, copy_outputs_to_host=True):
        from polygraphy import util
        from polygraphy.datatype import DataType

        assert copy_outputs_to_host
        self.calls.append({k: tuple(v.shape) for k, v in feeds.items()})
        result = _expected(feeds["sample"], feeds["t_index"]).float().contiguous()
        raw = self.host_output_buffers.get("noise_pred")
        if raw is None:
            raw = torch.empty((result.numel() * 4,), dtype=torch.uint8)
        raw = util.array.resize_or_reallocate(raw, (result.numel() * 4,))
        self.host_output_buffers["noise_pred"] = raw
        raw.copy_(result.view(-1).view(torch.uint8))
        out = util.array.view(raw, DataType.FLOAT32, tuple(result.shape))
        self.returned.append(out.data_ptr())
        return {"noise_pred": out}


@pytest.fixture
def fake_polygraphy(monkeypatch):
    """TensorRT 11.4 and an H100 'found', Polygraphy's TrtRunner/EngineFromBytes replaced, inputs kept on the CPU."""
    import polygraphy.backend.trt as ptrt

    loaded = []

    def engine_from_bytes(data):
        loaded.append(bytes(data))
        return lambda: types.SimpleNamespace(serialized=bytes(data))

    trt = types.SimpleNamespace(__version__="11.4.0.106")
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "test")
    monkeypatch.setattr(trt_runner, "require_trt_and_gpu", lambda: (trt, gpu))
    monkeypatch.setattr(ptrt, "EngineFromBytes", engine_from_bytes)
    monkeypatch.setattr(ptrt, "TrtRunner", FakeTrtRunner)
    monkeypatch.setattr(TensorRTRunner, "FEED_DEVICE", "cpu")
    return types.SimpleNamespace(loaded=loaded, trt=trt, gpu=gpu)


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    ti = torch.arange(batch) % 4
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor(TIMESTEPS)[ti], ti


def test_a_second_infer_does_not_overwrite_the_first(tmp_path, fake_polygraphy):
    runner = TensorRTRunner(_plan(tmp_path, _profile(1, 16)))
    x1, ts1, ti1 = _inputs(3, seed=1)
    x2, ts2, ti2 = _inputs(3, seed=2)
    out1 = runner.infer(x1, ts1, ti1)
    out2 = runner.infer(x2, ts2, ti2)
    fake = FakeTrtRunner.last
    assert fake.returned[0] == fake.returned[1], "the stand-in reuses its host buffer, as Polygraphy's does"
    assert torch.equal(out1, _expected(x1, ti1)) and torch.equal(out2, _expected(x2, ti2))
    assert out1.data_ptr() not in fake.returned and out1.dtype == torch.float32
    assert fake_polygraphy.loaded == [b"PLAN"]


def test_a_batch_above_the_profile_is_split_into_calls_that_fit(tmp_path, fake_polygraphy):
    runner = TensorRTRunner(_plan(tmp_path, _profile(1, 4)))
    x, ts, ti = _inputs(10)
    out = runner.infer(x, ts, ti)
    assert [c["sample"][0] for c in FakeTrtRunner.last.calls] == [4, 3, 3]
    assert all(c["t_index"] == (c["sample"][0],) for c in FakeTrtRunner.last.calls)
    assert torch.equal(out, _expected(x, ti))  # chunks in order, none overwritten by the next


def test_a_classifier_free_guidance_batch_is_split_for_any_sampler(tmp_path, fake_polygraphy):
    """The sampler doubles the batch ([uncond; cond]); on a plan built for at most 4 it still runs, with the
    same images as on a plan that takes the whole batch."""
    from conftest import tiny_cond

    from dilatequant.core.sampling import sample

    model = tiny_cond()
    images = []
    for hi in (4, 16):
        (tmp_path / str(hi)).mkdir()
        runner = TensorRTRunner(_plan(tmp_path / str(hi), _profile(1, hi, cond=True), conditional=True))
        res = sample(model, runner, num_samples=3, steps=4, labels=torch.tensor([1, 2, 3]), guidance_scale=2.0,
                     progress=False, decode=False)
        images.append(res.images)
        if hi == 4:
            assert {c["sample"][0] for c in FakeTrtRunner.last.calls} == {3}  # 6 = [uncond; cond] -> 3 + 3
            assert {c["encoder_hidden_states"] for c in FakeTrtRunner.last.calls} == {(3, 2, 16)}
        else:
            assert {c["sample"][0] for c in FakeTrtRunner.last.calls} == {6}
    assert torch.equal(images[0], images[1])


def test_sizes_outside_the_profile_are_refused_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_runner, "require_trt_and_gpu", lambda: pytest.fail("TensorRT must not be reached"))
    runner = TensorRTRunner(_plan(tmp_path, _profile(2, 8)))
    x, ts, ti = _inputs(1)
    with pytest.raises(UserError) as err:
        runner.infer(x, ts, ti)
    assert str(err.value).startswith("input 'sample' batch is 1, outside the engine's optimization profile 2..8")
    assert "unet.plan.json" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "hw").mkdir()
    runner = TensorRTRunner(_plan(tmp_path / "hw", _profile(1, 8, spatial=(1, 16, 16))))
    x, ts, ti = _inputs(2)
    with pytest.raises(UserError, match=r"input 'sample' dimension 2 is 8, outside the engine's optimization profile "
                                         r"16\.\.16 .*--min-shapes/--max-shapes covering sample:2x1x8x8"):
        runner.infer(x, ts, ti)


def test_profile_chunks_are_even_and_within_the_range():
    p = EngineProfile.from_sidecar({"profiles": [_profile(2, 8)]}, "u.plan.json")
    assert p.batch_range == (2, 8)
    assert p.chunks(8) == [(0, 8)] and p.chunks(9) == [(0, 5), (5, 9)] and p.chunks(17) == [(0, 6), (6, 12), (12, 17)]
    with pytest.raises(UserError, match=r"a batch of 6 cannot be split into calls of 4\.\.5 .*--min-shapes"):
        EngineProfile.from_sidecar({"profiles": [_profile(4, 5)]}).chunks(6)  # 3 + 3 < 4
    with pytest.raises(UserError, match="batch is 9, outside the engine's optimization profile 2..8"):
        p.check({"sample": (9, 1, 8, 8)}, split_batch=False)
    assert EngineProfile.from_sidecar({"metadata": {}}) is None  # an old sidecar: nothing to check
    with pytest.raises(UserError, match="malformed optimization profile"):
        EngineProfile.from_sidecar({"profiles": [{"sample": {"min": [1]}}]}, "x.json")


@pytest.mark.parametrize("built, gpu, needle", [
    ("11.3.0.1", None, "it was built with TensorRT 11.3.0.1 and this is TensorRT 11.4.0.106"),
    ("11.4.0.106", {"name": "NVIDIA L40S", "compute_capability": "8.9"},
     "it was built on NVIDIA L40S (compute capability 8.9) and this is NVIDIA H100 80GB HBM3 (compute capability 9.0)"),
])
def test_a_plan_from_another_tensorrt_or_gpu_is_one_line(tmp_path, fake_polygraphy, built, gpu, needle):
    runner = TensorRTRunner(_plan(tmp_path, _profile(1, 8), tensorrt=built, gpu=gpu))
    x, ts, ti = _inputs(2)
    with pytest.raises(UserError) as err:
        runner.infer(x, ts, ti)
    msg = str(err.value)
    assert msg.startswith(f"engine '{tmp_path / 'unet.plan'}' cannot run here: {needle}") and "\n" not in msg
    assert "rebuild it here with dq-build-engine" in msg
    assert fake_polygraphy.loaded == []  # refused before deserializing


def test_plan_mismatch_compares_release_and_architecture_only():
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert plan_mismatch("p", "11.4.0.106", h100, "11.4.0.110", GpuInfo("NVIDIA H100 NVL", "9.0", "torch")) is None
    assert plan_mismatch("p", None, None, "11.4.0", h100) is None  # an old sidecar: not judged
    assert "TensorRT 10.13.0 and this is TensorRT 11.4.0" in plan_mismatch("p", "10.13.0", h100, "11.4.0", h100)


def test_a_plan_tensorrt_cannot_load_is_one_line(tmp_path, fake_polygraphy, monkeypatch):
    import polygraphy.backend.trt as ptrt
    from polygraphy.exception import PolygraphyException

    from dilatequant.engines.tensorrt import env as trt_env

    def broken(data):
        def load():
            raise PolygraphyException("Could not deserialize engine. See log for details.")
        return load

    monkeypatch.setattr(ptrt, "EngineFromBytes", broken)
    runner = TensorRTRunner(_plan(tmp_path, _profile(1, 8)))
    x, ts, ti = _inputs(2)
    with pytest.raises(UserError, match=r"^TensorRT could not load engine .*Could not deserialize engine.*rebuild it "
                                        r"here with dq-build-engine$"):
        runner.infer(x, ts, ti)

    def cuda_failure(data):
        def load():
            raise TypeError("pybind11::init(): factory function returned nullptr; [TRT] CUDA initialization failure "
                            "with error: 35")
        return load

    monkeypatch.setattr(ptrt, "EngineFromBytes", cuda_failure)
    monkeypatch.setattr(trt_env, "tensorrt_cuda_major", lambda: 13)
    monkeypatch.setattr(trt_env, "driver_cuda_version", lambda: (12, 8))
    runner = TensorRTRunner(_plan(tmp_path, _profile(1, 8)))
    with pytest.raises(UserError, match=r"^TensorRT is the CUDA 13 build \(tensorrt-cu13\) but the NVIDIA driver here "
                                        r"supports CUDA up to 12\.8; .*dilatequant\[trt-cu12\]"):
        runner.infer(x, ts, ti)
