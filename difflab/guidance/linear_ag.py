"""LinearAG (Castillo et al., AAAI 2025, arXiv 2312.12487): unconditional evaluations replaced by an
affine combination of past predictions whose coefficients are fitted offline by least squares.

A plan over the T steps of one (model, scheduler, T) combination:

* ``uncond_steps``: steps with a real unconditional evaluation (plain CFG there);
* surrogate steps (the others before ``cond_only_from``): per step k, with j the last real step,

      eps_u(k) ~ a_k eps_c(k) + b_k eps_c(j) + c_k eps_u(j) + d_k                    (scalars a..d)

  (a = 1, b = -1, c = 1, d = 0 is "reuse the stale difference eps_c - eps_u"); the regressors are
  all real network outputs, so errors do not chain from one surrogate step to the next;
* from ``cond_only_from`` on: the conditional prediction alone (the tail Adaptive Guidance finds).

The exact regressors of the paper are not spelled out in our notes; this choice is ours and named
as such. :func:`fit_linear_ag` records CFG trajectories (with the unconditional branch at every
step), fits the coefficients and stores them with the model, scheduler and step count; applying
them to another combination raises an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..schedule import broadcast_to
from .base import Guider

SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                 "timestep_spacing", "steps_offset", "shift", "use_karras_sigmas")


def model_fingerprint(pipe: Any) -> str:
    """A short hash of the denoiser's config and weights (first and last parameter tensors)."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    digest = hashlib.sha256(json.dumps(dict(denoiser.config), sort_keys=True, default=str).encode())
    params = list(denoiser.parameters())
    for p in (params[0], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def scheduler_signature(scheduler: Any) -> dict:
    return {"class": type(scheduler).__name__, **{k: scheduler.config.get(k) for k in SCHEDULE_KEYS if k in scheduler.config}}


@dataclass
class LinearAGFit:
    """Fitted LinearAG plan and coefficients, bound to the (model, scheduler, steps) they were fitted on."""

    model: str
    scheduler: dict
    num_inference_steps: int
    guidance_scale: float
    uncond_steps: list[int]
    cond_only_from: int
    coefficients: dict[int, list[float]] = field(default_factory=dict)
    residual: dict[int, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearAGFit:
        data = json.loads(Path(path).read_text())
        data["coefficients"] = {int(k): v for k, v in data["coefficients"].items()}
        data["residual"] = {int(k): v for k, v in data.get("residual", {}).items()}
        return cls(**data)

    def check(self, pipe: Any) -> None:
        """Raise if ``pipe`` (its model, scheduler or step count) is not what the fit belongs to."""
        problems = []
        if model_fingerprint(pipe) != self.model:
            problems.append(f"model fingerprint {model_fingerprint(pipe)} != {self.model}")
        if scheduler_signature(pipe.scheduler) != self.scheduler:
            problems.append(f"scheduler {scheduler_signature(pipe.scheduler)} != {self.scheduler}")
        steps = len(pipe.scheduler.timesteps)
        if steps != self.num_inference_steps:
            problems.append(f"{steps} steps != {self.num_inference_steps}")
        if problems:
            raise ValueError("These LinearAG coefficients were fitted for another combination: " + "; ".join(problems)
                             + ". Fit new ones with `difflab guidance fit-linear-ag` for this model, scheduler and step count.")


def default_plan(num_inference_steps: int) -> tuple[list[int], int]:
    """Real unconditional calls in the first 20% of steps, surrogates up to half-way, then conditional only."""
    n_real = max(1, round(0.2 * num_inference_steps))
    return list(range(n_real)), max(n_real, num_inference_steps // 2)


class LinearAG(Guider):
    """Guidance with real unconditional calls only at ``fit.uncond_steps`` (see the module docstring)."""

    def __init__(self, fit: LinearAGFit | str | Path, guidance_scale: float | None = None):
        self.fit = fit if isinstance(fit, LinearAGFit) else LinearAGFit.load(fit)
        self.guidance_scale = self.fit.guidance_scale if guidance_scale is None else guidance_scale
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.last_real: tuple[torch.Tensor, torch.Tensor] | None = None

    def reindex(self, indices: torch.Tensor) -> None:
        if self.last_real is not None:
            self.last_real = (self.last_real[0][indices], self.last_real[1][indices])

    def check_pipeline(self, pipe: Any) -> None:
        self.fit.check(pipe)

    def uncond_rows_needed(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.step in self.fit.uncond_steps, dtype=torch.bool)

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        k = self.step
        self.step += 1
        alpha, sigma = schedule.alpha_sigma(timestep)
        if k >= self.fit.cond_only_from:
            return cond
        x0_c, eps_c = schedule.to_x0_eps(cond.double(), sample.double(), alpha, sigma, prediction_type)
        if k in self.fit.uncond_steps:
            _, eps_u = schedule.to_x0_eps(uncond.double(), sample.double(), alpha, sigma, prediction_type)
            self.last_real = (eps_c, eps_u)
        else:
            if self.last_real is None or k not in self.fit.coefficients:
                raise RuntimeError(f"LinearAG has no surrogate for step {k}: the plan needs a real step before it.")
            a, b, c, d = self.fit.coefficients[k]
            eps_u = a * eps_c + b * self.last_real[0] + c * self.last_real[1] + d
        eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        x0 = (sample.double() - broadcast_to(sigma, eps) * eps) / broadcast_to(alpha, eps)
        return schedule.from_x0_eps(x0, eps, alpha, sigma, prediction_type).to(cond.dtype)


class _Recorder(Guider):
    """CFG that keeps every step's eps_c and eps_u (for fitting)."""

    def __init__(self, guidance_scale: float):
        self.guidance_scale = guidance_scale
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        alpha, sigma = schedule.alpha_sigma(timestep)
        _, eps_c = schedule.to_x0_eps(cond.double(), sample.double(), alpha, sigma, prediction_type)
        _, eps_u = schedule.to_x0_eps(uncond.double(), sample.double(), alpha, sigma, prediction_type)
        self.records.append((eps_c.cpu(), eps_u.cpu()))
        return uncond + self.guidance_scale * (cond - uncond)


def fit_linear_ag(
    pipe: Any,
    call_kwargs: dict,
    num_inference_steps: int,
    guidance_scale: float,
    uncond_steps: list[int] | None = None,
    cond_only_from: int | None = None,
) -> LinearAGFit:
    """Record CFG trajectories of ``pipe(**call_kwargs)`` and fit the surrogate coefficients by least squares."""
    from .adapters import attach, detach

    default_real, default_cut = default_plan(num_inference_steps)
    uncond_steps = default_real if uncond_steps is None else sorted(uncond_steps)
    cond_only_from = default_cut if cond_only_from is None else cond_only_from
    if not uncond_steps or uncond_steps[0] != 0:
        raise ValueError("uncond_steps must start with step 0 (the first surrogate needs a real step before it).")
    recorder = _Recorder(guidance_scale)
    attach(pipe, recorder)
    try:
        pipe(**call_kwargs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    finally:
        detach(pipe)
    fit = LinearAGFit(model_fingerprint(pipe), scheduler_signature(pipe.scheduler), num_inference_steps, guidance_scale,
                      uncond_steps, cond_only_from)
    for k in range(cond_only_from):
        if k in uncond_steps:
            continue
        j = max(u for u in uncond_steps if u < k)
        (eps_c, eps_u), (eps_cj, eps_uj) = recorder.records[k], recorder.records[j]
        design = torch.stack([eps_c.flatten(), eps_cj.flatten(), eps_uj.flatten(), torch.ones(eps_c.numel(), dtype=eps_c.dtype)], 1)
        solution = torch.linalg.lstsq(design, eps_u.flatten()[:, None]).solution.flatten()
        fit.coefficients[k] = solution.tolist()
        fit.residual[k] = float((design @ solution - eps_u.flatten()).pow(2).mean() / eps_u.flatten().pow(2).mean())
    return fit
