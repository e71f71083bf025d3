"""Faults while serving, with a real server: `dq-serve` (a subprocess, as users run it) on the CPU repository of a tiny
conditional model, 127.0.0.1 only. A killed Python-backend stub (the unet's; one of the two pipeline instances'), a
killed tritonserver, client retries that succeed, a deadline that expires. Each
fault must give one log line when found and one when recovered, readiness that turns false and back, and requests
that succeed with retries (every failed attempt a clear transient answer, never a hang).

One dq-serve for the module; the tests run in file order and each leaves the server serving."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("tritonclient.http", reason="tritonclient[http,grpc] not installed: pip install 'dilatequant[serve]'")

from dilatequant.cli import client_main  # noqa: E402
from dilatequant.engines.triton.client import fetch_images, pipeline_inputs  # noqa: E402
from dilatequant.engines.triton.repository import RepositoryConfig, write_repository  # noqa: E402
from dilatequant.engines.triton.retry import RetriesExhausted, RetryPolicy  # noqa: E402
from dilatequant.engines.triton.server import free_port, unavailable_reason  # noqa: E402
from dilatequant.engines.triton.stubs import alive, children, stubs_of  # noqa: E402

from conftest import call_cli  # noqa: E402
from triton_fixtures import tiny_cond_export  # noqa: E402

if unavailable_reason():
    pytest.skip(f"no Triton server can start here: {unavailable_reason()}", allow_module_level=True)

pytestmark = pytest.mark.slow  # one dq-serve for the module; the server restart and the pipeline reload dominate
START_S = 240
RETRY = RetryPolicy(retries=8, deadline_s=120)


class DqServe:
    """`python -m dilatequant.cli serve ...` with its stderr (the fault log) in a file."""

    def __init__(self, repo, tmp):
        self.http, self.grpc, self.health_port = free_port(), free_port(), free_port()
        self.stderr_path = tmp / "dq-serve.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dilatequant.cli", "serve", "--repo", str(repo), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--health-port", str(self.health_port), "--log", str(tmp / "server.log"),
             "--drain-timeout", "2", "--timeout", str(START_S)],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb"), start_new_session=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def log(self) -> list[str]:
        return [line for line in self.stderr_path.read_text().splitlines() if line.startswith("dq-serve ")]

    def lines(self, kind: str, needle: str) -> list[str]:
        return [line for line in self.log() if f" {kind}: " in line and needle in line]

    def health(self, path: str = "/v2/health/ready") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def triton_ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0  # nothing answers

    def tritonserver_pid(self) -> int:
        (pid,) = [p for p in children(self.proc.pid) if alive(p)]
        return pid

    def wait_ready(self, timeout_s: float = START_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dq-serve exited: {self.stderr_path.read_text()[-2000:]}"
            try:
                if self.health()[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"dq-serve not ready after {timeout_s} s: {self.stderr_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing of it may outlive the module
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def serve(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("triton-faults")
    ckpt, graph = tiny_cond_export(tmp_path_factory)
    write_repository(RepositoryConfig(repo=tmp / "repo", onnx=graph, ckpt=ckpt, kind="cpu", max_batch=8,
                                      intra_op_threads=1, pipeline_instances=2))
    server = DqServe(tmp / "repo", tmp)
    request.addfinalizer(server.stop)
    server.wait_ready()
    return server


class Outcome:
    """One request: when it started and ended (monotonic), and its images and attempts, or the error it ended with."""

    def __init__(self, url, n, retry=RETRY):
        self.start = time.monotonic()
        try:  # one image (label n % 10, seed n), 20 steps: long enough to be in flight when the fault comes
            self.images, self.attempts = fetch_images(url, pipeline_inputs([n % 10], seed=n, steps=20), policy=retry)
            self.error = None
        except Exception as err:  # kept: the test asserts on every outcome
            self.images, self.attempts, self.error = None, None, err
        self.end = time.monotonic()


class Watcher:
    """Readiness from dq-serve's health endpoint and from Triton's own, every 50 ms, in a thread."""

    def __init__(self, server: DqServe):
        self.server, self.samples, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                code, body = self.server.health()
            except OSError:
                code, body = 0, {}
            self.samples.append((time.monotonic(), code, body, self.server.triton_ready()))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def _load(server, clients, per_client, fault, start=0):
    """`clients` threads x `per_client` requests with retries; `fault()` once the first request is in flight."""
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(lambda c=c: [Outcome(server.url, start + c * per_client + i) for i in range(per_client)])
                   for c in range(clients)]
        time.sleep(0.3)
        fault()
        return [r for f in futures for r in f.result(timeout=300)]


def test_probe_and_health_endpoint_answer_ready(serve, capsys):
    from dilatequant.cli import serve_main

    assert call_cli(serve_main, "--probe", "ready", "--health-port", serve.health_port) == 0
    assert capsys.readouterr().out.strip() == "ready: 2 models (pipeline, unet)"
    assert call_cli(serve_main, "--probe", "live", "--health-port", serve.health_port) == 0
    code, body = serve.health()
    assert code == 200 and body["ready"] and body["live"] and body["faults"] == 0
    assert serve.health("/v2/models/pipeline/ready")[0] == 200
    assert serve.health("/v2/models/nope/ready")[0] == 404
    nothing = free_port()
    assert call_cli(serve_main, "--probe", "live", "--health-port", nothing) == 1
    assert f"not live: nothing answers at http://127.0.0.1:{nothing}/v2/health/live" in capsys.readouterr().out


def test_killed_unet_stub_under_load_turns_readiness_false_and_the_model_comes_back(serve):
    (stub,) = [s for s in stubs_of(serve.tritonserver_pid()) if s.model == "unet"]
    killed = []

    def kill():
        killed.append(time.monotonic())
        os.kill(stub.pid, signal.SIGKILL)

    with Watcher(serve) as watch:
        results = _load(serve, clients=4, per_client=4, fault=kill)
        deadline = time.monotonic() + 60
        while serve.health()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
    failed = [r.error for r in results if r.error is not None]
    assert not failed, failed[:3]
    recovered = serve.lines("recovered", "model 'unet' serving again")
    assert len(recovered) == 1, serve.log()
    assert any(r.start < killed[0] < r.end for r in results), "no request was in flight at the fault"
    # Requests meeting the outage are held until the unet is back (Triton's BLS waits for a model being loaded) or
    # answered 503 "unavailable ... retry" (one that reached the dead process); never a timeout or another error.
    assert {f for r in results for f in r.attempts.failures} <= {"unavailable"}, [r.attempts.failures for r in results]
    assert max(r.end - r.start for r in results) < 30
    before = [s for s in watch.samples if s[0] < killed[0]]
    after_kill = [s for s in watch.samples if s[0] > killed[0]]
    assert before and all(s[1] == 200 and s[3] == 200 for s in before)
    down = [s for s in after_kill if s[1] == 503]
    assert down, "dq-serve's readiness never turned false"
    first = down[0][2]
    assert not first["models"]["unet"]["ready"] and not first["models"]["pipeline"]["ready"]
    assert "calls unet" in first["models"]["pipeline"]["reason"]
    assert any(s[3] not in (0, 200) for s in after_kill), "Triton's own /v2/health/ready never turned false"
    assert watch.samples[-1][1] == 200 and serve.triton_ready() == 200
    # one log line for the fault, one for the recovery
    assert len(serve.lines("fault", "model 'unet': backend process unet_0_0")) == 1, serve.log()
    (new,) = [s for s in stubs_of(serve.tritonserver_pid()) if s.model == "unet"]
    assert new.pid != stub.pid
    images, later = fetch_images(serve.url, pipeline_inputs([3], seed=1), policy=RetryPolicy(retries=0))
    assert images.shape == (1, 8, 8, 1) and later.failures == []


def test_a_killed_pipeline_instance_gets_every_instance_replaced_and_none_left_behind(serve):
    before = [s for s in stubs_of(serve.tritonserver_pid()) if s.model == "pipeline"]
    assert len(before) == 2
    victim = before[0]
    results = _load(serve, clients=2, per_client=3, fault=lambda: os.kill(victim.pid, signal.SIGKILL), start=100)
    failed = [r.error for r in results if r.error is not None]
    assert not failed, failed[:3]
    assert {f for r in results for f in r.attempts.failures} <= {"unavailable", "backend crashed", "model reloading"}
    deadline = time.monotonic() + 120
    while not serve.lines("recovered", "model 'pipeline'") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(serve.lines("fault", f"model 'pipeline': backend process {victim.instance}")) == 1, serve.log()
    assert len(serve.lines("recovered", "model 'pipeline' serving again")) == 1, serve.log()
    serve.wait_ready(60)
    after = {s.pid for s in stubs_of(serve.tritonserver_pid()) if s.model == "pipeline"}
    deadline = time.monotonic() + 30  # the surviving instance's process is gone after --drain-timeout (2 s)
    while after & {s.pid for s in before} and time.monotonic() < deadline:
        time.sleep(0.2)
        after = {s.pid for s in stubs_of(serve.tritonserver_pid()) if s.model == "pipeline"}
    assert len(after) == 2 and not after & {s.pid for s in before}


def test_killed_server_is_restarted_and_a_retrying_client_is_served(serve, capsys):
    from dilatequant.cli import serve_main

    old = serve.tritonserver_pid()
    os.kill(old, signal.SIGKILL)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(Outcome, serve.url, 7)  # sent while nothing listens: connection refused, retried
        deadline = time.monotonic() + 10
        while not serve.lines("fault", "tritonserver exited") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call_cli(serve_main, "--probe", "ready", "--health-port", serve.health_port) == 1
        assert "tritonserver restarting (tritonserver exited with code -9)" in capsys.readouterr().out
        assert call_cli(serve_main, "--probe", "live", "--health-port", serve.health_port) == 0  # restarting: live
        outcome = pending.result(timeout=300)
    assert outcome.error is None, outcome.error
    assert outcome.images.shape == (1, 8, 8, 1) and "connection refused" in outcome.attempts.failures
    assert len(serve.lines("fault", "tritonserver exited with code -9; restarting tritonserver")) == 1, serve.log()
    assert len(serve.lines("recovered", "tritonserver restarted, every model ready")) == 1, serve.log()
    serve.wait_ready(60)
    assert serve.tritonserver_pid() != old
    assert serve.health()[1]["restarts"] == 1


def test_a_deadline_that_expires_ends_in_one_line_naming_the_attempts(serve, tmp_path, capsys):
    """1000 steps take longer than a 1 s budget: the attempt times out and no other fits; the last line says so."""
    serve.wait_ready(60)  # a server still restarting would refuse the connection instead
    t = time.monotonic()
    code = call_cli(client_main, "--url", serve.url, "--label", 3, "--steps", 1000, "--timeout", 1,
                    "--retries", 3, "--out", tmp_path / "x.png")
    elapsed = time.monotonic() - t
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[-1].startswith(f"error: Triton at {serve.url} did not serve 'pipeline': 1 attempt in 1.")
    assert "(timed out), the deadline of 1 s (--timeout) ran out" in err[-1] and err[-1].endswith("--timeout")
    assert elapsed < 5 and not (tmp_path / "x.png").exists()
    with pytest.raises(RetriesExhausted, match="the deadline of 1 s"):
        fetch_images(serve.url, pipeline_inputs([3], 0, steps=1000), policy=RetryPolicy(retries=3, deadline_s=1))
