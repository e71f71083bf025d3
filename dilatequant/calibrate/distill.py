"""Block-wise Knowledge Distillation (BKD), resumable, and full-model QAT for the cost comparison.

Block k of the quantized model learns to reproduce FP block k's output, fed with the input that the
already-quantized blocks before it produce (errors propagate, as in the paper). Only one block's
activations are held for backprop. After every block its trained tensors and a small progress file are
written atomically, so an interrupted run continues at the next unfinished block.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from ..core.denoisers import predict
from ..core.device import autocast, module_device, to_device
from ..core.errors import UserError
from ..core.reporting import atomic_write_stream, own_storage
from .block_cache import BlockCache, CacheFolder
from .calibration_data import CalibrationSet, condition_of
from .distill_config import DistillConfig
from .distributed import SINGLE, Dist
from .quant_unet import QuantLayer, QuantUNet

PROGRESS_FORMAT = "dilatequant.bkd-progress/2"  # /2: one file per finished block
BASE = "_base"  # the progress file of the model as BKD found it (units are module paths: never this name)


class _Stop(Exception):
    pass


def block_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    """What a unit hands on: its tensor, or every tensor of its tuple (a UNet unit returns one; an SD3 or FLUX
    block returns the text and the image stream, SD3's last block None for the text it no longer updates)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(v for v in out if isinstance(v, torch.Tensor))


def block_loss(outputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """MSE over every element a unit hands on (both streams of a DiT block weigh by their element counts)."""
    if len(outputs) == 1:
        return torch.nn.functional.mse_loss(outputs[0].float(), targets[0].float())
    sq = sum(torch.nn.functional.mse_loss(o.float(), t.float(), reduction="sum") for o, t in zip(outputs, targets))
    return sq / sum(o.numel() for o in outputs)


@torch.no_grad()
def capture(run: Callable[[dict], Any], unit: nn.Module, data: CalibrationSet, batch: int, want_output: bool,
            folder: Path, name: str) -> BlockCache:
    """Run the model over the calibration set and stream unit's call (args, kwargs) or its output to disk.

    Only one chunk's activations are in memory at a time; the rows land in a memory-mapped BlockCache.
    """
    cache = BlockCache(folder, name, len(data))
    size = 0

    def pre(mod, args, kwargs):
        if not want_output:
            cache.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                          {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}), size)
            raise _Stop

    def post(mod, args, kwargs, output):
        cache.append(tuple(o.detach() for o in block_outputs(output)), size)
        raise _Stop

    h = unit.register_forward_pre_hook(pre, with_kwargs=True) if not want_output else \
        unit.register_forward_hook(post, with_kwargs=True)
    calls = 0
    try:
        for chunk in data.chunks(batch * 4):
            size = len(chunk["t_index"])
            calls += 1
            try:
                run(chunk)
            except _Stop:
                pass
            if cache.rows_written != min(calls * batch * 4, len(data)):
                raise RuntimeError(f"block {type(unit).__name__} was not called once per forward pass")
    except BaseException:
        cache.close()
        raise
    finally:
        h.remove()
    return cache.finish()


_EMBEDDED_AS_FLOAT32 = ("timestep", "time_ids", "guidance")  # diffusers' sinusoidal embeddings take float32


def fp_runner(fp_unet: nn.Module, amp: str = "none") -> Callable[[dict], torch.Tensor]:
    """The FP denoiser's prediction on a chunk of its inputs (moved to its device; amp: see device.autocast).

    A teacher held in a lower precision (recipe's --teacher-dtype bf16) gets its float inputs in its own dtype;
    its outputs stay in that dtype (a block's captured target too: half the cache) and the losses upcast them."""
    dtype = next(fp_unet.parameters()).dtype

    def run(chunk):
        dev = module_device(fp_unet)
        chunk = to_device(chunk, dev)
        if dtype != torch.float32:
            chunk = {k: v.to(dtype) if torch.is_floating_point(v) and k not in _EMBEDDED_AS_FLOAT32 else v
                     for k, v in chunk.items()}
        with autocast(dev, amp):
            return predict(fp_unet, chunk["sample"], chunk["timestep"], condition_of(chunk))
    return run


def quant_runner(qunet: QuantUNet, amp: str = "none") -> Callable[[dict], Any]:
    def run(chunk):
        dev = module_device(qunet)
        chunk = to_device(chunk, dev)
        with autocast(dev, amp):
            return qunet(chunk["sample"], chunk["timestep"], chunk["t_index"], condition_of(chunk))
    return run


