"""Samplers by name without another scheduler class's defaults, and the generic sampling loop over them."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from dilatequant.core.errors import UserError
from dilatequant.core.models import DiffusionModel, default_scheduler, load_model
from dilatequant.core.sampling import sample, sampling_timesteps
from dilatequant.core.schedulers import build_scheduler, resolve_scheduler, same_scheduler

# what an SDXL folder's scheduler/scheduler_config.json holds: saved by EulerDiscreteScheduler's constructor
SDXL_EULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
                  steps_offset=1)


def test_ddim_from_an_euler_config_takes_no_ddim_defaults():
    euler = EulerDiscreteScheduler(**SDXL_EULER)
    assert "clip_sample" not in euler.config
    assert DDIMScheduler.from_config(euler.config).config.clip_sample  # diffusers' own from_config: the leak
    ddim = build_scheduler("ddim", euler)
    c = ddim.config
    assert not c.clip_sample and not c.thresholding and c.set_alpha_to_one  # Euler never clips; it ends at sigma 0
    assert (c.timestep_spacing, c.steps_offset, c.beta_schedule, c.beta_start) == ("leading", 1, "scaled_linear", 0.00085)


def test_a_setting_the_config_leaves_out_takes_its_own_class_default():
    """An Euler config without timestep_spacing means Euler's 'linspace', not DDIM's or DDPM's 'leading'."""
    cfg = {k: v for k, v in EulerDiscreteScheduler(**SDXL_EULER).config.items() if k != "timestep_spacing"}
    assert build_scheduler("ddim", {**cfg, "_class_name": "EulerDiscreteScheduler"}).config.timestep_spacing == "linspace"
    ddpm = default_scheduler()  # the embedded UNet folders' training schedule: DDPM clips, so its DDIM does too
    assert build_scheduler("ddim", ddpm).config.clip_sample
    assert same_scheduler(build_scheduler("ddim", ddpm), DDIMScheduler.from_config(ddpm.config))


def test_dpm_is_dpm_solver_plus_plus_with_karras_sigmas_when_the_config_asks():
    plain = build_scheduler("dpm", EulerDiscreteScheduler(**SDXL_EULER))
    assert isinstance(plain, DPMSolverMultistepScheduler) and plain.config.algorithm_type == "dpmsolver++"
    assert not plain.config.use_karras_sigmas
    karras = build_scheduler("dpm", EulerDiscreteScheduler(**SDXL_EULER, use_karras_sigmas=True))
    assert karras.config.use_karras_sigmas
    with pytest.raises(UserError, match="unknown scheduler 'heun'"):
        build_scheduler("heun", plain)


def test_pipeline_means_the_folders_own_and_the_embedded_models_keep_ddim():
    unet_folder = load_model("default")
    assert isinstance(resolve_scheduler(unet_folder), DDIMScheduler)  # scheduler/ is its DDPM training schedule
    sd_digits = load_model("sd-digits")
    assert type(sd_digits.scheduler).__name__ == "PNDMScheduler" and sd_digits.sampler == "ddim"  # dilatequant.json
    own = resolve_scheduler(sd_digits)
    assert isinstance(own, DDIMScheduler) and same_scheduler(own, DDIMScheduler.from_config(sd_digits.scheduler.config))
    folder = DiffusionModel(None, EulerDiscreteScheduler(**SDXL_EULER), None, "x", pipeline_class="StableDiffusionXLPipeline")
    own = resolve_scheduler(folder)
    assert isinstance(own, EulerDiscreteScheduler) and own is not folder.scheduler
    assert same_scheduler(own, folder.scheduler)


def _with_scheduler(model, scheduler):
    return DiffusionModel(model.unet, scheduler, None, "tiny", pipeline_class=None)


def test_ddim_without_leaks_is_eulers_update(uncond_model):
    """DDIM (eta 0, set_alpha_to_one) is the Euler step of the same ODE: on Euler's config they sample the same."""
    euler = EulerDiscreteScheduler(**SDXL_EULER)
    a = sample(uncond_model, num_samples=3, steps=4, progress=False, scheduler=euler).images
    b = sample(uncond_model, num_samples=3, steps=4, progress=False, scheduler=build_scheduler("ddim", euler))
    leaky = sample(uncond_model, num_samples=3, steps=4, progress=False, scheduler=DDIMScheduler.from_config(euler.config))
    assert (a - b.images).abs().max() < 1e-4
    assert (a - leaky.images).abs().max() > 1e-2  # x0 clipping changes the trajectory


def test_euler_scales_the_input_and_starts_from_init_noise_sigma(uncond_model):
    seen = []

    def predict(x, t, t_index, cond):
        seen.append((x.std().item(), t.dtype, t_index.tolist()))
        return torch.zeros_like(x)

    euler = EulerDiscreteScheduler(**SDXL_EULER)
    sample(uncond_model, predict, num_samples=64, steps=4, progress=False, scheduler=euler)
    # x_T = noise * init_noise_sigma (~14.6), and scale_model_input divides by sqrt(sigma^2 + 1): unit std at the UNet
    assert abs(seen[0][0] - 1) < 0.1 and seen[0][1] == torch.int64
    assert [s[2][0] for s in seen] == [0, 1, 2, 3]


def test_euler_ancestral_noise_is_seeded_per_sample(uncond_model):
    sched = build_scheduler("euler-a", default_scheduler())
    a = sample(uncond_model, num_samples=5, steps=3, seed=7, progress=False, scheduler=sched).images
    b = sample(uncond_model, num_samples=5, steps=3, seed=7, batch_size=2, progress=False, scheduler=sched).images
    c = sample(uncond_model, num_samples=5, steps=3, seed=8, progress=False, scheduler=sched).images
    assert torch.allclose(a, b, atol=1e-4) and (a - c).abs().max() > 0.1


def test_float_timesteps_are_kept_and_rounded_for_the_unet(uncond_model):
    linspace = EulerDiscreteScheduler(**dict(SDXL_EULER, timestep_spacing="linspace"))
    ts = sampling_timesteps(uncond_model, 6, linspace)
    assert ts[0] == 999 and any(isinstance(t, float) for t in ts) and len(ts) == 6
    traj = sample(uncond_model, num_samples=2, steps=6, progress=False, scheduler=linspace,
                  return_trajectory=True).trajectory
    assert traj.timestep.dtype == torch.int64
    assert traj.timestep[:, 0].tolist() == [round(t) for t in ts] and traj.t_index[:, 0].tolist() == list(range(6))


def test_a_repeated_timestep_shares_its_t_index(uncond_model):
    """PNDM (SD 1.x folders' scheduler) calls the UNet twice at one timestep: one t_index, steps distinct ones."""
    pndm = build_scheduler("pndm", default_scheduler())
    traj = sample(uncond_model, num_samples=2, steps=4, progress=False, scheduler=pndm, return_trajectory=True).trajectory
    assert traj.timestep[:, 0].tolist() == [750, 500, 500, 250, 0]
    assert traj.t_index[:, 0].tolist() == [0, 1, 1, 2, 3]
    assert sampling_timesteps(uncond_model, 4, pndm) == [750, 500, 250, 0]
