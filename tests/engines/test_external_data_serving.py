"""An external-data graph (every weight in unet.onnx.data) through the runtimes: OrtRunner, dq-triton (the
`1/model.onnx/` folder form; the CPU form loaded by a real Triton server when one can start here) and
dq-build-engine (Polygraphy's NetworkFromOnnxPath -> parse_from_file, on the fake TensorRT 11)."""
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.dq_export.onnx_files import ENV_THRESHOLD, data_path, save_model
from dilatequant.dq_export.parity import ort_session
from dilatequant.engines.onnxruntime.runner import OrtRunner
from dilatequant.engines.tensorrt.build import BuildConfig, build_engine, fp16_graph_path

from test_trt_build import polygraphy_on_fake_trt  # noqa: F401  (the fixture: Polygraphy on a fake TensorRT 11)
from triton_fixtures import tiny_cond_export

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(q.pt, the single-file export, the same graph re-written with every weight in unet.onnx.data)."""
    ckpt, graph = tiny_cond_export(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("external")
    written = save_model(onnx.load(str(graph)), tmp / "unet.onnx", threshold=0)
    assert written["external_data"] == str(tmp / "unet.onnx.data")
    return ckpt, graph, tmp / "unet.onnx"


def _inputs(ck, n=4):
    gen = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(n, 1, 8, 8, generator=gen), "timestep": torch.tensor(ck.timesteps[:n]),
            "t_index": torch.arange(n), "encoder_hidden_states": ck.model.class_encoder(torch.arange(n) % 10).detach()}


def _ort(path, x):
    return ort_session(path).run(None, {k: v.numpy() for k, v in x.items()})[0]


def _weight_bytes(path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def test_ort_runner_reads_metadata_without_the_data_and_runs_the_same_numbers(graphs, tmp_path):
    ckpt, single, ext = graphs
    ck = load_checkpoint(ckpt)
    data = data_path(ext)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(ext), load_external_data=False).graph.initializer) >= 20
    away = tmp_path / "away.data"
    shutil.move(data, away)
    try:  # metadata comes from the graph file alone
        runner = OrtRunner(ext)
        assert runner.metadata.timesteps == (750, 500, 250, 0) and runner.metadata.conditional
    finally:
        shutil.move(away, data)
    x = _inputs(ck)
    out = runner(x["sample"], x["timestep"], x["t_index"], x["encoder_hidden_states"])
    assert torch.equal(out, torch.from_numpy(_ort(single, x)))  # the same weights, bit for bit


def test_triton_gpu_repository_holds_the_graph_and_its_data_in_a_model_onnx_folder(graphs, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed")
    from dilatequant.engines.triton.repository import validate_repository, write_repository
    from dilatequant.engines.triton.repository_config import RepositoryConfig

    ckpt, single, ext = graphs
    repo = tmp_path / "repo"
    s = write_repository(RepositoryConfig(repo=repo, onnx=ext, ckpt=ckpt, kind="gpu"))
    assert s["unet_backend"] == "onnxruntime_onnx"
    folder = repo / "unet" / "1" / "model.onnx"
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "unet.onnx.data"]
    assert (folder / "unet.onnx.data").read_bytes() == data_path(ext).read_bytes()
    assert validate_repository(repo) == []
    # what Triton's onnxruntime backend opens for a folder model.onnx: <folder>/model.onnx, data found beside it
    x = _inputs(load_checkpoint(ckpt))
    np.testing.assert_array_equal(_ort(folder / "model.onnx", x), _ort(single, x))


@pytest.mark.slow
def test_real_triton_server_serves_the_external_data_graph(graphs, tmp_path, request):
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
    from dilatequant.engines.triton.client import connect, infer
    from dilatequant.engines.triton.repository import write_repository
    from dilatequant.engines.triton.repository_config import RepositoryConfig
    from dilatequant.engines.triton.server import TritonServer, unavailable_reason

    if unavailable_reason():
        pytest.skip(f"no Triton server can start here: {unavailable_reason()}")
    ckpt, single, ext = graphs
    # the bundled server has the Python backend only: the CPU form (ORT in model.py, data beside model.onnx)
    write_repository(RepositoryConfig(repo=tmp_path / "repo", onnx=ext, ckpt=ckpt, kind="cpu", max_batch=8))
    assert (tmp_path / "repo" / "unet" / "1" / "unet.onnx.data").is_file()
    server = TritonServer(tmp_path / "repo", log_path=tmp_path / "server.log")
    request.addfinalizer(server.stop)
    server.start(timeout_s=180)
    x = _inputs(load_checkpoint(ckpt))
    arrays = {k: v.numpy() for k, v in x.items()}
    arrays["timestep"], arrays["t_index"] = arrays["timestep"][:, None], arrays["t_index"][:, None]
    client = connect(server.http_url, "http", TIMEOUT_S)
    try:
        got = infer(client, "http", "unet", arrays, ["noise_pred"], TIMEOUT_S)["noise_pred"]
    finally:
        client.close()
    np.testing.assert_allclose(got, _ort(single, x), rtol=0, atol=1e-5)


@pytest.fixture
def parser_reads_weights(polygraphy_on_fake_trt, monkeypatch):  # noqa: F811
    """The fake TensorRT, its parser also reading the weights from beside the graph as onnx-tensorrt does."""
    record = polygraphy_on_fake_trt()
    trt = sys.modules["tensorrt"]

    class DataReadingParser(trt.OnnxParser):
        def parse_from_file(self, path):
            record["weight_bytes"] = _weight_bytes(path)  # onnx.load resolves external data beside `path`
            return super().parse_from_file(path)

    monkeypatch.setattr(trt, "OnnxParser", DataReadingParser)
    return record


def test_build_engine_parses_the_external_data_graph_from_its_path(graphs, tmp_path, parser_reads_weights,
                                                                   monkeypatch):
    _, single, ext = graphs
    record = parser_reads_weights
    engine = tmp_path / "unet.plan"
    monkeypatch.setenv(ENV_THRESHOLD, "4096")  # the FP16 graph of the tiny UNet is "over 2 GB" too
    build_engine(BuildConfig(onnx=ext, engine=engine, fp16_fallback=True))
    fp16 = fp16_graph_path(engine)
    assert record["parsed"] == str(fp16)  # parse_from_file on the FP16 graph TensorRT builds, its data beside it
    assert data_path(fp16).is_file() and any(t.data_location == onnx.TensorProto.EXTERNAL for t in
                                             onnx.load(str(fp16), load_external_data=False).graph.initializer)
    assert record["weight_bytes"] == _weight_bytes(fp16) > 0
    build_engine(BuildConfig(onnx=ext, engine=engine))
    assert record["parsed"] == str(ext) and record["weight_bytes"] == _weight_bytes(single)
    assert not fp16.exists() and not data_path(fp16).exists()  # the FP16 graph of the previous build, data included
