import torch

from dilatequant.core.sampling import sample, sampling_timesteps


def test_trajectory_records_every_step(uncond_model):
    res = sample(uncond_model, num_samples=3, steps=4, return_trajectory=True, progress=False)
    traj = res.trajectory
    assert res.images.shape == (3, 1, 8, 8)
    assert traj.sample.shape == (4, 3, 1, 8, 8)
    assert traj.t_index[:, 0].tolist() == [0, 1, 2, 3]
    assert traj.timestep[:, 0].tolist() == sampling_timesteps(uncond_model, 4) == [750, 500, 250, 0]
    assert traj.encoder_hidden_states is None
    assert res.images.abs().max() <= 1.0


def test_samples_do_not_depend_on_batch_size(uncond_model):
    a = sample(uncond_model, num_samples=5, steps=3, seed=7, progress=False).images
    b = sample(uncond_model, num_samples=5, steps=3, seed=7, batch_size=2, progress=False).images
    c = sample(uncond_model, num_samples=5, steps=3, seed=8, progress=False).images
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - c).abs().max() > 0.1


def test_guidance_doubles_unet_batch_and_changes_images(cond_model):
    labels = torch.tensor([1, 2, 3])
    plain = sample(cond_model, num_samples=3, steps=3, labels=labels, progress=False)
    guided = sample(cond_model, num_samples=3, steps=3, labels=labels, guidance_scale=4.0,
                    return_trajectory=True, progress=False)
    ehs = guided.trajectory.encoder_hidden_states
    assert ehs.shape == (3, 6, 2, 16)
    null = cond_model.class_encoder(torch.full((3,), 10))
    assert torch.equal(ehs[0, 3:], null)
    assert (plain.images - guided.images).abs().max() > 1e-3


def test_predictor_receives_t_index(uncond_model):
    seen = []

    def predict(x, t, t_index, ehs):
        seen.append((t[0].item(), t_index.tolist()))
        return torch.zeros_like(x)

    sample(uncond_model, predict, num_samples=2, steps=3, progress=False)
    assert seen == [(666, [0, 0]), (333, [1, 1]), (0, [2, 2])]
