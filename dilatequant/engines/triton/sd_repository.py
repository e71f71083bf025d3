"""The Stable Diffusion half of dq-triton: `text_encoder` and `vae_decoder` models and the prompt `pipeline`.

    <repo>/text_encoder/1/model.onnx (+ model.py for --kind cpu)   input_ids -> last_hidden_state
                                                                   (SDXL: penultimate_hidden_state)
    <repo>/text_encoder_2/1/...      SDXL only                     input_ids -> penultimate_hidden_state, text_embeds
                                     (SD3: both CLIP encoders give both; text_encoder_3, T5 -> last_hidden_state)
    <repo>/vae_decoder/1/model.onnx  (+ model.py for --kind cpu)   latent / scaling_factor -> image in [-1, 1]
    <repo>/pipeline/1/model.py, dq_bls.py, schedulers.json, tokenizer/ (SDXL: + tokenizer_2/)  PROMPT -> IMAGES

--kind cpu: FP32 graphs in the Python backend with ONNX Runtime (what pytriton's bundled server runs);
--kind gpu: FP16-compute graphs (FP32 I/O) on Triton's onnxruntime backend. Written into the staging folder of
repository.write_repository, so the repository still appears complete or not at all.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from ...core.reporting import atomic_write_bytes
from . import config as C
from .sd_parts import (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, VAE_DECODER, SdParts, copy_tokenizer,
                       export_text_encoder, export_vae_decoder, tokenizer_folder)
from .unet_spec import TensorSpec, UnetSpec

PIPELINE = "pipeline"
MAX_SIZE_FACTOR = 4  # HEIGHT/WIDTH up to this many times the calibrated size


def default_steps() -> int:
    from ..generate_config import GenerateConfig

    return int(GenerateConfig.__dataclass_fields__["steps"].default)  # dq-generate's default, so both agree


def default_guidance(parts: SdParts) -> float:
    """What dq-generate uses when not told: the folder's own (dilatequant.json, 3.0 for sd-digits), else the
    pipeline class's default (7.5 in diffusers)."""
    if parts.guidance_scale is not None:
        return float(parts.guidance_scale)
    return float(inspect.signature(type(parts.pipeline).__call__).parameters["guidance_scale"].default)


def dynamic_spatial(spec: UnetSpec) -> UnetSpec:
    """sample/noise_pred as [B, C, -1, -1]: the graph takes any multiple of its spatial factor."""
    def widen(t: TensorSpec) -> TensorSpec:
        if t.name not in ("sample", "noise_pred"):
            return t
        return TensorSpec(t.name, t.dtype, (t.shape[0], t.shape[1], -1, -1))
    return UnetSpec([widen(t) for t in spec.inputs], [widen(t) for t in spec.outputs], spec.metadata)


def _t(name: str, dtype: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, dtype, shape)


def pipeline_io(parts: SdParts) -> tuple[list[TensorSpec], list[TensorSpec], tuple[str, ...]]:
    ins = [_t("PROMPT", "object", (1,)), _t("NEGATIVE_PROMPT", "object", (1,)), _t("SEED", "int64", (1,)),
           _t("STEPS", "int32", (1,)), _t("GUIDANCE_SCALE", "float32", (1,)), _t("NUM_IMAGES", "int32", (1,)),
           _t("HEIGHT", "int32", (1,)), _t("WIDTH", "int32", (1,)), _t("SCHEDULER", "object", (1,))]
    if parts.is_xl:  # SDXL's micro-conditioning: time_ids = original size + crop top-left + target size
        ins += [_t("ORIGINAL_SIZE", "int32", (2,)), _t("CROPS_COORDS_TOP_LEFT", "int32", (2,))]
    out_c = int(parts.pipeline.vae.config.out_channels)
    optional = tuple(t.name for t in ins if t.name not in ("PROMPT", "SEED"))
    return ins, [_t("IMAGES", "uint8", (-1, -1, -1, out_c))], optional


