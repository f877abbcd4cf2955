"""Sequential Monte Carlo over diffusion particles: log-weights, ESS, resampling, re-indexing.

A batch of particles is laid out as ``num_groups`` contiguous groups of ``num_particles`` rows
(group g owns rows g*K .. g*K + K - 1, the layout of ``labels.repeat_interleave(K)``); a group is
the set of particles of one prompt or class label, and particles only ever resample within their
group. Log-weights are float64.

After a resampling step particle j of a group is a copy of particle ``indices[j]``. Everything
that holds per-sample state -- the latents, the scheduler's history (``DifflabScheduler.reindex``),
guider buffers (``Guider.reindex``), SuperDiff log-densities -- must be re-indexed with the same
indices. :class:`ParticleSystem` keeps a registry of such holders and calls ``reindex(indices)``
on every one, so resampling cannot silently desynchronize state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class Reindexable(Protocol):
    def reindex(self, indices: torch.Tensor) -> None: ...


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


def normalized_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in float64."""
    return torch.softmax(log_weights.to(torch.float64), dim=-1)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = (sum w)^2 / sum w^2 over the last dimension (between 1 and the number of particles)."""
    lw = log_weights.to(torch.float64)
    return torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))


# ------------------------------------------------------------------------------------------------
# Resampling schemes: (G, K) log-weights -> (G, K) ancestor indices within each group
# ------------------------------------------------------------------------------------------------


def _inverse_cdf(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the CDF bin of each point in [0, 1); weights (G, K), points (G, M) sorted or not."""
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, points.contiguous(), right=True).clamp(max=weights.shape[-1] - 1)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform u per group, points (u + j) / K (Kitagawa 1996); the lowest-variance common scheme."""
    G, K = log_weights.shape
    u = torch.rand(G, 1, generator=generator, dtype=torch.float64)
    points = (u + torch.arange(K, dtype=torch.float64)) / K
    return _inverse_cdf(normalized_weights(log_weights), points)


def multinomial_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """K independent draws from the normalized weights."""
    return torch.multinomial(normalized_weights(log_weights), log_weights.shape[-1], replacement=True,
                             generator=generator)


def residual_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(K w_j) deterministic copies of particle j, the remainder drawn multinomially (Liu & Chen 1998)."""
    G, K = log_weights.shape
    weights = normalized_weights(log_weights)
    copies = torch.floor(K * weights).long()
    rows = []
    for g in range(G):
        fixed = torch.repeat_interleave(torch.arange(K), copies[g])
        rest = K - fixed.numel()
        if rest > 0:
            residual = K * weights[g] - copies[g]
            fixed = torch.cat([fixed, torch.multinomial(residual, rest, replacement=True, generator=generator)])
        rows.append(fixed)
    return torch.stack(rows)


RESAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "systematic": systematic_resample,
    "multinomial": multinomial_resample,
    "residual": residual_resample,
}


# ------------------------------------------------------------------------------------------------
# When to resample
# ------------------------------------------------------------------------------------------------


@dataclass
class ResamplingPolicy:
    """When and how particles resample.

    Args:
        method: ``"systematic"`` (default, as the FKC reference code), ``"multinomial"``, ``"residual"``.
        ess_threshold: resample a group when its ESS / K falls below this fraction; ``None``
            resamples every allowed step (the reference code's choice).
        start_step: first step index at which resampling may happen (annealing code: 10-50 of 1000).
        stop_step: no resampling at or after this step index (``None``: the last step is skipped,
            as in the reference image code, since duplicates made there never separate).
        every: resample only every ``every`` steps.
    """

    method: str = "systematic"
    ess_threshold: float | None = None
    start_step: int = 0
    stop_step: int | None = None
    every: int = 1

    def __post_init__(self) -> None:
        if self.method not in RESAMPLERS:
            raise ValueError(f"resampling method {self.method!r} is unknown; use one of {sorted(RESAMPLERS)}.")
        if self.ess_threshold is not None and not 0 < self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold is a fraction of the particles in (0, 1], got {self.ess_threshold}.")
        if self.every < 1 or self.start_step < 0:
            raise ValueError(f"every must be >= 1 and start_step >= 0, got every={self.every}, start_step={self.start_step}.")

    @classmethod
    def from_arg(cls, resample: str | bool | ResamplingPolicy | None, ess_threshold: float | None = None) -> ResamplingPolicy | None:
        """Pipelines' ``resample=`` argument: a policy, a method name, True (systematic) or False/None (off)."""
        if isinstance(resample, ResamplingPolicy):
            return resample
        if resample is None or resample is False:
            return None
        return cls(method="systematic" if resample is True else str(resample), ess_threshold=ess_threshold)

    def allowed(self, step: int, num_steps: int) -> bool:
        stop = num_steps - 1 if self.stop_step is None else self.stop_step
        return self.start_step <= step < stop and (step - self.start_step) % self.every == 0


