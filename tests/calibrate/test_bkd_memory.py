"""Block-wise distillation's memory is flat in the calibration-set size: blocks stream from an on-disk cache.

RSS is noisy at test sizes (allocator, page cache, thread pools), so this measures something exact: the largest
tensor storage that any torch op inside distill() reads or writes, leaving out the calibration set and the
model's own tensors, which exist before distillation starts. Holding a block's inputs or targets for the whole
set in memory (the old torch.cat of every chunk) makes that grow with the set; streaming keeps it at one chunk.
"""
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dilatequant.calibrate.block_cache import BlockCache
from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.distill import distill
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare


class LargestStorage(TorchDispatchMode):
    """Bytes of the largest storage any dispatched op touches, other than the excluded (pre-existing) ones."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude, self.largest = exclude, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                if s.data_ptr() not in self.exclude:
                    self.largest = max(self.largest, s.nbytes())
        return out


def _storages(*tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _bkd_footprint(model, n: int, tmp_path) -> tuple[int, float]:
    data = build_calibration_set(model, n, 4, use_cache=False)
    q, _ = prepare(model.unet, QuantConfig(weight_bits=8, act_bits=8, num_steps=4), data)
    before = _storages(*data.inputs(slice(None)).values(), *q.state_dict().values(),
                       *model.unet.state_dict().values())
    with LargestStorage(before) as mode:
        report = distill(q, model.unet, data, DistillConfig(iters=1, batch=2), cache_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "the block caches are removed when distillation ends"
    return mode.largest, report["largest_block_cache_mb"]


def test_bkd_memory_is_flat_in_calibration_set_size(cond_model, tmp_path):
    small_dir, big_dir = tmp_path / "small", tmp_path / "big"
    small_dir.mkdir(), big_dir.mkdir()
    small, small_cache = _bkd_footprint(cond_model, 8, small_dir)
    big, big_cache = _bkd_footprint(cond_model, 32, big_dir)
    # the on-disk cache holds every sample (4x the rows) ...
    assert big_cache / small_cache > 3.9, (small_cache, big_cache)
    # ... while the largest tensor in memory is one capture chunk (batch * 4 = 8 rows) at either size
    assert big <= small * 1.05, f"largest in-memory tensor grew from {small} to {big} bytes with 4x the samples"


def test_block_cache_round_trips_rows_and_constants(tmp_path):
    """Batch tensors (nested in tuples and dicts, bf16 too) come back bit for bit at any index; others once."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 4, generator=gen), torch.randn(10, 2, generator=gen).bfloat16()
    const = torch.randn(7)
    with BlockCache(tmp_path, "t", 10) as cache:
        for lo, hi in ((0, 4), (4, 8), (8, 10)):
            cache.append(((x[lo:hi], (y[lo:hi], 3)), {"c": const, "m": None}), hi - lo)
        cache.finish()
        idx = torch.tensor([9, 0, 0, 5])
        (gx, (gy, three)), kw = cache.rows(idx)
        assert torch.equal(gx, x[idx]) and gy.dtype == torch.bfloat16 and torch.equal(gy, y[idx])
        assert three == 3 and kw["m"] is None and kw["c"] is const
        assert cache.nbytes == x.numel() * 4 + y.numel() * 2
    assert not list(tmp_path.iterdir())
