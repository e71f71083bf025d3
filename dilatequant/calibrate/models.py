"""Diffusion models this toolchain works on, loaded offline.

A model is a diffusers UNet, its noise scheduler and, for conditional models, the encoder that
turns a class label into `encoder_hidden_states`. On disk it is a diffusers-style folder:
`unet/`, `scheduler/` and optionally `class_encoder/` (a bare UNet folder with config.json works too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..errors import UserError

EMBEDDED_MODELS = ("default", "default-cond")
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
class DiffusionModel:
    """A UNet with what is needed to sample from it; `source` says where the weights came from."""

    unet: UNet2DModel | UNet2DConditionModel
    scheduler: DDPMScheduler
    class_encoder: ClassTokenEncoder | None
    source: str

    @property
    def is_conditional(self) -> bool:
        return isinstance(self.unet, UNet2DConditionModel)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
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


def new_model(name: str) -> DiffusionModel:
    """An untrained embedded-architecture model (what the training script starts from)."""
    if name == "default":
        unet = UNet2DModel(**default_unet_config())
        encoder = None
    elif name == "default-cond":
        unet = UNet2DConditionModel(**default_cond_unet_config())
        encoder = ClassTokenEncoder(dim=unet.config.cross_attention_dim)
    else:
        raise ModelLoadError(f"unknown embedded model '{name}': choose one of {', '.join(EMBEDDED_MODELS)}")
    return DiffusionModel(unet, default_scheduler(), encoder, source=f"untrained:{name}")


def embedded_model_dir(name: str) -> Path:
    return Path(str(resources.files("dilatequant") / "assets" / name))


def load_model(name_or_path: str | Path) -> DiffusionModel:
    """`default`, `default-cond` or a diffusers folder; never touches the network."""
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
        unet = classes[class_name].from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
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
            f"'{folder}' holds a conditional UNet but no class_encoder/ folder; this toolchain conditions on "
            "class tokens (pass encoder_hidden_states through the library API for other encoders)"
        )
    unet.eval()
    if encoder is not None:
        encoder.eval()
    return DiffusionModel(unet, scheduler, encoder, source=name if name in EMBEDDED_MODELS else str(folder.resolve()))
