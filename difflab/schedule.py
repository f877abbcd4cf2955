"""Noise schedules: the one place where difflab computes alpha_t, sigma_t and lambda_t.

A diffusion model sees noisy samples ``x_t = alpha_t * x0 + sigma_t * eps``. Everything a sampler,
guider, particle weight or training loss needs about the noise schedule is a function of
``(alpha_t, sigma_t)`` and of the half log-SNR ``lambda_t = log(alpha_t / sigma_t)``
(DPM-Solver, Lu et al. 2022, eq. 3). This module builds those functions from any diffusers
scheduler config and converts model outputs between the four parameterizations:

* ``epsilon``          eps                              (DDPM)
* ``sample``           x0                               (data prediction)
* ``v_prediction``     v = alpha * eps - sigma * x0     (Salimans & Ho 2022)
* ``flow_prediction``  u = eps - x0                     (rectified flow, SD3 / Flux velocity)

Two schedule families are supported:

* **VP** (betas / ``alphas_cumprod``): ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` at
  integer timesteps. Between integers, lambda_t is interpolated linearly in t, which is exactly
  the log-sigma interpolation diffusers uses in ``_sigma_to_t`` (Euler sigma = exp(-lambda)).
* **flow** (``FlowMatchEulerDiscreteScheduler``): ``sigma_t = t / N``, ``alpha_t = 1 - sigma_t``; the
  shift (static or dynamic with ``mu``) only changes which timesteps are visited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
_PREDICTION_ALIASES = {
    "eps": "epsilon",
    "x0": "sample",
    "original_sample": "sample",
    "v": "v_prediction",
    "flow": "flow_prediction",
    "velocity": "flow_prediction",
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VP_SPACINGS = ("linspace", "leading", "trailing", "karras", "exponential", "uniform_logsnr")
FLOW_SPACINGS = ("linspace", "karras", "exponential", "uniform_logsnr")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
TensorLike = torch.Tensor | np.ndarray | float | int | list


def canonical_prediction_type(prediction_type: str) -> str:
    """Return the canonical diffusers name of a prediction type, or raise a helpful error."""
    name = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; use one of {list(PREDICTION_TYPES)} "
            f"(aliases: {sorted(_PREDICTION_ALIASES)})."
        )
    return name


def _as_float64(t: TensorLike) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(t, dtype=np.float64))


def broadcast_to(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Shape a scalar or per-sample (B,) coefficient so it broadcasts against ``like`` (B, ...)."""
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for float64 tensors (xp increasing); values outside are clamped."""
    return torch.as_tensor(np.interp(x.numpy(), xp.numpy(), fp.numpy()), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# VP beta schedules, computed exactly as diffusers computes them (float32), then kept in float64
# --------------------------------------------------------------------------------------------


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17) discretized to betas."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last timestep has zero SNR (Lin et al. 2024, Alg. 1)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def vp_betas(
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Any = None,
) -> torch.Tensor:
    """Betas of a VP schedule (float32, as diffusers makes them)."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(
        f"beta_schedule {beta_schedule!r} is not supported; use one of {list(BETA_SCHEDULES)} or pass trained_betas."
    )


