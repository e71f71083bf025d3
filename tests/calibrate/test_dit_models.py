"""Diffusion-transformer pipeline folders (SD3, FLUX.1-dev, PixArt-Sigma) as models: loading, prompt encoding and
the denoiser call agree bit for bit with what diffusers' own pipeline does; the quantized transformer's structure."""
from __future__ import annotations

import json

import pytest
import torch
from dit_pipelines import IMAGE_SIZE, T5_TOKENS, make

from dilatequant.calibrate.distill import block_loss, block_outputs
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.quant_unet import QuantLayer, QuantUNet
from dilatequant.core.errors import UserError
from dilatequant.core.models import ModelLoadError, load_model, make_prompt_bank

FAMILIES = ("sd3", "flux", "pixart")
CALL = {"sd3": {}, "flux": {}, "pixart": {"clean_caption": False, "use_resolution_binning": False}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_folder_loads_and_calls_the_transformer_as_its_pipeline_does(folders, name):
    """The pipeline's own first transformer call, recorded by hooks: our encoding of the same prompts gives the same
    condition tensors, and the family's call (from the sampler's latent and timestep) the same prediction."""
    model = load_model(folders[name], (IMAGE_SIZE, IMAGE_SIZE))
    assert model.is_transformer and model.sample_shape == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert model.pipeline_kwargs == {"max_sequence_length": T5_TOKENS}
    calls, outs = [], []
    pipe = model.pipeline
    h1 = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(lambda m, a, k, o: outs.append(o[0]), with_kwargs=True)
    try:
        pipe(["a red cat"], negative_prompt="blurry", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
             guidance_scale=model.guidance_scale, output_type="latent", generator=torch.Generator().manual_seed(0),
             max_sequence_length=T5_TOKENS, **CALL[name])
    finally:
        h1.remove(), h2.remove()
    sample, timestep, cond, layout = model.family.from_pipeline_call(*calls[0])
    pred = model.family.predict(model.denoiser, sample, timestep, cond)
    ref = outs[0][:, :4] if name == "pixart" else outs[0]  # PixArt: the noise half of its learned-sigma output
    assert torch.equal(model.family.to_pipeline_output(pred, layout), ref)
    ours = model.condition(["a red cat"], model.guidance_scale, negative_prompt="blurry")
    if name == "flux":  # guidance is an input, no unconditional batch
        assert set(ours) == {"encoder_hidden_states", "pooled_projections", "guidance"}
        assert ours["guidance"].tolist() == [model.guidance_scale] and len(ours["guidance"]) == 1
        pos = {k: v[0] for k, v in cond.items()}
    else:  # the pipeline batches [negative; positive], ours [positive; negative]
        pos = {k: v[1] for k, v in cond.items()}
        assert torch.equal(ours["encoder_hidden_states"][1], cond["encoder_hidden_states"][0])
    for k, v in pos.items():
        assert torch.equal(ours[k][0].float(), v.float()), k


def test_prompt_bank_rows_are_the_prompts_and_the_negative(folders):
    model = load_model(folders["sd3"], (IMAGE_SIZE, IMAGE_SIZE))
    model.prompt_bank = make_prompt_bank(model, ["a cat", "a dog"], "ugly")
    bank = model.prompt_bank.cond
    assert bank["encoder_hidden_states"].shape[0] == 3 and bank["pooled_projections"].shape[0] == 3
    direct = model.condition(["a dog"], 4.0, negative_prompt="ugly")  # encoded alone: other batch, other rounding
    guided = model.condition(torch.tensor([1]), 4.0)
    for k in direct:
        assert torch.allclose(direct[k], guided[k], rtol=0, atol=1e-5), k


def test_other_pipeline_classes_are_refused_naming_the_supported(tmp_path, folders):
    alpha = tmp_path / "alpha"
    alpha.mkdir()
    (alpha / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ModelLoadError, match="PixArtAlphaPipeline.*StableDiffusion3Pipeline, FluxPipeline, PixArtSigma"):
        load_model(alpha)
    with pytest.raises(UserError, match="multiples of 4"):  # VAE factor 2 x patch 2
        load_model(folders["sd3"], (18, 18))


@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_transformer_structure(folders, name):
    """Every Linear quantized except the patch embedding (it reads x_t); one quantizer per tensor read (q/k/v; a FLUX
    single block's q/k/v and MLP input); BKD units are the transformer blocks; quantizers off = the FP model."""
    model = load_model(folders[name], (IMAGE_SIZE, IMAGE_SIZE))
    q = QuantUNet(model.denoiser, QuantConfig(num_steps=4))
    family = model.family
    assert family.input_layer not in q.layers() and isinstance(q.layers()[family.output_layer], QuantLayer)
    linears = [n for n, m in model.denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(q.layers()) == sorted(n for n in linears if n != family.input_layer)
    blocks = [u for u in q.unit_order if "transformer_blocks." in u]
    expected = {"sd3": 2, "flux": 2, "pixart": 2}[name]
    assert len(blocks) == expected, q.unit_order
    shared = [g.layers for g in q.groups if len(g.layers) > 1]
    if name == "flux":
        assert ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_q",
                "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"] in shared
    assert all(len(g) >= 2 for g in shared) and len(shared) >= 2
    q.set_quant(weights=False, acts="off")
    x = torch.randn(2, *model.sample_shape)
    t = family.example_timestep(2)
    c = family.example_condition(model.denoiser, 2)
    with torch.no_grad():
        assert torch.equal(q(x, t, torch.tensor([0, 3]), c), family.predict(model.denoiser, x, t, c))
    with pytest.raises(UserError, match="attn-matmul"):
        QuantUNet(model.denoiser, QuantConfig(num_steps=4, attn_matmul=True))


def test_bkd_matches_both_streams_of_a_joint_block(folders):
    """An SD3 joint block hands on (text, image); its last one (None, image): BKD's loss covers every tensor."""
    model = load_model(folders["sd3"], (IMAGE_SIZE, IMAGE_SIZE))
    blocks = model.denoiser.transformer_blocks
    img, txt, temb = torch.randn(2, 16, 16), torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        first = block_outputs(blocks[0](hidden_states=img, encoder_hidden_states=txt, temb=temb))
        last = block_outputs(blocks[1](hidden_states=img, encoder_hidden_states=txt, temb=temb))
    assert [o.shape[1] for o in first] == [5, 16] and [o.shape[1] for o in last] == [16]
    moved = (first[0] + 1.0, first[1])  # only the text stream off by 1: loss = its share of the elements
    assert block_loss(moved, first).item() == pytest.approx(5 / 21)


def test_float_layer_patterns_keep_the_modulation_linears_in_float(folders):
    """Shell patterns over module names: the adaLN modulation linears of every SD3 block stay float."""
    model = load_model(folders["sd3"], (IMAGE_SIZE, IMAGE_SIZE))
    q = QuantUNet(model.denoiser, QuantConfig(num_steps=4, float_layers=("pos_embed.proj", "*norm1*.linear")))
    modulation = [n for n, m in model.denoiser.named_modules() if isinstance(m, torch.nn.Linear) and ".norm1" in n]
    assert len(modulation) == 4 and not set(modulation) & set(q.layers())  # norm1 + norm1_context, 2 blocks
    assert "transformer_blocks.0.attn.to_q" in q.layers()
    with pytest.raises(UserError, match=r"\*nothing\*"):
        QuantUNet(model.denoiser, QuantConfig(num_steps=4, float_layers=("*nothing*",)))
