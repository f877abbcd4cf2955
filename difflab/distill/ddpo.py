"""DDPO / Flow-GRPO-style policy gradient: the baseline AWM is measured against.

DDPO (Black et al., ICLR 2024) and Flow-GRPO (Liu et al., 2025) treat each denoising step of a stochastic
sampler as a Gaussian policy pi_theta(x_{j+1} | x_j) = N(mu_theta(x_j, t_j), c_j^2 I) and maximize the
clipped surrogate of PPO over the steps of each rollout:

    ratio_j = exp(log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j))
    L = E_{i,j}[ max(-A_i ratio_j, -A_i clip(ratio_j, 1 - eps, 1 + eps)) ] + beta E_j[ |mu_theta - mu_ref|^2 / (2 c_j^2) ]

Here the step is difflab's DDIM-eta step (``rollout.sde_rollout``; eta = 1: the DDPM ancestral step of VP
models, the matching stochastic step of flow models), log-likelihoods are averaged over dimensions as in
the reference code, and steps with no noise (the last one, into the clean end) carry no likelihood and are
skipped. The rollouts, rewards and advantages are the same as AWM's (``rewards.group_advantages``), so the
two methods differ only in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..schedule import NoiseSchedule
from .rollout import Trajectory, denoise, grid_levels, step_log_prob, step_mean


@dataclass
class DDPOTerms:
    """The loss to back-propagate and its parts (floats, for logging)."""

    loss: torch.Tensor
    policy: float
    kl: float
    clip_fraction: float
    ratio: float

    def stats(self) -> dict[str, float]:
        return {"policy_loss": self.policy, "kl": self.kl, "clip_fraction": self.clip_fraction}


@dataclass
class DDPORows:
    """The (sample, step) pairs of one DDPO update, one row each: the state ``x`` at timestep ``t``, the state
    ``x_next`` the rollout drew after it, the (alpha, sigma) levels of both, the step's noise scale ``c``, the
    rollout's log-likelihood of the step, the labels and the sample's advantage."""

    x: torch.Tensor
    x_next: torch.Tensor
    t: torch.Tensor
    level: tuple[torch.Tensor, torch.Tensor]
    level_next: tuple[torch.Tensor, torch.Tensor]
    c: torch.Tensor
    old_log_prob: torch.Tensor
    labels: torch.Tensor | None
    advantages: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def trainable_steps(trajectory: Trajectory) -> torch.Tensor:
    """Indices of the steps that carry a likelihood (noise scale c_j > 0)."""
    return torch.nonzero(trajectory.noise_std > 0).flatten()


def ddpo_rows(schedule: NoiseSchedule, trajectory: Trajectory, labels: torch.Tensor | None, advantages: torch.Tensor,
              steps: torch.Tensor) -> DDPORows:
    """The rows of the trajectory ``steps`` (step-major: all samples of the first step, then the next, ...)."""
    b = trajectory.states.shape[1]
    alphas, sigmas = grid_levels(schedule, trajectory.timesteps)
    rows = steps.repeat_interleave(b)
    return DDPORows(
        x=trajectory.states[steps].flatten(0, 1), x_next=trajectory.states[steps + 1].flatten(0, 1),
        t=trajectory.timesteps[steps].repeat_interleave(b), level=(alphas[rows], sigmas[rows]),
        level_next=(alphas[rows + 1], sigmas[rows + 1]), c=trajectory.noise_std[rows],
        old_log_prob=trajectory.log_probs[steps].flatten(), labels=None if labels is None else labels.repeat(len(steps)),
        advantages=advantages.double().repeat(len(steps)))


def ddpo_rows_loss(policy: nn.Module, schedule: NoiseSchedule, prediction_type: str, rows: DDPORows,
                   clip_range: float = 1e-4, reference: nn.Module | None = None, beta: float = 0.0) -> DDPOTerms:
    """The clipped policy-gradient loss, a mean over ``rows`` (one network call)."""
    mean = step_mean(schedule, denoise(policy, rows.x, rows.t, rows.labels), rows.x, rows.level, rows.level_next, rows.c,
                     prediction_type)
    log_prob = step_log_prob(rows.x_next, mean, rows.c)
    ratio = torch.exp(log_prob - rows.old_log_prob.to(log_prob))
    adv = rows.advantages.to(ratio.device)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    policy_term = surrogate.mean()
    loss, kl = policy_term, 0.0
    if reference is not None and beta > 0:
        with torch.no_grad():
            ref_mean = step_mean(schedule, denoise(reference, rows.x, rows.t, rows.labels), rows.x, rows.level,
                                 rows.level_next, rows.c, prediction_type)
        kl_term = (((mean.double() - ref_mean.double()) ** 2).flatten(1).mean(1)
                   / (2 * rows.c.to(mean.device) ** 2)).mean()
        loss, kl = loss + beta * kl_term, kl_term.item()
    clipped = ((ratio - 1).abs() > clip_range).double().mean().item()
    return DDPOTerms(loss.float(), policy_term.item(), kl, clipped, ratio.mean().item())


def ddpo_loss(policy: nn.Module, schedule: NoiseSchedule, prediction_type: str, trajectory: Trajectory,
              labels: torch.Tensor | None, advantages: torch.Tensor, steps: torch.Tensor, clip_range: float = 1e-4,
              reference: nn.Module | None = None, beta: float = 0.0) -> DDPOTerms:
    """Clipped policy-gradient loss over the trajectory ``steps``, all rows at once."""
    rows = ddpo_rows(schedule, trajectory, labels, advantages, steps)
    return ddpo_rows_loss(policy, schedule, prediction_type, rows, clip_range, reference, beta)
