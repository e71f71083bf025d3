"""Is TensorRT 11 usable here? Answered before any work, as one line that says what is missing and how to fix it.

TensorRT is an optional extra: its wheels come from NVIDIA's package index and it needs an NVIDIA GPU, so every
TensorRT entry point calls `require_trt_and_gpu()` first and the rest of the package never imports `tensorrt` at
module level. The checks, in order:

- TensorRT >= 11 imports. It comes in a CUDA 12 and a CUDA 13 build (`tensorrt-cu12`, `tensorrt-cu13`; the
  `tensorrt` metapackage installs the CUDA 13 one), and a build newer than the driver's CUDA fails only later,
  deep in TensorRT ("CUDA initialization failure with error: 35"): the driver's CUDA version is compared with the
  build's first, and such a failure, if it still happens, is turned into the same one line.
- Polygraphy >= 0.53: 0.49-0.52 read `layer.precision_is_set`, which TensorRT 11 removed, outside any guard.
- a CUDA GPU.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from types import ModuleType

from ...core.errors import UserError

MIN_MAJOR = 11
MIN_POLYGRAPHY = (0, 53)
NVIDIA_INDEX = "--extra-index-url https://pypi.nvidia.com"
INSTALL_HINT = (f'pip install "dilatequant[trt]" {NVIDIA_INDEX} (the CUDA 13 build; with a CUDA 12 driver: '
                f'pip install "dilatequant[trt-cu12]" {NVIDIA_INDEX})')
CUDA_BUILDS = {12: "trt-cu12", 13: "trt-cu13"}      # CUDA major -> this package's extra
MIN_DRIVER = {12: "525", 13: "580"}                 # Linux driver branch each CUDA major needs
CUDA_INIT_FAILURE = re.compile(r"CUDA initialization failure|cudaErrorInsufficientDriver|"
                               r"driver version is insufficient|CUDA driver version is insufficient", re.I)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    source: str              # how it was found: "torch" | "nvidia-smi"

    def to_json(self) -> dict:
        return asdict(self)


def require_tensorrt() -> ModuleType:
    """Import TensorRT >= 11 built for a CUDA the driver runs, or raise a UserError naming the install command."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: wheel present but its CUDA libraries are not
        check_cuda_build(tensorrt_cuda_major(), driver_cuda_version())  # the wrong CUDA build says so first
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
    check_cuda_build(tensorrt_cuda_major(), driver_cuda_version(), version)
    return trt


def tensorrt_cuda_major() -> int | None:
    """The CUDA major version of the installed TensorRT build (12 or 13), from the distribution that provides the
    `tensorrt` module (tensorrt-cu12-bindings / tensorrt-cu13-bindings); None when it cannot be told."""
    from importlib import metadata

    try:
        dists = metadata.packages_distributions().get("tensorrt", [])
    except Exception:  # a broken site-packages entry must not stop the other checks
        return None
    majors = sorted({int(m.group(1)) for d in dists if (m := re.search(r"cu(\d+)", d.lower()))})
    if len(majors) > 1:
        raise UserError(f"both the {' and the '.join(f'CUDA {m}' for m in majors)} builds of TensorRT are installed "
                        f"({', '.join(sorted(set(dists)))}) and overwrite each other's `tensorrt` module; keep one: "
                        f"pip uninstall {' '.join(f'tensorrt-cu{m} tensorrt-cu{m}-bindings tensorrt-cu{m}-libs' for m in majors)}"
                        f" and reinstall the one your driver runs ({INSTALL_HINT})")
    return majors[0] if majors else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver supports (cuDriverGetVersion), e.g. (12, 4); None when
    there is no driver library (no GPU, or a machine without the NVIDIA driver)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    try:
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except AttributeError:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def check_cuda_build(trt_cuda: int | None, driver: tuple[int, int] | None, trt_version: str = "") -> None:
    """One line when the TensorRT build needs a newer CUDA than the driver offers (e.g. tensorrt-cu13 on a CUDA 12
    driver); nothing when either side is unknown or they fit."""
    if trt_cuda is None or driver is None or driver[0] >= trt_cuda:
        return
    raise UserError(cuda_mismatch_message(trt_cuda, driver, trt_version))


