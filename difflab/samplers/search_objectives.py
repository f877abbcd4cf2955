"""Objectives for the S^3 search (:mod:`difflab.samplers.search`) on difflab's models.

* :func:`gmm_objective`: the Gaussian-mixture test bed; RMSE against the exact probability-flow
  ODE solution from the same starting noise.
* :func:`unet_objective`: a built-in digits model or a diffusers pipeline directory: an unconditional
  UNet (DDPM), or a text pipeline (Stable Diffusion 1.x / 2.x / XL / 3, Flux) behind the prompt tables of
  :mod:`difflab.models.conditioning`, whose prompts are given and cycled over the starting noises); RMSE against a
  250-step DPM-Solver++ 3M solution from the same noise (``metric="rmse"``; in latent space for
  latent pipelines), or FD-digits of the samples (``metric="fd"``, digits models only).

Each objective has a ``search`` and a ``heldout`` split of starting noise drawn from different
seeds; the search only sees ``search``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models.gmm import GaussianMixture, GMMDenoiser, probability_flow_ode
from ..schedule import NoiseSchedule
from .search import ReferenceObjective, SearchSpace, drive
from .usf import USFScheduler

GMM_SETTINGS = {
    "vp-scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "vp-linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "flow": dict(shift=1.0),
}
REFERENCE_STEPS = 250


def gmm_scheduler_config(setting: str) -> dict:
    """A diffusers config of a Gaussian-mixture setting (DDPM betas or FlowMatchEuler)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if setting not in GMM_SETTINGS:
        raise ValueError(f"unknown mixture setting {setting!r}; use one of {list(GMM_SETTINGS)}.")
    if setting == "flow":
        return dict(FlowMatchEulerDiscreteScheduler(**GMM_SETTINGS[setting]).config)
    return dict(DDPMScheduler(**GMM_SETTINGS[setting]).config)


def _noise_splits(shape: tuple[int, ...], num_samples: int, heldout_samples: int, seed: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "search": torch.randn(num_samples, *shape, generator=torch.Generator().manual_seed(10_000 + seed), dtype=dtype),
        "heldout": torch.randn(heldout_samples, *shape, generator=torch.Generator().manual_seed(20_000 + seed), dtype=dtype),
    }


def gmm_objective(setting: str = "vp-scaled_linear", dim: int = 16, num_samples: int = 512,
                  heldout_samples: int = 1000, mixture_seed: int = 0, seed: int = 0) -> tuple[ReferenceObjective, NoiseSchedule]:
    """RMSE to the exact ODE solution on the 8-component mixture of ``dim`` dimensions."""
    config = gmm_scheduler_config(setting)
    schedule = NoiseSchedule.from_config(config)
    mixture = GaussianMixture.random(dim, n_components=8, seed=mixture_seed)
    model = GMMDenoiser(mixture, schedule, "flow_prediction" if schedule.kind == "flow" else "epsilon")
    noise = _noise_splits((dim,), num_samples, heldout_samples, seed, torch.float64)

    def sample(scheduler: Any, split: str, num_inference_steps: int | None) -> torch.Tensor:
        return drive(scheduler, lambda x, t: model(x, t).sample, noise[split], num_inference_steps)

    def reference(split: str) -> torch.Tensor:
        return probability_flow_ode(mixture, schedule, noise[split], schedule.t_max)

    return ReferenceObjective(sample, config, reference), schedule


