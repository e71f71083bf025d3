"""A real Triton server (pytriton's bundled binary or tritonserver on PATH) on the CPU repository of a
tiny conditional model, on 127.0.0.1 only, always torn down: pipeline == direct ORT sampler, dynamic
batches mixing t_index == separate requests, bad requests -> errors naming the problem."""
import concurrent.futures as cf
import time

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.calibrate.checkpoint import load_checkpoint  # noqa: E402
from dilatequant.core.metrics import psnr_db  # noqa: E402
from dilatequant.core.guidance import DEFAULT_GUIDANCE  # noqa: E402
from dilatequant.core.sampling import sample  # noqa: E402
from dilatequant.dq_export.parity import ort_session  # noqa: E402
from dilatequant.engines.triton.client import InferenceFailed, connect, generate, infer  # noqa: E402
from dilatequant.engines.triton.repository import write_repository  # noqa: E402
from dilatequant.engines.triton.repository_config import RepositoryConfig  # noqa: E402
from dilatequant.engines.triton.server import TritonServer, unavailable_reason  # noqa: E402

from triton_fixtures import STEPS, ort_predictor, tiny_cond_export, to_uint8  # noqa: E402

if unavailable_reason():
    pytest.skip(f"no Triton server can start here: {unavailable_reason()}", allow_module_level=True)

TIMEOUT_S = 60
pytestmark = pytest.mark.slow  # one real server for the module: ~10 s on an idle machine plus the shared tiny export


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("triton")
    ckpt, graph = tiny_cond_export(tmp_path_factory)
    # 50 ms queue delay: two concurrent unet requests are sure to meet in one dynamic batch
    write_repository(RepositoryConfig(repo=tmp / "repo", onnx=graph, ckpt=ckpt, kind="cpu", max_batch=8,
                                      max_queue_delay_us=50_000, intra_op_threads=1, pipeline_instances=2))
    server = TritonServer(tmp / "repo", log_path=tmp / "server.log")
    request.addfinalizer(server.stop)  # registered before start: a server that hangs while loading still dies
    server.start(timeout_s=180)
    assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
    yield server, load_checkpoint(ckpt), graph


def _unet_inputs(ck, t_index, n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ehs = ck.model.class_encoder(torch.arange(n) % 10).detach().numpy()
    return {"sample": torch.randn(n, 1, 8, 8, generator=gen).numpy(),
            "timestep": np.array([[ck.timesteps[min(t, len(ck.timesteps) - 1)]] for t in t_index], np.int64),
            "t_index": np.array([[t] for t in t_index], np.int64), "encoder_hidden_states": ehs}


def _unet(server, arrays, protocol="http"):
    client = connect(server.http_url if protocol == "http" else server.grpc_url, protocol, TIMEOUT_S)
    try:
        return infer(client, protocol, "unet", arrays, ["noise_pred"], TIMEOUT_S)["noise_pred"]
    finally:
        client.close()


def _still_serving(server):
    """A good request succeeds after a bad one (server and model instances alive)."""
    img = generate(server.http_url, [4], seed=1, timeout_s=TIMEOUT_S)
    assert img.shape == (1, 8, 8, 1) and img.dtype == np.uint8


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pipeline_equals_direct_ort_sampler(served, protocol):
    server, ck, graph = served
    labels = [1, 3, 7]
    url = server.http_url if protocol == "http" else server.grpc_url
    got = generate(url, labels, seed=5, protocol=protocol, timeout_s=TIMEOUT_S)
    ref = sample(ck.model, ort_predictor(ort_session(graph)), num_samples=3, steps=STEPS, seed=5,
                 labels=torch.tensor(labels), guidance_scale=DEFAULT_GUIDANCE, progress=False).images
    ref = to_uint8(ref)
    assert got.shape == ref.shape == (3, 8, 8, 1) and got.dtype == np.uint8
    psnr = psnr_db(torch.tensor(got).float() / 127.5 - 1, torch.tensor(ref).float() / 127.5 - 1)
    assert psnr >= 40, f"PSNR {psnr:.1f} dB"


def test_other_step_counts_use_the_nearest_calibrated_t_index(served):
    server, ck, graph = served
    got = generate(server.grpc_url, [2, 8], seed=3, steps=7, guidance=1.0, protocol="grpc", timeout_s=TIMEOUT_S)
    ref = sample(ck.model, ort_predictor(ort_session(graph), ck.timesteps), num_samples=2, steps=7, seed=3,
                 labels=torch.tensor([2, 8]), guidance_scale=1.0, progress=False).images
    psnr = psnr_db(torch.tensor(got).float() / 127.5 - 1, torch.tensor(to_uint8(ref)).float() / 127.5 - 1)
    assert psnr >= 40, f"PSNR {psnr:.1f} dB"


def _stats(server):
    import tritonclient.http as http

    c = http.InferenceServerClient(server.http_url)
    try:
        s = c.get_inference_statistics("unet")["model_stats"][0]
    finally:
        c.close()
    return int(s["inference_count"]), int(s["execution_count"])


def _stats_after(server, inferences: int, timeout: float = 10.0):
    """The statistics once they count `inferences` requests: Triton may send a response before it updates
    them (a clean-clone CI run read both counters unchanged right after two answered requests)."""
    deadline = time.monotonic() + timeout
    while True:
        inf, exe = _stats(server)
        if inf >= inferences or time.monotonic() > deadline:
            return inf, exe
        time.sleep(0.05)


def test_mixed_t_index_batch_equals_separate_requests(served):
    server, ck, _ = served
    a, b = _unet_inputs(ck, [0], seed=1), _unet_inputs(ck, [3], seed=2)
    sep = [_unet(server, a), _unet(server, b)]
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    one_request = _unet(server, both, "grpc")
    np.testing.assert_allclose(one_request, np.concatenate(sep), rtol=0, atol=1e-5)
    # two concurrent requests with different t_index: Triton's dynamic batcher merges them into one execution
    inf0, exe0 = _stats(server)
    with cf.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: _unet(server, x), [a, b]))
    inf1, exe1 = _stats_after(server, inf0 + 2)
    assert (inf1 - inf0, exe1 - exe0) == (2, 1), "the two requests were not batched together"
    np.testing.assert_allclose(np.concatenate(outs), np.concatenate(sep), rtol=0, atol=1e-5)
    assert np.abs(sep[0] - sep[1]).max() > 1e-3  # the two t_index values really give different outputs


