"""What every report shares: the machine and versions it ran on, atomic file writes, sample grids."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import numpy as np

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is handled: the CLI's --help and the Triton client stay torch-free
    import torch


def environment() -> dict[str, Any]:
    """Versions and machine, recorded in every report so numbers can be traced to where they came from."""
    import diffusers
    import onnx
    import onnxruntime
    import torch

    from .. import __version__

    return {
        "dilatequant": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory PyTorch's allocator held on a CUDA device (None off CUDA): what a GPU calibration needs."""
    if device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    Linux's getrusage ru_maxrss survives execve, so a subprocess started by a big parent would report
    the parent's peak; the address space's own high-water mark (VmHWM) starts fresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource  # not on Windows; macOS reports bytes, Linux KiB

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 1024), 1)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create the folder (or check it) up front, so a bad path fails before minutes of work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to '{path}' ({err.strerror or err}); pass a folder you can write to") from err
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], object], fsync: bool = True) -> Path:
    """Stream `write(f)` into a temporary file beside the target, fsync it, rename it over the target.

    Nothing is ever held whole in memory (torch.save of an 860M-parameter q.pt writes 3.4 GB as it goes), no
    half-written file is ever seen under the target's name, and a failure removes the temporary file. fsync
    makes the data durable before the rename (a crash then leaves the old file or the new one, whole).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write '{path}' ({err.strerror or err}); choose a writable location") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Rename a finished temporary file (made by mkstemp beside `path`) over `path`, with the permissions a plain
    open() would have given it (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return Path(path)


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself where it spans its whole storage; a copy only where it is a view into a larger one
    (torch.save writes whole storages). Copying every tensor would be a second copy of the model."""
    t = t.detach()
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name beside the target and rename, so no half-written file is ever seen.

    Small reports and grids: not fsynced (as before), which keeps many small writes cheap."""
    return atomic_write_stream(path, lambda f: f.write(data), fsync=False)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf" / "nan": JSON has no literal for them
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """What write_json wrote, with its "inf" / "-inf" / "nan" strings read back as floats."""
    def floats(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: floats(v) for k, v in o.items()}
        if isinstance(o, list):
            return [floats(v) for v in o]
        return float(o) if o in ("inf", "-inf", "nan") else o

    return floats(json.loads(Path(path).read_text()))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def image_grid(images: torch.Tensor, nrow: int = 10) -> np.ndarray:
    """[N,1|3,H,W] in [-1,1] -> uint8 HxW(x3) grid with a 2-pixel gutter."""
    import torch

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), 64, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def save_grid(path: str | Path, images: torch.Tensor, nrow: int = 10, scale: int = 2) -> Path:
    import io

    from PIL import Image

    img = Image.fromarray(image_grid(images, nrow))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def return_free_memory() -> None:
    """Collect cycles, then hand glibc's freed heap pages back to the OS (malloc_trim): models loaded as many
    mid-sized tensors and then dropped (SDXL's text towers, 2.9 GB) otherwise stay in the process's RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
