"""Distribution-matching engine shared by the one-step distillation methods (DMD2, f-distill, ...).

Every distribution-matching step has the same pieces (research/distill_eval.md, section 5):

* a one-step generator ``x0 = G(z)``, noised to ``x_t = alpha_t x0 + sigma_t eps``;
* a frozen teacher denoiser and a trainable *fake score* denoiser fitted to the generator's samples
  by denoising score matching (DSM), both seen through :class:`ScoreModel`, which returns the
  model output and, optionally, features for a discriminator head;
* the generator update along the score difference, written as a pseudo-target MSE
  ``0.5 ||x0 - sg(x0 - g)||^2`` with ``g = w * (x0_fake - x0_teacher)`` and the DMD per-sample
  normalizer ``w = 1 / mean|x0 - x0_teacher|`` (Yin et al. 2024, DMD eq. 8; since
  ``grad log p_t - grad log q_t = alpha_t / sigma_t^2 (x0_teacher - x0_fake)``, descending on the
  pseudo target moves x0 along the score difference);
* a GAN discriminator head with the non-saturating logistic loss (DMD2, Yin et al. 2024b).

A method only adds a per-sample weight on ``g`` (f-distill: h(r), :mod:`difflab.distill.fdistill`).
All noise-schedule math comes from :class:`~difflab.schedule.NoiseSchedule`. Reductions that must be
global across processes (f-distill's normalizations) go through :func:`global_sum`, which uses
accelerate's ``reduce`` when several processes run and is the identity in a single plain process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import NoiseSchedule, canonical_prediction_type

FeatureFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (module, x_t, t, **cond) -> (output, features)


# --------------------------------------------------------------------------------------------
# Randomness and processes
# --------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """CPU generator of all random draws of one process at one training iteration.

    Draws depend only on ``(seed, step, rank)``, so a resumed run repeats the uninterrupted one.
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1024 + rank) % (2**63 - 1))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes; ``x`` itself in a single plain process.

    Under ``accelerate launch`` this is accelerate's ``reduce``; when only ``torch.distributed`` was
    initialized (accelerate's state reports a single process) it is a plain ``all_reduce``. The sum is
    taken on the device the process group's backend needs (NCCL: the process's GPU) and returned on
    ``x``'s device, so callers may reduce CPU statistics on GPU runs.
    """
    if not _distributed():
        return x
    from accelerate import PartialState
    from accelerate.utils import reduce

    device = _reduction_device()
    if PartialState().num_processes > 1:
        return reduce(x.to(device), reduction="sum").to(x.device)
    out = x.to(device, copy=True)
    torch.distributed.all_reduce(out)
    return out.to(x.device)


def _reduction_device() -> torch.device:
    """Where the process group reduces: this process's GPU for NCCL, the CPU otherwise (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of all entries of ``x`` over all processes (each process may hold a different count)."""
    stats = global_sum(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return stats[0] / stats[1].clamp(min=1.0)


@contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Turn off ``requires_grad`` of the modules' parameters inside the block (two-time-scale updates)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# Denoisers as the engine sees them
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Gradient steps, with float16 loss scaling when a scaler is given
# --------------------------------------------------------------------------------------------


def backward(loss: torch.Tensor, scaler: Any = None) -> None:
    """``loss.backward()``; with a loss scaler (``torch.amp.GradScaler``, which accelerate makes for
    ``mixed_precision="fp16"`` on a GPU) the scaled loss, so that small float16 gradients do not underflow."""
    (loss if scaler is None else scaler.scale(loss)).backward()


def clip_gradients(module: nn.Module, max_norm: float) -> float:
    """The norm of ``module``'s gradients (parameters without one are left out), clipped to ``max_norm`` when it is
    positive; 0 when no parameter has a gradient."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def clip_and_step(pairs: list[tuple[nn.Module, torch.optim.Optimizer]], max_norm: float,
                  scaler: Any = None) -> list[float]:
    """Clip each module's gradient norm to ``max_norm`` (0: no clipping) and step its optimizer; returns the norms.

    With a loss scaler the gradients are unscaled first, a step whose gradients overflowed is skipped (its norm
    is not finite), and the scale is updated once after all the steps, as accelerate does for float16.
    """
    if scaler is not None:
        for _, optimizer in pairs:
            scaler.unscale_(optimizer)
    norms = [clip_gradients(module, max_norm) for module, _ in pairs]
    for _, optimizer in pairs:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    if scaler is not None:
        scaler.update()
    return norms



@dataclass
class ScoreModel:
    """A denoiser (teacher or fake score) seen by the engine: ``(x_t, t) -> (output, features)``.

    ``module`` is anything called like a diffusers UNet (``module(x_t, t).sample``): a
    :class:`~difflab.models.gmm.GMMDenoiser`, an :class:`~difflab.distill.nets.MLPDenoiser`, a
    ``UNet2DModel``. ``class_labels`` (when not None) are passed on as the UNet keyword. Features
    for a discriminator head come from modules that take ``return_features=True``
    (``supports_features``), or from ``feature_fn(module, x_t, t, **cond) -> (output, features)``,
    the hook a UNet plugs in (:func:`difflab.distill.digits.unet_mid_features`: mid-block activations).
    """

    module: nn.Module
    prediction_type: str
    feature_fn: FeatureFn | None = None

    def __post_init__(self) -> None:
        self.prediction_type = canonical_prediction_type(self.prediction_type)

    @property
    def has_features(self) -> bool:
        return self.feature_fn is not None or getattr(self.module, "supports_features", False)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, with_features: bool = False,
                 class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = {} if class_labels is None else {"class_labels": class_labels}
        if not with_features:
            return self.module(x_t, t, **cond).sample, None
        if self.feature_fn is not None:
            return self.feature_fn(self.module, x_t, t, **cond)
        if not getattr(self.module, "supports_features", False):
            raise ValueError(f"{type(self.module).__name__} gives no features for a discriminator head; pass "
                             "feature_fn=(module, x_t, t) -> (output, features) to ScoreModel, or put the head on "
                             "a network that has features.")
        out = self.module(x_t, t, return_features=True, **cond)
        return out.sample, out.features

    def x0(self, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, with_features: bool = False,
           class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Data prediction x0_hat(x_t, t) (via NoiseSchedule.to_x0_eps) and the features if asked for."""
        out, feats = self(x_t, t, with_features, class_labels)
        alpha, sigma = schedule.alpha_sigma(t)
        x0, _ = schedule.to_x0_eps(out.float(), x_t.float(), alpha, sigma, self.prediction_type)
        return x0, feats


# --------------------------------------------------------------------------------------------
# Noising and the losses
# --------------------------------------------------------------------------------------------


def sample_timesteps(n: int, t_range: tuple[float, float], generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """n continuous diffusers timesteps, uniform on ``t_range`` (DMD2: 2% to 98% of the schedule)."""
    lo, hi = t_range
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)


def noised(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, eps) with x_t = alpha_t x0 + sigma_t eps; differentiable in x0."""
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    return schedule.add_noise(x0, eps, t), eps


def dsm_loss(fake: ScoreModel, schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor,
             t: torch.Tensor, with_features: bool = False,
             class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Denoising score matching of the fake score on generator samples, in its own prediction type.

    The target (eps, x0, v or velocity) comes from :meth:`NoiseSchedule.training_target`.
    """
    target = schedule.training_target(x0, eps, t, fake.prediction_type)
    out, feats = fake(x_t, t, with_features, class_labels)
    return F.mse_loss(out.float(), target.float()), feats


@torch.no_grad()
def dmd_normalizer(x0: torch.Tensor, x0_teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DMD's per-sample weight w = 1 / (mean over dimensions of |x0 - x0_teacher| + eps), shape (B,)."""
    return 1.0 / ((x0.float() - x0_teacher.float()).abs().reshape(len(x0), -1).mean(1) + eps)


@torch.no_grad()
def score_difference_target(x0: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """g = w * weight * (x0_fake - x0_teacher) in fp32: the per-sample gradient of the generator loss."""
    scale = dmd_normalizer(x0, x0_teacher)
    if weight is not None:
        scale = scale * weight.float()
    return scale.reshape(-1, *([1] * (x0.ndim - 1))) * (x0_fake.float() - x0_teacher.float())


def pseudo_target_loss(x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE(x0, sg(x0 - g)): its gradient with respect to x0 is g / x0.numel()."""
    target = (x0.detach().float() - g).detach()
    return 0.5 * F.mse_loss(x0.float(), target)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss mean softplus(-D(x_t^fake))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss softplus(D(fake)) + softplus(-D(real)); real is labelled positive,
    so at the optimum D = log p_data,t / q_t (the ratio f-distill needs)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied), with a state dict."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.model.load_state_dict(state["model"])
