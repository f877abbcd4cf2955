"""Gaussian-mixture test bed with exact scores, exact noised marginals and exact composite targets.

A mixture p(x0) = sum_k w_k N(mu_k, diag(v_k)) noised by x_t = alpha x0 + sigma eps stays a mixture:
q_t(x) = sum_k w_k N(alpha mu_k, diag(alpha^2 v_k + sigma^2)). Its posterior mean E[x0 | x_t] (the
ideal data prediction, Tweedie's formula) is the responsibility-weighted per-component mean

    E[x0 | x_t, k] = mu_k + alpha v_k / (alpha^2 v_k + sigma^2) * (x_t - alpha mu_k),

so :class:`GMMDenoiser` answers like a trained diffusers UNet with the exact eps / x0 / v /
velocity, and every sampler can be checked against exact probability-flow solutions.

Classes are subsets of components; class ``n_classes`` is the null (unconditional) label, as in
the digits models. Exact targets for later methods: :meth:`GaussianMixture.product` (closed form),
and tempered p^beta or CFG-tilted p_u^(1-w) p_c^w densities on a grid (:class:`GridTarget`, 1-2-D).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from ..schedule import NoiseSchedule, broadcast_to, canonical_prediction_type

LOG_2PI = math.log(2 * math.pi)


def _responsibilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax over components; shifted logits are clamped at -600 so exp() never produces slow
    denormal floats (the clamped weights are below 1e-260); masked (-inf) components stay zero."""
    shifted = logits - logits.amax(dim=1, keepdim=True)
    shifted = torch.where(torch.isfinite(shifted), shifted.clamp(min=-600.0), shifted)
    weights = shifted.exp()
    return weights / weights.sum(dim=1, keepdim=True)


def _per_sample(coef: torch.Tensor | float, n: int) -> torch.Tensor:
    coef = torch.as_tensor(coef, dtype=torch.float64).reshape(-1)
    return coef.expand(n) if coef.numel() == 1 else coef


