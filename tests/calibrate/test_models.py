import json
import socket

import pytest
import torch

from dilatequant.core.digit_classifier import classify
from dilatequant.core.digits import load_digits
from dilatequant.core.models import ModelLoadError, load_model


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name,conditional", [("default", False), ("default-cond", True)])
def test_embedded_models_load_offline(no_network, name, conditional):
    model = load_model(name)
    assert model.is_conditional == conditional
    assert model.sample_shape == (1, 32, 32)
    assert (model.class_encoder is not None) == conditional
    x = torch.randn(2, 1, 32, 32)
    kwargs = {"encoder_hidden_states": model.class_encoder(torch.tensor([3, 10]))} if conditional else {}
    with torch.no_grad():
        out = model.unet(x, torch.tensor([10, 900]), **kwargs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_saved_folder_round_trips(tmp_path, cond_model, no_network):
    cond_model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    norm = lambda cfg: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert norm(loaded.unet.config) == norm(cond_model.unet.config)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    ehs = cond_model.class_encoder(torch.tensor([1, 2]))
    with torch.no_grad():
        a = cond_model.unet(x, t, encoder_hidden_states=ehs).sample
        b = loaded.unet(x, t, encoder_hidden_states=loaded.class_encoder(torch.tensor([1, 2]))).sample
    assert torch.equal(a, b)


def test_unknown_name_and_foreign_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an embedded model"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="not a diffusers model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelLoadError, match="supported UNets"):
        load_model(tmp_path)


def test_shipped_digit_classifier_is_accurate_on_held_out_digits():
    data = load_digits()
    _, probs = classify(data.test_images)
    assert (probs.argmax(-1) == data.test_labels).float().mean() >= 0.95
