"""dq-serve's command line (127.0.0.1 only, no metrics port, bundled-server environment) and CLI errors, no server."""
import sys
from pathlib import Path

import pytest

from dilatequant.cli import client_main, serve_main
from dilatequant.engines.triton import server as S


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_server_command_binds_localhost_and_prepares_the_bundled_backend(tmp_path, monkeypatch):
    if S._pytriton_root() is None:
        pytest.skip("nvidia-pytriton not installed: pip install 'dilatequant[serve]'")
    monkeypatch.setattr(S.shutil, "which", lambda name: None)  # force the bundled server
    monkeypatch.setattr(S, "_require_numpy_1", lambda: None)
    cmd = S.server_command(tmp_path / "repo", 18000, 18001, tmp_path / "work")
    assert cmd.source == "pytriton" and cmd.argv[0].endswith("bin/tritonserver")
    assert _flag(cmd.argv, "--http-address") == _flag(cmd.argv, "--grpc-address") == "127.0.0.1"
    assert (_flag(cmd.argv, "--http-port"), _flag(cmd.argv, "--grpc-port")) == ("18000", "18001")
    assert _flag(cmd.argv, "--allow-metrics") == "false"  # the metrics port would bind 0.0.0.0
    backend = Path(_flag(cmd.argv, "--backend-directory")) / "python"
    assert sorted(p.name for p in backend.iterdir()) == ["libtriton_python.so", "triton_python_backend_stub",
                                                         "triton_python_backend_utils.py"]
    assert cmd.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    import sysconfig

    assert sysconfig.get_config_var("LIBDIR") in cmd.env["LD_LIBRARY_PATH"].split(":")
    assert any(p.endswith("nvidia_pytriton.libs") for p in cmd.env["LD_LIBRARY_PATH"].split(":"))


def test_numpy_2_is_refused_for_the_bundled_server(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.1.0")
    with pytest.raises(S.UserError, match=r"numpy 2\.1\.0 .*empty tensors.*numpy<2"):
        S._require_numpy_1()


def test_serve_on_an_empty_folder_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        serve_main(["--repo", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "dq-triton --repo" in err and err.count("\n") == 1


def test_client_without_a_server_names_the_url(tmp_path, capsys):
    pytest.importorskip("tritonclient.http", reason="tritonclient not installed: pip install 'dilatequant[serve]'")
    port = S.free_port()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        client_main(["--url", f"127.0.0.1:{port}", "--label", "3", "--timeout", "5", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot reach Triton at 127.0.0.1:{port}" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_serve_without_repo_or_probe_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        serve_main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: pass --repo DIR") and "--probe live|ready" in err
    assert err.count("\n") == 1
