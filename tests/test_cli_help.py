"""Every command's --help builds its parser without importing the heavy stack (torch, diffusers, ONNX Runtime).

A parser that reads a default from a module that imports torch makes `--help` take seconds (7-8 s on 2 cores);
this checks the cause, in a fresh interpreter, rather than timing it.
"""
import json
import subprocess
import sys

import pytest

COMMANDS = ("demo_main", "calibrate_main", "export_main", "build_engine_main", "verify_main", "generate_main",
            "triton_main", "serve_main", "client_main")
HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "onnx", "tensorrt", "tensorrt_rtx")

PROBE = """
import contextlib, io, json, sys
from dilatequant import cli
out = {}
for name in %r:
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            getattr(cli, name)(["--help"])
        except SystemExit:
            pass
    out[name] = {"help_chars": len(text.getvalue()), "heavy": sorted(m for m in %r if m in sys.modules)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_probe() -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE % (COMMANDS, HEAVY)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_command_prints_its_help(help_probe):
    assert set(help_probe) == set(COMMANDS)
    for name, r in help_probe.items():
        assert r["help_chars"] > 200, (name, r)


def test_help_imports_no_heavy_module(help_probe):
    """Cumulative across commands in one interpreter: the first parser that pulls torch in is named."""
    loaded = {name: r["heavy"] for name, r in help_probe.items() if r["heavy"]}
    assert not loaded, f"--help imported {loaded}"