def unet_denoiser(net: torch.nn.Module, labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  null_label: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> model output`` of a denoiser, class-conditional (and classifier-free guided) if labels are given;
    a text pipeline's denoiser behind prompt tables takes prompt indices as labels."""
    from ..models.digits import guided_unet_output

    dtype = next(net.parameters()).dtype

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.to(dtype), torch.as_tensor(t, device=x.device).expand(len(x))  # transformers need a timestep per row
        if labels is None:
            return net(x, t).sample
        return guided_unet_output(net, x, t, labels, guidance_scale, null_label)

    return denoise


class FDObjective(ReferenceObjective):
    """FD-digits of a schedule's samples (class-conditional digits models); no reference needed."""

    def __init__(self, sample: Callable, scheduler_config: dict, labels: dict[str, torch.Tensor]):
        super().__init__(sample, scheduler_config, reference=lambda split: torch.empty(0))
        self.labels = labels

    def score_samples(self, x: torch.Tensor, split: str) -> float:
        from ..eval.digits import evaluate_digits

        if not torch.isfinite(x).all():
            return float("inf")
        return float(evaluate_digits(x.float().clamp(-1, 1), self.labels[split]).fd_digits)


def unet_objective(model: str, metric: str = "rmse", num_samples: int = 256, heldout_samples: int = 500,
                   guidance_scale: float = 1.0, seed: int = 0, prompts: list[str] | None = None,
                   resolution: int | None = None) -> tuple[ReferenceObjective, NoiseSchedule]:
    """Objective for a built-in digits model or a local pipeline directory: unconditional or class-conditional
    UNets, and text pipelines (Stable Diffusion 1.x / 2.x / XL / 3, Flux; SDXL and Flux at ``resolution`` pixels)
    with ``prompts``, which the starting noises take in turn."""
    from ..models import load
    from ..models.conditioning import (
        ModelSpace,
        checked_resolution,
        flux_rollout_scheduler_config,
        is_flux_pipeline,
        is_text_conditioned,
        prompt_conditioned,
    )
    from ..models.digits import DigitsPipeline

    pipe = load(model)
    conditional = isinstance(pipe, DigitsPipeline)
    text = not conditional and is_text_conditioned(pipe, str(model))
    if metric == "fd" and not conditional:
        raise ValueError("metric 'fd' (FD-digits) needs a class-conditional digits model; use metric 'rmse'.")
    if prompts and not text:
        raise ValueError(f"{model} is not text-conditioned: it takes no --prompts.")
    if text and not prompts:
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass the prompts to search with (--prompts).")
    if conditional and resolution is not None:
        raise ValueError("--resolution applies to SDXL and Flux pipelines; the digits models are 16x16.")
    space = ModelSpace(pipe, checked_resolution(pipe, resolution, str(model)))
    config = dict(pipe.scheduler.config)
    if is_flux_pipeline(pipe):
        config = flux_rollout_scheduler_config(pipe, space.resolution)
    schedule = NoiseSchedule.from_config(config)
    noise = _noise_splits(space.sample_shape, num_samples, heldout_samples, seed, torch.float32)
    net, null, labels = None, None, None
    if conditional:
        net = pipe.unet.eval()
        null = net.config.num_class_embeds - 1
        labels = {split: torch.arange(len(z)) % 10 for split, z in noise.items()}
    elif text:
        net = prompt_conditioned(pipe, list(prompts), space.resolution).eval()
        null = net.null_label
        labels = {split: torch.arange(len(z)) % len(prompts) for split, z in noise.items()}
    elif guidance_scale != 1.0:
        raise ValueError(f"{model} is unconditional: classifier-free guidance needs a conditional model; leave "
                         "--guidance-scale at 1.")
    else:
        net = pipe.unet.eval()

    def sample(scheduler: Any, split: str, num_inference_steps: int | None) -> torch.Tensor:
        denoise = unet_denoiser(net, None if labels is None else labels[split], guidance_scale, null)
        return drive(scheduler, denoise, noise[split], num_inference_steps)

    if metric == "fd":
        return FDObjective(sample, config, labels), schedule
    if metric != "rmse":
        raise ValueError(f"metric must be 'rmse' or 'fd', got {metric!r}.")

    def reference(split: str) -> torch.Tensor:
        return sample(USFScheduler.from_config(config, decisions="dpm++3m"), split, REFERENCE_STEPS)

    return ReferenceObjective(sample, config, reference), schedule


def build_objective(model: str, metric: str, nfe: int, *, setting: str = "vp-scaled_linear", dim: int = 16,
                    num_samples: int | None = None, heldout_samples: int | None = None, guidance_scale: float = 1.0,
                    seed: int = 0, prompts: list[str] | None = None,
                    resolution: int | None = None) -> tuple[ReferenceObjective, SearchSpace]:
    """The objective and search space of ``difflab search`` for a model name (``gmm``, a digits model, a directory)."""
    if model == "gmm":
        if prompts or resolution is not None:
            raise ValueError("the Gaussian-mixture model takes no --prompts or --resolution.")
        if metric != "rmse":
            raise ValueError("the Gaussian-mixture model supports metric 'rmse' only (distance to the exact ODE solution).")
        objective, schedule = gmm_objective(setting, dim, num_samples or 512, heldout_samples or 1000, seed=seed)
    else:
        objective, schedule = unet_objective(model, metric, num_samples or (500 if metric == "fd" else 256),
                                             heldout_samples or 500, guidance_scale, seed, prompts, resolution)
    return objective, SearchSpace(schedule, nfe)
