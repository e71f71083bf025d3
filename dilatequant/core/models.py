"""Diffusion models this toolchain works on, loaded offline.

A model is a diffusers denoiser (a UNet, or a diffusion transformer: denoisers.py says how each family is
called), its noise scheduler and, for conditional models, what turns a label into the denoiser's condition: a
class-token encoder (the embedded models) or the text encoders of a pipeline (prompts; SDXL adds the pooled
embedding and `time_ids`, SD3 and FLUX a pooled embedding, PixArt a token mask). On disk it is a diffusers
folder: `unet/`, `scheduler/` and optionally `class_encoder/` (a bare UNet folder with config.json works
too), or a pipeline folder (`model_index.json`: Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1,
PixArt-Sigma), loaded with diffusers' own loaders. The text encoders encode the calibration prompts once
(`PromptBank`) and can then be dropped. Latent models sample latents; only metrics decode them with the VAE.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .conditioning import Condition, cat_conditions, map_condition
from .denoisers import GUIDANCE, PIPELINE_CLASSES, DenoiserFamily, cond_names, family_of, family_of_pipeline
from .errors import UserError
from .sizes import parse_size  # noqa: F401  (re-exported: callers take it from here)

# sd-digits: a StableDiffusionPipeline folder; sd3-digits: a StableDiffusion3Pipeline folder (a diffusion transformer)
EMBEDDED_MODELS = ("default", "default-cond", "sd-digits", "sd3-digits")
TRAINABLE_MODELS = ("default", "default-cond")  # fp_training.py; sd-digits is trained by sd_training.py
NUM_CLASSES = 10


class ModelLoadError(UserError):
    """A model name or folder that cannot be loaded; the message says what to pass instead."""


class ClassTokenEncoder(ModelMixin, ConfigMixin):
    """Class label -> a few learned tokens, standing in for a text encoder.

    Label `num_classes` is the null condition used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, dim: int = 64):
        super().__init__()
        self.table = torch.nn.Embedding(num_classes + 1, num_tokens * dim)
        torch.nn.init.normal_(self.table.weight, std=1.0)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.min() < 0 or labels.max() > self.config.num_classes:
            raise ValueError(
                f"class label out of range: got {labels.tolist()}, expected 0..{self.config.num_classes - 1} "
                f"(or {self.config.num_classes} for the unconditional/null label)"
            )
        return self.table(labels).view(len(labels), self.config.num_tokens, self.config.dim)


def default_unet_config() -> dict:
    """`default`: DDPM UNet2DModel, 32x32 grey digits, self-attention at 8x8."""
    return dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def default_cond_unet_config(cross_attention_dim: int = 64) -> dict:
    """`default-cond`: Stable-Diffusion-shaped UNet2DConditionModel with cross-attention transformers."""
    return dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def default_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


@dataclass
class PromptBank:
    """Encoded conditions of a fixed prompt list: label i means prompts[i], label len(prompts) the negative prompt.

    It travels in q.pt, so everything after calibration (export, parity, dq-verify, Triton) conditions on
    exactly the calibration prompts without loading the text encoders again.
    """

    prompts: list[str]
    negative_prompt: str
    cond: Condition  # every tensor [len(prompts) + 1, ...]; the last row is the negative prompt

    @property
    def null_label(self) -> int:
        return len(self.prompts)

    def lookup(self, labels: torch.Tensor) -> Condition:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(f"prompt label out of range: got {labels.tolist()}, expected 0..{self.null_label - 1} "
                             f"(or {self.null_label} for the negative prompt)")
        return map_condition(self.cond, lambda v: v[labels])

    def to_dict(self) -> dict:
        return {"prompts": list(self.prompts), "negative_prompt": self.negative_prompt,
                "cond": {k: v.detach().clone() for k, v in self.cond.items()}}

    @staticmethod
    def from_dict(d: dict) -> "PromptBank":
        return PromptBank(list(d["prompts"]), d["negative_prompt"], dict(d["cond"]))


