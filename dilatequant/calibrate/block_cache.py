"""On-disk, memory-mapped cache of one block's captured inputs or FP targets, for block-wise distillation.

Held in memory, a block's inputs and targets over the calibration set grow with its size (an SD 1.5 down
block's input is 320x64x64 floats, 5 MiB a sample: 2.6 GiB at 512 samples, twice over for the target).
Here every batch-sized tensor of a captured call is appended chunk by chunk to a flat file with plain
writes (no dirty pages mapped into the process), then read back by row index through a read-only mmap.
After each gather the mapping's pages are dropped again (madvise DONTNEED), so the resident set holds one
training batch, whatever the calibration-set size: file pages stay in the kernel's page cache, which is
reclaimable and not this process's memory.
"""
from __future__ import annotations

import mmap
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

# dtypes numpy has no type for are stored as raw integers of the same width and viewed back
_STORAGE = {torch.bfloat16: torch.int16, torch.float16: torch.float16}


@dataclass
class _Leaf:
    """One batch-sized tensor position of the captured structure: its file, row shape and dtype."""
    path: Path
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    file: Any = None
    mm: mmap.mmap | None = None
    array: np.ndarray | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


class BlockCache:
    """Rows 0..n-1 of a captured structure (tuples/lists/dicts of tensors and constants), on disk.

    A tensor is a batch row tensor when its first dimension is the chunk's size (as distill's in-memory
    merge decided); anything else must be the same in every chunk and is kept once, from the first chunk.
    """

    def __init__(self, folder: Path, name: str, n: int) -> None:
        self.folder, self.name, self.n = Path(folder), name, n
        self.rows_written = 0
        self._spec: pytree.TreeSpec | None = None
        self._leaves: list[_Leaf | Any] = []   # _Leaf for row tensors, the constant itself otherwise
        self.nbytes = 0

    def append(self, obj: Any, size: int) -> None:
        """Write one chunk's captured structure (`size` rows) at the end of the files."""
        flat, spec = pytree.tree_flatten(obj)
        if self._spec is None:
            self._spec = spec
            for i, v in enumerate(flat):
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size:
                    leaf = _Leaf(self.folder / f"{self.name}.{i}.bin", tuple(v.shape[1:]), v.dtype)
                    leaf.file = open(leaf.path, "wb")
                    self._leaves.append(leaf)
                else:
                    self._leaves.append(v)
        elif spec != self._spec:
            raise RuntimeError(f"block cache {self.name}: a call's arguments changed structure between chunks")
        for leaf, v in zip(self._leaves, flat):
            if not isinstance(leaf, _Leaf):
                continue
            if tuple(v.shape) != (size, *leaf.row_shape) or v.dtype != leaf.dtype:
                raise RuntimeError(f"block cache {self.name}: expected {(size, *leaf.row_shape)} {leaf.dtype}, "
                                   f"got {tuple(v.shape)} {v.dtype}")
            t = v.detach().cpu().contiguous().view(_STORAGE.get(v.dtype, v.dtype))  # cached on the CPU
            leaf.file.write(memoryview(t.numpy()).cast("B"))
            self.nbytes += t.numel() * t.element_size()
        self.rows_written += size

    def finish(self) -> "BlockCache":
        """Close the files and map them read-only; every row must have been written."""
        if self.rows_written != self.n:
            raise RuntimeError(f"block cache {self.name}: {self.rows_written} rows written, expected {self.n}")
        for leaf in self._leaves:
            if isinstance(leaf, _Leaf):
                leaf.file.close()
                leaf.file = None
                with open(leaf.path, "rb") as f:
                    leaf.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                np_dtype = torch.empty((), dtype=_STORAGE.get(leaf.dtype, leaf.dtype)).numpy().dtype
                leaf.array = np.frombuffer(leaf.mm, dtype=np_dtype).reshape(self.n, *leaf.row_shape)
        return self

    def rows(self, idx: torch.Tensor) -> Any:
        """The structure with every row tensor gathered at idx (a fresh, writable in-memory copy)."""
        ii = idx.numpy()
        out = []
        for leaf in self._leaves:
            if isinstance(leaf, _Leaf):
                t = torch.from_numpy(np.take(leaf.array, ii, axis=0))
                out.append(t.view(leaf.dtype) if leaf.dtype in _STORAGE else t)
                leaf.mm.madvise(mmap.MADV_DONTNEED)  # drop the pages just read from this process's resident set
            else:
                out.append(leaf)
        return pytree.tree_unflatten(out, self._spec)

    def __enter__(self) -> "BlockCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap and delete the files (the cache is transient: a resumed run recaptures its block)."""
        for leaf in self._leaves:
            if isinstance(leaf, _Leaf):
                if leaf.file is not None:
                    leaf.file.close()
                leaf.array = None
                if leaf.mm is not None:
                    leaf.mm.close()
                leaf.path.unlink(missing_ok=True)
        self._leaves = []


class CacheFolder:
    """A private folder for block caches: under `parent` (next to q.pt) or the system temp folder; removed
    on exit, including after an interruption (a resumed run recaptures its unfinished block)."""

    def __init__(self, parent: Path | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="dq-bkd-cache-", dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
