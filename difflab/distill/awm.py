"""Advantage Weighted Matching (AWM; Xue, Ge, Zhang, Li, Ma 2025, arXiv 2509.25050).

AWM keeps the pretraining loss and weights it by the advantage of each generated sample. For clean
rollout samples x0^i (from any sampler) with group-normalized advantages A_i (``rewards.group_advantages``):

    x_t = alpha_t x0^i + sigma_t eps,   eps fresh for every training timestep
    l_i(t) = mean_pixels || f_theta(x_t, t, c) - target(x0^i, eps, t) ||^2      (the pretraining MSE)
    L_AWM = E_{i,t}[ A_i psi(l_i(t)) ] + beta E|| f_theta - f_ref ||^2 + beta_ema E|| f_theta - f_ema ||^2

``target`` is the model's own training target (velocity eps - x0 for flow models, eps for eps models, ...;
:meth:`NoiseSchedule.training_target`), so the loss is exactly the model's pretraining loss. psi is the
per-sample weighting of the reference code: ``uniform`` (psi(l) = l; the paper's equation, the ELBO
weighting without 1/(2 sigma^2)) or ``ghuber`` (psi(l) = sigma_t ((l + d)^p - d^p) / p, p = 0.25, the
reference default, which damps samples with large errors). On-policy the reference code's PPO-shaped loss
has ratio 1 and its gradient is exactly grad(A psi(l)), which is what :func:`awm_loss` computes. The
timesteps come from the sampler's own grid (``rollout.training_timestep_indices``), one set shared by the
batch, as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..schedule import NoiseSchedule
from .rollout import denoise

WEIGHTINGS = ("uniform", "ghuber")
GHUBER_POWER = 0.25
GHUBER_DELTA = 1e-10


@dataclass
class AWMTerms:
    """The loss to back-propagate and its parts (floats, for logging)."""

    loss: torch.Tensor
    policy: float
    kl: float
    ema_kl: float
    mse: float

    def stats(self) -> dict[str, float]:
        return {"policy_loss": self.policy, "kl": self.kl, "ema_kl": self.ema_kl, "mse": self.mse}


@dataclass
class AWMRows:
    """The (sample, training timestep) pairs of one AWM update, one row each: the noised input ``x_t`` at
    timestep ``t``, the pretraining ``target``, the labels, the sample's advantage and sigma_t."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None
    advantages: torch.Tensor
    sigma: torch.Tensor

    def __len__(self) -> int:
        return self.x_t.shape[0]


def weighting(mse: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """psi(l) of AWM: ``uniform`` l, or ``ghuber`` sigma_t ((l + 1e-10)^p - 1e-10^p) / p with p = 0.25."""
    if kind == "uniform":
        return mse
    if kind == "ghuber":
        p = GHUBER_POWER
        return sigma.to(mse) * ((mse + GHUBER_DELTA) ** p - GHUBER_DELTA**p) / p
    raise ValueError(f"unknown AWM weighting {kind!r}; use one of {', '.join(WEIGHTINGS)}.")


def _repeat(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if x is None else x.repeat(k, *([1] * (x.ndim - 1)))


def awm_rows(schedule: NoiseSchedule, prediction_type: str, x0: torch.Tensor, labels: torch.Tensor | None,
             advantages: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator) -> AWMRows:
    """The K x B rows of clean samples ``x0`` (B, ...) at the K training ``timesteps``, each (sample, timestep)
    pair with its own fresh noise (all drawn here, in one call, so any split of the rows gives the same update)."""
    k, b = len(timesteps), x0.shape[0]
    x0_k = _repeat(x0.detach(), k)
    t = timesteps.double().repeat_interleave(b)
    eps = torch.randn(x0_k.shape, generator=generator).to(x0_k)
    x_t = schedule.add_noise(x0_k.double(), eps.double(), t).to(x0.dtype)
    target = schedule.training_target(x0_k.double(), eps.double(), t, prediction_type)
    _, sigma = schedule.alpha_sigma(t)
    return AWMRows(x_t, t, target, _repeat(labels, k), _repeat(advantages.double(), k), sigma)


def awm_rows_loss(policy: nn.Module, rows: AWMRows, weighting_kind: str = "ghuber", reference: nn.Module | None = None,
                  beta: float = 0.0, ema: nn.Module | None = None, ema_beta: float = 0.0) -> AWMTerms:
    """The AWM loss, a mean over ``rows`` (one network call each for the policy, reference and EMA anchor).

    ``reference`` / ``ema`` (frozen, no grad) give the velocity- (or eps-) MSE KL terms when ``beta`` /
    ``ema_beta`` are > 0.
    """
    out = denoise(policy, rows.x_t, rows.t.float(), rows.labels)
    mse = ((out.double() - rows.target.to(out.device)) ** 2).flatten(1).mean(1)  # l_i(t), float64 as the reference
    policy_term = (rows.advantages.to(mse.device) * weighting(mse, rows.sigma.to(mse.device), weighting_kind)).mean()
    loss, kl, ema_kl = policy_term, 0.0, 0.0
    for module, weight, name in ((reference, beta, "kl"), (ema, ema_beta, "ema_kl")):
        if module is None or weight <= 0:
            continue
        with torch.no_grad():
            anchor = denoise(module, rows.x_t, rows.t.float(), rows.labels)
        term = ((out.double() - anchor.double()) ** 2).flatten(1).mean(1).mean()
        loss = loss + weight * term
        kl, ema_kl = (term.item(), ema_kl) if name == "kl" else (kl, term.item())
    return AWMTerms(loss.float(), policy_term.item(), kl, ema_kl, mse.mean().item())


def awm_loss(policy: nn.Module, schedule: NoiseSchedule, prediction_type: str, x0: torch.Tensor,
             labels: torch.Tensor | None, advantages: torch.Tensor, timesteps: torch.Tensor,
             generator: torch.Generator, weighting_kind: str = "ghuber", reference: nn.Module | None = None,
             beta: float = 0.0, ema: nn.Module | None = None, ema_beta: float = 0.0) -> AWMTerms:
    """The AWM loss of clean samples ``x0`` (B, ...) at the K training ``timesteps``, all rows at once."""
    rows = awm_rows(schedule, prediction_type, x0, labels, advantages, timesteps, generator)
    return awm_rows_loss(policy, rows, weighting_kind, reference, beta, ema, ema_beta)