@dataclass
class DiffusionModel:
    """A denoiser (UNet or diffusion transformer) with what is needed to sample from it; `source` says where
    the weights came from.

    Text-conditioned models carry their pipeline (text encoders, tokenizers, VAE) when loaded from a folder,
    and a `prompt_bank` once calibration prompts are chosen; a model rebuilt from q.pt has the bank only.
    """

    denoiser: torch.nn.Module  # UNet2DModel | UNet2DConditionModel | a diffusers transformer (denoisers.FAMILIES)
    scheduler: SchedulerMixin
    class_encoder: ClassTokenEncoder | None
    source: str
    pipeline: DiffusionPipeline | None = None
    pipeline_class: str | None = None        # denoisers.PIPELINE_CLASSES | None (class-token and bare UNets)
    vae_scale_factor: int = 1                # pixels per latent (8 for SD); 1 for pixel-space models
    resolution: tuple[int, int] | None = None  # image (H, W) to sample at; None: the denoiser's default size
    prompt_bank: PromptBank | None = None
    # what the model samples with unless told: a pipeline folder's dilatequant.json, or the guidance a q.pt was
    # calibrated at; None: sampling.default_guidance's rule
    guidance_scale: float | None = None
    default_prompts: list[str] | None = None  # calibration prompts named by the folder (None: the package's set)
    # keyword arguments the folder's dilatequant.json gives its pipeline's calls (e.g. SD3's max_sequence_length:
    # the number of T5 tokens a prompt is padded to, which the transformer sees); prompt encoding uses them too
    pipeline_kwargs: dict = field(default_factory=dict)
    # the sampler a pipeline folder names in its dilatequant.json (a core.schedulers name); None: its own scheduler
    sampler: str | None = None
    # the weights' fingerprint, pinned by calibration before it drops the text encoders and swaps the UNet for a
    # lower-precision teacher (calibration_data.model_fingerprint answers it from then on)
    pinned_fingerprint: str | None = None

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its UNet-era name (code that only ever handles UNets still reads it)."""
        return self.denoiser

    @unet.setter
    def unet(self, module: torch.nn.Module) -> None:
        self.denoiser = module

    @property
    def family(self) -> DenoiserFamily:
        return family_of(self.denoiser)

    @property
    def is_transformer(self) -> bool:
        """A diffusion transformer (DiT), not a UNet."""
        return self.denoiser is not None and not isinstance(self.denoiser, (UNet2DModel, UNet2DConditionModel))

    @property
    def is_conditional(self) -> bool:
        return isinstance(self.denoiser, UNet2DConditionModel) or self.is_transformer

    @property
    def guidance_embedded(self) -> bool:
        """Guidance is an input of the denoiser (FLUX-dev), not a second, unconditional batch."""
        return self.is_transformer and self.family.guidance_embedded(self.denoiser)

    def classifier_free(self, guidance_scale: float) -> bool:
        """Does sampling at this scale run each sample twice, conditional and unconditional ([cond; uncond])?"""
        return self.is_conditional and guidance_scale != 1.0 and not self.guidance_embedded

    @property
    def is_text_conditioned(self) -> bool:
        return self.pipeline_class is not None

    @property
    def cond_names(self) -> tuple[str, ...]:
        return cond_names(self.denoiser)

    @property
    def num_labels(self) -> int:
        """How many distinct conditions `labels` index: classes, or the calibration prompts."""
        if self.prompt_bank is not None:
            return len(self.prompt_bank.prompts)
        return self.class_encoder.config.num_classes if self.class_encoder is not None else NUM_CLASSES

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latent the sampler holds (FLUX: unpacked, 16 channels)."""
        family, module = self.family, self.denoiser
        channels = family.latent_channels(module)
        if self.resolution is not None:
            h, w = self.resolution
            return (channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        size = family.latent_size(module)
        return (channels, size, size)

    def timestep_kwargs(self, scheduler: SchedulerMixin, steps: int) -> dict:
        """What this model's pipeline passes to scheduler.set_timesteps besides the step count (flow matching:
        FLUX's sigmas, and the resolution-dependent shift mu): the calibrated schedule must be the deployed one."""
        if not self.is_transformer:
            return {}
        return self.family.set_timesteps_kwargs(self.denoiser, scheduler, steps, self.sample_shape[1:])

    @property
    def patch_multiple(self) -> int:
        """Latent heights and widths the denoiser takes are multiples of this (UNet downsampling, DiT patch)."""
        return self.family.patch_multiple(self.denoiser)

    @property
    def image_size(self) -> tuple[int, int]:
        _, h, w = self.sample_shape
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    def condition(self, labels: torch.Tensor | list[str], guidance_scale: float = 1.0,
                  negative_prompt: str | None = None) -> Condition:
        """The denoiser's condition of a batch, with the unconditional half appended under classifier-free guidance
        ([cond; uncond]); a guidance-embedded model (FLUX-dev) gets the scale as its `guidance` input instead.

        labels: class labels, prompt-bank labels, or (with a loaded pipeline) prompt strings.
        """
        cond = self._condition(labels, guidance_scale, negative_prompt)
        if self.guidance_embedded:
            cond[GUIDANCE] = torch.full((len(labels),), float(guidance_scale))
        return cond

    def _condition(self, labels, guidance_scale: float, negative_prompt: str | None) -> Condition:
        guided = self.classifier_free(guidance_scale)
        if self.class_encoder is not None:
            labels = torch.as_tensor(labels)
            with torch.no_grad():
                cond = self.class_encoder(labels)
                if guided:
                    cond = torch.cat([cond, self.class_encoder(torch.full_like(labels, self.class_encoder.null_label))])
            return {"encoder_hidden_states": cond}
        if not self.is_text_conditioned:
            raise ValueError("this model is unconditional; do not pass labels")
        if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
            return encode_prompts(self, list(labels), guided,
                                  negative_prompt if negative_prompt is not None
                                  else (self.prompt_bank.negative_prompt if self.prompt_bank else ""))
        if self.prompt_bank is None:
            raise ValueError("this text-conditioned model has no calibration prompts: pass prompt strings")
        labels = torch.as_tensor(labels, dtype=torch.long)
        cond = self.prompt_bank.lookup(labels)
        if guided:
            cond = cat_conditions([cond, self.prompt_bank.lookup(torch.full_like(labels, self.prompt_bank.null_label))])
        return cond

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from samples: the VAE for latent models (needs the pipeline), identity otherwise."""
        if not self.is_text_conditioned:
            return latents
        if self.pipeline is None:
            raise UserError(f"decoding latents needs the pipeline's VAE; load the model folder '{self.source}'")
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor") or 0.0  # SD3 and FLUX VAEs: latents = (z - shift) * scaling
        with torch.no_grad():
            return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0].clamp(-1, 1)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        if self.pipeline is not None:
            self.pipeline.save_pretrained(folder)
            return
        self.denoiser.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.class_encoder is not None:
            self.class_encoder.save_pretrained(folder / "class_encoder")
        for cfg in folder.glob("*/config.json"):  # a loaded model remembers where it came from: not portable
            data = json.loads(cfg.read_text())
            if data.pop("_name_or_path", None) is not None:
                cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for f in folder.rglob("*.safetensors"):  # readable by every user of a shared install
            f.chmod(0o644)


def encode_prompts(model: DiffusionModel, prompts: list[str], with_negative: bool, negative_prompt: str = "") -> Condition:
    """The pipeline's own encode_prompt: [cond; uncond] with the negative prompt; SDXL adds text_embeds and
    time_ids, SD3 and FLUX pooled_projections, PixArt the token mask (the folder's pipeline_kwargs apply:
    max_sequence_length)."""
    pipe = model.pipeline
    if pipe is None:
        raise UserError(f"encoding prompts needs the text encoders; load the pipeline folder '{model.source}'")
    guided = with_negative
    negative = [negative_prompt] * len(prompts) if guided else None
    if model.pipeline_class == "StableDiffusionXLPipeline" and not negative_prompt:
        negative = None  # SDXL's own default for no negative prompt (zeros when force_zeros_for_empty_prompt)
    cpu = torch.device("cpu")
    with torch.no_grad():
        if model.is_transformer:
            cond = _encode_for_transformer(model, prompts, cpu)
            return cat_conditions([cond, _encode_for_transformer(model, negative, cpu)]) if guided else cond
        if model.pipeline_class == "StableDiffusionXLPipeline":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompts, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=negative)
            h, w = model.image_size
            proj = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=emb.dtype, text_encoder_projection_dim=proj)
            cond = {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
            if guided:
                cond = cat_conditions([cond, {"encoder_hidden_states": neg, "text_embeds": neg_pooled,
                                              "time_ids": time_ids.repeat(len(prompts), 1)}])
            return cond
        emb, neg = pipe.encode_prompt(prompts, cpu, 1, guided, negative_prompt=negative)
    return {"encoder_hidden_states": torch.cat([emb, neg]) if guided else emb}


def _encode_for_transformer(model: DiffusionModel, prompts: list[str], device: torch.device) -> Condition:
    """One list of prompts through a DiT pipeline's encode_prompt, positive branch only (the negative prompt is
    encoded as a list of prompts of its own: the same tensors the pipeline's negative branch makes)."""
    pipe, kwargs = model.pipeline, dict(model.pipeline_kwargs)
    length = {k: kwargs[k] for k in ("max_sequence_length",) if k in kwargs}
    if model.pipeline_class == "StableDiffusion3Pipeline":
        emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, **length)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}
    if model.pipeline_class == "FluxPipeline":
        emb, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1, **length)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}
    emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                         device=device, clean_caption=False, **length)  # PixArt-Sigma
    return {"encoder_hidden_states": emb, "encoder_attention_mask": mask.float()}


