"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416), paper-exact.

In denoiser (x0) space, with D_c, D_u the conditional and unconditional data predictions
(paper Algorithm 1):

    dD  = D_c - D_u
    M  <- dD + beta * M,  dD <- M              reverse momentum, beta < 0 (M = 0 before step 1)
    dD <- dD * min(1, r / ||dD||)               clip to a ball of radius r (per sample)
    dD_par = <dD, D_c> / ||D_c||^2 * D_c,  dD_perp = dD - dD_par      (float64)
    D   = D_c + (w - 1) * (dD_perp + eta * dD_par)

and the guided x0 is converted back to the scheduler's prediction type through the noise schedule
(eps = (x - alpha D) / sigma). diffusers' ``AdaptiveProjectedGuidance`` differs: it works on the raw
noise / velocity prediction and its default formula is u + w * update.

``resolution_independent_radius=True`` scales r by sqrt(N / N_ref) with N the number of elements
per sample (N_ref = 4 * 128 * 128, an SDXL latent): a deviation from the paper, named as such.
"""

from __future__ import annotations

import math

import torch

from ..schedule import broadcast_to
from .base import Guider, per_sample_norm

SDXL_LATENT_ELEMENTS = 4 * 128 * 128


class APG(Guider):
    """APG with reverse momentum ``momentum`` (beta < 0), radius ``norm_threshold`` and parallel weight ``eta``."""

    def __init__(
        self,
        guidance_scale: float = 7.5,
        momentum: float = -0.5,
        norm_threshold: float = 15.0,
        eta: float = 0.0,
        resolution_independent_radius: bool = False,
    ):
        if momentum > 0:
            raise ValueError(f"APG uses reverse momentum: momentum must be <= 0, got {momentum}.")
        if norm_threshold <= 0:
            raise ValueError(f"norm_threshold must be > 0 (use math.inf to disable the clip), got {norm_threshold}.")
        self.guidance_scale = guidance_scale
        self.momentum = momentum
        self.norm_threshold = norm_threshold
        self.eta = eta
        self.resolution_independent_radius = resolution_independent_radius
        self.running: torch.Tensor | None = None

    def reset(self) -> None:
        self.running = None

    def reindex(self, indices: torch.Tensor) -> None:
        if self.running is not None:
            self.running = self.running[indices]

    def radius(self, like: torch.Tensor) -> float:
        if not self.resolution_independent_radius:
            return self.norm_threshold
        return self.norm_threshold * math.sqrt(like[0].numel() / SDXL_LATENT_ELEMENTS)

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        alpha, sigma = schedule.alpha_sigma(timestep)
        d_cond, _ = schedule.to_x0_eps(cond.double(), sample.double(), alpha, sigma, prediction_type)
        d_uncond, _ = schedule.to_x0_eps(uncond.double(), sample.double(), alpha, sigma, prediction_type)
        diff = d_cond - d_uncond
        if self.running is not None and self.running.shape == diff.shape:
            diff = diff + self.momentum * self.running
        self.running = diff
        norm = per_sample_norm(diff)
        diff = diff * torch.clamp(self.radius(diff) / norm.clamp_min(1e-30), max=1.0)
        cond_norm2 = per_sample_norm(d_cond).pow(2).clamp_min(1e-30)
        parallel = (diff * d_cond).flatten(1).sum(1).reshape(norm.shape) / cond_norm2 * d_cond
        guided_x0 = d_cond + (self.guidance_scale - 1) * (diff - parallel + self.eta * parallel)
        eps = (sample.double() - broadcast_to(alpha, guided_x0) * guided_x0) / broadcast_to(sigma, guided_x0)
        return schedule.from_x0_eps(guided_x0, eps, alpha, sigma, prediction_type).to(cond.dtype)

    def __repr__(self) -> str:
        return (f"APG(guidance_scale={self.guidance_scale}, momentum={self.momentum}, "
                f"norm_threshold={self.norm_threshold}, eta={self.eta})")

