"""The TensorRT-RTX build, run in a child process: `python -m dilatequant.engines.tensorrt.rtx_child JOBS RESULTS`.

A child because a builder that crashes (a segmentation fault on some graphs) would otherwise take the command
down with no message, and because Polygraphy picks TensorRT or TensorRT-RTX once, when it is imported
(POLYGRAPHY_USE_TENSORRT_RTX), so the RTX build needs a process whose Polygraphy imported TensorRT-RTX.

JOBS is a JSON list of builds (rtx.RtxJob.to_json); for each, a line {"start": index} and then the result line go
to RESULTS as they happen, so the parent knows which build a crash interrupted. Only Polygraphy, TensorRT-RTX
and this package's Polygraphy helpers are imported here (not torch): the child starts in about a second.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path


def build_one(job: dict) -> dict:
    """Parse (strongly typed) and build one graph, CPU-only ahead of time; write the plan when the job names one."""
    import tensorrt_rtx as trt
    from polygraphy import config as polygraphy_config
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    from .polygraphy_build import KeptConfig, builder_settings, network_summary, polygraphy_errors, polygraphy_profile

    if not polygraphy_config.USE_TENSORRT_RTX:
        raise SystemExit("POLYGRAPHY_USE_TENSORRT_RTX=1 must be set before Polygraphy is imported")
    out = {"index": job["index"], "tensorrt_rtx": str(trt.__version__), "onnx_parser": _parser_version(trt),
           "parsed": False, "built": False, "errors": []}
    failures = (PolygraphyException, RuntimeError, TypeError, ValueError)
    with polygraphy_errors() as errors:
        try:  # parse_from_file: external weights are found beside the graph
            network = NetworkFromOnnxPath(job["onnx"], strongly_typed=True)()
        except failures as err:
            out["errors"] = [*errors(), f"{type(err).__name__}: {err}"]
            return out
        out["parsed"] = True
        seen = len(errors())
        pools = {trt.MemoryPoolType.WORKSPACE: int(job["workspace_bytes"])} if job.get("workspace_bytes") else None
        config = KeptConfig(CreateConfigRTX(
            profiles=[polygraphy_profile(job["profile"])] if job.get("profile") else None,
            compute_capabilities=[tuple(c) for c in job["compute_capabilities"]] if job.get("compute_capabilities")
            else None, builder_optimization_level=job.get("opt_level"), memory_pool_limits=pools,
            profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY), summarize=network_summary)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # Polygraphy sets an empty timing cache, a no-op in TensorRT-RTX
                warnings.filterwarnings("ignore", message=".*[Tt]iming cache.*", category=DeprecationWarning)
                data = EngineBytesFromNetwork(network, config=config)()
        except failures as err:
            out["errors"] = [*errors()[seen:], f"{type(err).__name__}: {err}"]
            data = None
        else:
            out["errors"] = errors()[seen:]
        out["build_s"] = round(time.perf_counter() - start, 2)
        out["network"] = config.network
        out["settings"] = builder_settings(trt, config.config) if config.config is not None else None
    if data is None or not data.nbytes:
        return out
    out["built"], out["plan_bytes"] = True, int(data.nbytes)
    if job.get("plan"):
        with open(job["plan"], "wb") as f:  # the parent's temporary name; it renames it once this child is done
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
    return out


def _parser_version(trt) -> int | None:
    get = getattr(trt, "get_nv_onnx_parser_version", None)
    return int(get()) if get else None


def main(argv: list[str]) -> None:
    os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")  # before Polygraphy is imported (build_one)
    jobs = json.loads(Path(argv[0]).read_text())
    with open(argv[1], "a") as results:
        for job in jobs:
            results.write(json.dumps({"start": job["index"]}) + "\n")
            results.flush()
            results.write(json.dumps(build_one(job)) + "\n")
            results.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