def make_prompt_bank(model: DiffusionModel, prompts: list[str], negative_prompt: str = "") -> PromptBank:
    """Encode the prompts once, and the unconditional half as the null label, the way guided sampling does."""
    both = encode_prompts(model, list(prompts), True, negative_prompt)  # [cond of every prompt; uncond of every prompt]
    n = len(prompts)
    return PromptBank(list(prompts), negative_prompt, map_condition(both, lambda v: v[: n + 1].clone()))


def new_model(name: str) -> DiffusionModel:
    """An untrained embedded-architecture model (what the training script starts from)."""
    if name == "default":
        unet = UNet2DModel(**default_unet_config())
        encoder = None
    elif name == "default-cond":
        unet = UNet2DConditionModel(**default_cond_unet_config())
        encoder = ClassTokenEncoder(dim=unet.config.cross_attention_dim)
    else:
        raise ModelLoadError(f"unknown embedded model '{name}': choose one of {', '.join(TRAINABLE_MODELS)}")
    return DiffusionModel(unet, default_scheduler(), encoder, source=f"untrained:{name}")


def embedded_model_dir(name: str) -> Path:
    return Path(str(resources.files("dilatequant") / "assets" / name))


def check_size(model: DiffusionModel, size: tuple[int, int], flag: str = "--size") -> tuple[int, int]:
    """A size the denoiser can take: a multiple of the VAE factor times its patch multiple (a UNet's total
    downsampling, a transformer's patch)."""
    multiple = model.vae_scale_factor * model.patch_multiple
    if size[0] % multiple or size[1] % multiple:
        what = "transformer patch" if model.is_transformer else "UNet downsampling"
        raise UserError(f"{flag} {size[0]}x{size[1]} cannot be taken by this {model.family.name}: height and width "
                        f"must be multiples of {multiple} (VAE factor {model.vae_scale_factor} x {what}); "
                        f"e.g. {max(multiple, size[0] // multiple * multiple)}x{max(multiple, size[1] // multiple * multiple)}")
    return size