# --------------------------------------------------------------------------------------------
# NoiseSchedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowShift:
    """Timestep shifting of flow-matching schedules (SD3 static shift; Flux dynamic shift with mu)."""

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    def apply(self, sigmas: torch.Tensor, mu: float | None = None) -> torch.Tensor:
        """Shift flow sigmas in [0, 1] the way FlowMatchEulerDiscreteScheduler does."""
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("This flow schedule uses dynamic shifting: pass `mu` to set_timesteps "
                                 "(pipelines compute it from the image size; see mu_for_seq_len).")
            if self.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
            elif self.time_shift_type == "linear":
                sigmas = mu / (mu + (1 / sigmas - 1))
            else:
                raise ValueError(f"time_shift_type {self.time_shift_type!r}; use 'exponential' or 'linear'.")
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return sigmas

    def mu_for_seq_len(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent mu: linear in the number of latent tokens."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_image_seq_len

    def static_shift(self, mu: float) -> float:
        """The static ``shift`` that moves sigmas as the dynamic shift with ``mu`` does: exp(mu) / (exp(mu) +
        1/s - 1) = k s / (1 + (k - 1) s) with k = exp(mu) (exponential time shift), and k = mu for linear."""
        if self.time_shift_type == "exponential":
            return math.exp(mu)
        if self.time_shift_type == "linear":
            return float(mu)
        raise ValueError(f"time_shift_type {self.time_shift_type!r}; use 'exponential' or 'linear'.")


class NoiseSchedule:
    """alpha_t, sigma_t, lambda_t of a VP or flow-matching diffusion, and output conversions.

    Build it with :meth:`from_config` from any diffusers scheduler config (or scheduler), or with
    :meth:`vp` / :meth:`flow`. All quantities are float64 CPU tensors; timesteps may be fractional.
    """

    def __init__(
        self,
        kind: str,
        num_train_timesteps: int = 1000,
        alphas_cumprod: torch.Tensor | None = None,
        flow_shift: FlowShift | None = None,
    ):
        if kind not in ("vp", "flow"):
            raise ValueError(f"kind {kind!r} is not supported; use 'vp' or 'flow'.")
        self.kind = kind
        self.num_train_timesteps = int(num_train_timesteps)
        self.flow_shift = flow_shift or FlowShift()
        if kind == "vp":
            if alphas_cumprod is None:
                raise ValueError("A VP NoiseSchedule needs alphas_cumprod.")
            abar = _as_float64(alphas_cumprod).clamp(max=1.0 - 1e-12)
            abar = torch.where(abar > 0, abar, torch.full_like(abar, 2.0**-24))  # zero-SNR end, as diffusers does
            self.alphas_cumprod = abar
            self._train_t = torch.arange(len(abar), dtype=torch.float64)
            self._train_lambda = 0.5 * (abar.log() - torch.log1p(-abar))  # lambda = log(alpha/sigma)

    # ---------------------------------------------------------------- construction
    @classmethod
    def vp(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        rescale_betas_zero_snr: bool = False,
    ) -> NoiseSchedule:
        betas = vp_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls("vp", len(abar), alphas_cumprod=abar)

    @classmethod
    def flow(cls, num_train_timesteps: int = 1000, **shift_kwargs: Any) -> NoiseSchedule:
        return cls("flow", num_train_timesteps, flow_shift=FlowShift(**shift_kwargs))

    @staticmethod
    def is_flow_config(config: Mapping[str, Any]) -> bool:
        """True if a diffusers config describes a flow-matching (rectified flow) model."""
        if str(config.get("_class_name", "")).startswith("FlowMatch"):
            return True
        if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
            return True
        has_betas = any(k in config for k in ("beta_schedule", "trained_betas", "beta_start"))
        return not has_betas and "shift" in config

    @staticmethod
    def model_prediction_type(config: Mapping[str, Any]) -> str:
        """The output type of the model a scheduler config belongs to: the flow velocity for flow-matching
        configs, else its ``prediction_type`` (diffusers' default: eps)."""
        if NoiseSchedule.is_flow_config(config):
            return "flow_prediction"
        return config.get("prediction_type", "epsilon")

    @classmethod
    def from_config(cls, config: Any) -> NoiseSchedule:
        """Build from a diffusers scheduler, its ``config``, a dict, or a path's loaded config."""
        if hasattr(config, "config") and not isinstance(config, Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"NoiseSchedule.from_config expects a scheduler or a config mapping, got {type(config)}.")
        n = int(config.get("num_train_timesteps", 1000) or 1000)
        if cls.is_flow_config(config):
            use_flow_sigmas = bool(config.get("use_flow_sigmas", False)) and "shift" not in config
            shift = config.get("flow_shift", 1.0) if use_flow_sigmas else config.get("shift", 1.0)
            fields = {f: config[f] for f in FlowShift.__dataclass_fields__ if f in config and f != "shift"}
            fields = {k: v for k, v in fields.items() if v is not None or k == "shift_terminal"}
            return cls.flow(n, shift=float(shift if shift is not None else 1.0), **fields)
        missing = [k for k in ("beta_schedule",) if k not in config and "trained_betas" not in config]
        if missing:
            raise ValueError(
                f"Cannot build a noise schedule from this config: missing keys {missing}. difflab understands "
                "VP configs (num_train_timesteps, beta_start, beta_end, beta_schedule or trained_betas) as in "
                "DDPM/DDIM/Euler/DPM-Solver/UniPC schedulers, and flow-matching configs (num_train_timesteps, "
                "shift, use_dynamic_shifting) as in FlowMatchEulerDiscreteScheduler. "
                f"Keys present: {sorted(k for k in config if not k.startswith('_'))}."
            )
        return cls.vp(
            n,
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=config.get("beta_schedule", "linear"),
            trained_betas=config.get("trained_betas"),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    # ---------------------------------------------------------------- t <-> (alpha, sigma, lambda)
    @property
    def t_max(self) -> float:
        """Largest timestep the model was trained on (VP: N - 1; flow: N, i.e. pure noise)."""
        return float(self.num_train_timesteps - 1) if self.kind == "vp" else float(self.num_train_timesteps)

    def lambda_(self, t: TensorLike) -> torch.Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t); linear in t between integer timesteps (VP)."""
        t = _as_float64(t)
        if self.kind == "vp":
            return _interp(t, self._train_t, self._train_lambda)
        s = t / self.num_train_timesteps
        return torch.log1p(-s) - torch.log(s)

    def alpha_sigma(self, t: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at timesteps t (float64)."""
        t = _as_float64(t)
        if self.kind == "flow":
            s = t / self.num_train_timesteps
            return 1.0 - s, s
        return self.alpha_sigma_from_lambda(self.lambda_(t))

    def alpha_sigma_from_lambda(self, lam: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) with log(alpha/sigma) = lambda: VP alpha^2 + sigma^2 = 1, flow alpha + sigma = 1."""
        lam = _as_float64(lam)
        if self.kind == "vp":
            return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
        return torch.sigmoid(lam), torch.sigmoid(-lam)

    def timestep_from_lambda(self, lam: TensorLike) -> torch.Tensor:
        """Inverse of :meth:`lambda_` (diffusers' ``_sigma_to_t`` with sigma = exp(-lambda) for VP)."""
        lam = _as_float64(lam)
        if self.kind == "vp":  # lambda decreases in t; np.interp needs increasing abscissae
            return _interp(-lam, -self._train_lambda, self._train_t)
        return torch.sigmoid(-lam) * self.num_train_timesteps

    def timestep_from_sigma(self, sigma: TensorLike) -> torch.Tensor:
        """Timestep of a diffusers-convention sigma: VP Euler sigma = sigma_t/alpha_t; flow sigma in [0, 1]."""
        sigma = _as_float64(sigma)
        if self.kind == "flow":
            return sigma * self.num_train_timesteps
        return self.timestep_from_lambda(-torch.log(sigma))

    def diffusers_sigma(self, t: TensorLike) -> torch.Tensor:
        """The sigma diffusers schedulers store: sigma_t/alpha_t for VP (Euler / DPM), sigma_t for flow."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha if self.kind == "vp" else sigma

    # ---------------------------------------------------------------- spacings
    def timesteps(
        self,
        num_inference_steps: int,
        spacing: str = "linspace",
        steps_offset: int = 0,
        mu: float | None = None,
        rho: float = 7.0,
    ) -> torch.Tensor:
        """Decreasing inference timesteps (float64), without the final clean point.

        VP integer spacings follow diffusers' multistep schedulers (DPM-Solver / UniPC / DEIS):
        ``linspace``, ``leading`` (+ ``steps_offset``) and ``trailing`` (Lin et al. 2024, Table 2).
        ``karras`` (Karras et al. 2022, eq. 5, rho = 7), ``exponential`` (uniform in log sigma)
        and ``uniform_logsnr`` (uniform in lambda, DPM-Solver's default) are fractional. Flow
        schedules follow FlowMatchEulerDiscreteScheduler (linspace in sigma, then the shift).
        """
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if self.kind == "flow":
            return self._flow_timesteps(n, spacing, mu, rho)
        N = self.num_train_timesteps
        if spacing == "linspace":
            t = np.linspace(0, N - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1] + steps_offset
        elif spacing == "trailing":
            t = np.arange(N, 0, -N / n).round() - 1
        elif spacing in ("karras", "exponential", "uniform_logsnr"):
            lam = self._lambda_spacing(n, spacing, self.lambda_(float(N - 1)), self.lambda_(0.0), rho)
            return self.timestep_from_lambda(lam)
        else:
            raise ValueError(f"timestep spacing {spacing!r} is not supported; use one of {list(VP_SPACINGS)}.")
        return torch.as_tensor(np.ascontiguousarray(t), dtype=torch.float64)

    @staticmethod
    def _lambda_spacing(n: int, spacing: str, lam_lo: torch.Tensor, lam_hi: torch.Tensor, rho: float) -> torch.Tensor:
        """n values of lambda from lam_lo (noisy end) to lam_hi, spaced in Euler sigma = exp(-lambda)."""
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        if spacing == "uniform_logsnr":
            return lam_lo + ramp * (lam_hi - lam_lo)
        s_max, s_min = torch.exp(-lam_lo), torch.exp(-lam_hi)
        if spacing == "exponential":
            return -(s_max.log() + ramp * (s_min.log() - s_max.log()))
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        return -torch.log(sigmas)

    def _flow_timesteps(self, n: int, spacing: str, mu: float | None, rho: float) -> torch.Tensor:
        if spacing not in FLOW_SPACINGS:
            raise ValueError(
                f"timestep spacing {spacing!r} is not supported for flow-matching schedules; "
                f"use one of {list(FLOW_SPACINGS)}."
            )
        N = self.num_train_timesteps
        train_sigmas = torch.arange(N, 0, -1, dtype=torch.float64) / N
        if not self.flow_shift.use_dynamic_shifting:  # FlowMatchEuler shifts its training sigmas too
            train_sigmas = self.flow_shift.apply(train_sigmas)
        sigmas = torch.linspace(float(train_sigmas[0]), float(train_sigmas[-1]), n, dtype=torch.float64)
        sigmas = self.flow_shift.apply(sigmas, mu)
        if spacing != "linspace":
            lo, hi = sigmas[0], sigmas[-1]
            lam = self._lambda_spacing(n, spacing, torch.log1p(-lo) - lo.log(), torch.log1p(-hi) - hi.log(), rho)
            sigmas = torch.sigmoid(-lam)
        return sigmas * N

    def flow_timesteps_from_sigmas(self, sigmas: TensorLike, mu: float | None = None) -> torch.Tensor:
        """Timesteps of user flow sigmas, shifted as FlowMatchEuler shifts custom sigmas (Flux)."""
        return self.flow_shift.apply(_as_float64(sigmas), mu) * self.num_train_timesteps

    # ---------------------------------------------------------------- conversions
    def to_x0_eps(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        alpha: torch.Tensor | float,
        sigma: torch.Tensor | float,
        prediction_type: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a model output of the given type at x_t = alpha * x0 + sigma * eps."""
        kind = canonical_prediction_type(prediction_type)
        a, s = broadcast_to(alpha, sample), broadcast_to(sigma, sample)
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - s * eps) / a
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a * x0) / s
        elif kind == "v_prediction":  # v = a eps - s x0  =>  x0 = (a x - s v)/(a^2+s^2), eps = (s x + a v)/(a^2+s^2)
            norm = a * a + s * s
            x0 = (a * sample - s * model_output) / norm
            eps = (s * sample + a * model_output) / norm
        else:  # u = eps - x0  =>  x = a x0 + s (x0 + u)
            x0 = (sample - s * model_output) / (a + s)
            eps = x0 + model_output
        return x0, eps

    def from_x0_eps(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        alpha: torch.Tensor | float,
        sigma: torch.Tensor | float,
        prediction_type: str,
    ) -> torch.Tensor:
        """Model output of the given type that corresponds to (x0, eps) at (alpha, sigma)."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            return broadcast_to(alpha, eps) * eps - broadcast_to(sigma, x0) * x0
        return eps - x0

    def convert(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timestep: TensorLike,
        from_type: str,
        to_type: str,
    ) -> torch.Tensor:
        """Convert a model output between parameterizations at the given timestep(s)."""
        alpha, sigma = self.alpha_sigma(timestep)
        x0, eps = self.to_x0_eps(model_output, sample, alpha, sigma, from_type)
        return self.from_x0_eps(x0, eps, alpha, sigma, to_type)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: TensorLike) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps (the forward process)."""
        alpha, sigma = self.alpha_sigma(timestep)
        return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, noise) * noise

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timestep: TensorLike, prediction_type: str
    ) -> torch.Tensor:
        """Regression target of a model with the given prediction type (eps, x0, v or velocity)."""
        alpha, sigma = self.alpha_sigma(timestep)
        return self.from_x0_eps(x0, noise, alpha, sigma, prediction_type)

    def __repr__(self) -> str:
        if self.kind == "flow":
            return f"NoiseSchedule(kind='flow', num_train_timesteps={self.num_train_timesteps}, {self.flow_shift})"
        return f"NoiseSchedule(kind='vp', num_train_timesteps={self.num_train_timesteps})"