def _relative(params: list[nn.Parameter], lr: float) -> list[dict]:
    """One Adam group per step-size tensor, its lr scaled to the tensor's magnitude.

    Step sizes span orders of magnitude (an 8-bit conv_out weight step ~1e-3, a 4-bit one ~1e-1);
    Adam moves every parameter by about lr per step, so one absolute lr is either frozen or wild.
    """
    return [{"params": [p], "lr": lr * p.detach().abs().mean().clamp_min(1e-8).item()} for p in params]


def _param_groups(qunet: QuantUNet, layer_names: list[str], cfg: DistillConfig,
                  extra_quantizers: list[nn.Module] = ()) -> list[dict]:
    layers = qunet.layers()
    weights, wscales = [], []
    quantizers: dict[int, nn.Module] = {id(q): q for q in extra_quantizers}
    for n in layer_names:
        layer: QuantLayer = layers[n]
        weights += [p for p in (layer.weight, layer.bias) if p is not None]
        wscales.append(layer.weight_quantizer.scale)
        quantizers.setdefault(id(layer.input_quantizer), layer.input_quantizer)
    deltas = [q.delta for q in quantizers.values()]
    zps = [q.zero_point for q in quantizers.values() if q.zero_point is not None]
    groups = [{"params": weights, "lr": cfg.lr_weight}] + _relative(wscales, cfg.lr_weight_scale)
    groups += _relative(deltas, cfg.lr_act)
    return groups + ([{"params": zps, "lr": cfg.lr_zero_point}] if zps else [])


def _attn_quantizers(qunet: QuantUNet, unit: str | None) -> list[nn.Module]:
    prefix = "" if unit is None else unit.replace(".", "/") + "/"
    return [q for k, q in qunet.act_quantizers.items() if k.startswith(prefix) and "/attn_" in k]


@torch.no_grad()
def _keep_valid(qunet: QuantUNet) -> None:
    for q in qunet.act_quantizers.values():
        q.delta.clamp_(min=1e-8)
        if q.zero_point is not None:
            q.zero_point.clamp_(q.range.qmin, q.range.qmax)
    for layer in qunet.layers().values():
        layer.weight_quantizer.scale.clamp_(min=1e-8)


def _train(qunet, groups, step_loss, iters, desc, report: Callable[[torch.Tensor], float] | None = None,
           quiet: bool = False) -> list[float]:
    """Adam over the groups; `report` turns a step's loss into the logged value (distributed: the global loss)."""
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    losses = []
    for _ in tqdm(range(iters), desc=desc, leave=False, mininterval=2, disable=quiet):
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _keep_valid(qunet)
        losses.append(loss.item() if report is None else report(loss))
    for p in params:
        p.requires_grad_(False)
        p.grad = None  # the last step's gradients: kept, they would add a copy of every trained block's weights
    return losses


def progress_blocks(path: Path) -> Path:
    """The folder beside the progress file that holds each finished block's trained tensors."""
    return Path(f"{path}.blocks")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_stream(path, lambda f: torch.save({k: own_storage(v.detach().cpu()) for k, v in tensors.items()}, f))


