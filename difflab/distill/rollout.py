"""Rollouts for alignment: samples from the current policy with any scheduler, or with log-likelihoods.

* :func:`ode_rollout` -- AWM's rollouts: any scheduler (difflab's or diffusers'), ODE or not; only the
  final clean samples are kept (detached), together with the scheduler's timestep grid, from which AWM
  draws its training timesteps (:func:`training_timestep_indices`).
* :func:`sde_rollout` -- the DDPO / Flow-GRPO baseline's rollouts: the DDIM-eta stochastic step (eta = 1:
  DDPM ancestral for VP models, the matching SDE step for flow models) on the same grid, keeping every
  state and the Gaussian log-likelihood log pi(x_{j+1} | x_j) of each step (:func:`step_log_prob`).

Networks are called as diffusers UNets (``net(x, t, class_labels=labels).sample``) or, without labels,
as difflab's MLP denoisers (``net(x, t).sample``), through :func:`denoise`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..schedule import NoiseSchedule, broadcast_to, stochastic_noise_std


def denoise(net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Raw network output at samples ``x`` and per-row timesteps ``t`` (class labels when given)."""
    t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
    if labels is None:
        return net(x, t).sample
    return net(x, t, class_labels=labels.to(x.device)).sample


def _check_finite(out: torch.Tensor, step: int, t: torch.Tensor) -> None:
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"The model output contains NaN/inf at rollout step {step} (timestep {float(t):g}); "
                                 "lower the learning rate.")


@torch.no_grad()
def ode_rollout(net: nn.Module, scheduler, num_inference_steps: int, labels: torch.Tensor | None,
                shape: tuple[int, ...], generator: torch.Generator,
                batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, timesteps)``: final samples of ``scheduler`` run for ``num_inference_steps``, and its grid.

    ``batch_size`` samples go through the network at a time (None: all); the starting noise of all samples is
    drawn first, so a deterministic sampler gives the same samples for any ``batch_size``.
    """
    scheduler.set_timesteps(num_inference_steps)
    device = next(net.parameters()).device
    x_start = torch.randn(shape, generator=generator).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    finals = []
    for index in torch.arange(shape[0]).split(batch_size or shape[0]):
        scheduler.set_timesteps(num_inference_steps)  # a fresh sampler state for each batch
        x, part = x_start[index.to(device)], None if labels is None else labels[index.to(labels.device)]
        for i, t in enumerate(scheduler.timesteps):
            model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = denoise(net, model_in, t.float(), part)
            _check_finite(out, i, t)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        finals.append(x)
    return torch.cat(finals).detach(), scheduler.timesteps.detach().float().cpu()


def training_timestep_indices(num_steps: int, k: int, generator: torch.Generator,
                              skip_last_fraction: float = 0.1) -> torch.Tensor:
    """``k`` stratified indices into a sampler grid of ``num_steps``, from 1 to ``floor((1 - f) n) - 1``.

    AWM's ``discrete_wo_init`` rule: the first (pure-noise) step and the last 10% are never trained on;
    the range is cut into ``k`` equal strata and one index is drawn in each.
    """
    hi = math.floor((1.0 - skip_last_fraction) * num_steps)
    if hi <= 1:
        raise ValueError(f"a grid of {num_steps} steps leaves no training timesteps after skipping the first step "
                         f"and the last {skip_last_fraction:.0%}; use more sampling steps.")
    available = torch.arange(1, hi)
    k = min(k, len(available))
    edges = torch.linspace(0, len(available), k + 1).floor().long()  # k <= len: every stratum is non-empty
    picks = [int(lo) + int(torch.randint(int(hi - lo), (1,), generator=generator))
             for lo, hi in zip(edges[:-1], edges[1:])]
    return available[torch.tensor(picks)]


# --------------------------------------------------------------------------------------------
# Stochastic rollouts with log-likelihoods (DDPO baseline)
# --------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """States ``(N + 1, B, ...)``, log-likelihoods ``(N, B)``, timesteps ``(N,)``, noise scales ``(N,)``."""

    states: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    noise_std: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


def grid_levels(schedule: NoiseSchedule, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of each grid timestep followed by the clean end (1, 0): two tensors of length N + 1."""
    alpha, sigma = schedule.alpha_sigma(timesteps)
    return torch.cat([alpha, alpha.new_ones(1)]), torch.cat([sigma, sigma.new_zeros(1)])


