"""The TensorRT rules checker against NVIDIA's real parser and builder (TensorRT-RTX, CPU-only), ONNX, and TensorRT
11's documentation, on the planted-defect corpus (tests/trt_defects.py): nothing any of them refuses may pass the
checker, and switching any one rule off lets a defect through. The corpus builds for real in a child process (about
60 small builds, a few tenths of a second each)."""
import ast
import json
from pathlib import Path

import pytest

import trt_defects as T
from dilatequant.dq_export import trt_rules

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is the test extra's: pip install -e '.[test,rtx]'")

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "trt_rules_vs_rtx" / "results.json"
# Rules no builder, document or ONNX refusal asks for: the project's own, each with why it stays.
PROJECT_RULES = {
    "explicit-axis": "ONNX's default axis (1) is the input channels of a Conv weight: an axis written out is never "
                     "read wrong (matmul_no_axis: right by default, flagged anyway)",
    "channel-axis": "a per-input-channel Conv scale cannot be applied after the integer sum, so no INT8 kernel can "
                    "use it (weight_axis_cin; TensorRT-RTX's builder takes it, kernels are not visible without a GPU)",
    "q-feeds-dq": "TensorRT fuses a Q only into the DQ after it (q_to_cast: TensorRT-RTX builds it)",
    "int4-even": "written when TensorRT packed 4-bit pairs only; TensorRT 11.5's Explicit Quantization page describes "
                 "odd counts and TensorRT-RTX builds them (int4_odd)",
}
# A rule that only ever fires together with another (it names the right axis where the other asks for any axis).
REFINES = {"default-axis": ("explicit-axis",)}


def checker_rules() -> set[str]:
    """Every rule name trt_rules can report: the first argument of each Violation(...) in its source."""
    tree = ast.parse(Path(trt_rules.__file__).read_text())
    return {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
            "Violation" and n.args and isinstance(n.args[0], ast.Constant)}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return T.judge(tmp_path_factory.mktemp("defects"))


def test_the_checker_rejects_everything_the_builder_the_docs_or_onnx_refuse(rows):
    assert T.misses(rows) == []
    assert T.false_alarms(rows) == []
    by = {r.defect.id: r for r in rows}
    # the corpus is what it claims: the real parser and builder refuse these, and pass the references
    refused = {i for i, r in by.items() if r.builder.verdict != "built"}
    assert {"scale_zero", "zp_nonzero", "scale_count", "int4_block_96", "int4_conv_blocked", "qlinear_op",
            "weight_scale_runtime", "w4_fp8_gemm", "fp8_gemm_sm86", "fp8_e5m2", "fp8_act_int8_weight"} <= refused
    assert "Non-zero zero point is not supported" in by["zp_nonzero"].builder.reason
    assert "Cannot compile for target(s) sm86" in by["fp8_gemm_sm86"].builder.reason
    assert by["fp8_gemm_sm86"].target_check.startswith("refuses") and by["fp8_gemm_sm86"].violations == []
    assert by["fp8_e5m2"].builder.verdict == "parser refused" and by["fp8_e5m2"].onnx == "ok"
    assert "dtype == W.type()" in by["fp8_act_int8_weight"].builder.reason
    # ... and accept these, which only the checker (with the docs, ONNX, or the numerics) stops
    built = {i for i, r in by.items() if r.builder.verdict == "built"}
    assert {"scale_gather_vector", "act_per_channel", "zp_fp8_act", "int4_block_32", "int8_blocked",
            "opset20_blocked", "zp_missing", "fp8_opset18"} <= built
    assert "float8e4m3fn" in by["fp8_opset18"].onnx  # ONNX has no FP8 type before opset 19
    assert by["ok_w4a16"].builder.details["network"]["layer_types"]["DEQUANTIZE"] == 1


def test_the_committed_table_says_what_the_builder_says_now(rows):
    """benchmarks/results/trt_rules_vs_rtx is this corpus's table: rerun benchmarks/trt_rules_vs_rtx.py when a
    case or TensorRT-RTX changes."""
    table = json.loads(TABLE.read_text())
    version = rows[0].builder.details.get("tensorrt_rtx") or next(r.builder.details["tensorrt_rtx"] for r in rows
                                                                 if r.builder.details)
    if table["versions"]["tensorrt_rtx"] != version:
        pytest.skip(f"the table is TensorRT-RTX {table['versions']['tensorrt_rtx']}'s; this is {version}")
    committed = {c["id"]: (c["tensorrt_rtx"]["verdict"], c["onnx"] == "ok", c["checker"]["rules"])
                 for c in table["cases"]}
    assert committed == {r.defect.id: (r.builder.verdict, r.onnx == "ok", r.rules) for r in rows}
    assert table["misses"] == [] and table["false_alarms"] == []


def test_every_rule_is_classified():
    assert set(PROJECT_RULES) <= checker_rules() and set(REFINES) <= checker_rules()


@pytest.mark.parametrize("rule", sorted(checker_rules()))
def test_switching_off_one_rule_lets_a_defect_through(rule, rows, monkeypatch):
    """With `rule` (and a rule it only refines) dropped from the checker, a corpus graph the builder, the docs or
    ONNX refuse passes: the miss check fails. The project's own rules let their own case through instead."""
    off = {rule, *REFINES.get(rule, ())}
    real = trt_rules.check_graph
    monkeypatch.setattr(trt_rules, "check_graph", lambda *a, **kw: [v for v in real(*a, **kw) if v.rule not in off])
    weaker = T.rejudge(rows)
    if off & set(PROJECT_RULES):
        let_through = [r.defect.id for r, w in zip(rows, weaker) if r.checker_refuses and not w.checker_refuses]
        assert let_through, f"no corpus case is caught by {rule} alone"
    else:
        assert T.misses(weaker), f"the corpus cannot tell that {rule} is off"
