"""Serving through faults: C clients x R prompt requests to `dq-serve` while one Python-backend stub is killed once.

    flock /tmp/dq-heavy.lock python benchmarks/triton_faults.py --out benchmarks/results/triton_faults
    python benchmarks/triton_faults.py --onnx unet.onnx ...   (an sd-digits graph already exported)

Builds (unless --onnx) the sd-digits graph cheaply (W8A8 symmetric PTQ, 8 calibration samples, 4 calibrated steps),
writes a CPU repository (text_encoder + unet + vae_decoder + prompt pipeline), and for each target in --targets
(default: unet, then text_encoder) starts a fresh `dq-serve` (a subprocess, as users run it), sends C x R requests
with client retries (dq-client's RetryPolicy), SIGKILLs the target's stub once `--fault-after` requests have been
served, and records:
- every request: served, failed with a clear error (its message), or hung (no answer within its deadline + 30 s);
  the attempts it took and why each failed;
- the fault (kill time), dq-serve's fault and recovery log lines, the first request started after the fault that was
  served (its end - the kill), and the first answer of any request after the kill;
- readiness every 100 ms: dq-serve's health endpoint and Triton's own /v2/health/ready, side by side.
Writes triton_faults.json and README.md (a table per target) under --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.engines.triton.client import fetch_images, prompt_inputs
from dilatequant.engines.triton.repository import RepositoryConfig, write_repository
from dilatequant.engines.triton.retry import RetryPolicy
from dilatequant.engines.triton.server import free_port
from dilatequant.engines.triton.stubs import alive, children, stubs_of

HANG_MARGIN_S = 30.0


def build_graph(work: Path, steps: int) -> tuple[Path, float]:
    from dilatequant.calibrate.quant_config import QuantConfig
    from dilatequant.calibrate.recipe import CalibrationJob, run_calibration
    from dilatequant.dq_export.qdq_graph import ExportConfig, export_onnx

    start = time.perf_counter()
    config = QuantConfig(num_steps=steps, weight_bits=8, act_bits=8, symmetric=True)
    run_calibration(CalibrationJob(model="sd-digits", config=config, calib_samples=8, bkd=False, out=work / "q.pt"))
    export_onnx(work / "q.pt", work / "unet.onnx", ExportConfig())
    return work / "unet.onnx", time.perf_counter() - start


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            return r.status, json.loads(body) if body.strip().startswith(b"{") else {}
    except urllib.error.HTTPError as err:
        body = err.read()
        return err.code, json.loads(body) if body.strip().startswith(b"{") else {}
    except OSError:
        return 0, {}  # no answer


class Serve:
    """A dq-serve subprocess on free ports, its stderr (the fault log) in a file."""

    def __init__(self, repo: Path, work: Path, name: str, start_timeout_s: float) -> None:
        self.http, self.grpc, self.health = free_port(), free_port(), free_port()
        self.stderr = work / f"{name}.dq-serve.stderr"
        argv = [sys.executable, "-m", "dilatequant.cli", "serve", "--repo", str(repo), "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--health-port", str(self.health), "--log", str(work / f"{name}.log"),
                "--drain-timeout", "5", "--timeout", str(start_timeout_s)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.stderr, "wb"),
                                     start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while _get(f"http://127.0.0.1:{self.health}/v2/health/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dq-serve did not become ready: {self.stderr.read_text()[-2000:]}")
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def stub(self, model: str):
        (server,) = [p for p in children(self.proc.pid) if alive(p)]
        return next(s for s in stubs_of(server) if s.model == model)

    def log_lines(self) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if line.startswith("dq-serve ")]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


class Watcher(threading.Thread):
    """Readiness every `period_s`: dq-serve's /v2/health/ready and Triton's own, as (t, ours, reason, triton)."""

    def __init__(self, serve: Serve, period_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.serve, self.period_s, self.samples, self.stop = serve, period_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            ours, body = _get(f"http://127.0.0.1:{self.serve.health}/v2/health/ready")
            down = {n: m.get("reason", "") for n, m in body.get("models", {}).items() if not m.get("ready")}
            triton, _ = _get(f"http://{self.serve.url}/v2/health/ready")
            self.samples.append((t, ours, down, triton))
            time.sleep(max(0.0, self.period_s - (time.monotonic() - t)))


def _request(url: str, n: int, steps: int, policy: RetryPolicy) -> dict:
    start = time.monotonic()
    out = {"n": n, "start": start}
    try:
        images, attempts = fetch_images(url, prompt_inputs(f"a handwritten digit {n % 10}", seed=n, steps=steps),
                                        policy=policy)
        out.update(served=True, failures=attempts.failures, shape=list(images.shape))
    except Exception as err:  # recorded: a failure must be a clear message, which the report shows
        out.update(served=False, failures=getattr(getattr(err, "attempts", None), "failures", []),
                   error=f"{type(err).__name__}: {err}")
    out["end"] = time.monotonic()
    return out


def _log_time(line: str, t0_wall: float, t0_mono: float) -> float:
    """A dq-serve log line's UTC time stamp, on the monotonic clock of this process."""
    stamp = re.match(r"dq-serve (\S+)Z ", line).group(1)
    wall = datetime.fromisoformat(stamp + "+00:00").timestamp()
    return t0_mono + (wall - t0_wall)


