import math

import numpy as np
import pytest
import torch

from dilatequant.core.metrics import frechet_distance, mse, psnr_db, sqnr_db, ssim


def test_identical_inputs_give_zero_error():
    x = torch.randn(4, 1, 16, 16)
    assert mse(x, x) == 0.0
    assert sqnr_db(x, x) == math.inf
    assert psnr_db(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("target_db", [10.0, 30.0, 50.0])
def test_sqnr_of_gaussian_noise_with_known_power(target_db):
    gen = torch.Generator().manual_seed(1)
    signal = torch.randn(200_000, generator=gen) * 3.0  # power 9
    noise_power = 9.0 / 10 ** (target_db / 10)
    noisy = signal + torch.randn(200_000, generator=gen) * math.sqrt(noise_power)
    assert sqnr_db(noisy, signal) == pytest.approx(target_db, abs=0.5)
    assert mse(noisy, signal) == pytest.approx(noise_power, rel=0.05)


def test_psnr_known_value():
    x = torch.zeros(1, 1, 8, 8)
    y = x + 0.02  # mse 4e-4, range 2 -> 10 log10(4 / 4e-4) = 40 dB
    assert psnr_db(y, x) == pytest.approx(40.0, abs=1e-6)


def test_ssim_drops_with_noise():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert ssim(x + 0.5 * torch.randn_like(x), x) < ssim(x + 0.05 * torch.randn_like(x), x) < 1.0


def test_frechet_distance_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    near = frechet_distance(a, b)
    far = frechet_distance(a, b + 0.5)
    assert near < 0.1
    assert far > near + 16 * 0.25 * 0.9  # mean shift contributes |0.5|^2 per dimension


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200_000, 2)) * np.array([1.0, 2.0])
    b = rng.normal(size=(200_000, 2)) * np.array([3.0, 1.0]) + np.array([1.0, 0.0])
    expected = 1.0 + (1 - 3) ** 2 + (2 - 1) ** 2  # |dmu|^2 + sum (sigma_a - sigma_b)^2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_class_accuracy_per_requested_class():
    """Held-out digits with every 1 relabelled 7: class 7 loses accuracy, the other classes keep theirs."""
    from dilatequant.core.digits import load_digits
    from dilatequant.core.metrics import digit_scores

    d = load_digits()
    images, labels = d.test_images[::4], d.test_labels[::4].clone()  # 25 of each class
    true = digit_scores(images, labels)
    labels[labels == 1] = 7
    wrong = digit_scores(images, labels)
    assert wrong["class_accuracy_per_class"][1] is None  # no sample asked for a 1 any more
    assert wrong["class_accuracy_per_class"][7] < 0.7 < true["class_accuracy_per_class"][7]
    others = [c for c in range(10) if c not in (1, 7) and true["class_accuracy_per_class"][c] is not None]
    assert others and all(wrong["class_accuracy_per_class"][c] == true["class_accuracy_per_class"][c] for c in others)
    assert wrong["class_accuracy"] < true["class_accuracy"]


def test_mean_noise_mse_before_the_final_step():
    from dilatequant.core.evaluation import mean_mse_before_final
    rows = [{"mse": 1.0}, {"mse": 3.0}, {"mse": 100.0}]
    assert mean_mse_before_final(rows) == 2.0
    assert mean_mse_before_final(rows[:1]) == 1.0  # a one-step schedule has nothing else to average


def test_format_sqnr_names_bit_identical_outputs():
    from dilatequant.core.metrics import format_sqnr

    assert format_sqnr(float("inf")) == "exact"
    assert format_sqnr(45.27) == "45.3 dB"