PIPELINE_DOC = """\
# {title} prompt pipeline (Python backend): BLS calls to {te}, '{unet}' and '{vae}'.
# The same seed and settings give dq-generate's images (see model.py's docstring for how each step matches).
# Inputs (all [1]):
#   PROMPT           BYTES  the text (tokenized here with the pipeline's own tokenizer, {tokens} tokens, truncated)
#   SEED             INT64  latents = torch.randn((N, {c}, H/{f}, W/{f}), Generator().manual_seed(SEED))
#                           * init_noise_sigma
#   NEGATIVE_PROMPT  BYTES  optional; the unconditional half under guidance (default {negative})
#   STEPS            INT32  optional; sampling steps (default {steps}; the unet uses the nearest calibrated timestep's
#                           scales, calibrated: {timesteps})
#   GUIDANCE_SCALE   FP32   optional; classifier-free guidance (default {guidance}; <= 1 turns it off)
#   NUM_IMAGES       INT32  optional; images for the prompt (default 1, at most {max_images})
#   HEIGHT, WIDTH    INT32  optional; pixels (default {h}x{w}; {size_rule})
#   SCHEDULER        BYTES  optional; {scheduler_doc}
{xl_doc}# Output:
#   IMAGES           UINT8  [N, H, W, {out_c}]
"""
XL_DOC = """\
#   ORIGINAL_SIZE    INT32 [2]  optional; SDXL time_ids' original (H, W) (default HEIGHT, WIDTH)
#   CROPS_COORDS_TOP_LEFT INT32 [2]  optional; SDXL time_ids' crop (top, left) (default 0, 0)
#                           time_ids = ORIGINAL_SIZE + CROPS_COORDS_TOP_LEFT + (HEIGHT, WIDTH), for both CFG halves
"""


def _xl_params(parts: SdParts) -> dict[str, str]:
    """What the SDXL pipeline computes beyond SD's: the negative rule, the VAE's latent statistics."""
    vae = parts.pipeline.vae.config
    stats = {k: json.dumps(list(getattr(vae, k))) for k in ("latents_mean", "latents_std")
             if getattr(vae, k, None) is not None}
    return {"pipeline_class": parts.pipeline_class, "text_encoder_2_model": TEXT_ENCODER_2,
            "tokenizer_2_class": type(parts.pipeline.tokenizer_2).__name__,
            "force_zeros_for_empty_prompt": str(bool(parts.pipeline.config.force_zeros_for_empty_prompt)).lower(),
            **(stats if len(stats) == 2 else {})}


SD3_DOC = """\
# SD3: the prompt is both CLIP encoders' penultimate hidden states (concatenated, zero-padded to {joint}) followed by
#      {t5} T5 tokens ({t5_source}); pooled_projections = both CLIP pooled projections; FlowMatchEuler timesteps
#      (1000 sigma, floats) go to the transformer as they are; decode: latents / scaling_factor + shift_factor
"""


def _sd3_params(parts: SdParts) -> dict[str, str]:
    """What the SD3 pipeline computes beyond SD's: the second CLIP (and T5), the joint width, the VAE shift."""
    p = parts.pipeline
    out = {"text_encoder_2_model": TEXT_ENCODER_2, "tokenizer_2_class": type(p.tokenizer_2).__name__,
           "joint_attention_dim": str(parts.text_dim), "t5_tokens": str(parts.t5_tokens),
           "shift_factor": repr(float(p.vae.config.shift_factor or 0.0)),
           "patch_size": str(int(p.transformer.config.patch_size))}
    if TEXT_ENCODER_3 in parts.encoders:
        out.update(text_encoder_3_model=TEXT_ENCODER_3, tokenizer_3_class=type(p.tokenizer_3).__name__)
    return out


