"""Feynman-Kac correctors (Skreta, Akhound-Sadegh et al., ICML 2025, arXiv 2503.02819).

Target: the product of powers of pretrained marginals ``p_t(x) ~ prod_i q_t^i(x)^beta_i``. Simulate
the SDE whose drift uses the combined score ``S = sum_i beta_i s^i`` (in noise-prediction form
``eps_tilde = sum_i beta_i eps_i``) and carry a log-weight per particle whose increment over a
step k -> k+1 is, in eps terms and without the particle-independent constant
(research notes, guidance.md section 3, "discrete, scheduler-friendly form"),

    dlog w_k = (lambda_{k+1} - lambda_k) * ( ||sum_i beta_i eps_i||^2 - sum_i beta_i ||eps_i||^2 ),

with every eps evaluated at the start of the step. No divergence is needed and the increment does
not depend on how much noise the sampler injects. Special cases (:class:`FKCTarget`):

* CFG-tilted ``q_u^(1-w) q_c^w`` (terms [uncond, cond]): ``w (w - 1) dlambda ||eps_c - eps_u||^2``;
  the drift is ordinary CFG.
* product ``q^1 q^2``: ``2 dlambda <eps_1, eps_2>``, drift with the summed scores.
* annealing ``q^beta``: ``beta (beta - 1) dlambda ||eps||^2``, drift with beta times the score.

The initial particles come from the normalized ``prod_i N(0, I)^beta_i = N(0, I / sum beta)``:
``init_noise_scale = 1 / sqrt(sum beta)`` (1 for CFG, 1/sqrt(2) for a product of two, 1/sqrt(beta)
for annealing). The increment of the final step to a clean point (lambda = inf) is not defined in
this form; that step is taken without weighting and particles do not resample on it.

The increment does not depend on the sampler's noise level in continuous time, but with little
noise (eta < 1) the copies that resampling makes stay together and the particle cloud shrinks; use
eta = 1. For the same reason a final deterministic jump to the clean point with the combined
prediction distorts tempered targets: end at the smallest trained noise level
(``final_sigmas_type="sigma_min"``), as the pipelines do.

Weight degeneracy is the practical problem (on high-dimensional latents increments reach
hundreds of nats). ``clamp_increments`` / ``center_increments`` are the reference image code's
remedy (it centres and clamps to [-2, 2]); both bias the target and are off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .base import DifflabScheduler
from .smc import ParticleSystem

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared_norms(x: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """Squared norm over everything after the first ``batch_dims`` dimensions (summed, never averaged)."""
    return x.flatten(batch_dims).pow(2).sum(-1)


@dataclass(frozen=True)
class FKCTarget:
    """``prod_i q^i ^ betas[i]`` over the M prediction terms a ``predict`` function returns, in order."""

    betas: tuple[float, ...]
    name: str = "general"

    def __post_init__(self) -> None:
        if len(self.betas) < 1:
            raise ValueError("an FKC target needs at least one term.")
        if sum(self.betas) <= 0:
            raise ValueError(f"the exponents must have a positive sum (the target must be normalizable), got {self.betas}.")

    @classmethod
    def cfg(cls, guidance_scale: float) -> FKCTarget:
        """``q_u^(1-w) q_c^w``; terms ordered [unconditional, conditional]."""
        w = float(guidance_scale)
        return cls((1.0 - w, w), f"cfg(w={w:g})")

    @classmethod
    def product(cls, num_models: int = 2) -> FKCTarget:
        return cls((1.0,) * num_models, f"product({num_models})")

    @classmethod
    def anneal(cls, beta: float) -> FKCTarget:
        if beta <= 0:
            raise ValueError(f"annealing needs beta > 0, got {beta}.")
        return cls((float(beta),), f"anneal(beta={beta:g})")

    @property
    def num_terms(self) -> int:
        return len(self.betas)

    @property
    def init_noise_scale(self) -> float:
        """Standard deviation of the normalized initial target prod_i N(0, I)^beta_i."""
        return float(sum(self.betas)) ** -0.5

    def _coefs(self, eps: torch.Tensor) -> torch.Tensor:
        if eps.shape[0] != self.num_terms:
            raise ValueError(f"target {self.name} has {self.num_terms} terms but the model gave {eps.shape[0]} predictions.")
        return torch.tensor(self.betas, dtype=eps.dtype, device=eps.device).reshape(-1, *([1] * (eps.ndim - 1)))

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        """``sum_i beta_i eps_i`` of stacked predictions (M, B, ...)."""
        return (self._coefs(eps) * eps).sum(0)

    def log_weight_increment(self, eps: torch.Tensor, delta_lambda: float) -> torch.Tensor:
        """(B,) float64 ``dlambda (||sum beta eps||^2 - sum beta ||eps||^2)`` (module docstring)."""
        eps = eps.to(torch.float64)
        combined = squared_norms(self.combine(eps))
        separate = (torch.tensor(self.betas, dtype=torch.float64, device=eps.device)[:, None] * squared_norms(eps, 2)).sum(0)
        return delta_lambda * (combined - separate)


@dataclass
class ParticleOutput:
    """Final particles (B, ...), their log-weights (B,), and per-step (step, mean ESS/K, groups resampled)."""

    samples: torch.Tensor
    log_weights: torch.Tensor
    history: list[tuple[int, float, int]] = field(default_factory=list)


def require_stochastic(scheduler: object, method: str) -> DifflabScheduler:
    """The scheduler if it is a stochastic difflab scheduler, else an error that says what to use."""
    if not isinstance(scheduler, DifflabScheduler) or not getattr(scheduler, "is_stochastic", False):
        raise ValueError(
            f"{method} needs a stochastic difflab scheduler (resampled copies of a particle never separate on an "
            f"ODE, and the weights assume the matching noise); got {type(scheduler).__name__}. Use "
            "difflab.samplers.EulerDDIMScheduler.from_config(pipe.scheduler.config, eta=1.0)."
        )
    return scheduler


def shape_increments(increment: torch.Tensor, num_groups: int, center: bool, clamp: float | None) -> torch.Tensor:
    """Optional centring (per group) and clamping of log-weight increments; both bias the target."""
    if center:
        grouped = increment.reshape(num_groups, -1)
        increment = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    if clamp is not None:
        increment = increment.clamp(-clamp, clamp)
    return increment


def fkc_sample(
    predict: Predict,
    scheduler: DifflabScheduler,
    latents: torch.Tensor,
    target: FKCTarget,
    particles: ParticleSystem,
    generator: torch.Generator | None = None,
    holders: Sequence[object] = (),
    center_increments: bool = False,
    clamp_increments: float | None = None,
    progress: Callable | None = None,
) -> ParticleOutput:
    """Run FKC from ``latents`` (already scaled by ``target.init_noise_scale``) on the set timesteps.

    Args:
        predict: ``predict(x, t) -> (M, B, ...)`` raw model outputs of the M target terms, in the
            scheduler's prediction type (one batched network call is the caller's business).
        scheduler: a stochastic difflab scheduler after ``set_timesteps``.
        particles: log-weights, resampling policy and holders; the scheduler and ``holders`` are
            registered on it so resampling re-indexes them.
        progress: optional wrapper of the timestep iterator (a pipeline's ``progress_bar``).
    """
    scheduler = require_stochastic(scheduler, "FKC")
    particles.register(scheduler, *holders)
    x = latents
    timesteps = scheduler.timesteps
    n = len(timesteps)
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        eps = scheduler.output_to_eps(predict(x, t), x, i)
        if i < n - 1:
            _, _, lam, _, _, lam_next = scheduler.noise_levels(i)
            increment = target.log_weight_increment(eps, lam_next - lam)
            particles.add_log_weights(shape_increments(increment.cpu(), particles.num_groups, center_increments,
                                                       clamp_increments))
        guided = scheduler.eps_to_output(target.combine(eps), x, i)
        x = scheduler.step(guided, t, x, generator=generator).prev_sample
        x = particles.step(i, n, x)
    return ParticleOutput(x, particles.log_weights.clone(), list(particles.history))
