"""The Stable Diffusion parts a prompt pipeline needs besides the UNet: the text encoder(s) and the VAE decoder as
ONNX graphs, and the tokenizer files, taken from the pipeline folder the UNet was calibrated from.

The encoder and decoder are exported with torch's TorchScript exporter (under a second for sd-digits; the dynamo
exporter takes ~10x longer for the same graph), FP32, or converted to FP16 compute for the GPU kind with ONNX
Runtime's float16 converter (inputs and outputs stay FP32, so the pipeline model feeds both kinds alike).
They run the pipeline's own modules with the calls diffusers makes: `text_encoder(input_ids)[0]` (no attention
mask, as StableDiffusionPipeline.encode_prompt calls CLIP) and `vae.decode(latents / scaling_factor)`, the division
left to the pipeline model, exactly where diffusers does it. SDXL (StableDiffusionXLPipeline.encode_prompt) reads
`hidden_states[-2]` of both encoders (concatenated by the pipeline model) and the pooled projection `[0]` of
`text_encoder_2`; its VAE stays FP32 on the GPU kind when the VAE config says `force_upcast` (SDXL's VAE overflows
in FP16: diffusers upcasts it for the same reason). SD3 (StableDiffusion3Pipeline.encode_prompt) reads
`hidden_states[-2]` and the pooled projection of both CLIP encoders, and T5's last hidden state at
`max_sequence_length` tokens (zeros when the folder has no T5); its VAE decodes `latents / scaling + shift`.
Imported only on the SD path (it imports torch).
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

SD, SDXL, SD3 = "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"
SUPPORTED_PIPELINES = (SD, SDXL, SD3)
TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3 = "text_encoder", "text_encoder_2", "text_encoder_3"
VAE_DECODER = "vae_decoder"
PART_NAMES = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, VAE_DECODER)
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length unless the folder names another
LAST_HIDDEN, PENULTIMATE, POOLED = "last_hidden_state", "penultimate_hidden_state", "text_embeds"


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
    pipeline_class: str = SD
    t5_tokens: int = 0                 # SD3: max_sequence_length, T5's share of the prompt tokens

    @property
    def is_xl(self) -> bool:
        return self.pipeline_class == SDXL

    @property
    def is_sd3(self) -> bool:
        return self.pipeline_class == SD3

    @property
    def encoders(self) -> tuple[str, ...]:
        """The text encoder models, in the order encode_prompt concatenates their hidden states."""
        if self.is_sd3:
            t5 = self.pipeline.text_encoder_3 is not None and self.t5_tokens > 0
            return (TEXT_ENCODER, TEXT_ENCODER_2) + ((TEXT_ENCODER_3,) if t5 else ())
        return (TEXT_ENCODER, TEXT_ENCODER_2) if self.is_xl else (TEXT_ENCODER,)

    @property
    def max_tokens(self) -> int:
        return int(self.pipeline.tokenizer.model_max_length)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the denoiser's encoder_hidden_states: SD3 appends T5's to CLIP's."""
        return self.max_tokens + (self.t5_tokens if self.is_sd3 else 0)

    def tokens(self, encoder: str) -> int:
        """Tokens an encoder reads: CLIP's model_max_length, SD3's T5 max_sequence_length."""
        return self.t5_tokens if encoder == TEXT_ENCODER_3 else self.max_tokens

    @property
    def text_dim(self) -> int:
        """encoder_hidden_states per token: SDXL concatenates both encoders' hidden states; SD3 pads them (and T5's
        tokens) to the transformer's joint_attention_dim."""
        if self.is_sd3:
            return int(self.pipeline.transformer.config.joint_attention_dim)
        return sum(int(getattr(self.pipeline, e).config.hidden_size) for e in self.encoders)

    @property
    def pooled_dim(self) -> int:
        """SDXL: text_encoder_2's pooled projection; SD3: both CLIP encoders' concatenated."""
        if self.is_sd3:
            return sum(int(getattr(self.pipeline, e).config.projection_dim) for e in (TEXT_ENCODER, TEXT_ENCODER_2))
        return int(self.pipeline.text_encoder_2.config.projection_dim)

    def pooled(self, encoder: str) -> bool:
        """Does this encoder's graph also give its pooled projection (text_embeds)?"""
        return encoder == TEXT_ENCODER_2 or (self.is_sd3 and encoder == TEXT_ENCODER)

    @property
    def vae_fp32_on_gpu(self) -> bool:
        """SDXL's pipeline runs an FP16 VAE in FP32 when its config says force_upcast; the GPU kind does the same."""
        return self.is_xl and bool(getattr(self.pipeline.vae.config, "force_upcast", False))

    def penultimate(self, encoder: str) -> bool:
        """SDXL and SD3 read CLIP's penultimate hidden state; SD 1.x/2.x CLIP and SD3's T5 the last one."""
        return (self.is_xl or self.is_sd3) and encoder != TEXT_ENCODER_3

    def text_encoder_io(self, name: str = TEXT_ENCODER) -> tuple[list[TensorSpec], list[TensorSpec]]:
        te = getattr(self.pipeline, name).config
        dim = int(getattr(te, "hidden_size", None) or te.d_model)  # CLIP | T5
        tokens = self.tokens(name)
        hidden = TensorSpec(PENULTIMATE if self.penultimate(name) else LAST_HIDDEN, "float32", (BATCH, tokens, dim))
        pooled = [TensorSpec(POOLED, "float32", (BATCH, int(te.projection_dim)))] if self.pooled(name) else []
        return [TensorSpec("input_ids", "int64", (BATCH, tokens))], [hidden, *pooled]

    def vae_decoder_io(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        vae = self.pipeline.vae.config
        return ([TensorSpec("latent", "float32", (BATCH, int(vae.latent_channels), -1, -1))],
                [TensorSpec("image", "float32", (BATCH, int(vae.out_channels), -1, -1))])


def refuse_unsupported(pipeline_class: str) -> None:
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise UserError(f"the graph names pipeline class '{pipeline_class}'; the Triton prompt pipeline serves "
                        f"{' and '.join(SUPPORTED_PIPELINES)} graphs: re-export from such a pipeline's q.pt")


def load_parts(meta: dict[str, str], model: str | Path | None) -> SdParts:
    """The pipeline folder (`model`, else the graph's base model), checked to be the one the graph was calibrated on."""
    from ...calibrate.calibration_data import model_fingerprint
    from ...core.models import EMBEDDED_MODELS, embedded_model_dir, load_model

    pipeline_class = meta.get("dilatequant.pipeline_class", "")
    refuse_unsupported(pipeline_class)
    name = str(model) if model is not None else meta.get("dilatequant.base_model", "")
    try:
        m = load_model(name)
    except UserError as err:
        raise UserError(f"cannot load the pipeline folder '{name}' ({err}); pass --model FOLDER, the "
                        f"{pipeline_class} the graph was calibrated from") from err
    if m.pipeline_class != pipeline_class:
        raise UserError(f"'{name}' is not a {pipeline_class} folder (the graph was calibrated on one); pass "
                        "--model FOLDER, the pipeline the graph was calibrated from")
    want = meta.get("dilatequant.fp_fingerprint")
    if want and want != model_fingerprint(m):
        raise UserError(f"the graph was calibrated on other weights than '{name}' (FP fingerprints differ); pass "
                        "--model FOLDER, the pipeline it was calibrated from")
    te_cfg = m.pipeline.text_encoder.config
    if pipeline_class in (SDXL, SD3) and \
            m.pipeline.tokenizer_2.model_max_length != m.pipeline.tokenizer.model_max_length:
        raise UserError(f"'{name}' has tokenizers of {m.pipeline.tokenizer.model_max_length} and "
                        f"{m.pipeline.tokenizer_2.model_max_length} tokens; {pipeline_class} concatenates both CLIP "
                        "encoders' hidden states per token, so they must agree")
    if pipeline_class == SD and getattr(te_cfg, "use_attention_mask", False):
        raise UserError(f"'{name}' has a text encoder that takes an attention mask; the Triton pipeline feeds "
                        "input_ids only (as CLIP in SD 1.x/2.x): use dq-generate for this pipeline")
    folder = embedded_model_dir(name) if name in EMBEDDED_MODELS else Path(name)
    sample_shape = json.loads(meta.get("dilatequant.sample_shape", "[]"))
    f = m.vae_scale_factor
    image_size = (sample_shape[1] * f, sample_shape[2] * f) if len(sample_shape) == 3 else m.image_size
    spatial = int(meta.get("dilatequant.spatial_multiple", "0") or 0)
    t5_tokens = int(m.pipeline_kwargs.get("max_sequence_length", SD3_T5_TOKENS)) if pipeline_class == SD3 else 0
    return SdParts(m.pipeline, folder, name, image_size, f, spatial * f, served_schedulers(m), m.guidance_scale,
                   pipeline_class, t5_tokens)


SERVED_SCHEDULERS = ("pipeline", "ddim", "euler", "dpm")


def served_schedulers(model) -> dict[str, dict]:
    """The samplers the prompt pipeline serves, built here (core.schedulers: the folder's own as `pipeline`, the
    others on its noise schedule without another class's defaults) so the backend only instantiates them. A
    diffusion transformer's pipeline samples with its own scheduler only."""
    from ...core.schedulers import config_json, resolve_scheduler

    names = ("pipeline",) if model.is_transformer else SERVED_SCHEDULERS
    return {name: json.loads(config_json(resolve_scheduler(model, name))) for name in names}


class _TextEncoder(torch.nn.Module):
    """What encode_prompt reads: SD `text_encoder(input_ids)[0]`; SDXL `hidden_states[-2]` and, from
    text_encoder_2 (CLIPTextModelWithProjection), the pooled projection `[0]` too; SD3 that of both CLIP encoders,
    and T5's `[0]`."""

    def __init__(self, text_encoder, penultimate: bool, pooled: bool) -> None:
        super().__init__()
        self.te, self.penultimate, self.pooled = text_encoder, penultimate, pooled

    def forward(self, input_ids: torch.Tensor):
        if not self.penultimate:
            return self.te(input_ids, return_dict=False)[0]
        out = self.te(input_ids, output_hidden_states=True)
        return (out.hidden_states[-2], out[0]) if self.pooled else out.hidden_states[-2]


class _VaeDecoder(torch.nn.Module):
    """`vae.decode(z)[0]`; z = latents / scaling_factor comes from the pipeline model."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def _export(module, example, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, dynamo=False, opset_version=17)


def _to_fp16(path: Path) -> None:
    """FP16 compute inside, FP32 inputs and outputs (what TensorRT/ORT-GPU run fast; the pipeline feeds FP32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(path))


def export_text_encoder(parts: SdParts, path: Path, fp16: bool = False, name: str = TEXT_ENCODER) -> Path:
    ids = torch.zeros((1, parts.tokens(name)), dtype=torch.int64)
    ins, outs = parts.text_encoder_io(name)
    module = _TextEncoder(getattr(parts.pipeline, name), parts.penultimate(name), parts.pooled(name)).eval()
    _export(module, ids, path, [t.name for t in ins], [t.name for t in outs],
            {t.name: {0: "batch"} for t in ins + outs})
    if fp16:
        _to_fp16(path)
    return path


def export_vae_decoder(parts: SdParts, path: Path, fp16: bool = False) -> Path:
    vae = parts.pipeline.vae
    h, w = (s // parts.vae_scale_factor for s in parts.image_size)
    z = torch.zeros((1, int(vae.config.latent_channels), h, w))
    _export(_VaeDecoder(vae).eval(), z, path, ["latent"], ["image"],
            {"latent": {0: "batch", 2: "height", 3: "width"},
             "image": {0: "batch", 2: "pixel_height", 3: "pixel_width"}})
    if fp16 and not parts.vae_fp32_on_gpu:
        _to_fp16(path)
    return path


def tokenizer_folder(encoder: str) -> str:
    """The tokenizer beside each text encoder in a pipeline folder (text_encoder_2 -> tokenizer_2)."""
    return encoder.replace("text_encoder", "tokenizer")


def copy_tokenizer(parts: SdParts, dest: Path, encoder: str = TEXT_ENCODER) -> Path:
    """The pipeline's own tokenizer files (vocab, merges, configs): the server tokenizes offline as diffusers does."""
    src = parts.folder / tokenizer_folder(encoder)
    if not src.is_dir():
        raise UserError(f"'{parts.folder}' has no {src.name}/ folder; save the whole pipeline with save_pretrained")
    shutil.copytree(src, dest)
    return dest
