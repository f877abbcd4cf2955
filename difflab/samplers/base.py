"""Shared machinery of difflab's diffusers-compatible schedulers.

:class:`DifflabScheduler` implements the diffusers scheduler contract once (config, named
``set_timesteps``, step index / begin index, history reset, ``add_noise`` / ``scale_noise``,
model-output conversion, ``generator=`` in ``step``, float32 math cast back to the input dtype).
A method subclass supplies only :meth:`DifflabScheduler.update`, the rule that maps the current
sample and the converted model output (and the history of earlier outputs) to the next sample,
written as ``x_next = c * x + d``: ``c`` a number, ``d`` the model-dependent increment.

Every scheduler works in the ``x_t = alpha_t x0 + sigma_t eps`` parameterization of its
:class:`~difflab.schedule.NoiseSchedule`, so ``init_noise_sigma = 1`` and ``scale_model_input``
is the identity: it runs in StableDiffusion / SDXL (epsilon, v), SD3 / Flux (flow matching) and
``DDPMPipeline``. ``DDIMPipeline`` cannot host any custom scheduler (it converts every scheduler
to ``DDIMScheduler``). Saved pipelines need ``import difflab`` before ``from_pretrained``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..schedule import (
    FINAL_SIGMAS_TYPES,
    FLOW_SPACINGS,
    VP_SPACINGS,
    NoiseSchedule,
    canonical_prediction_type,
)

# Config keys every difflab scheduler accepts, with diffusers' names and defaults. They cover the
# VP keys of DDPM/DDIM/Euler/DPM-Solver/UniPC configs and the flow keys of FlowMatchEuler configs.
COMMON_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_lu_lambdas": False,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
    "shift_terminal": None,
    # Levenberg-Marquardt-Langevin correction of the increment d (samplers/lml.py); None = off
    "lml_lambda": None,
    "lml_kappa": 0.0,
    "lml_scale_free": False,
}


def scheduler_config(init: Callable) -> Callable:
    """``register_to_config`` for a method's ``__init__(self, <method keys>, **common)``.

    The method lists only its own keys; this gives ``__init__`` the full explicit signature (method
    keys then :data:`COMMON_CONFIG`) that diffusers' ``from_config`` / ``save_pretrained`` read, so
    the common keys are written once, here, instead of in every scheduler file.
    """
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in own}
    common = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY if any(p.kind is p.KEYWORD_ONLY for p in own)
                          else inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
        for k, v in COMMON_CONFIG.items() if k not in names
    ]
    init.__signature__ = inspect.Signature(own + common)
    return register_to_config(init)


@dataclass
class SchedulerOutput(BaseOutput):
    """Output of ``step``: the next sample, then the model's current estimate of x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class StepState:
    """Everything a method's update rule sees at one step, in the compute dtype.

    ``alpha, sigma, lam`` are at the current timestep and ``alpha_next, sigma_next, lam_next`` at the
    one the step goes to (``sigma_next = 0`` and ``lam_next = inf`` at a clean final point).
    """

    index: int
    sample: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    model_output: torch.Tensor
    alpha: float
    sigma: float
    lam: float
    alpha_next: float
    sigma_next: float
    lam_next: float
    generator: torch.Generator | list[torch.Generator] | None = None
    noise: torch.Tensor | None = None  # pre-drawn noise of a stochastic step (``variance_noise=``)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample state to keep in the history


@dataclass
class HistoryEntry:
    """One past model evaluation: where it was taken (lambda) and what it predicted."""

    index: int
    lam: float
    x0: torch.Tensor
    eps: torch.Tensor
    sample: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def reindex(self, indices: torch.Tensor) -> None:
        self.x0, self.eps, self.sample = self.x0[indices], self.eps[indices], self.sample[indices]
        self.extra = {k: v[indices] for k, v in self.extra.items()}


