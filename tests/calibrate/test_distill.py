import pytest
import torch

from dilatequant.calibrate import distill as distill_mod
from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.distill import distill
from dilatequant.calibrate.distill_config import DistillConfig
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import noise_error, prepare


@pytest.fixture
def setup(cond_model):
    data = build_calibration_set(cond_model, 32, 4, use_cache=False)
    q, _ = prepare(cond_model.unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=4), data)
    return cond_model, data, q


def test_bkd_lowers_noise_error(setup):
    model, data, q = setup
    before = noise_error(q, model.unet, data)["noise_mse"]
    report = distill(q, model.unet, data, DistillConfig(iters=30, batch=8, lr_weight=1e-3, lr_act=1e-3))
    after = noise_error(q, model.unet, data)["noise_mse"]
    assert report["blocks"] == len(q.unit_order) == len(report["block_losses"])
    assert after < before
    assert not any(p.requires_grad for p in q.parameters()), "training leaves nothing trainable behind"
    # nor gradients: kept, they were a second copy of every trained weight by the end (SDXL ran out of memory)
    assert not [n for n, p in q.named_parameters() if p.grad is not None]


def test_resume_continues_at_next_unfinished_block(setup, tmp_path, monkeypatch):
    model, data, q = setup
    cfg = DistillConfig(iters=2, batch=8)
    progress = tmp_path / "q.pt.progress"
    real_train, calls = distill_mod._train, []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(q, model.unet, data, cfg, progress_path=progress, fingerprint="run-a")
    assert progress.is_file()
    # each finished block's trained tensors written once, beside the model as BKD found it (not the whole
    # model after every block: 3.4 GB per block at SD 1.5 size)
    blocks = {f.stem: torch.load(f, weights_only=True) for f in distill_mod.progress_blocks(progress).glob("*.pt")}
    assert sorted(blocks) == sorted(["_base", *q.unit_order[:3]]), sorted(blocks)
    assert blocks["_base"].keys() == q.state_dict().keys()
    for unit in q.unit_order[:3]:
        assert blocks[unit] and all(k.startswith(("unet." + unit + ".", "act_quantizers." + unit.replace(".", "/")))
                                    for k in blocks[unit]), (unit, list(blocks[unit])[:4])
    monkeypatch.setattr(distill_mod, "_train", lambda *a, **k: calls.append(a[3]) or real_train(*a, **k))
    report = distill(q, model.unet, data, cfg, progress_path=progress, resume=True, fingerprint="run-a")
    assert len(calls) == len(q.unit_order), "every block trained exactly once across both runs"
    assert len(report["block_losses"]) == len(q.unit_order)
    with pytest.raises(Exception, match="other settings"):
        distill(q, model.unet, data, cfg, progress_path=progress, resume=True, fingerprint="run-b")


def test_resume_after_interruption_equals_an_uninterrupted_run(cond_model, tmp_path, monkeypatch):
    """Interrupted after block 3, resumed in a 'new process' (fresh model, other global seed): the state dict
    is bit-identical to one uninterrupted seeded run (same batches drawn per block, same training)."""
    data = build_calibration_set(cond_model, 32, 4, use_cache=False)
    cfg = DistillConfig(iters=3, batch=8, lr_weight=1e-3, lr_act=1e-3)

    def fresh():
        return prepare(cond_model.unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=4), data)[0]

    ref = fresh()
    distill(ref, cond_model.unet, data, cfg)
    progress, real_train, calls = tmp_path / "q.pt.progress", distill_mod._train, []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(fresh(), cond_model.unet, data, cfg, progress_path=progress, fingerprint="run-a")
    monkeypatch.setattr(distill_mod, "_train", real_train)
    torch.manual_seed(1234)  # a new process: nothing carried over in memory
    resumed = fresh()
    distill(resumed, cond_model.unet, data, cfg, progress_path=progress, resume=True, fingerprint="run-a")
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after resume, e.g. {differ[:3]}"
    assert len(q_units := ref.unit_order) > 3, q_units  # the interruption fell in the middle


def test_full_model_qat_runs(setup):
    model, data, q = setup
    report = distill(q, model.unet, data, DistillConfig(iters=3, batch=8, full_model=True))
    assert report["mode"] == "full-model QAT" and len(report["loss_first_last"]) == 2


def test_validation_reference_is_the_samplers_own_fp_output(cond_model, tmp_path, monkeypatch):
    """noise_error's FP reference comes from sampling (no FP pass of its own): the UNet's raw output for each
    held-out input (not the guided mix), equal to a fresh FP run up to batch-size rounding, kept by the disk
    cache, and giving the same error figures as running the FP model."""
    from dataclasses import replace

    from dilatequant.calibrate.calibration_data import build_calibration_sets
    from dilatequant.calibrate.distill import fp_runner
    from dilatequant.core.metrics import sqnr_db

    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    data, val = build_calibration_sets(cond_model, 16, 4, 8, guidance_scale=2.0)
    assert val.fp_output is not None and val.fp_output.shape == val.sample.shape
    fresh = fp_runner(cond_model.unet)(val.inputs(slice(None)))
    assert sqnr_db(val.fp_output, fresh) > 80
    _, cached = build_calibration_sets(cond_model, 16, 4, 8, guidance_scale=2.0)
    assert torch.equal(cached.fp_output, val.fp_output)
    q, _ = prepare(cond_model.unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=4), data)
    calls = []
    hook = cond_model.unet.register_forward_hook(lambda *_: calls.append(1))
    kept = noise_error(q, cond_model.unet, val)
    assert not calls
    ran = noise_error(q, cond_model.unet, replace(val, fp_output=None))
    hook.remove()
    assert calls
    assert kept["noise_sqnr_db"] == pytest.approx(ran["noise_sqnr_db"], abs=1e-3)
