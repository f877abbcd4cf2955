"""First-order exponential-integrator scheduler: DDIM (eta = 0) for VP models, Euler for flow models.

DDIM (Song et al. 2021, eq. 12 with eta = 0) re-noises the current data prediction with the
current noise prediction at the next noise level:

    x_{t'} = alpha_{t'} * x0_hat(x_t) + sigma_{t'} * eps_hat(x_t).

This is the first-order DPM-Solver step (Lu et al. 2022, eq. 3.7) and, for rectified-flow
schedules (alpha = 1 - s, sigma = s), exactly the Euler step x + (s' - s) * (eps_hat - x0_hat).
"""

from __future__ import annotations

import torch

from .base import DifflabScheduler, StepState


class EulerDDIMScheduler(DifflabScheduler):
    """DDIM for epsilon / v / x0 models and Euler for flow-matching models, one model call per step."""

    history_size = 0

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        # x' = alpha' x0 + sigma' eps = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0  (DPM-Solver++-1)
        ratio = state.sigma_next / state.sigma
        return ratio, (state.alpha_next - state.alpha * ratio) * state.x0