BAD_UNET = [
    ("t_index out of range", lambda x: x.update(t_index=np.array([[9]], np.int64)), r"t_index 9 out of range.*0\.\.3"),
    ("wrong shape", lambda x: x.update(sample=np.zeros((1, 1, 4, 4), np.float32)), r"sample.*shape|shape.*sample"),
    ("wrong dtype", lambda x: x.update(sample=np.zeros((1, 1, 8, 8), np.float64)), r"sample.*FP64|FP64.*FP32"),
    ("NaN in sample", lambda x: x["sample"].__setitem__((0, 0, 0, 0), np.nan), r"'sample' contains NaN"),
]


@pytest.mark.parametrize("case,edit,message", BAD_UNET, ids=[b[0] for b in BAD_UNET])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_unet_request_gets_an_error_and_server_keeps_serving(served, case, edit, message, protocol):
    server, ck, _ = served
    x = _unet_inputs(ck, [1])
    edit(x)
    with pytest.raises(InferenceFailed, match=message):
        _unet(server, x, protocol)
    _still_serving(server)


def test_bad_request_in_a_batch_does_not_fail_the_good_one(served):
    server, ck, _ = served
    good, bad = _unet_inputs(ck, [2], seed=4), _unet_inputs(ck, [5], seed=4)
    want = _unet(server, good)
    with cf.ThreadPoolExecutor(2) as pool:
        f_good, f_bad = pool.submit(_unet, server, good), pool.submit(_unet, server, bad)
        np.testing.assert_allclose(f_good.result(timeout=TIMEOUT_S), want, rtol=0, atol=1e-5)
        with pytest.raises(InferenceFailed, match="t_index 5 out of range"):
            f_bad.result(timeout=TIMEOUT_S)


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=[3, 12]), r"unknown class label 12: this model knows classes 0\.\.9"),
    (dict(labels=[-1]), r"unknown class label -1"),
    (dict(labels=[3], steps=0), r"STEPS 0 out of range"),
    (dict(labels=[3], guidance=float("nan")), r"GUIDANCE_SCALE must be a finite number"),
])
def test_bad_pipeline_request_gets_an_error_and_server_keeps_serving(served, kwargs, message):
    server, _, _ = served
    with pytest.raises(InferenceFailed, match=message):
        generate(server.http_url, seed=0, timeout_s=TIMEOUT_S, **kwargs)
    _still_serving(server)


def test_a_prompt_sent_to_a_class_label_pipeline_names_the_fix(served):
    from dilatequant.engines.triton.client import generate_from_prompt

    server, _, _ = served
    with pytest.raises(InferenceFailed, match=r"unexpected inference input 'PROMPT'.*pass --label N"):
        generate_from_prompt(server.http_url, "a handwritten digit seven", timeout_s=TIMEOUT_S)
    _still_serving(server)


def _listening(pid):
    """(ip, port) of the TCP sockets process `pid` listens on (Linux /proc; IPv6 too)."""
    import ipaddress
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)  # 32-bit words in host (little-endian) order
            if v6:
                addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                ip = str(addr.ipv4_mapped or addr)  # gRPC binds 127.0.0.1 as ::ffff:127.0.0.1
            else:
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            found.add((ip, int(hexport, 16)))
    return found


def test_server_listens_on_localhost_only(served):
    server, _, _ = served
    addrs = _listening(server.process.pid)
    assert {server.http_port, server.grpc_port} <= {p for _, p in addrs}, addrs
    assert {ip for ip, _ in addrs} == {"127.0.0.1"}, addrs
