"""dq-export as a library call: export -> TensorRT-rules check -> layer-wise and end-to-end parity -> JSON report."""
from __future__ import annotations

from pathlib import Path

from ..calibrate.checkpoint import load_checkpoint
from ..core.reporting import write_json
from .export_config import ExportConfig
from .fold import w4a16_reference
from .layer_parity import layer_parity_report, raise_on_failure
from .ort_graph import convert_file
from .parity import parity_report
from .qdq_graph import export_onnx
from .trt_rules import enforce


def export_and_verify(ckpt: Path, onnx_path: Path, cfg: ExportConfig, verify: bool = True,
                      per_step: int = 2, torch_floor: bool = False, layer_parity: bool | None = None,
                      fp_model=None) -> dict:
    """Export and check; a failed layer-wise parity raises LayerParityError after the report is written.

    The reference is the fake-quant model configured as the graph runs: under `--precision int4` the weight-only
    INT4 layers read a float activation, so their input quantizers pass through (fold.w4a16_reference).
    """
    layer_parity = verify if layer_parity is None else layer_parity
    summary = export_onnx(ckpt, onnx_path, cfg)
    reference = None
    if verify or layer_parity:
        reference = load_checkpoint(ckpt)
        w4a16_reference(reference.qunet, summary.get("int4_layers", []))
    if layer_parity:  # on the TensorRT-form graph (for --target ort: the graph the integer ops are converted from)
        summary["layer_parity"] = layer_parity_report(onnx_path, reference, per_step=per_step,
                                                      weight_only=tuple(summary.get("int4_layers", [])),
                                                      fp_model=fp_model)
    if cfg.target == "ort":  # an ONNX Runtime graph, not a TensorRT one: parity still proves it
        summary["ort_graph"] = convert_file(onnx_path, onnx_path)
        summary["bytes"] = summary["ort_graph"]["bytes"]
        summary["trt_rules"] = "skipped: --target ort is not a TensorRT graph"
    else:
        enforce(onnx_path)
        summary["trt_rules"] = "passed"
    if verify:  # an FP16 graph is measured against the same FP32 fake-quant model (informational bound)
        summary["parity"] = parity_report(onnx_path, reference, per_step=per_step, torch_floor=torch_floor)
    report = write_json(Path(f"{onnx_path}.export.json"), summary)
    if layer_parity:
        raise_on_failure(summary["layer_parity"], report)
    return summary
