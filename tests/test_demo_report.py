"""dq-demo's README: every cell it shows is a measurement (no "not computed" placeholders)."""
import copy
from pathlib import Path

import pytest

from dilatequant.core.metrics import FID_MIN_SAMPLES
from dilatequant.core.reporting import read_json
from dilatequant.demo import summary_markdown

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo" / "report.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return read_json(REPORT)


def test_too_few_samples_drop_the_fid_column_with_one_line_saying_where_it_is_measured(report):
    assert report["models"]["default"]["fp"]["num_samples"] < FID_MIN_SAMPLES
    md = summary_markdown(report)
    assert "not computed" not in md and "digit-FID |" not in md
    assert md.count("Digit-FID is left out: 100 samples are too few") == 1
    assert "benchmarks/results/fp_quality" in md


def test_enough_samples_show_the_fid_column_with_its_spread(report):
    r = copy.deepcopy(report)
    for i, sec in enumerate([m["fp"] for m in r["models"].values()] + [r["quantized"]["fake_quant_vs_fp"]]):
        sec.update(num_samples=1000, digit_fid=10.0 + i, digit_fid_spread=1.4)
        sec.pop("digit_fid_note", None)
    md = summary_markdown(r)
    assert "| digit-FID |" in md and "Digit-FID is left out" not in md
    assert "| 10.00 ± 1.4 (n=1000) |" in md and "digit-FID 13.00 ± 1.4 (n=1000)" in md
