"""Samplers by name on a model's own noise schedule, without another scheduler class's defaults.

A pipeline folder's scheduler is what its users deploy, so it is what calibration, dq-verify and dq-generate
sample with unless told otherwise (`pipeline`). A named sampler (`ddim`, `euler`, `dpm`, ...) is built from the
folder's scheduler config, and a config only lists the settings of its own class: an `EulerDiscreteScheduler`
saved by diffusers has no `clip_sample`, so `DDIMScheduler.from_config` would switch on DDIM's default x0
clipping, a behaviour the user's Euler never has. `build_scheduler` decides each setting of the target class:

1. the source config resolved through its own class: a key it leaves out takes the *source* class's default;
2. a setting the source class has carries over (noise schedule, prediction type, timestep spacing, steps offset,
   Karras / exponential sigmas, final sigma, ...);
3. a setting the source class does not have at all is a behaviour its sampler lacks, so it is turned off
   (`NEUTRAL`: no x0 clipping, no dynamic thresholding, the last step lands on the clean sample as
   Euler's and DPM-Solver's sigma 0 does); any other such setting takes the target class's default, which is
   what defines the target sampler (DPM-Solver's order, Euler's interpolation);
4. the named sampler's own fixed settings (`dpm`: DPM-Solver++).

The embedded models keep the sampler they were trained and measured with: a UNet folder (`default`,
`default-cond`) has only its training schedule (`scheduler/` holds a DDPMScheduler) and samples with DDIM on it;
a pipeline folder may name its sampler in its dilatequant.json (`sd-digits`: DDIM, as every committed figure of
it was measured).

The names are torch-free (the CLI reads them for its help); building a scheduler imports diffusers.
"""
from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, Mapping

from .errors import UserError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

PIPELINE = "pipeline"
# name -> (class, fixed settings). Every one has one UNet call per step at distinct timesteps, except PNDM
# (PLMS: the second step repeats the first's successor) which SD 1.x folders ship.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
CHOICES = (PIPELINE, *SCHEDULERS)
# settings that switch a behaviour on, and the value that means the behaviour is absent
NEUTRAL: dict[str, Any] = {"clip_sample": False, "thresholding": False, "set_alpha_to_one": True}
SHORT_NAMES = {"DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler-a",
               "DPMSolverMultistepScheduler": "DPM-Solver++", "LCMScheduler": "LCM", "PNDMScheduler": "PNDM",
               "UniPCMultistepScheduler": "UniPC", "DDPMScheduler": "DDPM",
               "FlowMatchEulerDiscreteScheduler": "FlowMatch-Euler"}


def scheduler_class(name: str | None) -> type[SchedulerMixin] | None:
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, str(name), None)
    return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None


def _settings(cls: type) -> dict[str, Any]:
    """The constructor's settings and their defaults: what a config of this class can hold."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def resolved_config(source: SchedulerMixin | Mapping) -> dict[str, Any]:
    """Every setting of the source's own class (a scheduler, or a config naming its `_class_name`): the config's
    value, else that class's default."""
    if not isinstance(source, Mapping):  # a scheduler instance
        cls, config = type(source), dict(source.config)
    else:
        config = dict(source)
        cls = scheduler_class(config.get("_class_name"))
    if cls is None:  # not a diffusers scheduler: its keys are all we know
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return {k: config.get(k, default) for k, default in _settings(cls).items()}


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise UserError(f"unknown scheduler '{name}': choose one of {', '.join(CHOICES)}")
    return name


def build_scheduler(name: str, source: SchedulerMixin | Mapping) -> SchedulerMixin:
    """The named sampler on the noise schedule of `source` (a scheduler, or a config with its `_class_name`, as a
    folder's scheduler_config.json has it); see the module docstring."""
    if check_name(name) == PIPELINE:
        raise ValueError("'pipeline' names a model's own scheduler: use resolve_scheduler(model)")
    class_name, fixed = SCHEDULERS[name]
    cls = scheduler_class(class_name)
    source = resolved_config(source)
    settings = {k: source[k] if k in source else NEUTRAL.get(k, default) for k, default in _settings(cls).items()}
    return cls.from_config({**settings, **fixed})


def copy_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh instance of the same class and config (no timesteps set, no solver state)."""
    return type(scheduler).from_config(scheduler.config)


def own_scheduler(model) -> SchedulerMixin:
    """The sampler a model is deployed with (`pipeline`): a pipeline folder's own scheduler, or the one its
    dilatequant.json names; DDIM on a UNet folder's training schedule."""
    if model.sampler is not None:
        return build_scheduler(model.sampler, model.scheduler)
    if model.pipeline_class is None:
        return build_scheduler("ddim", model.scheduler)
    return copy_scheduler(model.scheduler)


def resolve_scheduler(model, name: str = PIPELINE) -> SchedulerMixin:
    """`pipeline` (the model's own) or a name from SCHEDULERS, on the model's noise schedule."""
    if check_name(name) == PIPELINE:
        return own_scheduler(model)
    return build_scheduler(name, model.scheduler)


def describe(scheduler: SchedulerMixin) -> str:
    """A short human name: DDIM, Euler, DPM-Solver++ (Karras), ..."""
    cls = type(scheduler).__name__
    text = SHORT_NAMES.get(cls, cls.removesuffix("Scheduler"))
    if scheduler.config.get("use_karras_sigmas"):
        text += " (Karras)"
    return text


def config_json(scheduler: SchedulerMixin) -> str:
    """Every setting of the scheduler (its class and constructor settings; keys its class ignores are left out)
    as JSON: what q.pt records, and how two are compared."""
    data = resolved_config(scheduler)
    data["_class_name"] = type(scheduler).__name__
    return json.dumps(data, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def from_config_json(text: str) -> SchedulerMixin:
    """A scheduler rebuilt from config_json (every setting is in it: no defaults are filled in)."""
    data = json.loads(text)
    cls = scheduler_class(data.get("_class_name"))
    if cls is None:
        raise UserError(f"scheduler class '{data.get('_class_name')}' is not in this diffusers; upgrade diffusers")
    return cls.from_config(data)


def same_scheduler(a: SchedulerMixin, b: SchedulerMixin) -> bool:
    return config_json(a) == config_json(b)
