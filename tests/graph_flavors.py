"""Tiny graphs of every flavor dq-export emits, each exported at most once per test session, when first asked for.

    from graph_flavors import FLAVORS, graph
    path = graph("int4")          # .../int4/unet.onnx (with .../int4/q.pt beside it)

Exporting is the slow part of any graph test (a dynamo trace), so tests share these instead of exporting their
own: a flavor is exported the first time a test asks for it, and checkpoints are shared between flavors that
export the same q.pt differently. Every graph is dq-export's own output (export_onnx, or the same save_model
for the external-data copy), from a tiny random model calibrated PTQ-only for STEPS steps; the folder is removed
when the session ends.

    flavor              model (tests/conftest.py, tests/sd_pipelines.py)   calibration   dq-export
    w8a8_sym            tiny_uncond (class-free, self-attention)           W8A8 sym      default (int8, fp32, t_index)
    w8a8_asym_attn      tiny_cond (class tokens, cross-attention)          W8A8 asym, --attn-matmul   default
    w4a8                tiny_cond                                          W4A8 sym      default
    int4                tiny_cond                                          W4A8 sym      --precision int4 (W4A16 GEMMs)
    fp16_static_shapes  tiny_uncond                                        W8A8 sym      --dtype fp16 --static-shapes
    static_scales       tiny_uncond                                        W8A8 sym      --static-scales (no t_index)
    sd_text             tiny_sd2 pipeline (CLIP text, v-prediction)        W8A8 sym      default
    sdxl                tiny_sdxl pipeline (text_embeds, time_ids)         W8A8 sym      default
    external_data       w8a8_sym's graph written again by save_model with the external-data threshold at 4 KB

Orthogonal options share a graph (asymmetric activations with --attn-matmul, --dtype fp16 with --static-shapes):
every option is exported, in as few dynamo traces as the checkpoints allow.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import onnx
import torch

from dilatequant.calibrate.calibration_data import build_calibration_set
from dilatequant.calibrate.checkpoint import save_checkpoint
from dilatequant.calibrate.quant_config import QuantConfig
from dilatequant.calibrate.recipe import prepare
from dilatequant.core.models import load_model, make_prompt_bank
from dilatequant.core.sampling import sampling_timesteps
from dilatequant.dq_export.onnx_files import save_model
from dilatequant.dq_export.qdq_graph import ExportConfig, export_onnx

from conftest import tiny_cond, tiny_uncond
from sd_pipelines import save, tiny_sd2, tiny_sdxl

STEPS = 4
CALIB_SAMPLES = 4  # one calibration input per step: exports need valid tables, not good ones
EXTERNAL_DATA_BYTES = 4096  # the tiny UNet's ~50 KB of weights are "over 2 GB" at this threshold
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a yellow car"]


@dataclass(frozen=True)
class Flavor:
    model: str                                   # tiny_uncond | tiny_cond | tiny_sd2 | tiny_sdxl
    quant: tuple = ()                            # QuantConfig fields beyond W8A8 symmetric, as (name, value) pairs
    export: dict = field(default_factory=dict)   # ExportConfig fields
    what: str = ""


FLAVORS: dict[str, Flavor] = {
    "w8a8_sym": Flavor("tiny_uncond", what="W8A8 symmetric"),
    "w8a8_asym_attn": Flavor("tiny_cond", (("symmetric", False), ("attn_matmul", True)),
                             what="W8A8 asymmetric, --attn-matmul"),
    "w4a8": Flavor("tiny_cond", (("weight_bits", 4),), what="W4A8 (int8 graph)"),
    "int4": Flavor("tiny_cond", (("weight_bits", 4),), {"precision": "int4"}, "--precision int4 (W4A16 GEMMs)"),
    "fp16_static_shapes": Flavor("tiny_uncond", export={"dtype": "fp16", "static_shapes": True},
                                 what="--dtype fp16 --static-shapes"),
    "static_scales": Flavor("tiny_uncond", export={"static_scales": True}, what="--static-scales"),
    "sd_text": Flavor("tiny_sd2", what="text-conditioned SD pipeline"),
    "sdxl": Flavor("tiny_sdxl", what="SDXL pipeline (text_embeds, time_ids)"),
}
DERIVED = {"external_data": "w8a8_sym"}  # flavors written from another flavor's graph
ALL = (*FLAVORS, *DERIVED)


@cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dq-graph-flavors-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _model(name: str):
    torch.manual_seed(0)
    if name == "tiny_uncond":
        return tiny_uncond()
    if name == "tiny_cond":
        return tiny_cond()
    build = {"tiny_sd2": tiny_sd2, "tiny_sdxl": tiny_sdxl}[name]
    model = load_model(save(build(), _root() / name))
    model.prompt_bank = make_prompt_bank(model, PROMPTS)
    return model


def checkpoint(model: str, quant: tuple = ()) -> Path:
    """A PTQ q.pt (no training: exports only need a valid checkpoint) of `model`, W8A8 symmetric unless `quant`
    says otherwise; shared by every flavor with the same model and quantization."""
    return _checkpoint(model, tuple(quant))


@cache
def _checkpoint(model: str, quant: tuple) -> Path:
    folder = _root() / f"{model}-{'-'.join(f'{k}={v}' for k, v in quant) or 'w8a8_sym'}"
    folder.mkdir()
    m = _model(model)
    torch.manual_seed(0)
    data = build_calibration_set(m, CALIB_SAMPLES, STEPS, use_cache=False)
    cfg = QuantConfig(num_steps=STEPS, **{"weight_bits": 8, "act_bits": 8, "symmetric": True, **dict(quant)})
    q, _ = prepare(m.unet, cfg, data)
    return save_checkpoint(folder / "q.pt", q, m, sampling_timesteps(m, STEPS), "fp", {})


@cache
def graph(name: str) -> Path:
    """The flavor's unet.onnx, exported on first use."""
    folder = _root() / name
    folder.mkdir(exist_ok=True)
    path = folder / "unet.onnx"
    if name in DERIVED:
        save_model(onnx.load(str(graph(DERIVED[name]))), path, threshold=EXTERNAL_DATA_BYTES)
        return path
    f = FLAVORS[name]
    export_onnx(checkpoint(f.model, f.quant), path, ExportConfig(**f.export))
    return path
