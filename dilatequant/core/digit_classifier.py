"""A small digit classifier whose penultimate features define digit-FID (no Inception offline).

Trained once by this repository and shipped (< 1 MB) by `python -m dilatequant.training.classifier_training`.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N,1,32,32] in [-1,1] -> (features [N,128], logits [N,10])."""
        feats = self.features(images)
        return feats, self.head(feats)


def classifier_path() -> Path:
    return Path(str(resources.files("dilatequant") / "assets" / "digit_classifier" / "model.safetensors"))


@lru_cache(maxsize=1)
def load_classifier() -> DigitClassifier:
    path = classifier_path()
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights missing at {path}; reinstall the package")
    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


@torch.no_grad()
def classify(images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, softmax probabilities) of images in [-1, 1]."""
    model = load_classifier()
    feats, probs = [], []
    for chunk in images.float().clamp(-1, 1).split(batch):
        f, logits = model(chunk)
        feats.append(f)
        probs.append(logits.softmax(-1))
    return torch.cat(feats), torch.cat(probs)