def run_target(repo: Path, work: Path, target: str, a) -> dict:
    serve = Serve(repo, work, target, a.start_timeout)
    try:
        _request(serve.url, 10_000, a.steps, RetryPolicy(retries=0))  # warm-up: every model's first call
        victim = serve.stub(target)
        policy = RetryPolicy(retries=a.retries, deadline_s=a.deadline)
        served_count, lock, killed = [0], threading.Lock(), {}

        def client(c: int) -> list[dict]:
            results = []
            for i in range(a.requests):
                r = _request(serve.url, c * a.requests + i, a.steps, policy)
                results.append(r)
                with lock:
                    served_count[0] += r["served"]
                    if served_count[0] >= a.fault_after and not killed:
                        killed["t"] = time.monotonic()
                        os.kill(victim.pid, signal.SIGKILL)
            return results

        watcher = Watcher(serve)
        watcher.start()
        t0_wall, t0_mono = time.time(), time.monotonic()
        with cf.ThreadPoolExecutor(a.clients) as pool:
            futures = [pool.submit(client, c) for c in range(a.clients)]
            budget = a.requests * (a.deadline + HANG_MARGIN_S)
            results, hung = [], 0
            for f in futures:
                try:
                    results += f.result(timeout=budget)
                except cf.TimeoutError:
                    hung += a.requests  # a client that never returned: count all its requests as hung
        time.sleep(1.0)
        watcher.stop.set()
        watcher.join()
        lines = serve.log_lines()
    finally:
        serve.stop()
    return summarize(target, victim, killed.get("t"), results, hung, watcher.samples, lines, t0_wall, t0_mono, a)