def step_mean(schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, level: tuple, level_next: tuple,
              noise_std: torch.Tensor | float, prediction_type: str) -> torch.Tensor:
    """Mean ``alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat`` of the DDIM-eta step (Song et al. 2021, eq. 12).

    ``level`` = (alpha, sigma) and ``level_next`` = (alpha', sigma') are floats or per-row (B,) tensors, as is
    the noise scale c.
    """
    x0, eps = schedule.to_x0_eps(out.double(), x.double(), level[0], level[1], prediction_type)
    alpha_next, sigma_next = (torch.as_tensor(v, dtype=torch.float64) for v in level_next)
    keep = (sigma_next**2 - torch.as_tensor(noise_std, dtype=torch.float64) ** 2).clamp_min(0).sqrt()
    return (broadcast_to(alpha_next, x0) * x0 + broadcast_to(keep, eps) * eps).to(x.dtype)


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, noise_std: torch.Tensor | float) -> torch.Tensor:
    """Gaussian log-likelihood of ``x_next`` under N(mean, c^2 I), averaged over dimensions (as DDPO does)."""
    c = torch.as_tensor(noise_std, dtype=torch.float64, device=x_next.device)
    z2 = ((x_next.double() - mean.double()) ** 2).flatten(1).mean(1) / c**2
    return -0.5 * z2 - torch.log(c) - 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def sde_rollout(net: nn.Module, schedule: NoiseSchedule, prediction_type: str, timesteps: torch.Tensor,
                labels: torch.Tensor | None, shape: tuple[int, ...], generator: torch.Generator,
                eta: float = 1.0, batch_size: int | None = None) -> Trajectory:
    """Stochastic DDIM-eta sampling on the grid ``timesteps`` (then to the clean end), recording log pi.

    ``batch_size`` samples go through the network at a time (None: all); every draw (the starting noise, then
    each step's noise) is made first, for all samples, so the trajectory is the same for any ``batch_size``.
    """
    device = next(net.parameters()).device
    alphas, sigmas = grid_levels(schedule, timesteps)
    draws = [torch.randn(shape, generator=generator).to(device) for _ in range(len(timesteps) + 1)]
    levels = [((float(alphas[j]), float(sigmas[j])), (float(alphas[j + 1]), float(sigmas[j + 1])))
              for j in range(len(timesteps))]
    stds = [stochastic_noise_std(*level, *level_next, eta) for level, level_next in levels]
    states, log_probs = [], []
    for index in torch.arange(shape[0]).split(batch_size or shape[0]):
        index = index.to(device)
        x, part = draws[0][index], None if labels is None else labels[index.to(labels.device)]
        chunk_states, chunk_log_probs = [x], []
        for j, t in enumerate(timesteps):
            out = denoise(net, x, t.float(), part)
            _check_finite(out, j, t)
            mean = step_mean(schedule, out, x, *levels[j], stds[j], prediction_type)
            x = mean + stds[j] * draws[j + 1][index]
            chunk_states.append(x)
            chunk_log_probs.append(step_log_prob(x, mean, stds[j]) if stds[j] > 0
                                   else torch.zeros(len(index), dtype=torch.float64, device=device))
        states.append(torch.stack(chunk_states))
        log_probs.append(torch.stack(chunk_log_probs))
    return Trajectory(torch.cat(states, dim=1), torch.cat(log_probs, dim=1), timesteps.float(),
                      torch.tensor(stds, dtype=torch.float64))
