"""Running a sampler with another schedule than the one a model was calibrated for.

TPQ stores one activation scale per calibrated timestep, addressed by t_index. A sampler on the
same schedule passes its own step index; any other schedule (other step count, other sampler) has
timesteps the model never saw, so each one uses the scales of the nearest calibrated timestep (ties go
to the larger timestep, i.e. the earlier, noisier step). Timesteps may be floats (Euler-type samplers);
distances are taken in float64. What the mapping costs in accuracy is measured by dq-verify.
"""
from __future__ import annotations

from typing import Sequence

import torch


def nearest_t_index(calibrated: Sequence[float], timesteps) -> torch.Tensor:
    """t_index of the calibrated timestep nearest to each timestep (int64, same shape)."""
    cal = torch.as_tensor([float(t) for t in calibrated], dtype=torch.float64)
    t = torch.as_tensor(timesteps).to(torch.float64)
    dist = (t.reshape(-1, 1) - cal.reshape(1, -1)).abs()
    # argmin returns the first minimum; calibrated timesteps are in sampling (descending) order, so a
    # tie resolves to the larger timestep.
    return dist.argmin(dim=1).reshape(t.shape)


def map_schedule(calibrated: Sequence[float], inference: Sequence[float]) -> list[int]:
    """t_index for every step of an inference schedule: identity when it is the calibrated one."""
    if [float(t) for t in inference] == [float(t) for t in calibrated]:
        return list(range(len(calibrated)))
    return nearest_t_index(calibrated, torch.tensor([float(t) for t in inference], dtype=torch.float64)).tolist()


class ScheduleMapper:
    """A NoisePredictor wrapper that derives t_index from the timestep (nearest calibrated one).

    The sampler's own t_index counts steps of *its* schedule; this replaces it with the position of
    the nearest calibrated timestep, which equals the sampler's index when the schedules match.
    """

    def __init__(self, predict, calibrated: Sequence[float]):
        self.predict, self.calibrated = predict, list(calibrated)
        self.metadata = getattr(predict, "metadata", None)

    def __call__(self, sample, timestep, t_index, cond=None):
        mapped = nearest_t_index(self.calibrated, torch.as_tensor(timestep).reshape(-1))
        if mapped.numel() == 1 and sample.shape[0] > 1:
            mapped = mapped.expand(sample.shape[0])
        return self.predict(sample, timestep, mapped, cond)
