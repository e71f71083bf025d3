"""dq-export as a library call: export -> TensorRT-rules check -> ONNX Runtime parity -> JSON report."""
from __future__ import annotations

from pathlib import Path

from ..calibrate.checkpoint import load_checkpoint
from ..calibrate.reporting import write_json
from .ort_graph import convert_file
from .parity import parity_report
from .qdq_graph import ExportConfig, export_onnx
from .trt_rules import enforce


def export_and_verify(ckpt: Path, onnx_path: Path, cfg: ExportConfig, verify: bool = True,
                      per_step: int = 2, torch_floor: bool = False) -> dict:
    summary = export_onnx(ckpt, onnx_path, cfg)
    if cfg.target == "ort":  # an ONNX Runtime graph, not a TensorRT one: parity still proves it
        summary["ort_graph"] = convert_file(onnx_path, onnx_path)
        summary["bytes"] = summary["ort_graph"]["bytes"]
        summary["trt_rules"] = "skipped: --target ort is not a TensorRT graph"
    else:
        enforce(onnx_path)
        summary["trt_rules"] = "passed"
    if verify:  # an FP16 graph is measured against the same FP32 fake-quant model (informational bound)
        summary["parity"] = parity_report(onnx_path, load_checkpoint(ckpt), per_step=per_step,
                                          torch_floor=torch_floor)
    write_json(Path(f"{onnx_path}.export.json"), summary)
    return summary