class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances, optionally with classes.

    Args:
        means: (K, D) component means.
        variances: (K, D), (K,) or scalar component variances.
        weights: (K,) mixture weights (normalized here); uniform if omitted.
        component_classes: (K,) class index of each component, or None for an unconditional mixture.
    """

    def __init__(
        self,
        means: torch.Tensor | Sequence,
        variances: torch.Tensor | Sequence | float = 1.0,
        weights: torch.Tensor | Sequence | None = None,
        component_classes: torch.Tensor | Sequence[int] | None = None,
    ):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}.")
        K, D = self.means.shape
        var = torch.as_tensor(variances, dtype=torch.float64)
        self.variances = (var.reshape(K, 1) if var.ndim == 1 else var).expand(K, D).clone()
        if (self.variances <= 0).any():
            raise ValueError("variances must be positive.")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum.")
        self.weights = w / w.sum()
        self.component_classes = None if component_classes is None else torch.as_tensor(component_classes, dtype=torch.long)
        self.n_classes = 0 if self.component_classes is None else int(self.component_classes.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def random(
        cls,
        dim: int,
        n_components: int = 8,
        n_classes: int | None = None,
        seed: int = 0,
        mean_scale: float = 0.6,
        std_range: tuple[float, float] = (0.08, 0.25),
    ) -> GaussianMixture:
        """A seeded random mixture with data roughly in [-1, 1] (the scale of image models)."""
        g = torch.Generator().manual_seed(seed)
        means = mean_scale * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(n_components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        classes = None if not n_classes else torch.arange(n_components) % n_classes
        return cls(means, stds**2, weights, classes)

    # ---------------------------------------------------------------- classes
    def _log_weights(self, class_labels: torch.Tensor | Sequence[int] | int | None, n: int) -> torch.Tensor:
        """(n, K) normalized log-weights per sample; the null label n_classes means unconditional."""
        log_w = self.weights.log().expand(n, -1)
        if class_labels is None:
            return log_w
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        labels = labels.expand(n) if labels.numel() == 1 else labels
        if self.component_classes is None:
            raise ValueError("class_labels were given but this mixture has no classes; build it with component_classes.")
        if ((labels < 0) | (labels > self.n_classes)).any():
            raise ValueError(f"class labels must be in 0..{self.n_classes} ({self.n_classes} is the null class), got {labels.unique().tolist()}.")
        member = self.component_classes[None, :] == labels[:, None]
        member |= (labels == self.n_classes)[:, None]
        log_w = torch.where(member, log_w, torch.full_like(log_w, -math.inf))
        return log_w - torch.logsumexp(log_w, dim=1, keepdim=True)

    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """The marginal q_t of x_t = alpha x0 + sigma eps: the same mixture with alpha mu_k, alpha^2 v_k + sigma^2."""
        return GaussianMixture(alpha * self.means, alpha**2 * self.variances + sigma**2, self.weights, self.component_classes)

    def restrict(self, class_label: int) -> GaussianMixture:
        """The mixture of one class (its components, renormalized weights)."""
        if self.component_classes is None or class_label == self.n_classes:
            return self
        keep = self.component_classes == class_label
        if not keep.any():
            raise ValueError(f"class {class_label} has no components; classes are 0..{self.n_classes - 1}.")
        return GaussianMixture(self.means[keep], self.variances[keep], self.weights[keep])

    # ---------------------------------------------------------------- densities and sampling
    def sample(
        self, n: int, generator: torch.Generator | None = None, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """n exact samples (float64), optionally of given classes."""
        log_w = self._log_weights(class_labels, n)
        k = torch.multinomial(log_w.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * z

    def _component_log_probs(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, K) log N(x; alpha mu_k, alpha^2 v_k + sigma^2) and the (n, K, D) noised variances."""
        a, s = alpha[:, None, None], sigma[:, None, None]
        var_t = a * a * self.variances[None] + s * s
        diff = x[:, None, :] - a * self.means[None]
        logp = -0.5 * ((diff * diff) / var_t + var_t.log() + LOG_2PI).sum(-1)
        return logp, var_t

    def log_prob(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor | float = 1.0,
        sigma: torch.Tensor | float = 0.0,
        class_labels: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """log q_t(x) of the noised marginal (alpha = 1, sigma = 0 gives the data density)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        n = x.shape[0]
        logp, _ = self._component_log_probs(x, _per_sample(alpha, n), _per_sample(sigma, n))
        return torch.logsumexp(logp + self._log_weights(class_labels, n), dim=1)

    def _posterior(self, x: torch.Tensor, alpha, sigma, class_labels) -> tuple[torch.Tensor, ...]:
        """Flattened float64 x (n, D), per-sample alpha, responsibilities (n, K), noised variances (n, K, D)."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        n = x.shape[0]
        alpha, sigma = _per_sample(alpha, n), _per_sample(sigma, n)
        logp, var_t = self._component_log_probs(x, alpha, sigma)
        return x, alpha[:, None, None], _responsibilities(logp + self._log_weights(class_labels, n)), var_t

    def posterior_mean(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor | float,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """E[x0 | x_t = x] (Tweedie), exact, for scalar or per-sample (alpha, sigma)."""
        flat, a, resp, var_t = self._posterior(x, alpha, sigma, class_labels)
        cond_mean = self.means[None] + a * self.variances[None] / var_t * (flat[:, None, :] - a * self.means[None])
        return (resp[:, :, None] * cond_mean).sum(1).reshape(x.shape)

    def score(
        self,
        x: torch.Tensor,
        alpha: torch.Tensor | float = 1.0,
        sigma: torch.Tensor | float = 0.0,
        class_labels: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """grad_x log q_t(x) = (alpha E[x0|x] - x) / sigma^2, computed per component (valid at sigma = 0)."""
        flat, a, resp, var_t = self._posterior(x, alpha, sigma, class_labels)
        comp_score = -(flat[:, None, :] - a * self.means[None]) / var_t
        return (resp[:, :, None] * comp_score).sum(1).reshape(x.shape)

    # ---------------------------------------------------------------- exact composite targets
    def product(self, other: GaussianMixture) -> GaussianMixture:
        """The normalized product p(x) q(x), again a mixture (one component per pair)."""
        if other.dim != self.dim:
            raise ValueError(f"dimensions differ: {self.dim} vs {other.dim}.")
        v1, v2 = self.variances[:, None], other.variances[None]
        m1, m2 = self.means[:, None], other.means[None]
        var = v1 * v2 / (v1 + v2)
        mean = var * (m1 / v1 + m2 / v2)
        # N(x; m1, v1) N(x; m2, v2) = N(m1; m2, v1 + v2) N(x; mean, var)
        log_c = -0.5 * (((m1 - m2) ** 2) / (v1 + v2) + (v1 + v2).log() + LOG_2PI).sum(-1)
        log_w = self.weights.log()[:, None] + other.weights.log()[None] + log_c
        return GaussianMixture(mean.reshape(-1, self.dim), var.reshape(-1, self.dim), torch.softmax(log_w.reshape(-1), 0))

    def sample_tempered(self, n: int, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of p(x)^beta / Z in any dimension, by rejection sampling.

        With a_k = w_k N(x; mu_k, v_k) the power-mean inequality gives (sum_k a_k)^beta <=
        K^max(beta-1, 0) sum_k a_k^beta, and a_k^beta is a constant times N(x; mu_k, v_k / beta), so
        the mixture g = sum_k pi_k N(mu_k, v_k / beta) with pi_k ~ w_k^beta int N_k^beta is an
        envelope; a proposal is accepted with probability p^beta / (K^max(beta-1,0) sum_k a_k^beta).
        """
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}.")
        K, D = self.means.shape
        log_norm = -0.5 * (beta - 1) * D * LOG_2PI - 0.5 * D * math.log(beta) - 0.5 * (beta - 1) * self.variances.log().sum(1)
        proposal = GaussianMixture(self.means, self.variances / beta, torch.softmax(beta * self.weights.log() + log_norm, 0))
        log_bound = max(beta - 1.0, 0.0) * math.log(K)

        def log_accept(x: torch.Tensor) -> torch.Tensor:
            log_a = self._component_log_probs(x, torch.ones(len(x), dtype=torch.float64), torch.zeros(len(x), dtype=torch.float64))[0]
            log_a = log_a + self.weights.log()
            return beta * torch.logsumexp(log_a, 1) - log_bound - torch.logsumexp(beta * log_a, 1)

        return _rejection_sample(n, lambda m: proposal.sample(m, generator=generator), log_accept, generator)

    def sample_cfg_tilted(
        self, n: int, class_label: int, guidance_scale: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n exact samples of p_u^(1-w) p_c^w / Z (w >= 1) in any dimension, by rejection from p_c.

        p_u = sum_c pi_c p_c >= pi_c p_c, so the target is at most pi_c^(1-w) p_c and a draw from
        p_c is accepted with probability (pi_c p_c / p_u)^(w-1).
        """
        w = float(guidance_scale)
        if w < 1:
            raise ValueError(f"exact CFG-tilted sampling needs guidance_scale >= 1, got {w}.")
        if self.component_classes is None:
            raise ValueError("this mixture has no classes; build it with component_classes.")
        log_prior = float(self.weights[self.component_classes == class_label].sum().log())

        def log_accept(x: torch.Tensor) -> torch.Tensor:
            return (w - 1) * (log_prior + self.log_prob(x, class_labels=class_label) - self.log_prob(x))

        return _rejection_sample(n, lambda m: self.sample(m, generator, class_labels=class_label), log_accept, generator)

    def tempered_on_grid(self, beta: float, bounds: tuple[float, float] | None = None, resolution: int = 400) -> GridTarget:
        """p(x)^beta / Z on a grid (1-2-D), the target of annealed sampling."""
        return GridTarget.from_log_density(lambda x: beta * self.log_prob(x), self.dim, bounds or self._bounds(), resolution)

    def cfg_tilted_on_grid(
        self, class_label: int, guidance_scale: float, bounds: tuple[float, float] | None = None, resolution: int = 400
    ) -> GridTarget:
        """p_u(x)^(1-w) p_c(x)^w / Z on a grid (1-2-D): the distribution CFG with scale w aims at."""
        w = guidance_scale

        def log_density(x: torch.Tensor) -> torch.Tensor:
            return (1 - w) * self.log_prob(x) + w * self.log_prob(x, class_labels=class_label)

        return GridTarget.from_log_density(log_density, self.dim, bounds or self._bounds(), resolution)

    def _bounds(self, margin: float = 5.0) -> tuple[float, float]:
        spread = margin * self.variances.sqrt().max()
        return float(self.means.min() - spread), float(self.means.max() + spread)


def unequal_ring(radius: float = 0.8, std: float = 0.08, spread: float = 6.0) -> GaussianMixture:
    """8 modes on a circle in 2-D; weights spread^(j/7), j = 0..7, placed so heavy and light modes alternate."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    levels = spread ** (torch.arange(8, dtype=torch.float64) / 7)
    order = [7, 0, 5, 2, 6, 1, 4, 3]  # mode i gets level order[i]
    return GaussianMixture(means, std**2, levels[order])


def _rejection_sample(
    n: int,
    propose: Callable[[int], torch.Tensor],
    log_accept: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
    max_rounds: int = 200,
) -> torch.Tensor:
    """n accepted draws; proposals come in batches sized by the running acceptance rate."""
    kept: list[torch.Tensor] = []
    have, rate = 0, 1.0
    for _ in range(max_rounds):
        m = int(min(4_000_000, max(1024, 1.2 * (n - have) / max(rate, 1e-4))))
        x = propose(m)
        accept = torch.rand(m, generator=generator, dtype=torch.float64).log() < log_accept(x)
        rate = max(float(accept.double().mean()), 1e-4)
        kept.append(x[accept])
        have += int(accept.sum())
        if have >= n:
            return torch.cat(kept)[:n]
    raise RuntimeError(f"rejection sampling accepted only {have} of {n} samples; the acceptance rate is {rate:.1e}.")


@dataclass
class GridTarget:
    """A density known up to a constant, tabulated on a regular 1-D or 2-D grid, with exact sampling."""

    axes: list[torch.Tensor]
    log_density: torch.Tensor  # normalized over cells: logsumexp(log_density) + log(cell volume) = 0

    @classmethod
    def from_log_density(
        cls, fn: Callable[[torch.Tensor], torch.Tensor], dim: int, bounds: tuple[float, float], resolution: int
    ) -> GridTarget:
        if dim not in (1, 2):
            raise ValueError(f"grid targets are for 1-D or 2-D mixtures, got dimension {dim}.")
        lo, hi = bounds
        edges = torch.linspace(lo, hi, resolution + 1, dtype=torch.float64)
        centers = 0.5 * (edges[1:] + edges[:-1])
        axes = [centers] * dim
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dim)
        logp = fn(points).reshape([resolution] * dim)
        cell = ((hi - lo) / resolution) ** dim
        logp = logp - torch.logsumexp(logp.reshape(-1), 0) - math.log(cell)
        return cls(axes, logp)

    @property
    def cell_width(self) -> float:
        return float(self.axes[0][1] - self.axes[0][0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of the tabulated density (uniform within a cell)."""
        probs = torch.softmax(self.log_density.reshape(-1), 0)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        res = self.axes[0].numel()
        coords = [idx // res, idx % res] if len(self.axes) == 2 else [idx]
        jitter = torch.rand(n, len(self.axes), generator=generator, dtype=torch.float64) - 0.5
        return torch.stack([ax[c] for ax, c in zip(self.axes, coords)], dim=1) + jitter * self.cell_width

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density at the grid cell containing each point (-inf outside the grid)."""
        lo = float(self.axes[0][0]) - 0.5 * self.cell_width
        idx = ((x - lo) / self.cell_width).floor().long()
        res = self.axes[0].numel()
        inside = ((idx >= 0) & (idx < res)).all(dim=1)
        idx = idx.clamp(0, res - 1)
        vals = self.log_density[tuple(idx.T)]
        return torch.where(inside, vals, torch.full_like(vals, -math.inf))


@dataclass
class DenoiserOutput(BaseOutput):
    """Output of :class:`GMMDenoiser`, shaped like diffusers' ``UNet2DOutput``."""

    sample: torch.Tensor


class GMMDenoiser(torch.nn.Module):
    """The exact denoiser of a :class:`GaussianMixture`, called like a diffusers UNet.

    ``model(sample, timestep, class_labels=None).sample`` returns the exact eps, x0, v or flow
    velocity at diffusers timesteps of ``schedule`` (scalar or per-sample). ``sample`` may have any
    shape (B, ...) whose trailing dimensions flatten to the mixture dimension. ``calls`` and
    ``rows`` count forward calls and evaluated batch rows.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if (schedule.kind == "flow") != (self.prediction_type == "flow_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} does not fit a {schedule.kind} schedule.")
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)
        self.calls = 0
        self.rows = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused: object,
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        n = sample.shape[0]
        self.calls += 1
        self.rows += n
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        t = t.expand(n) if t.numel() == 1 else t
        alpha, sigma = self.schedule.alpha_sigma(t)
        x = sample.detach().to("cpu", torch.float64).reshape(n, -1)
        labels = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1).cpu()
        x0 = self.mixture.posterior_mean(x, alpha, sigma, labels)
        eps = (x - broadcast_to(alpha, x) * x0) / broadcast_to(sigma, x)
        out = self.schedule.from_x0_eps(x0, eps, alpha, sigma, self.prediction_type)
        out = out.reshape(sample.shape).to(device=sample.device, dtype=sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)


def probability_flow_ode(
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    x_start: torch.Tensor,
    t_start: float,
    class_labels: torch.Tensor | int | None = None,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    t_end: float = 0.0,
    denoise: bool = True,
) -> torch.Tensor:
    """High-accuracy solution of the probability-flow ODE from x_start at timestep t_start, denoised.

    Uses the exact denoiser and scipy's DOP853. Along x = alpha(tau) x0 + sigma(tau) eps the ODE is
    dx/dtau = alpha'(tau) x0_hat + sigma'(tau) eps_hat (Song et al. 2021, eq. 13 in these variables),
    with tau = sigma/alpha and x scaled by 1/alpha for VP schedules (Karras et al. 2022, eq. 4), and
    tau = s for flow schedules. It is integrated to timestep ``t_end`` (default 0: the least noisy
    level a VP model is trained on; flow schedules go on to sigma = 1e-6) and finished with the exact
    posterior mean, the final "jump to clean" that diffusers samplers make with final_sigmas_type="zero"
    (``denoise=False`` returns the noisy solution at ``t_end`` instead).
    """
    from scipy.integrate import solve_ivp

    shape, n = x_start.shape, x_start.shape[0]
    alpha0, sigma0 = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t_start))))
    alpha1, sigma1 = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t_end))))
    if schedule.kind == "vp":  # tau = r = sigma/alpha, x_e = x/alpha: alpha = 1, sigma = r, dx_e/dr = eps_hat

        def coefs(tau: float) -> tuple[float, float, float, float]:
            a = 1.0 / math.sqrt(1.0 + tau * tau)
            return a, tau * a, 0.0, 1.0  # (alpha, sigma) of the model input x = a * x_e; d/dtau of (1, r)

        y0, tau0, tau1, scale_in = x_start.reshape(n, -1).double() / alpha0, sigma0 / alpha0, sigma1 / alpha1, True
    else:  # tau = s: alpha = 1 - s, sigma = s

        def coefs(tau: float) -> tuple[float, float, float, float]:
            return 1.0 - tau, tau, -1.0, 1.0

        y0, tau0, tau1, scale_in = x_start.reshape(n, -1).double(), sigma0, max(sigma1, 1e-6), False

    def rhs(tau: float, y_flat):
        a, s, da, ds = coefs(tau)
        y = torch.from_numpy(y_flat).reshape(n, -1)
        x = a * y if scale_in else y
        x0 = mixture.posterior_mean(x, a, s, class_labels)
        eps = (x - a * x0) / s
        d = (0.0 if scale_in else da) * x0 + ds * eps
        return d.reshape(-1).numpy()

    sol = solve_ivp(rhs, (tau0, tau1), y0.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    y_end = torch.from_numpy(sol.y[:, -1]).reshape(n, -1)
    a, s, _, _ = coefs(tau1)
    x_end = a * y_end if scale_in else y_end
    if not denoise:
        return x_end.reshape(shape)
    return mixture.posterior_mean(x_end, a, s, class_labels).reshape(shape)
