"""Train the digit classifier whose features define digit-FID (shipped in assets/digit_classifier):
    python -m dilatequant.training.classifier_training --seed 0 --epochs 12
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..core.digit_classifier import DigitClassifier, classifier_path
from ..core.digits import load_digits


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, so generated digits that sit slightly off-centre still classify."""
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(seed: int, epochs: int, out: Path) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n, batch = len(data.train_labels), 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((n + batch - 1) // batch))
    start = time.time()
    for _ in tqdm(range(epochs), desc="train digit classifier"):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch):
            x = _augment(data.train_images[idx], gen)
            loss = nn.functional.cross_entropy(model(x)[1], data.train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.test_images)[1].argmax(-1) == data.test_labels).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    record = {
        "command": "python -m dilatequant.training.classifier_training " + " ".join(sys.argv[1:]),
        "seed": seed, "epochs": epochs, "held_out_accuracy": acc, "wall_s": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    out.with_name("training.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    print(json.dumps(train(a.seed, a.epochs, a.out or classifier_path()), indent=2))


if __name__ == "__main__":
    main()
