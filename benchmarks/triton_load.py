"""Bounded load test of the Triton `pipeline` (CPU repository): C concurrent clients x R requests.

    python benchmarks/triton_load.py --ckpt q.pt --onnx unet.onnx --out benchmarks/results/triton_load
    python benchmarks/triton_load.py --repo REPO ...   (an existing repository, e.g. from dq-triton --kind cpu)

Each request asks for one image (label cycling 0..9, seed = request number) at the calibrated step
count, so every request runs `steps` UNet calls through BLS; the unet model's dynamic batcher merges
concurrent ones. Writes JSON (throughput, latency p50/p90/p99, errors, unet batching) and markdown.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.engines.triton.client import connect, infer, pipeline_inputs
from dilatequant.engines.triton.repository import write_repository
from dilatequant.engines.triton.repository_config import RepositoryConfig
from dilatequant.engines.triton.server import TritonServer


def _client(url: str, protocol: str, worker: int, requests: int, steps: int | None, timeout_s: float):
    client = connect(url, protocol, timeout_s)
    lat, errors = [], []
    try:
        for i in range(requests):
            n = worker * requests + i
            start = time.perf_counter()
            try:
                out = infer(client, protocol, "pipeline", pipeline_inputs([n % 10], seed=n, steps=steps),
                            ["IMAGES"], timeout_s)["IMAGES"]
                if out.shape[0] != 1 or out.dtype != np.uint8:
                    errors.append(f"unexpected output {out.shape} {out.dtype}")
            except Exception as err:  # counted, not raised: the test reports every failure
                errors.append(f"{type(err).__name__}: {err}")
            lat.append(time.perf_counter() - start)
    finally:
        client.close()
    return lat, errors


def _unet_stats(url: str, unet: str) -> dict:
    import tritonclient.http as http

    c = http.InferenceServerClient(url)
    try:
        s = c.get_inference_statistics(unet)["model_stats"][0]
    finally:
        c.close()
    return {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, help="existing repository (else built from --onnx/--ckpt)")
    p.add_argument("--onnx", type=Path)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20, help="per client")
    p.add_argument("--steps", type=int, help="DDIM steps per request (default: the calibrated count)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--pipeline-instances", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/triton_load"))
    a = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="dq-triton-load-")
    repo = a.repo
    if repo is None:
        if not (a.onnx and a.ckpt):
            p.error("pass --repo, or --onnx and --ckpt to build a CPU repository")
        repo = Path(tmp.name) / "repo"
        write_repository(RepositoryConfig(repo=repo, onnx=a.onnx, ckpt=a.ckpt, kind="cpu", max_batch=a.max_batch,
                                          pipeline_instances=a.pipeline_instances))
    log = Path(tmp.name) / "server.log"
    with TritonServer(repo, log_path=log).start(timeout_s=300) as server:
        url = server.http_url if a.protocol == "http" else server.grpc_url
        _client(url, a.protocol, 0, 2, a.steps, a.timeout)  # warm-up: model instances, ORT sessions
        before = _unet_stats(server.http_url, "unet")
        load_before = os.getloadavg()[0]  # other processes on the machine skew latencies: record it
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(a.clients) as pool:
            results = list(pool.map(lambda w: _client(url, a.protocol, w, a.requests, a.steps, a.timeout),
                                    range(a.clients)))
        wall = time.perf_counter() - start
        after = _unet_stats(server.http_url, "unet")
    lat = np.array([x for r in results for x in r[0]]) * 1000
    errors = [e for r in results for e in r[1]]
    unet_inf = after["inference_count"] - before["inference_count"]  # samples (batch elements), not requests
    unet_exe = after["execution_count"] - before["execution_count"]
    out = {
        "settings": {k: str(v) for k, v in vars(a).items()}, "environment": environment(),
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "server": server.source, "requests": int(len(lat)), "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 2), "throughput_images_per_s": round(len(lat) / wall, 3),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p90": round(float(np.percentile(lat, 90)), 1),
                       "p99": round(float(np.percentile(lat, 99)), 1), "mean": round(float(lat.mean()), 1),
                       "max": round(float(lat.max()), 1)},
        "unet_samples": unet_inf, "unet_executions": unet_exe,
        "unet_mean_batch": round(unet_inf / max(unet_exe, 1), 2),
    }
    write_json(a.out / "triton_load.json", out)
    L = out["latency_ms"]
    write_text(a.out / "triton_load.md",
               "| clients x requests | protocol | images/s | p50 ms | p90 ms | p99 ms | errors | mean unet batch (samples) |\n"
               "|---|---|---|---|---|---|---|---|\n"
               f"| {a.clients} x {a.requests} | {a.protocol} | {out['throughput_images_per_s']} | {L['p50']} | "
               f"{L['p90']} | {L['p99']} | {out['errors']} | {out['unet_mean_batch']} |\n")
    print({k: v for k, v in out.items() if k not in ("environment", "settings")}, flush=True)
    tmp.cleanup()
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, e.g. {errors[0]}")


if __name__ == "__main__":
    main()