def cuda_mismatch_message(trt_cuda: int | None, driver: tuple[int, int] | None, trt_version: str = "") -> str:
    what = f"TensorRT {trt_version} ".replace("  ", " ") if trt_version else "TensorRT "
    build = f"is the CUDA {trt_cuda} build (tensorrt-cu{trt_cuda})" if trt_cuda else "was built for a newer CUDA"
    drv = f"supports CUDA up to {driver[0]}.{driver[1]}" if driver else "is too old for it"
    fix = (f'install the build for your driver: pip uninstall -y tensorrt tensorrt-cu{trt_cuda} tensorrt-cu{trt_cuda}-bindings tensorrt-cu{trt_cuda}-libs && pip install '
           f'"dilatequant[{CUDA_BUILDS[driver[0]]}]" {NVIDIA_INDEX}, or update the NVIDIA driver'
           if driver and driver[0] in CUDA_BUILDS and trt_cuda
           else f"update the NVIDIA driver or install the TensorRT build for its CUDA ({INSTALL_HINT})")
    need = f" (CUDA {trt_cuda} needs driver {MIN_DRIVER[trt_cuda]} or newer)" if trt_cuda in MIN_DRIVER else ""
    return f"{what}{build} but the NVIDIA driver here {drv}; {fix}{need}"


def explain_cuda_failure(text: str) -> str | None:
    """The one-line driver/runtime mismatch message when TensorRT's own error text is a CUDA initialization failure
    (what a too-new TensorRT build reports when it creates a builder or runtime); None for any other error."""
    if not CUDA_INIT_FAILURE.search(text or ""):
        return None
    try:
        trt_cuda = tensorrt_cuda_major()
    except UserError as err:
        return str(err)
    return cuda_mismatch_message(trt_cuda, driver_cuda_version())


def require_polygraphy() -> str:
    """Polygraphy >= 0.53, or one line saying to upgrade: 0.49-0.52 read `layer.precision_is_set` (removed in
    TensorRT 11) outside any guard, so a build would stop with an AttributeError deep inside CreateConfig."""
    try:
        import polygraphy
    except ImportError as err:
        raise UserError(f"Polygraphy is not installed ({err}); pip install \"polygraphy>=0.53\"") from err
    version = str(getattr(polygraphy, "__version__", "0"))
    parts = tuple(int(p) if p.isdigit() else 0 for p in re.findall(r"\d+", version)[:2])
    if parts < MIN_POLYGRAPHY:
        raise UserError(f"Polygraphy {version} is installed, but TensorRT {MIN_MAJOR} needs Polygraphy >= "
                        f"{'.'.join(map(str, MIN_POLYGRAPHY))} (older ones read layer.precision_is_set, which TensorRT "
                        f"{MIN_MAJOR} removed); upgrade: pip install -U \"polygraphy>=0.53\"")
    return version


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
    """TensorRT (and its CUDA build against the driver), Polygraphy, then the GPU; call before any expensive work."""
    trt = require_tensorrt()
    require_polygraphy()
    return trt, require_gpu()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def plan_mismatch(plan: str, built_trt: str | None, built_gpu: dict | None, trt_version: str | None,
                  gpu: GpuInfo | dict | None) -> str | None:
    """Why a plan built with TensorRT `built_trt` on `built_gpu` (its sidecar) cannot load here, or None.

    A plan runs only on the TensorRT release (major.minor.patch) and the GPU architecture (compute capability)
    that built it; anything else fails inside deserialize_cuda_engine with a long log, or not at all but wrongly.
    Unknown sides (an old sidecar, no GPU information) are not judged.
    """
    gpu_here = gpu.to_json() if isinstance(gpu, GpuInfo) else (gpu or {})
    built_gpu = built_gpu or {}
    problems = []
    if built_trt and trt_version and _release(built_trt) != _release(trt_version):
        problems.append(f"it was built with TensorRT {built_trt} and this is TensorRT {trt_version}")
    cc_built, cc_here = built_gpu.get("compute_capability"), gpu_here.get("compute_capability")
    if cc_built and cc_here and str(cc_built) != str(cc_here):
        problems.append(f"it was built on {built_gpu.get('name', 'a GPU')} (compute capability {cc_built}) and this "
                        f"is {gpu_here.get('name', 'a GPU')} (compute capability {cc_here})")
    if not problems:
        return None
    return (f"engine '{plan}' cannot run here: {' and '.join(problems)}; a TensorRT plan runs only with the TensorRT "
            "release and GPU architecture that built it: rebuild it here with dq-build-engine from the ONNX graph")
