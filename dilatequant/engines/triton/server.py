"""dq-serve: start a Triton server on a repository, bound to 127.0.0.1, and wait until it is ready.

A `tritonserver` on PATH wins (NVIDIA's container, a local build); otherwise the binary bundled in
nvidia-pytriton, which has only the Python backend and needs, on our machines, LD_LIBRARY_PATH with
Python's LIBDIR (else model load fails with "'_thread.RLock' object has no attribute
'_recursion_count'") and site-packages/nvidia_pytriton.libs, plus --backend-directory pointing at
its python backend. PYTHONPATH carries this interpreter's site-packages into the backend stubs, so
model.py files import the same numpy/onnxruntime/torch/diffusers, and PATH starts with this
interpreter's bin folder (the stub's embedded Python locates its prefix, a venv included, from it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import UserError

LOCALHOST = "127.0.0.1"


@dataclass
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    source: str   # "PATH" | "pytriton"


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _prepend(env: dict[str, str], key: str, paths: list[str]) -> None:
    old = [p for p in env.get(key, "").split(os.pathsep) if p]
    env[key] = os.pathsep.join(dict.fromkeys(paths + old))


def unavailable_reason() -> str | None:
    """Why no Triton server can start here (None when one can): what tests print when they skip."""
    if shutil.which("tritonserver"):
        return None
    root = _pytriton_root()
    if root is None:
        return "neither tritonserver on PATH nor nvidia-pytriton installed (pip install 'dilatequant[serve]')"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "python_backend_stubs" / version / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton has no Python-backend stub for Python {version}"
    try:
        _require_numpy_1()
    except UserError as err:
        return str(err)
    return None


def _require_numpy_1() -> None:
    from importlib.metadata import version

    if int(version("numpy").split(".")[0]) >= 2:
        raise UserError(f"numpy {version('numpy')} is installed, but nvidia-pytriton's Python backend is built against "
                        "numpy 1 and would return empty tensors; pip install 'numpy<2' (the dilatequant[serve] extra "
                        "pins it) or put NVIDIA's tritonserver on PATH")


def python_backend_dir(root: Path, dest: Path) -> Path:
    """A backend directory for the bundled server: its python backend plus the stub for this Python.

    pytriton ships one triton_python_backend_stub per Python version; the stub must match the
    interpreter whose site-packages the model.py files import from.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise UserError(f"nvidia-pytriton has no Python-backend stub for Python {version} (it has {', '.join(have)}); "
                        "run dq-serve from one of those Python versions")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    shutil.copy2(stub, target / stub.name)
    return dest


def server_command(repo: Path, http_port: int, grpc_port: int, workdir: Path, binary: str | None = None,
                   log_verbose: int = 0, exit_timeout_s: int = 30) -> ServerCommand:
    env = dict(os.environ)
    _prepend(env, "PYTHONPATH", [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # The backend stub's embedded Python finds its prefix (and a venv's pyvenv.cfg) from `python3` on PATH.
    _prepend(env, "PATH", [str(Path(sys.executable).parent)])
    found = binary or shutil.which("tritonserver")
    extra: list[str] = []
    source = "PATH"
    if not found:
        root = _pytriton_root()
        if root is None:
            raise UserError("no Triton server found: put tritonserver on PATH (NVIDIA's container has it) or "
                            "install the bundled one: pip install 'dilatequant[serve]' (nvidia-pytriton)")
        _require_numpy_1()
        found = str(root / "bin" / "tritonserver")
        extra = ["--backend-directory", str(python_backend_dir(root, workdir / "backends"))]
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent.parent / "nvidia_pytriton.libs")]
        _prepend(env, "LD_LIBRARY_PATH", [p for p in libs if p and Path(p).is_dir()])
        source = "pytriton"
    argv = [found, "--model-repository", str(Path(repo).resolve()),
            "--http-address", LOCALHOST, "--http-port", str(http_port),
            "--grpc-address", LOCALHOST, "--grpc-port", str(grpc_port),
            "--allow-metrics", "false", "--allow-sagemaker", "false", "--allow-vertex-ai", "false",
            "--exit-on-error", "true", "--strict-readiness", "true", "--disable-auto-complete-config",
            # explicit model control: a model whose backend died can be reloaded over the API (supervisor.py)
            "--model-control-mode", "explicit", "--load-model", "*",
            "--exit-timeout-secs", str(exit_timeout_s), "--log-verbose", str(log_verbose), *extra]
    return ServerCommand(argv, env, source)


@dataclass
class TritonServer:
    """A running server process; use as a context manager so it is always stopped."""

    repo: Path
    http_port: int = 0
    grpc_port: int = 0
    binary: str | None = None
    log_path: Path | None = None
    exit_timeout_s: int = 30  # Triton's own drain time on SIGTERM (--exit-timeout-secs); stop() waits a little longer
    log_verbose: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)
    source: str = ""
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{LOCALHOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        repo = Path(self.repo)
        if not any(repo.glob("*/config.pbtxt")):
            raise UserError(f"'{repo}' holds no model (no */config.pbtxt); write one with dq-triton --repo {repo}")
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self._workdir = tempfile.TemporaryDirectory(prefix="dq-serve-")
        cmd = server_command(repo, self.http_port, self.grpc_port, Path(self._workdir.name), self.binary,
                             self.log_verbose, self.exit_timeout_s)
        self.source = cmd.source
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd.argv, env=cmd.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if self.log_path:
            log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.process.returncode} before it was ready"
                                + (f"; see {self.log_path}:\n{_tail(self.log_path)}" if self.log_path else
                                   " (run dq-serve --log FILE to see why)"))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"tritonserver not ready after {timeout_s:.0f} s; see its log"
                        + (f" {self.log_path}:\n{_tail(self.log_path)}" if self.log_path else ""))

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (Triton drains and unloads for up to exit_timeout_s), then SIGKILL of the whole process group."""
        timeout_s = self.exit_timeout_s + 10 if timeout_s is None else timeout_s
        p = self.process
        try:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            if p is not None:
                # Python-backend stubs share the server's session; none may outlive it.
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(timeout=10)
        finally:
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
