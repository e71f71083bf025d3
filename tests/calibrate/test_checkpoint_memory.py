"""q.pt at scale: save streams into the file (no in-memory copy of the payload), load maps the file instead of
reading a second copy, and neither leaves a half-written file behind (benchmarks/checkpoint_memory.py measures
an SD-shaped UNet)."""
import copy
import hashlib
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from dilatequant.calibrate import checkpoint
from dilatequant.calibrate.checkpoint import load_checkpoint, save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantUNet
from dilatequant.core.models import DiffusionModel
from dilatequant.core.reporting import own_storage
from dilatequant.core.sampling import sampling_timesteps
from conftest import tiny_cond

STEPS = 4


def _model() -> DiffusionModel:
    """A few million parameters: the payload (~10 MB) dwarfs save's and load's own Python bookkeeping."""
    return tiny_cond(channels=(64, 128), in_channels=4, groups=16, heads=8, dim=64, source="mid-random")


@pytest.fixture(scope="module")
def mid():
    torch.manual_seed(0)
    model = _model()
    q = QuantUNet(model.unet, QuantConfig(num_steps=STEPS, symmetric=False))
    with torch.no_grad():  # calibrated-looking state: distinct scales and tables, not the constructor's ones
        for layer in q.layers().values():
            layer.weight_quantizer.scale.copy_(layer.weight.abs().flatten(1).amax(1) / 127)
        for aq in q.act_quantizers.values():
            aq.delta.uniform_(0.01, 0.1)
            aq.zero_point.copy_(torch.randint(-8, 8, aq.zero_point.shape).float())
    q.set_quant(weights=True, acts="quant")
    return q, model


def _save(tmp_path, mid, name="q.pt") -> Path:
    q, model = mid
    return save_checkpoint(tmp_path / name, q, model, sampling_timesteps(model, STEPS), "fp-hash", {"k": 1})


def _inputs(model: DiffusionModel) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    return x, torch.tensor([999, 750, 500, 0]), torch.arange(STEPS), model.condition(torch.tensor([0, 1, 2, 3]))


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges this process maps from `path` (Linux /proc/self/maps)."""
    target = str(path.resolve())
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (uncalibrated static rows are NaN, which torch.equal calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_bit_identical(mid, tmp_path):
    q, model = mid
    ck = load_checkpoint(_save(tmp_path, mid))
    ours, theirs = q.state_dict(), ck.qunet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(_same(ours[k], theirs[k]) for k in ours), [k for k in ours if not _same(ours[k], theirs[k])][:3]
    x, t, ti, cond = _inputs(model)
    with torch.no_grad():
        assert torch.equal(q(x, t, ti, cond), ck.qunet(x, t, ti, ck.model.condition(torch.tensor([0, 1, 2, 3]))))
    assert ck.summary == {"k": 1} and ck.timesteps == sampling_timesteps(model, STEPS)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_load_maps_the_file_instead_of_copying_it(mid, tmp_path):
    path = _save(tmp_path, mid)
    ck = load_checkpoint(path)
    ranges = _mapped_from(path)
    tensors = [*ck.qunet.parameters(), *ck.qunet.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    mapped = sum(t.numel() * t.element_size() for t in tensors
                 if any(lo <= t.data_ptr() < hi for lo, hi in ranges))
    # the old load read every tensor into fresh memory (0 % mapped) after a random init of the whole UNet
    assert total > 8 * 2**20 and mapped / total >= 0.99, (mapped, total)


def test_loaded_tensors_change_in_memory_only(mid, tmp_path):
    """The mapping is private (copy on write): training or editing a loaded model never writes into q.pt."""
    path = _save(tmp_path, mid)
    before = _sha(path)
    ck = load_checkpoint(path)
    with torch.no_grad():
        for p in ck.qunet.parameters():
            p.add_(1.0)
    assert _sha(path) == before
    assert torch.equal(next(load_checkpoint(path).qunet.parameters()) + 1, next(ck.qunet.parameters()))


def test_save_does_not_hold_the_payload_in_memory(mid, tmp_path):
    tracemalloc.start()
    try:
        path = _save(tmp_path, mid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    # the old save serialized into a BytesIO and copied it out (>= 2x the file in Python memory); what is left is
    # pickling ~1 MB of metadata, 0.84 MB once in a whole-suite run (0.05 x the file was too tight)
    assert size > 8 * 2**20 and peak < 0.1 * size, (peak, size)


def test_bkd_progress_is_streamed_too_and_restores_the_model(mid, tmp_path):
    """A finished block's trained tensors are streamed to their own file (a big block here: the whole model);
    the progress file itself stays small (the whole model after every block was 3.4 GB per block at SD 1.5)."""
    from dilatequant.calibrate.distill import (_keep_valid, _save_progress, _start_progress, load_progress,
                                               progress_blocks)

    q, _ = mid
    path = tmp_path / "q.pt.progress"
    gen = torch.Generator().manual_seed(3)
    _start_progress(path, q)
    tracemalloc.start()
    try:
        _save_progress(path, "big", dict(q.state_dict()), ["big"], {"big": [1.0]}, "fp", gen)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (progress_blocks(path) / "big.pt").stat().st_size  # pickling ~1 MB of tensor metadata is no copy
    assert size > 8 * 2**20 and peak < 0.1 * size, (peak, size)
    assert path.stat().st_size < 64 * 2**10, path.stat().st_size
    other = QuantUNet(mid[1].unet, q.config)
    assert load_progress(path, other, "fp", torch.Generator()) == (["big"], {"big": [1.0]})
    ref = copy.deepcopy(q)
    _keep_valid(ref)  # what every training step does to the whole model; the fixture's zero points break it
    for k, v in ref.state_dict().items():  # NaN: a static row never calibrated
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


def test_failed_save_leaves_no_file_and_keeps_the_previous_one(mid, tmp_path, monkeypatch):
    path = _save(tmp_path, mid)
    before = _sha(path)
    real = torch.save

    def write_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of it is on disk ...
        raise OSError(28, "No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(torch, "save", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, mid)
    with pytest.raises(OSError):
        _save(tmp_path, mid, name="new.pt")
    monkeypatch.setattr(torch, "save", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]  # no temporaries, no new.pt
    assert _sha(path) == before and load_checkpoint(path).summary == {"k": 1}


def test_a_state_dict_view_is_saved_compactly():
    """torch.save writes whole storages: a view into a larger tensor is copied, a whole tensor is not."""
    whole = torch.arange(6.0)
    assert own_storage(whole).data_ptr() == whole.data_ptr()
    view = whole[2:4]
    own = own_storage(view)
    assert own.data_ptr() != view.data_ptr() and own.untyped_storage().nbytes() == 8 and torch.equal(own, view)


def test_a_q_pt_from_before_the_static_rows_still_loads(mid, tmp_path):
    """Tensors a q.pt predates (the pooled static rows) are filled in on the CPU, not left on the meta device."""
    path = _save(tmp_path, mid)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if ".static_" not in k}
    torch.save(raw, tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")
    rows = [q.static_delta for q in ck.qunet.act_quantizers.values()]
    assert rows and all(r.device.type == "cpu" and torch.isnan(r).all() for r in rows)