def remove_progress(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(progress_blocks(path), ignore_errors=True)


def _start_progress(path: Path, qunet: QuantUNet) -> None:
    """A fresh start: no block of an older run survives; the model as BKD finds it is kept once."""
    remove_progress(path)
    _save_tensors(progress_blocks(path) / f"{BASE}.pt", qunet.state_dict())


def _save_progress(path: Path, unit: str, trained: dict[str, torch.Tensor], done: list[str], losses: dict,
                   fingerprint: str, gen: torch.Generator) -> None:
    """After a finished block: its trained tensors, once, in a file of their own (blocks/<unit>.pt), then the
    small progress file naming every finished block and both random streams (the batch-index generator,
    torch's global one), so a resumed run draws the same batches as an uninterrupted one and q.pt is
    bit-identical. With the model as BKD found it (blocks/_base.pt, written once before the first block) that
    is the whole state; the whole model after every block was 3.4 GB written per block at SD 1.5 size."""
    _save_tensors(progress_blocks(path) / f"{unit}.pt", trained)
    payload = {"format": PROGRESS_FORMAT, "fingerprint": fingerprint, "completed": done, "block_losses": losses,
               "rng": {"batches": gen.get_state(), "torch": torch.get_rng_state()}}
    atomic_write_stream(path, lambda f: torch.save(payload, f))


def load_progress(path: Path, qunet: QuantUNet, fingerprint: str,
                  gen: torch.Generator | None = None, dist: Dist = SINGLE) -> tuple[list[str], dict]:
    """Restore the model and random streams after the last finished block (distributed: rank 0 reads the files
    and sends them; the progress does not depend on the world size, so any world size may resume it).

    The model as BKD found it, then each finished block's trained tensors; _keep_valid's clamps, which every
    training step applies to the whole model, once more for the blocks not yet trained."""
    d = dist.on_main(lambda: _read_progress(path, fingerprint, gen is not None))
    qunet.load_state_dict(d["state_dict"])
    if d["completed"]:
        _keep_valid(qunet)
    if gen is not None:
        gen.set_state(d["rng"]["batches"])
        torch.set_rng_state(d["rng"]["torch"])
    return list(d["completed"]), dict(d["block_losses"])


def _read_progress(path: Path, fingerprint: str, need_rng: bool) -> dict:
    fix = "delete it (and its .blocks folder) to start over"
    try:
        d = torch.load(path, weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read progress file '{path}' ({err}); {fix}") from err
    if not isinstance(d, dict) or d.get("format") != PROGRESS_FORMAT:
        raise UserError(f"'{path}' is not a progress file of this dq-calibrate version; {fix}")
    if d["fingerprint"] != fingerprint:
        raise UserError(f"'{path}' was written for other settings or another model; delete it or rerun "
                        "with the settings it was started with")
    if need_rng and "rng" not in d:
        raise UserError(f"'{path}' predates resumable random state (its resumed run would draw other batches); "
                        f"{fix}")
    state: dict[str, torch.Tensor] = {}
    for unit in [BASE, *d["completed"]]:  # in training order: a quantizer two blocks share ends as the later left it
        f = progress_blocks(path) / f"{unit}.pt"
        try:
            state.update(torch.load(f, weights_only=True, mmap=True))
        except Exception as err:
            raise UserError(f"cannot read '{f}', a finished block of '{path}' ({err}); {fix}") from err
    d["state_dict"] = state
    return d


def distill(qunet: QuantUNet, fp_unet: nn.Module, data: CalibrationSet, cfg: DistillConfig,
            progress_path: Path | None = None, resume: bool = False, fingerprint: str = "",
            cache_dir: Path | None = None, dist: Dist = SINGLE, amp: str = "none") -> dict:
    """Train qunet (quantizers in 'quant' mode) against fp_unet; returns losses, times, settings.

    Each block's inputs and FP targets are streamed to a memory-mapped cache in a private folder under
    cache_dir (default: next to the progress file, else the system temp folder), so memory stays flat in
    the calibration-set size; the folder is removed when distillation ends or is interrupted.

    Distributed (dist): each rank owns a contiguous range of the calibration rows and caches only those;
    every rank draws the same global batch indices, runs the rows of the batch it owns through a
    DistributedDataParallel copy of the block, and DDP's gradient all-reduce makes the step one process's
    step on the whole batch (up to float summation order; see bkd_divergence_bound). Rank 0 writes progress."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    qunet.requires_grad_(False)
    qunet.set_quant(weights=True, acts="quant")
    start = time.perf_counter()
    if cfg.full_model:
        if dist.enabled:
            raise UserError("full-model QAT runs in one process; launch it without torchrun")
        losses = _distill_full(qunet, fp_unet, data, cfg, gen)
        return {"mode": "full-model QAT", "final_loss": losses[-1] if losses else None,
                "loss_first_last": [losses[0], losses[-1]] if losses else None,
                "wall_s": time.perf_counter() - start, "config": asdict(cfg)}
    if dist.enabled and len(data) < dist.world:
        raise UserError(f"world size {dist.world} is larger than the calibration set ({len(data)} samples)")
    if cache_dir is None and progress_path is not None:
        cache_dir = progress_path.parent
    done: list[str] = []
    block_losses: dict[str, list[float]] = {}
    if resume and progress_path is not None and dist.on_main(progress_path.is_file):
        done, block_losses = load_progress(progress_path, qunet, fingerprint, gen, dist)
        if dist.is_main:
            print(f"resuming: {len(done)} of {len(qunet.unit_order)} blocks already distilled")
    elif progress_path is not None:
        dist.on_main(lambda: _start_progress(progress_path, qunet))
    names = {id(v): k for k, v in qunet.state_dict(keep_vars=True).items()}
    modules = dict(qunet.unet.named_modules())
    fp_modules = dict(fp_unet.named_modules())
    layers_of = _layers_of(qunet)
    own = dist.shard(len(data)) if dist.enabled else range(len(data))
    local = data.rows(own) if dist.enabled else data
    cache_bytes = 0
    with CacheFolder(cache_dir) as folder:
        for k, unit in enumerate(qunet.unit_order):
            if unit in done:
                continue
            with capture(fp_runner(fp_unet, amp), fp_modules[unit], local, cfg.batch, True, folder, "target") as target, \
                    capture(quant_runner(qunet, amp), modules[unit], local, cfg.batch, False, folder,
                            "inputs") as inputs:
                cache_bytes = max(cache_bytes, target.nbytes + inputs.nbytes)
                extra = _attn_quantizers(qunet, unit)
                groups = _param_groups(qunet, layers_of[unit], cfg, extra)
                n, block, dev = len(data), modules[unit], module_device(qunet)
                desc = f"BKD {k + 1}/{len(qunet.unit_order)} {unit}"

                def step_loss():
                    idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
                    args, kwargs = to_device(inputs.rows(idx), dev)
                    qunet.ctx.t_index = data.t_index[idx].to(dev)  # once, not once per quantizer
                    try:
                        with autocast(dev, amp):
                            out = block_outputs(block(*args, **kwargs))
                    finally:
                        qunet.ctx.t_index = None
                    return block_loss(out, to_device(target.rows(idx), dev))

                if dist.enabled:
                    quantizers = extra + [qunet.layers()[name].input_quantizer for name in layers_of[unit]]
                    step, report = _ddp_step(qunet, block, quantizers, data, inputs, target, own, gen, cfg, dist, amp)
                    losses = _train(qunet, groups, step, cfg.iters, desc, report=report, quiet=not dist.is_main)
                    _check_in_sync([p for g in groups for p in g["params"]], dist, unit)
                else:
                    losses = _train(qunet, groups, step_loss, cfg.iters, desc)
            block_losses[unit] = [losses[0], losses[-1]] if losses else []
            done.append(unit)
            if progress_path is not None:
                trained = {names[id(p)]: p for g in groups for p in g["params"]}
                dist.on_main(lambda: _save_progress(progress_path, unit, trained, done, block_losses, fingerprint,
                                                    gen))
    return {"mode": "block-wise distillation", "blocks": len(qunet.unit_order), "block_losses": block_losses,
            "wall_s": time.perf_counter() - start, "config": asdict(cfg),
            "largest_block_cache_mb": round(cache_bytes / 2**20, 3), "world_size": dist.world}


def _layers_of(qunet: QuantUNet) -> dict[str, list[str]]:
    """Each BKD unit's quantized layers, in layer order."""
    out: dict[str, list[str]] = {}
    for layer, unit in qunet.unit_of_layer.items():
        out.setdefault(unit, []).append(layer)
    return out


class _Unit(nn.Module):
    """The block plus the quantizers it trains that live outside it (in QuantUNet.act_quantizers): one module
    holding every trained parameter, which is what DistributedDataParallel wraps."""

    def __init__(self, block: nn.Module, quantizers: list[nn.Module]) -> None:
        super().__init__()
        self.block = block
        self.quantizers = nn.ModuleList(list({id(q): q for q in quantizers}.values()))

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        return block_outputs(self.block(*args, **kwargs))


def _ddp_step(qunet: QuantUNet, block: nn.Module, quantizers: list[nn.Module], data: CalibrationSet,
              inputs: BlockCache, target: BlockCache, own: range, gen: torch.Generator, cfg: DistillConfig,
              dist: Dist, amp: str = "none") -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], float]]:
    """One rank's share of a global-batch BKD step, and the global loss for the log.

    The rank's loss is its rows' squared-error sum over the global batch's element count, times the world
    size: DDP averages gradients over ranks, so the update is the gradient of the global batch's MSE. A rank
    that owns no row of a batch runs one row at weight 0, so it still joins DDP's all-reduce."""
    n, (a, b), dev = len(data), (own.start, own.stop), module_device(qunet)
    ddp: list[nn.Module] = []

    def step() -> torch.Tensor:
        if not ddp:  # built once the parameters require grad (_train switches them on)
            from torch.nn.parallel import DistributedDataParallel

            unit = _Unit(block, quantizers)
            ids = [dist.local_rank] if dist.backend == "nccl" else None
            with warnings.catch_warnings():  # the buffers are equal on every rank and never trained: no syncing
                warnings.simplefilter("ignore", FutureWarning)
                ddp.append(DistributedDataParallel(unit, device_ids=ids, broadcast_buffers=False))
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
        mine, weight = idx[(idx >= a) & (idx < b)], 1.0
        if len(mine) == 0:
            mine, weight = torch.tensor([a]), 0.0
        args, kwargs = to_device(inputs.rows(mine - a), dev)
        qunet.ctx.t_index = data.t_index[mine].to(dev)
        try:
            with autocast(dev, amp):
                out = tuple(o.float() for o in ddp[0](*args, **kwargs))
        finally:
            qunet.ctx.t_index = None
        targets = to_device(target.rows(mine - a), dev)
        sq = sum(torch.nn.functional.mse_loss(o, t.float(), reduction="sum") for o, t in zip(out, targets))
        return sq * (weight * dist.world / (len(idx) * sum(o[0].numel() for o in out)))

    def report(loss: torch.Tensor) -> float:
        return float(dist.sum(loss.detach())) / dist.world

    return step, report


