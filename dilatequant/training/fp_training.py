"""Train the embedded full-precision models from scratch (done once; the results ship in assets/).

    python -m dilatequant.training.fp_training --model default --iters 3500 --seed 0 --out /tmp/default-stage1
    python -m dilatequant.training.fp_training --model default --iters 2000 --seed 1 --lr 3e-4 \
        --init-from /tmp/default-stage1
    python -m dilatequant.training.fp_training --model default-cond --iters 3000 --seed 0
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..core.digits import load_digits
from ..core.models import TRAINABLE_MODELS, DiffusionModel, embedded_model_dir, load_model, new_model

COND_DROPOUT = 0.1


def train(name: str, iters: int, seed: int, batch: int, lr: float, ema_decay: float, out: Path, threads: int,
          init_from: Path | None = None) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    data = load_digits()
    model = load_model(init_from) if init_from else new_model(name)
    lineage = json.loads((init_from / "training.json").read_text()) if init_from else None
    modules = torch.nn.ModuleList([model.unet] + ([model.class_encoder] if model.class_encoder else []))
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
    )
    gen = torch.Generator().manual_seed(seed)
    num_t = model.scheduler.config.num_train_timesteps
    losses, start = [], time.time()
    bar = tqdm(range(iters), desc=f"train {name}", mininterval=10)
    for step in bar:
        idx = torch.randint(0, len(data.train_labels), (batch,), generator=gen)
        x0, labels = data.train_images[idx], data.train_labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_t, (batch,), generator=gen)
        xt = model.scheduler.add_noise(x0, noise, t)
        kwargs = {}
        if model.class_encoder is not None:
            drop = torch.rand(batch, generator=gen) < COND_DROPOUT
            labels = torch.where(drop, torch.full_like(labels, model.class_encoder.null_label), labels)
            kwargs["encoder_hidden_states"] = model.class_encoder(labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model.unet(xt, t, **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(modules.parameters()), 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    trained = DiffusionModel(ema[0], model.scheduler, ema[1] if len(ema) > 1 else None, source=f"trained:{name}")
    trained.save(out)
    record = {
        "model": name,
        "command": "python -m dilatequant.training.fp_training " + " ".join(sys.argv[1:]),
        "seed": seed, "iters": iters, "batch": batch, "lr": lr, "ema_decay": ema_decay,
        "cond_dropout": COND_DROPOUT if model.class_encoder else None,
        "train_images": len(data.train_labels),
        "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
        "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 5) for i in range(0, iters, 100)],
        "wall_s": round(time.time() - start, 1), "threads": threads,
        "torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
        "parameters": sum(p.numel() for p in ema[0].parameters()),
        "continued_from": lineage,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=TRAINABLE_MODELS, required=True)
    p.add_argument("--iters", type=int, default=3500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="default: the package's assets/<model>")
    p.add_argument("--init-from", type=Path, default=None, help="continue training a saved model folder")
    a = p.parse_args()
    out = a.out or embedded_model_dir(a.model)
    rec = train(a.model, a.iters, a.seed, a.batch, a.lr, a.ema_decay, out, a.threads, a.init_from)
    print(json.dumps({k: v for k, v in rec.items() if k != "loss_every_100"}, indent=2))


if __name__ == "__main__":
    main()
