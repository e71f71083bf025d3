"""The Stable Diffusion parts a prompt pipeline needs besides the UNet: the text encoder and the VAE decoder as
ONNX graphs, and the tokenizer files, taken from the pipeline folder the UNet was calibrated from.

The encoder and decoder are exported with torch's TorchScript exporter (under a second for sd-digits; the dynamo
exporter takes ~10x longer for the same graph), FP32, or converted to FP16 compute for the GPU kind with ONNX
Runtime's float16 converter (inputs and outputs stay FP32, so the pipeline model feeds both kinds alike).
They run the pipeline's own modules with the calls diffusers makes: `text_encoder(input_ids)[0]` (no attention
mask, as StableDiffusionPipeline.encode_prompt calls CLIP) and `vae.decode(latents / scaling_factor)`, the division
left to the pipeline model, exactly where diffusers does it. Imported only on the SD path (it imports torch).
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.errors import UserError
from .unet_spec import BATCH, TensorSpec

SUPPORTED_PIPELINE = "StableDiffusionPipeline"
TEXT_ENCODER, VAE_DECODER = "text_encoder", "vae_decoder"


@dataclass
class SdParts:
    """What the repository needs from the pipeline folder; `folder` is where the tokenizer files are."""

    pipeline: object                   # diffusers StableDiffusionPipeline
    folder: Path
    source: str
    image_size: tuple[int, int]        # the calibrated (H, W) in pixels
    vae_scale_factor: int
    size_multiple: int                 # H and W must be multiples of this (0: the calibrated size only)
    schedulers: dict[str, dict]        # the samplers a request may name -> their whole configs (core.schedulers)
    guidance_scale: float | None = None  # the folder's own default (dilatequant.json), if it names one

    @property
    def max_tokens(self) -> int:
        return int(self.pipeline.tokenizer.model_max_length)

    @property
    def text_dim(self) -> int:
        return int(self.pipeline.text_encoder.config.hidden_size)

    def text_encoder_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return ([TensorSpec("input_ids", "int64", (BATCH, self.max_tokens))],
                [TensorSpec("last_hidden_state", "float32", (BATCH, self.max_tokens, self.text_dim))])

    def vae_decoder_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        vae = self.pipeline.vae.config
        return ([TensorSpec("latent", "float32", (BATCH, int(vae.latent_channels), -1, -1))],
                [TensorSpec("image", "float32", (BATCH, int(vae.out_channels), -1, -1))])


def refuse_unsupported(pipeline_class: str) -> None:
    if pipeline_class == "StableDiffusionXLPipeline":
        raise UserError("this graph comes from an SDXL pipeline; the Triton prompt pipeline serves "
                        "StableDiffusionPipeline (SD 1.x/2.x) only (SDXL's second text encoder, pooled text_embeds "
                        "and time_ids are not wired): generate SDXL images with dq-generate --onnx")
    if pipeline_class != SUPPORTED_PIPELINE:
        raise UserError(f"the graph names pipeline class '{pipeline_class}'; the Triton prompt pipeline serves "
                        f"{SUPPORTED_PIPELINE} graphs only: re-export from a StableDiffusionPipeline q.pt")


def load_parts(meta: dict[str, str], model: str | Path | None) -> SdParts:
    """The pipeline folder (`model`, else the graph's base model), checked to be the one the graph was calibrated on."""
    from ...calibrate.calibration_data import model_fingerprint
    from ...core.models import EMBEDDED_MODELS, embedded_model_dir, load_model

    refuse_unsupported(meta.get("dilatequant.pipeline_class", ""))
    name = str(model) if model is not None else meta.get("dilatequant.base_model", "")
    try:
        m = load_model(name)
    except UserError as err:
        raise UserError(f"cannot load the pipeline folder '{name}' ({err}); pass --model FOLDER, the "
                        "StableDiffusionPipeline the graph was calibrated from") from err
    if m.pipeline_class != SUPPORTED_PIPELINE:
        raise UserError(f"'{name}' is not a {SUPPORTED_PIPELINE} folder; pass --model FOLDER, the pipeline the "
                        "graph was calibrated from")
    want = meta.get("dilatequant.fp_fingerprint")
    if want and want != model_fingerprint(m):
        raise UserError(f"the graph was calibrated on other weights than '{name}' (FP fingerprints differ); pass "
                        "--model FOLDER, the pipeline it was calibrated from")
    te_cfg = m.pipeline.text_encoder.config
    if getattr(te_cfg, "use_attention_mask", False):
        raise UserError(f"'{name}' has a text encoder that takes an attention mask; the Triton pipeline feeds "
                        "input_ids only (as CLIP in SD 1.x/2.x): use dq-generate for this pipeline")
    folder = embedded_model_dir(name) if name in EMBEDDED_MODELS else Path(name)
    sample_shape = json.loads(meta.get("dilatequant.sample_shape", "[]"))
    f = m.vae_scale_factor
    image_size = (sample_shape[1] * f, sample_shape[2] * f) if len(sample_shape) == 3 else m.image_size
    spatial = int(meta.get("dilatequant.spatial_multiple", "0") or 0)
    return SdParts(m.pipeline, folder, name, image_size, f, spatial * f, served_schedulers(m), m.guidance_scale)


SERVED_SCHEDULERS = ("pipeline", "ddim", "euler", "dpm")


def served_schedulers(model) -> dict[str, dict]:
    """The samplers the prompt pipeline serves, built here (core.schedulers: the folder's own as `pipeline`, the
    others on its noise schedule without another class's defaults) so the backend only instantiates them."""
    from ...core.schedulers import config_json, resolve_scheduler

    return {name: json.loads(config_json(resolve_scheduler(model, name))) for name in SERVED_SCHEDULERS}


class _TextEncoder(torch.nn.Module):
    """`text_encoder(input_ids)[0]`, the call encode_prompt makes."""

    def __init__(self, text_encoder) -> None:
        super().__init__()
        self.te = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.te(input_ids, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    """`vae.decode(z)[0]`; z = latents / scaling_factor comes from the pipeline model."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def _export(module, example, path: Path, names: tuple[str, str], dynamic: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), str(path), input_names=[names[0]], output_names=[names[1]],
                          dynamic_axes=dynamic, dynamo=False, opset_version=17)


def _to_fp16(path: Path) -> None:
    """FP16 compute inside, FP32 inputs and outputs (what TensorRT/ORT-GPU run fast; the pipeline feeds FP32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(path))


def export_text_encoder(parts: SdParts, path: Path, fp16: bool = False) -> Path:
    ids = torch.zeros((1, parts.max_tokens), dtype=torch.int64)
    _export(_TextEncoder(parts.pipeline.text_encoder).eval(), ids, path, ("input_ids", "last_hidden_state"),
            {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}})
    if fp16:
        _to_fp16(path)
    return path


def export_vae_decoder(parts: SdParts, path: Path, fp16: bool = False) -> Path:
    vae = parts.pipeline.vae
    h, w = (s // parts.vae_scale_factor for s in parts.image_size)
    z = torch.zeros((1, int(vae.config.latent_channels), h, w))
    _export(_VaeDecoder(vae).eval(), z, path, ("latent", "image"),
            {"latent": {0: "batch", 2: "height", 3: "width"},
             "image": {0: "batch", 2: "pixel_height", 3: "pixel_width"}})
    if fp16:
        _to_fp16(path)
    return path


def copy_tokenizer(parts: SdParts, dest: Path) -> Path:
    """The pipeline's own tokenizer files (vocab, merges, configs): the server tokenizes offline as diffusers does."""
    src = parts.folder / "tokenizer"
    if not src.is_dir():
        raise UserError(f"'{parts.folder}' has no tokenizer/ folder; save the whole pipeline with save_pretrained")
    shutil.copytree(src, dest)
    return dest
