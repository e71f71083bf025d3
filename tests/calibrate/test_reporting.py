import math
import os
import stat
import subprocess
import sys

import pytest

from dilatequant.core.reporting import atomic_write_bytes, read_json, write_json


def test_atomic_write_has_plain_file_permissions_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "out.bin", b"abc")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"abc"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644, "readable by a server running as another user"
    assert [f.name for f in tmp_path.iterdir()] == ["out.bin"]


def test_json_keeps_inf_and_nan_through_a_round_trip(tmp_path):
    p = write_json(tmp_path / "r.json", {"sqnr_db": [float("inf"), 31.5], "x": {"y": float("-inf"), "z": float("nan")},
                                         "name": "inf-free"})
    assert '"inf"' in p.read_text()  # JSON has no literal: stored as a string
    r = read_json(p)
    assert r["sqnr_db"] == [math.inf, 31.5] and r["x"]["y"] == -math.inf and math.isnan(r["x"]["z"])
    assert r["name"] == "inf-free"


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = atomic_write_bytes(tmp_path / "out.bin", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["out.bin"]


def test_peak_rss_of_a_subprocess_is_its_own():
    """Linux keeps ru_maxrss across exec: a calibration started by a 1.5 GB parent must not report 1.5 GB."""
    parent = (
        "import subprocess, sys, numpy as np\n"
        "big = np.ones(1536 * 2**20 // 8)\n"
        "child = 'import torch; from dilatequant.core.reporting import peak_rss_mb; print(peak_rss_mb())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n"
    )
    child_peak = float(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
    assert 50 < child_peak < 1000  # the child imports torch (~200-400 MB here), not the parent's 1.5 GB