def _check_in_sync(params: list[torch.Tensor], dist: Dist, unit: str) -> None:
    """Every rank must end a block with the same parameters (DDP keeps them equal; a rank that drifted would
    make rank 0's q.pt a silent average of nothing)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digests = dist.all_gather(h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"BKD block {unit}: ranks {[r for r, d in enumerate(digests) if d != digests[0]]} "
                           "ended with other parameters than rank 0")


ADAM_BETAS = (0.9, 0.999)


def adam_radius(iters: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """sum_t max |m_hat_t / sqrt(v_hat_t)| over t = 1..iters: how far, in units of lr, Adam can move one element.

    By Cauchy-Schwarz, |m_t| <= (1-b1) sqrt(sum_k (b1^2/b2)^k) sqrt(v_t / (1-b2)) (k < t); with the bias
    corrections, |m_hat/sqrt(v_hat)| <= (1-b1)/(1-b1^t) sqrt((1-b2^t)/(1-b2)) sqrt(sum_k (b1^2/b2)^k)
    (1 at t = 1, about 7.3 for large t), whatever the gradients; eps only shrinks the step."""
    b1, b2 = betas
    r, geo, total = b1 * b1 / b2, 0.0, 0.0
    for t in range(1, iters + 1):
        geo += r ** (t - 1)
        total += (1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2)) * math.sqrt(geo)
    return total


@torch.no_grad()
def bkd_divergence_bound(qunet: QuantUNet, cfg: DistillConfig) -> dict[str, float]:
    """Per state-dict tensor, the largest elementwise difference two BKD runs from this same initial model
    (same settings, same global batches) can end with, whatever their float rounding: 2 * lr * adam_radius
    summed over the blocks that train it (each run stays within lr * radius of the start; the clamps of
    _keep_valid are projections, which never move a point further from a valid start). Tensors no block
    trains get 0: they must match exactly.

    Why a trust-region bound and not a perturbation one: the fake-quant model is discontinuous in its
    parameters (a rounding tie that flips moves a level), so ulp-level differences in the summation order of
    the loss and of the gradient all-reduce are not guaranteed to stay ulp-level."""
    names = {id(p): k for k, p in qunet.named_parameters()}
    bound = {k: 0.0 for k in qunet.state_dict()}
    radius = adam_radius(cfg.iters)
    layers_of = _layers_of(qunet)
    for unit in qunet.unit_order:
        for g in _param_groups(qunet, layers_of[unit], cfg, _attn_quantizers(qunet, unit)):
            for p in g["params"]:
                bound[names[id(p)]] += 2 * g["lr"] * radius
    return bound


def _distill_full(qunet, fp_unet, data, cfg, gen) -> list[float]:
    with torch.no_grad():
        run = fp_runner(fp_unet)
        target = torch.cat([run(c) for c in data.chunks(cfg.batch * 4)])
    groups = _param_groups(qunet, list(qunet.layers()), cfg, _attn_quantizers(qunet, None))
    n = len(data)

    def step_loss():
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
        c = to_device(data.inputs(idx), module_device(qunet))
        out = qunet(c["sample"], c["timestep"], c["t_index"], condition_of(c))
        return torch.nn.functional.mse_loss(out, target[idx].float())

    return _train(qunet, groups, step_loss, cfg.iters, "full-model QAT")
