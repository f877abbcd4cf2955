"""SuperDiff: superposition of diffusion models with the Ito density estimator
(Skreta, Atanackovic, Bose, Tong, Neklyudov, ICLR 2025, arXiv 2412.17762).

**Ito density estimator.** Along any trajectory of an SDE whose noise has exactly the forward
diffusion coefficient g_t, the log-density of every model's marginal changes as
``d log q^i = <dx, s^i> + [d f + f <x, s^i> - (g^2/2) ||s^i||^2] dtau`` (no divergence needed).
Over a step k -> k+1 with scores at the *start* of the step and dx = x_{k+1} - x_k, in eps terms
(research notes, guidance.md section 4):

    dlog q^i = -<dx, eps_i>/sigma_k + dlog(alpha) <x_k, eps_i>/sigma_k - dlambda ||eps_i||^2 - d dlog(alpha).

This is the theory's form (``estimator="ito"``). Its error is first order in the step size and
accumulates (1.1 nats on average over 200 steps in 16-D); the default ``estimator="kernel"`` uses the
discrete chain's identity q_{k+1}(x') = q_k(x) q(x' | x) / q_fwd(x | x') with model i's ancestral
Gaussian step as q(x' | x), which tends to the Ito form as steps shrink and is several times more
accurate at the same steps. The reference code's OR branch has the opposite sign on the quadratic
term and drifts by hundreds of nats (pitfall 1), so it is not what is implemented here.

**OR** (mixture sum_i omega_i q^i): kappa = softmax(T (log q^i + log omega_i)); with T = 1 the
kappa-weighted score is the mixture's score. **AND** (equal densities): kappa solves, per sample,
dlog q^i - dlog q^1 = lift_i for i >= 2 and sum kappa = 1. The step is affine in the combined
prediction (``x' = a x + b eps_tilde + c z``, :func:`~difflab.schedule.stochastic_step_coefficients`)
and the noise z is drawn before solving, so the conditions are linear in kappa.
With an unconditional term and guidance scale w the combined prediction is
``eps_u + w (sum_i kappa_i eps_i - eps_u)`` (the reference SD recipe); without one it is
``sum_i kappa_i eps_i``. kappa is not clipped (it may leave [0, 1]); where the predictions nearly
coincide the system is singular and kappa falls back to equal weights (``coincide_tol``).

The final step to a clean point (lambda = inf) has no density increment in this form; it uses the
kappa of the previous step and leaves the log-densities as they were. AND's kappa can be large
(hundreds) late in sampling, so that stale step can undo part of the balance: schedulers with
``final_sigmas_type="sigma_min"`` end at the smallest trained noise level instead and every step
is balanced (the pipelines and the benchmark use that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..schedule import stochastic_step_coefficients
from .base import DifflabScheduler
from .fkc import require_stochastic
from .smc import ParticleSystem

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Levels = tuple[float, float, float, float, float, float]  # alpha, sigma, lambda now and at the next point
Coefs = tuple[float, float, float]  # x' = a x + b eps + c z
MODES = ("or", "and", "average")


def _inner(a: torch.Tensor, b: torch.Tensor, sample_dims: int) -> torch.Tensor:
    """Inner products over the trailing ``sample_dims`` dimensions (broadcast), in float64."""
    return (a.double() * b.double()).flatten(-sample_dims).sum(-1)


def ito_log_density_increment(
    x: torch.Tensor, x_next: torch.Tensor, eps: torch.Tensor, levels: Levels, coefs: Coefs
) -> torch.Tensor:
    """(N, B) float64 Ito increments of log q^i along x -> x_next; ``eps`` (N, B, ...) taken at (x, t_k)."""
    alpha, sigma, lam, alpha_next, _, lam_next = levels
    dim, k = x[0].numel(), x.ndim - 1
    dx = (x_next - x).double()
    dlog_alpha = math.log(alpha_next) - math.log(alpha)
    x_dot_eps, dx_dot_eps = _inner(eps, x, k), _inner(eps, dx, k)
    return -dx_dot_eps / sigma + dlog_alpha * x_dot_eps / sigma - (lam_next - lam) * _inner(eps, eps, k) - dim * dlog_alpha


def kernel_log_density_increment(
    x: torch.Tensor, x_next: torch.Tensor, eps: torch.Tensor, levels: Levels, coefs: Coefs
) -> torch.Tensor:
    """(N, B) increments from the Gaussian kernels of the discrete chain (the reference CIFAR code's form).

    q_{k+1}(x') = q_k(x) q(x' | x) / q_fwd(x | x'): the reverse transition of model i is its own
    ancestral step N(a x + b eps_i, c^2), the forward one N((alpha/alpha') x', sigma^2 - (alpha sigma'/alpha')^2).
    Tends to the Ito form as the step shrinks.
    """
    alpha, sigma, _, alpha_next, sigma_next, _ = levels
    a, b, c = coefs
    k = x.ndim - 1
    x, x_next = x.double(), x_next.double()
    reverse = _gaussian_log_density(x_next, a * x + b * eps, c * c, k)
    ratio = alpha / alpha_next
    forward = _gaussian_log_density(x, ratio * x_next, sigma * sigma - (ratio * sigma_next) ** 2, k)
    return reverse - forward


def _gaussian_log_density(y: torch.Tensor, mean: torch.Tensor, var: float, sample_dims: int) -> torch.Tensor:
    dim = y[0].numel()
    return -0.5 * (y - mean).pow(2).flatten(-sample_dims).sum(-1) / var - 0.5 * dim * math.log(2 * math.pi * var)


ESTIMATORS = {"ito": ito_log_density_increment, "kernel": kernel_log_density_increment}


@dataclass
class SuperDiffState:
    """Per-sample accumulated log-densities (N, B), float64; a particle-state holder."""

    log_densities: torch.Tensor
    kappa: torch.Tensor  # (N, B), the last weights used

    def reindex(self, indices: torch.Tensor) -> None:
        idx = indices.to(self.log_densities.device)
        self.log_densities = self.log_densities[:, idx]
        self.kappa = self.kappa[:, idx]


@dataclass
class SuperDiffOutput:
    samples: torch.Tensor
    log_densities: torch.Tensor  # (N, B) estimated log q^i(x) up to a common constant
    kappas: list[torch.Tensor] = field(default_factory=list)  # per step (N, B)


def or_kappa(log_densities: torch.Tensor, temperature: float, log_prior: torch.Tensor) -> torch.Tensor:
    """kappa_i = softmax_i(T (log q^i + log omega_i)): the mixture's score weights at T = 1."""
    return torch.softmax(temperature * (log_densities + log_prior[:, None]), dim=0)


def and_kappa(
    x: torch.Tensor,
    step_without_kappa: torch.Tensor,
    kappa_direction: torch.Tensor,
    eps: torch.Tensor,
    levels: Levels,
    coefs: Coefs,
    estimator: Callable[..., torch.Tensor],
    lift: torch.Tensor,
    coincide_tol: float,
) -> torch.Tensor:
    """kappa (N, B) that makes every model's log-density change by the same amount (plus ``lift``).

    The next point is ``step_without_kappa + sum_j kappa_j kappa_direction_j``. For both
    estimators the differences of increments between models are affine in the next point, hence in
    kappa, so evaluating them at kappa = 0 and at each unit vector gives the linear system exactly:
    (D_i - D_0)(kappa) = lift_i for i >= 1, plus sum kappa = 1.
    """
    n, B = eps.shape[0], x.shape[0]
    base = estimator(x, step_without_kappa, eps, levels, coefs)  # (N, B)
    diff0 = base[1:] - base[:1]  # (N-1, B)
    columns = []
    for j in range(n):
        moved = estimator(x, step_without_kappa + kappa_direction[j], eps, levels, coefs)
        columns.append((moved[1:] - moved[:1]) - diff0)
    matrix = torch.empty(B, n, n, dtype=torch.float64, device=x.device)
    rhs = torch.empty(B, n, dtype=torch.float64, device=x.device)
    matrix[:, : n - 1] = torch.stack(columns, dim=-1).permute(1, 0, 2)  # (B, N-1, N)
    rhs[:, : n - 1] = (lift[1:, None].to(x.device) - diff0).T
    matrix[:, n - 1] = 1.0
    rhs[:, n - 1] = 1.0
    k = x.ndim - 1
    centred = eps - eps.mean(0, keepdim=True)
    coincide = _inner(centred, centred, k).sum(0) <= coincide_tol * _inner(eps, eps, k).sum(0).clamp_min(1e-300)
    eye = torch.eye(n, dtype=torch.float64, device=x.device).expand(B, n, n)
    kappa, _ = torch.linalg.solve_ex(torch.where(coincide[:, None, None], eye, matrix), rhs)
    unsolvable = coincide | ~torch.isfinite(kappa).all(-1)  # singular systems: equal weights
    kappa = torch.where(unsolvable[:, None], torch.full_like(kappa, 1.0 / n), kappa)
    return kappa.T


def superdiff_sample(
    predict: Predict,
    scheduler: DifflabScheduler,
    latents: torch.Tensor,
    mode: str,
    num_models: int,
    guidance_scale: float = 1.0,
    has_uncond: bool = False,
    temperature: float = 1.0,
    prior_weights: Sequence[float] | None = None,
    lift: Sequence[float] | float = 0.0,
    coincide_tol: float = 1e-8,
    estimator: str = "kernel",
    generator: torch.Generator | None = None,
    particles: ParticleSystem | None = None,
    holders: Sequence[object] = (),
    progress: Callable | None = None,
    record_kappa: bool = False,
) -> SuperDiffOutput:
    """Superpose ``num_models`` models (or prompts) on the scheduler's timesteps.

    Args:
        predict: ``predict(x, t) -> (N [+1], B, ...)`` raw outputs of the N models (and, last, the
            unconditional one when ``has_uncond``) in the scheduler's prediction type.
        scheduler: a stochastic difflab scheduler (eta = 1 makes the noise match g_t exactly).
        mode: ``"or"`` (mixture, weights ``prior_weights``, softmax temperature ``temperature``)
            or ``"and"`` (equal densities, optional ``lift`` of model i over model 1); ``"average"``
            is the uncorrected baseline with kappa fixed at the prior weights.
        estimator: ``"kernel"`` (default: log-ratio of the chain's Gaussian kernels) or ``"ito"``
            (the theory's left-point Ito form). Both use start-of-step predictions and the pre-drawn
            noise; on a 16-D mixture with 200 ancestral steps the kernel form tracks the exact
            log q_t to 0.16 nats on average, the left-point form is off by 1.1 nats (its error is
            first order in the step size; docs/benchmarks/composition.md).
        particles: optional particle system; its holders are re-indexed together with the
            SuperDiff state when it resamples.
    """
    if mode not in MODES:
        raise ValueError(f"SuperDiff mode {mode!r} is unknown; use 'or' (mixture), 'and' (equal densities) or "
                         "'average' (fixed kappa, the baseline).")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is unknown; use one of {sorted(ESTIMATORS)}.")
    estimate = ESTIMATORS[estimator]
    if num_models < 2:
        raise ValueError(f"SuperDiff combines at least 2 models or prompts, got {num_models}.")
    scheduler = require_stochastic(scheduler, "SuperDiff")
    if abs(scheduler.config.eta - 1.0) > 1e-12:
        raise ValueError(f"the Ito density estimator needs the sampler's noise to equal g_t: use eta=1.0, got {scheduler.config.eta}.")
    priors = torch.full((num_models,), 1.0 / num_models, dtype=torch.float64) if prior_weights is None else \
        torch.as_tensor(prior_weights, dtype=torch.float64)
    if priors.shape != (num_models,) or (priors <= 0).any():
        raise ValueError(f"prior_weights must be {num_models} positive numbers, got {prior_weights}.")
    log_prior = (priors / priors.sum()).log()
    lifts = torch.as_tensor(lift, dtype=torch.float64).reshape(-1).expand(num_models).clone()
    lifts[0] = 0.0

    B = latents.shape[0]
    state = SuperDiffState(torch.zeros(num_models, B, dtype=torch.float64, device=latents.device),
                           torch.full((num_models, B), 1.0 / num_models, dtype=torch.float64, device=latents.device))
    if particles is not None:
        particles.register(scheduler, state, *holders)
    x = latents
    timesteps = scheduler.timesteps
    n = len(timesteps)
    kappas = []
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        eps_all = scheduler.output_to_eps(predict(x, t), x, i).double()
        eps, eps_u = (eps_all[:num_models], eps_all[num_models]) if has_uncond else (eps_all, None)
        levels = scheduler.noise_levels(i)
        alpha, sigma, lam, alpha_next, sigma_next, lam_next = levels
        last = not math.isfinite(lam_next)
        coefs = stochastic_step_coefficients(alpha, sigma, alpha_next, sigma_next, scheduler.config.eta)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        a, b, c = coefs
        free = eps_u * (1.0 - guidance_scale) if has_uncond else torch.zeros_like(eps[0])
        w = guidance_scale if has_uncond else 1.0
        # x' = a x + b eps_tilde + c z with eps_tilde = free + w sum_j kappa_j eps_j
        step_without_kappa = a * x.double() + b * free + c * noise
        if last:
            kappa = state.kappa
        elif mode == "average":  # the baseline: fixed kappa = prior weights (composable-diffusion style)
            kappa = (priors / priors.sum()).to(x.device)[:, None].expand(num_models, B)
        elif mode == "or":
            kappa = or_kappa(state.log_densities, temperature, log_prior.to(x.device))
        else:
            kappa = and_kappa(x.double(), step_without_kappa, b * w * eps, eps, levels, coefs, estimate, lifts,
                              coincide_tol)
        state.kappa = kappa
        combined = free + w * (kappa.reshape(*kappa.shape, *([1] * (eps.ndim - 2))) * eps).sum(0)
        guided = scheduler.eps_to_output(combined, x.double(), i)
        x_next = scheduler.step(guided.to(x.dtype), t, x, variance_noise=noise.to(x.dtype)).prev_sample
        if not last:
            increment = estimate(x.double(), x_next.double(), eps, levels, coefs)
            state.log_densities = state.log_densities + increment
            state.log_densities = state.log_densities - state.log_densities.amax(0, keepdim=True)  # only differences matter
        if record_kappa:
            kappas.append(kappa.cpu())
        x = x_next
        if particles is not None:
            x = particles.step(i, n, x)
    return SuperDiffOutput(x, state.log_densities, kappas)
