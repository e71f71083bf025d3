"""Diffusion models this toolchain works on, loaded offline.

A model is a diffusers UNet, its noise scheduler and, for conditional models, what turns a label into
the UNet's condition: a class-token encoder (the embedded models) or the text encoders of a Stable
Diffusion pipeline (prompts; SDXL adds the pooled embedding and `time_ids`). On disk it is a diffusers
folder: `unet/`, `scheduler/` and optionally `class_encoder/` (a bare UNet folder with config.json works
too), or a `StableDiffusionPipeline` / `StableDiffusionXLPipeline` folder (`model_index.json`), loaded
with diffusers' own loaders. Latent models sample latents; only metrics decode them with the VAE.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .conditioning import Condition, cat_conditions, cond_names, map_condition
from .errors import UserError
from .sizes import parse_size  # noqa: F401  (re-exported: callers take it from here)

EMBEDDED_MODELS = ("default", "default-cond", "sd-digits")  # sd-digits: a StableDiffusionPipeline folder
TRAINABLE_MODELS = ("default", "default-cond")  # fp_training.py; sd-digits is trained by sd_training.py
NUM_CLASSES = 10
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


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
    """A UNet with what is needed to sample from it; `source` says where the weights came from.

    Text-conditioned models carry their pipeline (text encoders, tokenizers, VAE) when loaded from a folder,
    and a `prompt_bank` once calibration prompts are chosen; a model rebuilt from q.pt has the bank only.
    """

    unet: UNet2DModel | UNet2DConditionModel
    scheduler: SchedulerMixin
    class_encoder: ClassTokenEncoder | None
    source: str
    pipeline: DiffusionPipeline | None = None
    pipeline_class: str | None = None        # StableDiffusionPipeline | StableDiffusionXLPipeline | None
    vae_scale_factor: int = 1                # pixels per latent (8 for SD); 1 for pixel-space models
    resolution: tuple[int, int] | None = None  # image (H, W) to sample at; None: the UNet's sample_size
    prompt_bank: PromptBank | None = None
    # what the model samples with unless told: a pipeline folder's dilatequant.json, or the guidance a q.pt was
    # calibrated at; None: sampling.default_guidance's rule
    guidance_scale: float | None = None
    default_prompts: list[str] | None = None  # calibration prompts named by the folder (None: the package's set)
    # the sampler a pipeline folder names in its dilatequant.json (a core.schedulers name); None: its own scheduler
    sampler: str | None = None
    # the weights' fingerprint, pinned by calibration before it drops the text encoders and swaps the UNet for a
    # lower-precision teacher (calibration_data.model_fingerprint answers it from then on)
    pinned_fingerprint: str | None = None

    @property
    def is_conditional(self) -> bool:
        return isinstance(self.unet, UNet2DConditionModel)

    @property
    def is_text_conditioned(self) -> bool:
        return self.pipeline_class is not None

    @property
    def cond_names(self) -> tuple[str, ...]:
        return cond_names(self.unet)

    @property
    def num_labels(self) -> int:
        """How many distinct conditions `labels` index: classes, or the calibration prompts."""
        if self.prompt_bank is not None:
            return len(self.prompt_bank.prompts)
        return self.class_encoder.config.num_classes if self.class_encoder is not None else NUM_CLASSES

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        if self.resolution is not None:
            h, w = self.resolution
            return (cfg.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @property
    def image_size(self) -> tuple[int, int]:
        _, h, w = self.sample_shape
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    def condition(self, labels: torch.Tensor | list[str], guidance_scale: float = 1.0,
                  negative_prompt: str | None = None) -> Condition:
        """The UNet condition of a batch, with the unconditional half appended under guidance ([cond; uncond]).

        labels: class labels, prompt-bank labels, or (with a loaded pipeline) prompt strings.
        """
        guided = guidance_scale != 1.0
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
            return encode_prompts(self, list(labels), guidance_scale,
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
        with torch.no_grad():
            return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        if self.pipeline is not None:
            self.pipeline.save_pretrained(folder)
            return
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.class_encoder is not None:
            self.class_encoder.save_pretrained(folder / "class_encoder")
        for cfg in folder.glob("*/config.json"):  # a loaded model remembers where it came from: not portable
            data = json.loads(cfg.read_text())
            if data.pop("_name_or_path", None) is not None:
                cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for f in folder.rglob("*.safetensors"):  # readable by every user of a shared install
            f.chmod(0o644)


def encode_prompts(model: DiffusionModel, prompts: list[str], guidance_scale: float, negative_prompt: str = "") -> Condition:
    """The pipeline's own encode_prompt: [cond; uncond] under guidance; SDXL adds text_embeds and time_ids."""
    pipe = model.pipeline
    if pipe is None:
        raise UserError(f"encoding prompts needs the text encoders; load the pipeline folder '{model.source}'")
    guided = guidance_scale != 1.0
    negative = [negative_prompt] * len(prompts) if guided else None
    if model.pipeline_class == "StableDiffusionXLPipeline" and not negative_prompt:
        negative = None  # SDXL's own default for no negative prompt (zeros when force_zeros_for_empty_prompt)
    with torch.no_grad():
        if model.pipeline_class == "StableDiffusionXLPipeline":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=negative)
            h, w = model.image_size
            proj = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=emb.dtype, text_encoder_projection_dim=proj)
            cond = {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
            if guided:
                cond = cat_conditions([cond, {"encoder_hidden_states": neg, "text_embeds": neg_pooled,
                                              "time_ids": time_ids.repeat(len(prompts), 1)}])
            return cond
        emb, neg = pipe.encode_prompt(prompts, torch.device("cpu"), 1, guided, negative_prompt=negative)
    return {"encoder_hidden_states": torch.cat([emb, neg]) if guided else emb}


def make_prompt_bank(model: DiffusionModel, prompts: list[str], negative_prompt: str = "") -> PromptBank:
    """Encode the prompts once, and the unconditional half as the null label, the way guided sampling does."""
    both = encode_prompts(model, list(prompts), 2.0, negative_prompt)  # [cond of every prompt; uncond of every prompt]
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
    """A size the UNet can take: a multiple of the VAE factor times the UNet's total downsampling."""
    multiple = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)
    if size[0] % multiple or size[1] % multiple:
        raise UserError(f"{flag} {size[0]}x{size[1]} cannot be taken by this UNet: height and width must be "
                        f"multiples of {multiple} (VAE factor {model.vae_scale_factor} x UNet downsampling); "
                        f"e.g. {max(multiple, size[0] // multiple * multiple)}x{max(multiple, size[1] // multiple * multiple)}")
    return size