# ------------------------------------------------------------------------------------------------
# The particle system
# ------------------------------------------------------------------------------------------------


class ParticleSystem:
    """Log-weights of ``num_groups x num_particles`` particles and the holders of their state.

    ``add_log_weights(increment)`` accumulates per-particle increments; ``step(i, n, x)``
    resamples the groups that the policy selects, re-indexes every registered holder and returns
    the re-indexed latents. ``history`` records (step, mean ESS / K, resampled groups).
    """

    def __init__(
        self,
        num_groups: int,
        num_particles: int,
        policy: ResamplingPolicy | None = None,
        generator: torch.Generator | None = None,
    ):
        if num_groups < 1 or num_particles < 1:
            raise ValueError(f"need at least one group and one particle, got {num_groups} x {num_particles}.")
        self.num_groups, self.num_particles = num_groups, num_particles
        self.policy = policy
        self.generator = generator
        self.log_weights = torch.zeros(num_groups * num_particles, dtype=torch.float64)
        self.holders: list[Reindexable] = []
        self.history: list[tuple[int, float, int]] = []

    @property
    def batch_size(self) -> int:
        return self.num_groups * self.num_particles

    def register(self, *holders: Reindexable | None) -> None:
        """Holders of per-sample state; each must implement ``reindex(indices)``."""
        for holder in holders:
            if holder is None:
                continue
            if not callable(getattr(holder, "reindex", None)):
                raise TypeError(f"{type(holder).__name__} holds per-particle state but has no reindex(indices) method.")
            if all(holder is not h for h in self.holders):
                self.holders.append(holder)

    def add_log_weights(self, increment: torch.Tensor) -> None:
        increment = increment.detach().to("cpu", torch.float64).reshape(-1)
        if increment.numel() != self.batch_size:
            raise ValueError(f"log-weight increment has {increment.numel()} entries for {self.batch_size} particles.")
        self.log_weights = self.log_weights + increment

    def grouped(self) -> torch.Tensor:
        return self.log_weights.reshape(self.num_groups, self.num_particles)

    def ess(self) -> torch.Tensor:
        """(G,) effective sample size of each group."""
        return effective_sample_size(self.grouped())

    def weights(self) -> torch.Tensor:
        """(G, K) normalized weights within each group."""
        return normalized_weights(self.grouped())

    def reindex(self, indices: torch.Tensor) -> None:
        """Apply global row indices to the log-weights and to every registered holder."""
        indices = indices.reshape(-1).long()
        self.log_weights = self.log_weights[indices.cpu()]
        for holder in self.holders:
            holder.reindex(indices)

    def resample_indices(self, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Global ancestor indices: resampled within the selected groups, identity elsewhere."""
        G, K = self.num_groups, self.num_particles
        method = RESAMPLERS[self.policy.method if self.policy else "systematic"]
        local = method(self.grouped(), self.generator)
        if groups is not None:
            local = torch.where(groups[:, None], local, torch.arange(K).expand(G, K))
        return (local + torch.arange(G)[:, None] * K).reshape(-1)

    def step(self, step: int, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """Resample if the policy says so at this step; returns the (re-indexed) latents."""
        ess = self.ess()
        if self.policy is None or not self.policy.allowed(step, num_steps):
            self.history.append((step, float((ess / self.num_particles).mean()), 0))
            return latents
        if self.policy.ess_threshold is None:
            groups = torch.ones(self.num_groups, dtype=torch.bool)
        else:
            groups = ess < self.policy.ess_threshold * self.num_particles
        self.history.append((step, float((ess / self.num_particles).mean()), int(groups.sum())))
        if not groups.any():
            return latents
        indices = self.resample_indices(groups)
        self.reindex(indices)
        self.log_weights = self.log_weights.reshape(self.num_groups, -1).masked_fill(groups[:, None], 0.0).reshape(-1)
        return latents[indices.to(latents.device)]

    def select(self, latents: torch.Tensor, how: str = "sample") -> torch.Tensor:
        """One particle per group: drawn by weight (``"sample"``) or the heaviest (``"argmax"``)."""
        if how == "argmax":
            local = self.grouped().argmax(-1)
        elif how == "sample":
            local = torch.multinomial(self.weights(), 1, generator=self.generator).squeeze(-1)
        else:
            raise ValueError(f"select how={how!r}; use 'sample' or 'argmax'.")
        return latents[(local + torch.arange(self.num_groups) * self.num_particles).to(latents.device)]
