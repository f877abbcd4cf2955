"""First-order exponential-integrator scheduler: DDIM for VP models, Euler for flow models, with eta.

DDIM (Song et al. 2021, eq. 12 with eta = 0) re-noises the current data prediction with the
current noise prediction at the next noise level:

    x_{t'} = alpha_{t'} * x0_hat(x_t) + sigma_{t'} * eps_hat(x_t).

This is the first-order DPM-Solver step (Lu et al. 2022, eq. 3.7) and, for rectified-flow
schedules (alpha = 1 - s, sigma = s), exactly the Euler step x + (s' - s) * (eps_hat - x0_hat).

With ``eta > 0`` part of the re-noising is fresh noise (:func:`~difflab.schedule.stochastic_step_coefficients`):
eta = 1 is the ancestral / DDPM posterior step, the stochastic sampler that particle methods
(:mod:`difflab.samplers.fkc`, :mod:`difflab.samplers.superdiff`) need. The noise comes from
``variance_noise=`` in ``step`` or is drawn with ``generator=``.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..schedule import stochastic_step_coefficients
from .base import DifflabScheduler, StepState, scheduler_config


class EulerDDIMScheduler(DifflabScheduler):
    """DDIM for epsilon / v / x0 models and Euler for flow-matching models, one model call per step.

    Args:
        eta: share of fresh noise per step; 0 (default) is the deterministic DDIM / Euler ODE step,
            1 the ancestral (DDPM) step.
    """

    history_size = 0

    @scheduler_config
    def __init__(self, eta: float = 0.0, **common):
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral / DDPM), got {eta}.")
        self._setup()

    @property
    def is_stochastic(self) -> bool:
        return self.config.eta > 0

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        if not self.is_stochastic:
            # x' = alpha' x0 + sigma' eps = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0  (DPM-Solver++-1)
            ratio = state.sigma_next / state.sigma
            return ratio, (state.alpha_next - state.alpha * ratio) * state.x0
        a, b, c = stochastic_step_coefficients(state.alpha, state.sigma, state.alpha_next, state.sigma_next, self.config.eta)
        increment = b * state.eps
        if c > 0:
            noise = state.noise
            if noise is None:
                noise = randn_tensor(state.sample.shape, generator=state.generator, device=state.sample.device,
                                     dtype=state.sample.dtype)
            increment = increment + c * noise.to(state.sample.dtype)
        return a, increment
