"""The Python backend's stub processes of a running tritonserver, read from /proc (Triton runs on Linux).

Every instance of a Python-backend model runs in its own `triton_python_backend_stub` process, a child of
tritonserver whose argv is `<stub> <repo>/<model>/<version>/model.py <shm region> ... <instance name> ...`. Triton
2.51 does not notice when one dies (docs/triton.md, "What Triton itself provides"): the process stays a zombie child
and the model keeps answering "ready". These functions are how dq-serve notices instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str  # Triton's instance name, e.g. unet_0_0


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the command name in parentheses may hold spaces


def alive(pid: int) -> bool:
    """Running, not gone and not a zombie (a killed stub stays one: tritonserver never reaps it)."""
    return process_state(pid) not in (None, "Z", "X")


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            kids.append(int(entry.name))
    return kids


def stubs_of(server_pid: int) -> list[Stub]:
    """The live stub processes of this server (a zombie's argv is empty: it is not listed)."""
    found = []
    for pid in children(server_pid):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if len(argv) < 2 or Path(argv[0]).name != STUB_BINARY or not alive(pid):
            continue
        model = Path(argv[1]).parent.parent.name
        instance = next((a for a in argv[2:] if a.startswith(f"{model}_")), f"{model} (pid {pid})")
        found.append(Stub(pid, model, instance))
    return found