def load_pipeline(folder: Path, source: str) -> DiffusionModel:
    """A StableDiffusionPipeline / StableDiffusionXLPipeline folder through diffusers' own loader, offline."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"'{index_file}' is not a readable pipeline index ({err}); re-save the pipeline "
                             "with save_pretrained") from err
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ModelLoadError(f"'{folder}' is a '{class_name}' pipeline; supported pipelines are "
                             f"{', '.join(PIPELINE_CLASSES)} (UNet-based Stable Diffusion 1.x/2.x and SDXL)")
    needed = ["unet", "vae", "scheduler", "text_encoder", "tokenizer"]
    if class_name == "StableDiffusionXLPipeline":
        needed += ["text_encoder_2", "tokenizer_2"]
    for part in needed:
        entry = index.get(part)
        if not isinstance(entry, list) or entry[0] is None or not (folder / part).is_dir():
            raise ModelLoadError(f"'{folder}' ({class_name}) has no {part}/ component; it is needed to condition "
                                 "and decode: save the whole pipeline with save_pretrained")
    try:
        import transformers  # noqa: F401  (the text encoders and tokenizers)
    except ImportError as err:
        raise ModelLoadError("loading a Stable Diffusion pipeline needs the transformers package: "
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
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).eval()
    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise ModelLoadError(f"'{folder}' has a {type(pipe.unet).__name__}; supported is UNet2DConditionModel")
    cond_names(pipe.unet)  # an unsupported addition embedding fails here, with its name
    defaults = pipeline_defaults(folder)
    return DiffusionModel(pipe.unet, pipe.scheduler, None, source=source, pipeline=pipe, pipeline_class=class_name,
                          vae_scale_factor=int(pipe.vae_scale_factor), guidance_scale=defaults.guidance_scale,
                          default_prompts=defaults.prompts, sampler=defaults.sampler)


DEFAULTS_FILE = "dilatequant.json"


@dataclass
class PipelineDefaults:
    guidance_scale: float | None = None
    prompts: list[str] | None = None
    sampler: str | None = None  # a core.schedulers name


def pipeline_defaults(folder: Path) -> PipelineDefaults:
    """What a pipeline folder names in its optional dilatequant.json: {"guidance_scale": 3.0,
    "calibration_prompts": "prompts.txt", "scheduler": "ddim"} (the prompt file beside it; the sampler it is
    deployed with when that is not its scheduler/ class)."""
    from .prompts import read_prompts
    from .schedulers import SCHEDULERS

    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return PipelineDefaults()
    example = '{"guidance_scale": 3.0, "calibration_prompts": "prompts.txt", "scheduler": "ddim"}'
    try:
        spec = json.loads(path.read_text())
        guidance = spec.get("guidance_scale")
        prompts_file = spec.get("calibration_prompts")
        sampler = spec.get("scheduler")
        if guidance is not None:
            guidance = float(guidance)
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ModelLoadError(f"'{path}' is not a valid defaults file ({err}); expected {example} or delete it") from err
    if sampler is not None and sampler not in SCHEDULERS:
        raise ModelLoadError(f"'{path}' names the scheduler '{sampler}'; choose one of {', '.join(SCHEDULERS)} "
                             "or leave it out (the folder's own scheduler)")
    return PipelineDefaults(guidance, read_prompts(folder / prompts_file) if prompts_file else None, sampler)


def load_model(name_or_path: str | Path, resolution: tuple[int, int] | None = None) -> DiffusionModel:
    """`default`, `default-cond`, a diffusers UNet folder or an SD/SDXL pipeline folder; never touches the network.

    resolution (H, W) in pixels sets the sampling size (default: the UNet's sample_size).
    """
    model = _load_model(name_or_path)
    if resolution is not None:
        model.resolution = check_size(model, resolution, "--resolution")
    return model


def _load_model(name_or_path: str | Path) -> DiffusionModel:
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        folder = embedded_model_dir(name)
        if not (folder / "unet" / "config.json").is_file():
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
