"""The TensorRT rules checker held against NVIDIA's own parser and builder: the planted-defect corpus
(tests/trt_defects.py) judged by dq_export.trt_rules (and dq-build-engine's target check), by TensorRT-RTX's
parser + CPU-only ahead-of-time builder (a child process per crash, 120 s per build at most), by ONNX (onnx.checker
full_check + an ONNX Runtime CPU run) and by TensorRT 11's documentation (quoted per case, with its source).

Writes results/trt_rules_vs_rtx/{results.json, README.md}: verdicts only (no timings). No GPU is needed or used.

    python benchmarks/trt_rules_vs_rtx.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "trt_rules_vs_rtx"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import trt_defects as T  # noqa: E402  (tests/trt_defects.py: the corpus)


def row_json(r: T.Row) -> dict:
    d, b = r.defect, r.builder
    return {"id": d.id, "what": d.what, "reference": d.is_reference,
            "targets": [f"{c[0]}.{c[1]}" for c in d.targets] if d.targets else "default",
            "checker": {"rules": r.rules, "violations": r.violations, "target_check": r.target_check,
                        "refuses": r.checker_refuses},
            "tensorrt_rtx": {"verdict": b.verdict, "reason": b.reason,
                             "layers": (b.details.get("network") or {}).get("layers")},
            "onnx": r.onnx, "tensorrt_11_docs": {"refuses": bool(d.docs), "citation": d.docs},
            "differs": d.differs, "note": d.note, "refused_by": r.refused_by}


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(report: dict) -> str:
    rows = report["cases"]
    missed = report["misses"]
    lines = [
        "# The TensorRT rules checker against TensorRT-RTX's parser and builder",
        "",
        f"`{report['command']}`: {len(rows)} small graphs (tests/trt_defects.py), each judged four ways. No GPU: "
        f"TensorRT-RTX {report['versions']['tensorrt_rtx']} (ONNX parser {report['versions']['onnx_parser']}) parses "
        "and builds CPU-only ahead of time; onnx.checker (full_check) and an ONNX Runtime CPU run stand for ONNX; "
        "TensorRT 11's documentation is quoted per case (TensorRT 11 builds only on a GPU).",
        "",
        f"**Misses** (a graph someone refuses that the checker passes): {len(missed)}"
        + (": " + "; ".join(missed) if missed else "") + f". **False alarms** on the {report['references']} clean "
        f"references: {len(report['false_alarms'])}.",
        "",
        "Reading the table: *checker* lists the trt_rules rules a case breaks and dq-build-engine's target check "
        "(FP8 needs compute capability 8.9); *TensorRT-RTX* is what its parser and builder did with the case's "
        "targets, with the first error; *ONNX* is onnx.checker / ONNX Runtime; *docs* names the TensorRT 11 "
        "passage (below) that rules the graph out. A build that succeeds proves only that the ahead-of-time builder "
        "accepted the graph: kernels are compiled on the GPU that runs the plan, and whether a layer then runs "
        "quantized is not visible here.",
        "",
        "| case | graph | targets | checker | TensorRT-RTX | first error | ONNX | docs | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        chk = c["checker"]
        verdict = ", ".join(chk["rules"]) or "passes"
        if chk["target_check"] != "passes":
            verdict += f"; targets: {chk['target_check']}"
        targets = c["targets"] if isinstance(c["targets"], str) else ", ".join(c["targets"])
        note = "; ".join(x for x in (c["differs"], c["note"]) if x)
        lines.append(f"| {c['id']} | {_cell(c['what'], 110)} | {targets} | {_cell(verdict, 90)} | "
                     f"{c['tensorrt_rtx']['verdict']} | {_cell(c['tensorrt_rtx']['reason'])} | {_cell(c['onnx'], 90)} "
                     f"| {c['tensorrt_11_docs']['citation'] or ''} | {_cell(note, 200)} |")
    lines += ["", "## The documentation quoted", ""]
    for key, (source, quote) in report["citations"].items():
        lines.append(f"- **{key}**: {source}: \"{quote}\"")
    env = report["environment"]
    lines += ["", f"onnx {report['versions']['onnx']}, onnxruntime {report['versions']['onnxruntime']}, "
              f"{env['cpu']} ({env['cpu_count']} cores), {env['platform']}", ""]
    return "\n".join(lines)


def main() -> None:
    import onnx
    import onnxruntime

    from dilatequant.core.reporting import environment, write_json, write_text
    from dilatequant.engines.tensorrt.rtx import require_tensorrt_rtx

    trt = require_tensorrt_rtx()
    with tempfile.TemporaryDirectory(prefix="dq-defects-") as tmp:
        rows = T.judge(Path(tmp))
    cases = [row_json(r) for r in rows]
    report = {"command": "python benchmarks/trt_rules_vs_rtx.py",
              "versions": {"tensorrt_rtx": trt.__version__, "onnx_parser": int(trt.get_nv_onnx_parser_version()),
                           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
              "references": sum(r.defect.is_reference for r in rows),
              "misses": T.misses(rows), "false_alarms": T.false_alarms(rows), "cases": cases,
              "citations": {k: list(v) for k, v in T.CITATIONS.items()}, "environment": environment()}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "results.json", report)
    write_text(OUT / "README.md", markdown(report))
    print(f"{len(rows)} cases, {len(report['misses'])} misses, {len(report['false_alarms'])} false alarms; "
          f"wrote {OUT}/README.md")


if __name__ == "__main__":
    main()
