"""Where an engine's companions live: the sidecar, the layer table, the FP16 graph it was built from."""
from __future__ import annotations

from pathlib import Path


def sidecar_path(engine: str | Path) -> Path:
    return Path(f"{engine}.json")


def layers_path(engine: str | Path) -> Path:
    return Path(f"{engine}.layers.json")


def fp16_graph_path(engine: str | Path) -> Path:
    """Where the FP16-fallback graph is kept (beside the engine: it is what TensorRT actually built)."""
    return Path(f"{engine}.fp16.onnx")


def plan_backend(engine: str | Path) -> str:
    """Which builder made the plan, from its sidecar: "tensorrt" (TensorRT 11, and sidecars older than the choice)
    or "tensorrt-rtx". An unreadable sidecar reads as "tensorrt": the code that needs its contents says what is
    wrong with it."""
    import json

    try:
        side = json.loads(sidecar_path(engine).read_text())
    except (OSError, ValueError):
        return "tensorrt"
    return str(side.get("backend") or "tensorrt") if isinstance(side, dict) else "tensorrt"
