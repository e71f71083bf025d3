"""The sd-digits training script's vocabulary, tokenizer and resumable loop (small and fast: no model training)."""
from __future__ import annotations

import json

import pytest
import torch

from dilatequant.core.errors import UserError
from dilatequant.training import sd_training as sd


def test_learn_bpe_merges_ties_deterministically_until_each_word_is_one_token():
    # both pairs occur once; the tie goes to the larger pair, then the remaining word is merged
    assert sd.learn_bpe(["aa", "ab"]) == [("a", "b</w>"), ("a", "a</w>")]
    # the most frequent pair first: "th" occurs in both words
    assert sd.learn_bpe(["the", "this"])[0] == ("t", "h")
    assert sd.learn_bpe(["x"]) == []  # a one-letter word is already a base token


def test_vocabulary_has_clip_layout():
    vocab, merges = sd.build_vocabulary(["the digit seven"])
    assert len(vocab) == 256 + 256 + len(merges) + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[sd.BOS] == len(vocab) - 2 and vocab[sd.EOS] == len(vocab) - 1
    assert {"the</w>", "digit</w>", "seven</w>"} <= set(vocab)


def test_clip_tokenizer_reads_the_written_files_and_every_caption_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tok = sd.make_tokenizer(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text())[sd.EOS] == tok.eos_token_id
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert tok.model_max_length == sd.MODEL_MAX_LENGTH == 16
    assert len(tok) == 573
    for digit in range(10):
        for caption in sd.captions_for(digit):
            tokens = tok.convert_ids_to_tokens(tok(caption).input_ids)
            assert tokens == [sd.BOS] + [w + "</w>" for w in caption.split()] + [sd.EOS], caption
    # the same files load through the constructor a user would call
    again = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert again("the number 7").input_ids == tok("the number 7").input_ids


def test_pipeline_style_tokenization_pads_with_eos_and_spells_unknown_words(tmp_path):
    tok = sd.make_tokenizer(tmp_path)
    ids = sd.tokenize(tok, ["", "a cat"])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ids.shape == (2, 16)
    assert ids[0].tolist() == [bos] + [eos] * 15  # the unconditional prompt the UNet learns from dropout
    # "cat" is no caption word: it falls back to byte pieces, never to the unknown token
    assert tok.convert_ids_to_tokens(ids[1, :6].tolist()) == [sd.BOS, "a</w>", "c", "a", "t</w>", sd.EOS]


def test_captions_use_the_right_article():
    assert "a picture of an eight" in sd.captions_for(8)
    assert "a picture of a seven" in sd.captions_for(7)
    assert "the number 7" in sd.captions_for(7)


def _tiny_run(work, iters: int, stop_at: int | None = None) -> torch.Tensor:
    """A linear model through sd._loop; raises KeyboardInterrupt before step `stop_at`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sd._cosine(iters, warmup=2))
    gen = torch.Generator().manual_seed(0)
    ema = torch.nn.Linear(3, 1).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    calls = [0]

    def step() -> torch.Tensor:
        if stop_at is not None and calls[0] == stop_at:
            raise KeyboardInterrupt
        calls[0] += 1
        x = torch.randn(8, 3, generator=gen)
        return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()

    ckpt = sd.Checkpoint(work, "tiny", {"iters": iters}, every=3)
    sd._loop("tiny", iters, ckpt, model, opt, sched, gen, step, ema, 0.9)
    return torch.cat([model.weight.flatten(), ema.weight.flatten()])


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = _tiny_run(tmp_path / "a", 10)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b", 10, stop_at=7)  # last checkpoint after step 6
    resumed = _tiny_run(tmp_path / "b", 10)
    assert torch.equal(straight, resumed)
    assert torch.load(tmp_path / "b" / "tiny.pt", weights_only=True)["step"] == 10


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    sd.Checkpoint(tmp_path, "vae", {"vae_iters": 800}, every=1).save({"step": 1})
    with pytest.raises(UserError, match="other settings"):
        sd.Checkpoint(tmp_path, "vae", {"vae_iters": 1500}, every=1).load()
