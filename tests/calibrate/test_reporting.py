import os
import stat

import pytest

from dilatequant.calibrate.reporting import atomic_write_bytes


def test_atomic_write_has_plain_file_permissions_and_leaves_no_temp(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "out.bin", b"abc")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"abc"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644, "readable by a server running as another user"
    assert [f.name for f in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = atomic_write_bytes(tmp_path / "out.bin", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["out.bin"]
