"""Running a sampler with S steps on a model calibrated for a T-step schedule.

TPQ stores one activation scale per calibrated timestep, addressed by t_index. A sampler on the
same schedule passes its own step index; any other schedule has timesteps the model never saw, so
each one uses the scales of the nearest calibrated timestep (ties go to the larger timestep, i.e.
the earlier, noisier step). What that costs in accuracy is measured by dq-verify.
"""
from __future__ import annotations

from typing import Sequence

import torch


def nearest_t_index(calibrated: Sequence[int], timesteps: torch.Tensor) -> torch.Tensor:
    """t_index of the calibrated timestep nearest to each timestep (int64, same shape)."""
    cal = torch.as_tensor(list(calibrated), dtype=torch.float64)  # flow matching's timesteps are floats
    t = torch.as_tensor(timesteps).to(torch.float64)
    dist = (t.reshape(-1, 1) - cal.reshape(1, -1)).abs()
    # argmin returns the first minimum; calibrated timesteps are in sampling (descending) order, so a
    # tie resolves to the larger timestep.
    return dist.argmin(dim=1).reshape(t.shape)


def map_schedule(calibrated: Sequence[int], inference: Sequence[int]) -> list[int]:
    """t_index for every step of an inference schedule: identity when it is the calibrated one."""
    if [int(t) for t in inference] == [int(t) for t in calibrated]:
        return list(range(len(calibrated)))
    return nearest_t_index(calibrated, torch.tensor([int(t) for t in inference])).tolist()


class ScheduleMapper:
    """A NoisePredictor wrapper that derives t_index from the timestep (nearest calibrated one).

    The sampler's own t_index counts steps of *its* schedule; this replaces it with the position of
    the nearest calibrated timestep, which equals the sampler's index when the schedules match.
    """

    def __init__(self, predict, calibrated: Sequence[int]):
        self.predict, self.calibrated = predict, [int(t) for t in calibrated]
        self.metadata = getattr(predict, "metadata", None)

    def __call__(self, sample, timestep, t_index, cond=None):
        mapped = nearest_t_index(self.calibrated, torch.as_tensor(timestep).reshape(-1))
        if mapped.numel() == 1 and sample.shape[0] > 1:
            mapped = mapped.expand(sample.shape[0])
        return self.predict(sample, timestep, mapped, cond)