# --------------------------------------------------------------------------------------------
# Stochastic (DDIM-eta / ancestral) steps
# --------------------------------------------------------------------------------------------


def stochastic_step_coefficients(
    alpha: float, sigma: float, alpha_next: float, sigma_next: float, eta: float = 1.0
) -> tuple[float, float, float]:
    """``(a, b, c)`` of the DDIM-eta step ``x' = a x + b eps_hat + c z`` with z ~ N(0, I).

    The step re-noises the data prediction x0_hat = (x - sigma eps_hat) / alpha as
    ``x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z`` (Song et al. 2021, eq. 12) with
    ``c = eta * sigma' * sqrt(1 - exp(-2h))`` and h = lambda' - lambda. For VP schedules eta = 1 is
    exactly the DDPM posterior (ancestral) step and its noise variance 2 sigma^2 h matches the
    diffusion coefficient of the reverse SDE to first order, which is what Feynman-Kac weights and
    the Ito density estimator assume; eta = 0 is DDIM (flow: Euler). The same formula holds for
    flow schedules (alpha = 1 - s, sigma = s). A clean end point (sigma' = 0) gives c = 0.
    """
    if sigma_next <= 0:
        stochastic_noise_std(alpha, sigma, alpha_next, sigma_next, eta)  # validates eta
        return 1.0 / alpha, -sigma / alpha, 0.0
    c = stochastic_noise_std(alpha, sigma, alpha_next, sigma_next, eta)
    return alpha_next / alpha, math.sqrt(sigma_next**2 - c**2) - alpha_next * sigma / alpha, c


def stochastic_noise_std(alpha: float, sigma: float, alpha_next: float, sigma_next: float, eta: float = 1.0) -> float:
    """Fresh-noise scale ``c = eta * sigma' * sqrt(1 - exp(-2h))`` of the DDIM-eta step (0 at a clean end).

    The step in (x0, eps) form is ``x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z``; unlike the
    ``(a, b, c)`` form of :func:`stochastic_step_coefficients` it also holds at alpha = 0 (flow, pure noise).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral / DDPM), got {eta}.")
    if sigma_next <= 0:
        return 0.0
    decay = (alpha * sigma_next / (alpha_next * sigma)) ** 2  # exp(-2h) = (alpha sigma' / (alpha' sigma))^2
    return min(eta * sigma_next * math.sqrt(max(0.0, 1.0 - decay)), sigma_next)