class DifflabScheduler(SchedulerMixin, ConfigMixin):
    """Base class of difflab schedulers; subclasses implement :meth:`update`.

    A subclass with keys of its own decorates ``__init__(self, <own keys>, **common)`` with
    :func:`scheduler_config` and calls ``self._setup()`` (the decorated ``__init__`` of the base must not
    be called again: it would re-register the config). ``history_size`` is how many past evaluations
    the update rule needs.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    history_size = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make pipelines saved with ``cls`` loadable. ``save_pretrained`` names a component from outside diffusers
        by its module (``["difflab.samplers.momentum", "GHVBScheduler"]`` in model_index.json), and diffusers'
        loader then looks up ``SchedulerMixin`` in that module to learn how to load the class; so the module must
        hold that name (and be imported: ``import difflab`` imports every difflab scheduler module)."""
        super().__init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        if module is not None and not hasattr(module, "SchedulerMixin"):
            module.SchedulerMixin = SchedulerMixin

    @scheduler_config
    def __init__(self, **common: Any):
        self._setup()

    def _setup(self) -> None:
        """Validate the config and build the noise schedule (shared by every subclass ``__init__``)."""
        self.prediction_type = canonical_prediction_type(self.config.prediction_type)
        if self.config.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(
                f"final_sigmas_type {self.config.final_sigmas_type!r} is not supported; "
                f"use one of {list(FINAL_SIGMAS_TYPES)}."
            )
        self.noise_schedule = NoiseSchedule.from_config(dict(self.config))
        self.is_flow = self.noise_schedule.kind == "flow"  # prediction_type 'flow_prediction' selects it
        self.spacing = self._resolve_spacing()
        from .lml import check_lml_config  # lml.py builds on this module

        check_lml_config(self.config.lml_lambda, self.config.lml_kappa)
        self.init_noise_sigma = 1.0
        if not self.is_flow:
            self.alphas_cumprod = self.noise_schedule.alphas_cumprod.float()
            self.betas = 1.0 - torch.cat([self.alphas_cumprod[:1], self.alphas_cumprod[1:] / self.alphas_cumprod[:-1]])
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, self.config.num_train_timesteps)[::-1].copy())
        self.sigmas = torch.zeros(0)
        self._reset_state()

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``from_config``; a flow-matching config selects ``prediction_type='flow_prediction'``."""
        if config is not None and hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        config = dict(config or {})
        if "prediction_type" not in kwargs and NoiseSchedule.is_flow_config(config):
            kwargs["prediction_type"] = "flow_prediction"
            if config.get("use_flow_sigmas") and "shift" not in config:
                kwargs.setdefault("shift", config.get("flow_shift", 1.0))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _resolve_spacing(self) -> str:
        cfg = self.config
        flags = {"karras": cfg.use_karras_sigmas, "exponential": cfg.use_exponential_sigmas,
                 "uniform_logsnr": cfg.use_lu_lambdas}
        chosen = [name for name, on in flags.items() if on]
        if len(chosen) > 1:
            raise ValueError(f"Only one of use_karras_sigmas / use_exponential_sigmas / use_lu_lambdas may be True, got {chosen}.")
        spacing = chosen[0] if chosen else cfg.timestep_spacing
        valid = FLOW_SPACINGS if self.is_flow else VP_SPACINGS
        if self.is_flow and spacing in ("leading", "trailing"):
            spacing = "linspace"  # FlowMatchEuler ignores timestep_spacing; so do we
        if spacing not in valid:
            raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {list(valid)}.")
        return spacing

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.history: list[HistoryEntry] = []
        self._lml_previous: torch.Tensor | None = None
        self.nfe = 0

    @property
    def step_index(self) -> int | None:
        """Index of the current timestep; advances by one after every ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index, set by pipelines (img2img) with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def reindex(self, indices: torch.Tensor) -> None:
        """Reorder every piece of per-sample state (particle resampling)."""
        for entry in self.history:
            entry.reindex(indices)
        if self._lml_previous is not None:
            self._lml_previous = self._lml_previous[indices]

    def noise_levels(self, index: int) -> tuple[float, float, float, float, float, float]:
        """``(alpha, sigma, lambda)`` at step ``index`` and at the point it steps to (lambda = inf at a clean end)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps() before noise_levels().")
        here = (float(self._alphas[index]), float(self._sigmas[index]), float(self._lambdas[index]))
        nxt = (float(self._alphas[index + 1]), float(self._sigmas[index + 1]), float(self._lambdas[index + 1]))
        return here + nxt

    def output_to_eps(self, output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """Model output(s) of this scheduler's prediction type at step ``index`` -> eps (stacked outputs broadcast)."""
        alpha, sigma = self.noise_levels(index)[:2]
        return self.noise_schedule.to_x0_eps(output, sample, alpha, sigma, self.prediction_type)[1]

    def eps_to_output(self, eps: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        """An eps prediction at step ``index`` -> this scheduler's prediction type."""
        alpha, sigma = self.noise_levels(index)[:2]
        x0, eps = self.noise_schedule.to_x0_eps(eps, sample, alpha, sigma, "epsilon")
        return self.noise_schedule.from_x0_eps(x0, eps, alpha, sigma, self.prediction_type)

    # ------------------------------------------------------------------ timesteps
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose the inference timesteps and reset all solver state.

        Args:
            num_inference_steps: number of model evaluations (steps) of the sampler.
            device: where ``timesteps`` live (``sigmas`` stay on the CPU, as in diffusers).
            timesteps: custom decreasing diffusers timesteps (model-facing values).
            sigmas: custom decreasing sigmas in the diffusers convention of the config family:
                sigma_t / alpha_t for VP models, flow sigmas in [0, 1] (shifted like FlowMatchEuler).
            mu: dynamic-shift parameter of flow models (Flux); required when ``use_dynamic_shifting``.
        """
        ns = self.noise_schedule
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass only one of `timesteps` or `sigmas`.")
        if timesteps is None and sigmas is None and num_inference_steps is None:
            raise ValueError("Pass `num_inference_steps`, custom `timesteps` or custom `sigmas` to set_timesteps.")
        if self.is_flow and self.config.use_dynamic_shifting and mu is None and timesteps is None:
            raise ValueError("This scheduler uses dynamic shifting (use_dynamic_shifting=True): pass `mu` to set_timesteps.")
        if timesteps is not None:
            t = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
        elif sigmas is not None:
            s = np.asarray(sigmas, dtype=np.float64)
            s = s[:-1] if len(s) > 1 and s[-1] == 0 else s  # a trailing 0 is the clean end, added below
            t = ns.flow_timesteps_from_sigmas(s, mu) if self.is_flow else ns.timestep_from_sigma(s)
        else:
            t = ns.timesteps(num_inference_steps, self.spacing, self.config.steps_offset, mu)
        self._check_decreasing(t)
        self._set_grid(t, device)

    @staticmethod
    def _check_decreasing(t: torch.Tensor) -> None:
        if t.ndim != 1 or len(t) == 0:
            raise ValueError("timesteps must be a non-empty 1-D sequence.")
        if len(t) > 1 and not bool((t[1:] < t[:-1]).all()):
            bad = int((t[1:] >= t[:-1]).nonzero()[0])
            raise ValueError(
                f"timesteps must be strictly decreasing, but entry {bad + 1} ({float(t[bad + 1])}) follows "
                f"{float(t[bad])} ({len(t)} timesteps). Integer spacings repeat timesteps when num_inference_steps "
                "approaches num_train_timesteps: use fewer steps or timestep_spacing='uniform_logsnr'."
            )

    def _set_grid(self, t: torch.Tensor, device: str | torch.device | None) -> None:
        """Store the timesteps and the (alpha, sigma, lambda) grid, with the final point appended."""
        ns = self.noise_schedule
        integer = bool((t == t.round()).all()) and not self.is_flow
        model_t = t.long() if integer else t.float()
        t = model_t.double()  # the solver uses exactly the timesteps the model is evaluated at
        alpha, sigma = ns.alpha_sigma(t)
        lam = ns.lambda_(t)
        if self.config.final_sigmas_type == "sigma_min" and not self.is_flow:
            a_end, s_end = ns.alpha_sigma(0.0)
            l_end = ns.lambda_(0.0)
        else:
            a_end, s_end, l_end = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)
        self._alphas = torch.cat([alpha, a_end.reshape(1)])
        self._sigmas = torch.cat([sigma, s_end.reshape(1)])
        self._lambdas = torch.cat([lam, l_end.reshape(1)])
        self.timesteps = model_t.to(device)
        public = self._sigmas / self._alphas if not self.is_flow else self._sigmas
        self.sigmas = public.float()  # diffusers convention, length N+1, kept on CPU
        self.num_inference_steps = len(t)
        self._reset_state()

    # ------------------------------------------------------------------ step index
    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it appears twice, as in diffusers)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0].cpu()
        matches = (schedule_timesteps.cpu().double() - value).abs() < 1e-4
        indices = matches.nonzero().flatten()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {float(value)} is not one of this scheduler's timesteps {self.timesteps.tolist()}; "
                "pass the values of `scheduler.timesteps` to step()."
            )
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # ------------------------------------------------------------------ diffusers API
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: difflab schedulers keep samples in the model's own x_t scaling."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance the sample by one step of the method's update rule.

        ``variance_noise`` (as in diffusers' DDIM / DDPM schedulers) is the standard normal noise
        of a stochastic step; without it a stochastic scheduler draws it with ``generator``.
        """
        if self.num_inference_steps is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called before set_timesteps(); call "
                "scheduler.set_timesteps(num_inference_steps) first (pipelines do this for you)."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise RuntimeError(f"All {self.num_inference_steps} steps have been taken; call set_timesteps() again.")
        state = self._make_state(model_output, sample, i, generator)
        state.noise = variance_noise
        coef, increment = self.update(state)
        if self.config.lml_lambda is not None:
            increment = self._apply_lml(increment)
        prev = coef * state.sample + increment
        self.history.append(self._history_entry(state))
        del self.history[: max(0, len(self.history) - self.history_size)]
        self._step_index += 1
        self.nfe += 1
        prev, x0 = prev.to(sample.dtype), state.x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _make_state(self, model_output: torch.Tensor, sample: torch.Tensor, i: int, generator: Any) -> StepState:
        if not torch.isfinite(model_output).all():
            raise FloatingPointError(
                f"The model output at step index {i} (timestep {float(self.timesteps[i])}) contains NaN or inf; "
                "check the model, its dtype (try float32) and the guidance scale."
            )
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x, out = sample.to(dtype), model_output.to(dtype)
        alpha, sigma = float(self._alphas[i]), float(self._sigmas[i])
        x0, eps = self.noise_schedule.to_x0_eps(out, x, alpha, sigma, self.prediction_type)
        return StepState(
            index=i, sample=x, x0=x0, eps=eps, model_output=out,
            alpha=alpha, sigma=sigma, lam=float(self._lambdas[i]),
            alpha_next=float(self._alphas[i + 1]), sigma_next=float(self._sigmas[i + 1]),
            lam_next=float(self._lambdas[i + 1]), generator=generator,
        )

    def _apply_lml(self, increment: torch.Tensor) -> torch.Tensor:
        """LML-correct the increment (no extra model call); remembers the raw one for the next step."""
        from .lml import lml_correct

        cfg = self.config
        corrected = lml_correct(increment, self._lml_previous, cfg.lml_lambda, cfg.lml_kappa, cfg.lml_scale_free)
        self._lml_previous = increment
        return corrected

    def _history_entry(self, state: StepState) -> HistoryEntry:
        return HistoryEntry(index=state.index, lam=state.lam, x0=state.x0, eps=state.eps, sample=state.sample,
                            extra=dict(state.extra))

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        """The method's update rule ``x_next = c * state.sample + d``; returns ``(c, d)``.

        ``self.history`` holds earlier evaluations (oldest first). A method may replace
        ``state.sample`` (a corrector does) and put per-sample tensors in ``state.extra``; both are
        stored in the history entry of this step.
        """
        raise NotImplementedError

    @property
    def is_last_step(self) -> bool:
        return self._step_index is not None and self._step_index == self.num_inference_steps - 1

    # ------------------------------------------------------------------ forward process
    def _timesteps_for(self, timesteps: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps).reshape(-1).to("cpu")
        return t.expand(like.shape[0]) if t.numel() == 1 else t

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = alpha_t x0 + sigma_t eps at per-sample timesteps."""
        t = self._timesteps_for(timesteps, original_samples)
        return self.noise_schedule.add_noise(original_samples, noise, t).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """Flow-matching name of the forward process (SD3 / Flux img2img): (1 - s) x0 + s eps."""
        return self.add_noise(sample, noise, timestep)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v-prediction target alpha_t eps - sigma_t x0 (training scripts)."""
        t = self._timesteps_for(timesteps, sample)
        return self.noise_schedule.training_target(sample, noise, t, "v_prediction").to(sample.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
