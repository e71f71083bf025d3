"""A pipeline folder's dilatequant.json: the guidance and calibration prompts the model is used with."""
import json
import shutil

import pytest
import torch

from dilatequant.core.errors import UserError
from dilatequant.core.evaluation import requested_digits
from dilatequant.core.guidance import TEXT_GUIDANCE
from dilatequant.core.models import embedded_model_dir, load_model, make_prompt_bank
from dilatequant.core.prompts import calibration_prompts, default_prompts
from dilatequant.core.sampling import default_guidance


@pytest.fixture(scope="module")
def sd_digits():
    return load_model("sd-digits")


def test_sd_digits_names_its_guidance_and_digit_prompts(sd_digits):
    assert default_guidance(sd_digits) == 3.0  # benchmarks/results/sd_quality: the measured best
    prompts = calibration_prompts(sd_digits)
    assert len(prompts) == 80 and prompts != default_prompts()
    sd_digits.prompt_bank = make_prompt_bank(sd_digits, prompts[:20], "")
    # prompt-bank index i asks for digit i % 10, whatever the phrasing
    assert requested_digits(sd_digits, torch.arange(20)).tolist() == [i % 10 for i in range(20)]
    assert requested_digits(sd_digits, ["the number 7", "a picture of an eight"]).tolist() == [7, 8]
    assert requested_digits(sd_digits, ["a red cat"]) is None


def test_a_folder_without_defaults_keeps_the_general_rule(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(embedded_model_dir("sd-digits"), folder)
    (folder / "dilatequant.json").unlink()
    model = load_model(folder)
    assert default_guidance(model) == TEXT_GUIDANCE and calibration_prompts(model) == default_prompts()
    (folder / "dilatequant.json").write_text(json.dumps({"guidance_scale": "high"}))
    with pytest.raises(UserError, match="not a valid defaults file"):
        load_model(folder)
    (folder / "dilatequant.json").write_text(json.dumps({"calibration_prompts": "missing.txt"}))
    with pytest.raises(UserError, match="does not exist"):
        load_model(folder)
