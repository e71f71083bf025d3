"""Is TensorRT 11 usable here? Answered before any work, as one line that says what is missing and how to fix it.

TensorRT is an optional extra: its wheels come from NVIDIA's package index and it needs an NVIDIA GPU, so every
TensorRT entry point calls `require_tensorrt()` and `require_gpu()` first and the rest of the package never
imports `tensorrt` at module level.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from types import ModuleType

from ..errors import UserError

MIN_MAJOR = 11
INSTALL_HINT = 'pip install "dilatequant[trt]" --extra-index-url https://pypi.nvidia.com'


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    source: str              # how it was found: "torch" | "nvidia-smi"

    def to_json(self) -> dict:
        return asdict(self)


def require_tensorrt() -> ModuleType:
    """Import TensorRT >= 11 or raise a UserError naming the install command."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: wheel present but its CUDA libraries are not
        raise UserError(f"TensorRT {MIN_MAJOR} is not installed ({err}); install it with: {INSTALL_HINT} "
                        f"(TensorRT {MIN_MAJOR} needs an NVIDIA GPU with its driver)") from err
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_MAJOR:
        raise UserError(f"TensorRT {version} is installed, but engines are built for TensorRT {MIN_MAJOR} "
                        f"(strongly typed networks); upgrade: pip install -U \"tensorrt>={MIN_MAJOR}\" "
                        "--extra-index-url https://pypi.nvidia.com")
    return trt


def detect_gpu() -> GpuInfo | None:
    """The first CUDA GPU, from torch when it is a CUDA build, else from nvidia-smi; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), f"{major}.{minor}", "torch")
    except Exception:  # a broken CUDA install must not hide the nvidia-smi answer
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(out)


def parse_nvidia_smi(out: str) -> GpuInfo | None:
    """'NVIDIA H100 80GB HBM3, 9.0' (one line per GPU) -> the first GPU."""
    for line in out.splitlines():
        name, _, cap = line.rpartition(",")
        if name.strip() and cap.strip():
            return GpuInfo(name.strip(), cap.strip(), "nvidia-smi")
    return None


def require_gpu() -> GpuInfo:
    gpu = detect_gpu()
    if gpu is None:
        raise UserError(f"no CUDA GPU found (neither torch.cuda nor nvidia-smi sees one); TensorRT {MIN_MAJOR} "
                        "builds and runs engines only on an NVIDIA GPU: run on a GPU machine with the NVIDIA driver "
                        "installed, or use the ONNX Runtime path (dq-verify --onnx) on CPU")
    return gpu


def require_trt_and_gpu() -> tuple[ModuleType, GpuInfo]:
    """Both checks, TensorRT first (the more common gap); call before any expensive work."""
    trt = require_tensorrt()
    return trt, require_gpu()