def _pipeline_config(cfg, spec: UnetSpec, parts: SdParts):
    ins, outs, optional = pipeline_io(parts)
    m = C.python_model(PIPELINE, ins, outs, optional, cfg.pipeline_instances)
    vae = parts.pipeline.vae.config
    steps, guidance = default_steps(), default_guidance(parts)
    max_size = MAX_SIZE_FACTOR * max(parts.image_size)
    params = {"text_encoder_model": TEXT_ENCODER, "unet_model": cfg.name, "vae_model": VAE_DECODER,
              "unet_output": spec.outputs[0].name, "unet_max_batch": str(cfg.max_batch),
              "t_index_input": str(spec.has_t_index).lower(), "timesteps": json.dumps(spec.timesteps),
              "latent_channels": str(int(vae.latent_channels)), "vae_scale_factor": str(parts.vae_scale_factor),
              "scaling_factor": repr(float(vae.scaling_factor)), "image_size": json.dumps(list(parts.image_size)),
              "size_multiple": str(parts.size_multiple), "max_size": str(max_size), "default_steps": str(steps),
              "default_guidance": repr(guidance), "max_images": str(cfg.max_images), "torch_threads": "1",
              "tokenizer_class": type(parts.pipeline.tokenizer).__name__, "source": parts.source,
              "pipeline_class": parts.pipeline_class}
    if parts.is_xl:
        params.update(_xl_params(parts))
    if parts.is_sd3:
        params.update(_sd3_params(parts))
    for k, v in params.items():
        m.parameters[k].string_value = v
    h, w = parts.image_size
    size_rule = (f"multiples of {parts.size_multiple} up to {max_size}" if parts.size_multiple else
                 "the unet has static shapes: only this size")
    negative = ('"" encoded; when left out and the pipeline forces zeros for an empty prompt (SDXL default), '
                "zero embeddings" if parts.is_xl else '""')
    extra = XL_DOC if parts.is_xl else ""
    if parts.is_sd3:
        extra = SD3_DOC.format(joint=parts.text_dim, t5=parts.t5_tokens,
                               t5_source="text_encoder_3" if TEXT_ENCODER_3 in parts.encoders else "zeros: no T5")
    own = parts.schedulers["pipeline"]["_class_name"]
    scheduler_doc = (f"pipeline only: the folder's own, {own}" if parts.is_sd3 else
                     f"pipeline (default: the folder's own, {own}) | ddim | euler | dpm (DPM-Solver++),\n"
                     "#                           on the pipeline's noise schedule (schedulers.json holds each one's config)")
    title = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD3"}.get(parts.pipeline_class,
                                                                                       "Stable Diffusion")
    doc = PIPELINE_DOC.format(title=title, scheduler_doc=scheduler_doc,
                              te=" and ".join(f"'{e}'" for e in parts.encoders), unet=cfg.name, vae=VAE_DECODER,
                              tokens=parts.max_tokens, negative=negative, xl_doc=extra,
                              c=int(vae.latent_channels), f=parts.vae_scale_factor, steps=steps,
                              timesteps=spec.timesteps, guidance=guidance, max_images=cfg.max_images, h=h, w=w,
                              size_rule=size_rule, out_c=int(vae.out_channels))
    return m, doc, C.Expected(ins, outs, optional)


def _part_config(cfg, name: str, ins: list[TensorSpec], outs: list[TensorSpec], fp16: bool):
    m = C.mc.ModelConfig(name=name, max_batch_size=cfg.max_batch)
    if cfg.kind == "cpu":
        m.backend = "python"
    else:
        m.platform = "onnxruntime_onnx"
    m.input.extend(C.model_input(t, True) for t in ins)
    m.output.extend(C.model_output(t, True) for t in outs)
    m.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = m.instance_group.add()
    group.count = 1
    group.kind = C.mc.ModelInstanceGroup.KIND_CPU if cfg.kind == "cpu" else C.mc.ModelInstanceGroup.KIND_GPU
    m.parameters["precision"].string_value = "fp16 (fp32 inputs and outputs)" if fp16 else "fp32"
    if cfg.kind == "cpu":
        m.parameters["intra_op_threads"].string_value = str(cfg.intra_op_threads)
    return m, C.Expected(ins, outs)


def write_sd_models(cfg, spec: UnetSpec, parts: SdParts, staging: Path, write_config, backend_source) -> None:
    """The text encoder(s), vae_decoder and the prompt pipeline into `staging` (the unet is already there)."""
    gpu = cfg.kind == "gpu"
    parts_to_write = [(e, lambda path, e=e: export_text_encoder(parts, path, gpu, e), parts.text_encoder_io(e), gpu)
                      for e in parts.encoders]
    parts_to_write.append((VAE_DECODER, lambda path: export_vae_decoder(parts, path, gpu), parts.vae_decoder_io(),
                           gpu and not parts.vae_fp32_on_gpu))
    for name, export, io, fp16 in parts_to_write:
        version = staging / name / "1"
        version.mkdir(parents=True)
        export(version / "model.onnx")
        if cfg.kind == "cpu":
            atomic_write_bytes(version / "model.py", backend_source("unet_ort"))
        message, expected = _part_config(cfg, name, *io, fp16)
        write_config(staging / name, message, expected)
    version = staging / PIPELINE / "1"
    version.mkdir(parents=True)
    atomic_write_bytes(version / "model.py", backend_source("sd_pipeline"))
    atomic_write_bytes(version / "dq_bls.py", backend_source("dq_bls"))
    (version / "schedulers.json").write_text(json.dumps(parts.schedulers, indent=2) + "\n")
    for e in parts.encoders:
        copy_tokenizer(parts, version / tokenizer_folder(e), e)
    message, doc, expected = _pipeline_config(cfg, spec, parts)
    write_config(staging / PIPELINE, message, expected, header=doc)