# the components each supported pipeline needs to condition and decode (SD3's T5 slot may be empty)
PIPELINE_PARTS = {
    "StableDiffusionPipeline": ("unet", "vae", "scheduler", "text_encoder", "tokenizer"),
    "StableDiffusionXLPipeline": ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                                  "tokenizer_2"),
    "StableDiffusion3Pipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                                 "tokenizer_2"),
    "FluxPipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "PixArtSigmaPipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
}
SUPPORTED_PIPELINES = ("Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, PixArt-Sigma: "
                       + ", ".join(PIPELINE_CLASSES))


def load_pipeline(folder: Path, source: str) -> DiffusionModel:
    """A supported pipeline folder (PIPELINE_PARTS) through diffusers' own loader, offline."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"'{index_file}' is not a readable pipeline index ({err}); re-save the pipeline "
                             "with save_pretrained") from err
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ModelLoadError(f"'{folder}' is a '{class_name}' pipeline; supported pipelines are {SUPPORTED_PIPELINES}")
    for part in PIPELINE_PARTS[class_name]:
        entry = index.get(part)
        if not isinstance(entry, list) or entry[0] is None or not (folder / part).is_dir():
            raise ModelLoadError(f"'{folder}' ({class_name}) has no {part}/ component; it is needed to condition "
                                 "and decode: save the whole pipeline with save_pretrained")
    try:
        import transformers  # noqa: F401  (the text encoders and tokenizers)
    except ImportError as err:
        raise ModelLoadError("loading a diffusers pipeline needs the transformers package: "
                             "pip install 'transformers>=4.40'") from err
    import diffusers

    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # importing the pipeline warns about torchvision-less image processors SD never uses
    try:
        cls = getattr(diffusers, class_name)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if class_name == "StableDiffusionPipeline" else {}
    # components saved empty (SD3 without T5): diffusers' loader wants them named
    kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)})
    diffusers.utils.logging.disable_progress_bar()  # per-component loading bars say nothing on a local folder
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ModelLoadError(f"cannot load the pipeline in '{folder}': {str(err).splitlines()[0]}") from err
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).eval()
    denoiser = pipe.transformer if "transformer" in PIPELINE_PARTS[class_name] else pipe.unet
    family = family_of_pipeline(class_name)
    if not family.matches(denoiser):
        raise ModelLoadError(f"'{folder}' has a {type(denoiser).__name__}; a {class_name} takes "
                             f"{', '.join(family.model_classes)}")
    if class_name == "PixArtSigmaPipeline" and denoiser.use_additional_conditions:
        raise ModelLoadError(f"'{folder}' has a PixArt transformer with resolution/aspect-ratio micro-conditions "
                             "(PixArt-Alpha), which PixArtSigmaPipeline never passes; set use_additional_conditions "
                             "false in transformer/config.json (PixArt-Sigma's own setting)")
    cond_names(denoiser)  # an unsupported addition embedding fails here, with its name
    defaults = pipeline_defaults(folder)
    guidance = defaults.guidance_scale
    if guidance is None and family.name != "UNet":  # a DiT pipeline samples at its own default scale
        guidance = float(inspect.signature(cls.__call__).parameters["guidance_scale"].default)
    return DiffusionModel(denoiser, pipe.scheduler, None, source=source, pipeline=pipe, pipeline_class=class_name,
                          vae_scale_factor=int(pipe.vae_scale_factor), guidance_scale=guidance,
                          default_prompts=defaults.prompts, pipeline_kwargs=defaults.pipeline_kwargs,
                          sampler=defaults.sampler)


DEFAULTS_FILE = "dilatequant.json"


@dataclass
class PipelineDefaults:
    guidance_scale: float | None = None
    prompts: list[str] | None = None
    sampler: str | None = None  # a core.schedulers name
    pipeline_kwargs: dict = field(default_factory=dict)  # e.g. {"max_sequence_length": 0}


def pipeline_defaults(folder: Path) -> PipelineDefaults:
    """What a pipeline folder names in its optional dilatequant.json: {"guidance_scale": 3.0,
    "calibration_prompts": "prompts.txt", "scheduler": "ddim", "pipeline_kwargs": {"max_sequence_length": 0}}
    (the prompt file beside it; the sampler it is deployed with when that is not its scheduler/ class; keyword
    arguments of its pipeline's calls that the weights were made for)."""
    from .prompts import read_prompts
    from .schedulers import SCHEDULERS

    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return PipelineDefaults()
    example = ('{"guidance_scale": 3.0, "calibration_prompts": "prompts.txt", "scheduler": "ddim", '
               '"pipeline_kwargs": {...}}')
    try:
        spec = json.loads(path.read_text())
        guidance = spec.get("guidance_scale")
        prompts_file = spec.get("calibration_prompts")
        pipeline_kwargs = dict(spec.get("pipeline_kwargs") or {})
        sampler = spec.get("scheduler")
        if guidance is not None:
            guidance = float(guidance)
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ModelLoadError(f"'{path}' is not a valid defaults file ({err}); expected {example} or delete it") from err
    unknown = set(pipeline_kwargs) - {"max_sequence_length"}
    if unknown:
        raise ModelLoadError(f"'{path}' names pipeline_kwargs {sorted(unknown)}; supported is max_sequence_length")
    if sampler is not None and sampler not in SCHEDULERS:
        raise ModelLoadError(f"'{path}' names the scheduler '{sampler}'; choose one of {', '.join(SCHEDULERS)} "
                             "or leave it out (the folder's own scheduler)")
    return PipelineDefaults(guidance, read_prompts(folder / prompts_file) if prompts_file else None, sampler,
                            pipeline_kwargs)


def load_model(name_or_path: str | Path, resolution: tuple[int, int] | None = None) -> DiffusionModel:
    """An embedded model, a diffusers UNet folder or a supported pipeline folder; never touches the network.

    resolution (H, W) in pixels sets the sampling size (default: the denoiser's own, e.g. the UNet's sample_size).
    """
    model = _load_model(name_or_path)
    if resolution is not None:
        model.resolution = check_size(model, resolution, "--resolution")
    return model


def _load_model(name_or_path: str | Path) -> DiffusionModel:
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        folder = embedded_model_dir(name)
        if not (folder / "unet" / "config.json").is_file() and not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"embedded model '{name}' is missing its weights at {folder}; reinstall the package")
    else:
        folder = Path(name)
        if not folder.exists():
            raise ModelLoadError(
                f"'{name}' is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an existing folder"
            )
    if (folder / "model_index.json").is_file():
        return load_pipeline(folder, name if name in EMBEDDED_MODELS else str(folder.resolve()))
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"'{folder}' is not a diffusers model: no unet/config.json or config.json inside")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"'{config_file}' is not valid JSON ({err}); re-save the model with save_pretrained") from err
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if class_name not in classes:
        raise ModelLoadError(
            f"'{config_file}' describes a '{class_name}'; supported UNets are {', '.join(classes)}"
        )
    try:
        unet = classes[class_name].from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load the UNet weights in '{unet_dir}': {err}") from err
    scheduler = (
        DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
        if (folder / "scheduler").is_dir() else default_scheduler()
    )
    encoder = None
    if (folder / "class_encoder").is_dir():
        encoder = ClassTokenEncoder.from_pretrained(
            folder / "class_encoder", local_files_only=True, low_cpu_mem_usage=False
        )
    elif class_name == "UNet2DConditionModel":
        raise ModelLoadError(
            f"'{folder}' holds a conditional UNet but no class_encoder/ folder and no model_index.json; pass the "
            "whole Stable Diffusion pipeline folder (with text_encoder/ and tokenizer/) or a class-token model"
        )
    unet.eval()
    if encoder is not None:
        encoder.eval()
    return DiffusionModel(unet, scheduler, encoder, source=name if name in EMBEDDED_MODELS else str(folder.resolve()))