def summarize(target, victim, kill_t, results, hung, samples, lines, t0_wall, t0_mono, a) -> dict:
    served = [r for r in results if r["served"]]
    failed = [r for r in results if not r["served"]]
    total = a.clients * a.requests
    out = {"target": target, "killed": {"model": victim.model, "instance": victim.instance},
           "requests": total, "served": len(served), "failed_with_clear_error": len(failed), "hung": hung,
           "served_share": round(len(served) / total, 4), "errors": [r["error"] for r in failed][:10],
           "log": lines}
    if kill_t is None:
        out["note"] = "the fault was never injected (fewer than --fault-after requests served)"
        return out
    faults = [line for line in lines if " fault: " in line]
    recoveries = [line for line in lines if " recovered: " in line]
    recovered_t = _log_time(recoveries[0], t0_wall, t0_mono) if recoveries else None
    after = [r for r in served if r["start"] > kill_t]
    met = [r for r in results if r["start"] < (recovered_t or kill_t) and r["end"] > kill_t]
    reasons: dict[str, int] = {}
    for r in results:
        for f in r["failures"]:
            reasons[f] = reasons.get(f, 0) + 1
    outage = [s for s in samples if kill_t <= s[0] <= (recovered_t or kill_t) + 0.5]
    ours_down = [s for s in samples if s[0] >= kill_t and s[1] != 200]
    back = [s for s in samples if s[0] > (ours_down[-1][0] if ours_down else kill_t) and s[1] == 200]
    out.update({
        "fault_logged_after_s": round(_log_time(faults[0], t0_wall, t0_mono) - kill_t, 2) if faults else None,
        "recovery_logged_after_s": round(recovered_t - kill_t, 2) if recovered_t else None,
        "first_new_request_served_after_s": round(min(r["end"] for r in after) - kill_t, 2) if after else None,
        "first_answer_after_fault_s": round(min(r["end"] for r in served if r["end"] > kill_t) - kill_t, 2),
        "requests_meeting_the_outage": len(met),
        "requests_retried": sum(1 for r in results if r["failures"]),
        "failed_attempts_by_reason": reasons,
        "latency_s": {"max": round(max(r["end"] - r["start"] for r in results), 2),
                      "max_meeting_outage": round(max((r["end"] - r["start"] for r in met), default=0.0), 2)},
        "readiness": {
            "samples_from_fault_to_recovery": len(outage),
            "dq_serve_not_ready": sum(1 for s in outage if s[1] != 200),
            "triton_not_ready": sum(1 for s in outage if s[3] != 200),
            "triton_no_answer": sum(1 for s in outage if s[3] == 0),
            "dq_serve_not_ready_after_s": round(ours_down[0][0] - kill_t, 2) if ours_down else None,
            "dq_serve_ready_again_after_s": round(back[0][0] - kill_t, 2) if back else None,
            "first_not_ready_reasons": ours_down[0][2] if ours_down else {},
        },
    })
    return out


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    rows = ["| killed stub | served | failed (clear error) | hung | fault -> recovery logged | fault -> first new "
            "request served | requests meeting the outage / retried | max latency meeting it | readiness samples "
            "in the outage: dq-serve not ready / Triton not ready |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        rd = r.get("readiness", {})
        rows.append(f"| {r['killed']['instance']} | {r['served']}/{r['requests']} ({100 * r['served_share']:.1f}%) | "
                    f"{r['failed_with_clear_error']} | {r['hung']} | {r.get('recovery_logged_after_s')} s | "
                    f"{r.get('first_new_request_served_after_s')} s | {r.get('requests_meeting_the_outage')} / "
                    f"{r.get('requests_retried')} | {r.get('latency_s', {}).get('max_meeting_outage')} s | "
                    f"{rd.get('dq_serve_not_ready')}/{rd.get('samples_from_fault_to_recovery')} / "
                    f"{rd.get('triton_not_ready')}/{rd.get('samples_from_fault_to_recovery')} |")
    logs = "\n".join(f"    {line}" for r in report["runs"] for line in r["log"])
    return f"""# Serving through a killed backend process (Triton, CPU)

{s['clients']} clients x {s['requests']} prompt requests (sd-digits, W8A8, {s['steps']} steps each, client retries:
--retries {s['retries']} within a {s['deadline']:g} s deadline) to `dq-serve`; once {s['fault_after']} requests were served,
one Python-backend stub was killed with SIGKILL. One fresh server per row.

{chr(10).join(rows)}

- Goal: >= 95% served with retries, 0 hung, recovery within 30 s. Met: {report['goal_met']}.
- "fault -> recovery logged": dq-serve's `recovered:` line minus the kill; "first new request served": the first
  request sent after the kill that was served, its answer minus the kill.
- Readiness was sampled every 100 ms from dq-serve's health endpoint and from Triton's own `/v2/health/ready`.
  dq-serve unloads the model whose stub died, so Triton's readiness turns false too, but only after dq-serve noticed;
  Triton 2.51 by itself keeps answering 200 (docs/triton.md).
- Machine: {env['cpu']} (avx512: {report['cpu_avx512']}), {env['cpu_count']} cores, load average before the runs
  {report['load_average_1m_before']} (other jobs share the machine). {report['graph']} (not part of the figures).

dq-serve's log lines (one per fault, one per recovery):

{logs}

Command: `{report['command']}`; full records in triton_faults.json.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, help="an sd-digits graph (default: calibrate and export one, W8A8, 4 steps)")
    p.add_argument("--targets", nargs="+", default=["unet", "text_encoder"], help="models whose stub is killed")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--steps", type=int, default=8, help="sampling steps per request")
    p.add_argument("--fault-after", type=int, default=40, help="kill once this many requests were served")
    p.add_argument("--retries", type=int, default=RetryPolicy.retries)
    p.add_argument("--deadline", type=float, default=120.0, help="per request, retries included (s)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/triton_faults"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dq-triton-faults-") as tmp:
        work = Path(tmp)
        load_before = os.getloadavg()[0]
        graph, build_s = (a.onnx, 0.0) if a.onnx else build_graph(work, 4)
        write_repository(RepositoryConfig(repo=work / "repo", onnx=graph, kind="cpu", max_batch=8,
                                          intra_op_threads=1))
        runs = [run_target(work / "repo", work, target, a) for target in a.targets]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    goal = all(r["hung"] == 0 and r["served_share"] >= 0.95 and (r.get("recovery_logged_after_s") or 1e9) <= 30
               for r in runs)
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "environment": environment(), "cpu_avx512": "avx512f" in flags,
              "load_average_1m_before": round(load_before, 2), "load_average_1m_after": round(os.getloadavg()[0], 2),
              "graph": f"Graph given: {a.onnx}" if a.onnx else f"Graph built here in {build_s:.0f} s (W8A8 PTQ, "
                       "8 calibration samples, 4 calibrated steps)",
              "goal_met": goal, "runs": runs}
    write_json(a.out / "triton_faults.json", report)
    write_text(a.out / "README.md", markdown(report))
    for r in runs:
        print({k: v for k, v in r.items() if k not in ("log", "errors")}, flush=True)
    if not goal:
        raise SystemExit("the goal was not met; see " + str(a.out / "README.md"))


if __name__ == "__main__":
    main()
