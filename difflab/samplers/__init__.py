"""diffusers-compatible schedulers and particle samplers.

``SCHEDULERS`` maps a short name to every difflab scheduler class; the conformance suite and the
benchmarks iterate over it, so a scheduler registered here is tested and benchmarked everywhere.
"""

from ..schedule import NoiseSchedule
from .base import COMMON_CONFIG, DifflabScheduler, SchedulerOutput, StepState, scheduler_config
from .first_order import EulerDDIMScheduler
from .fkc import FKCTarget, ParticleOutput, fkc_sample
from .lml import LMLScheduler, lml_correct
from .momentum import DPMSolverHBScheduler, GHVBScheduler, PLMSHBScheduler, UniPCHBScheduler
from .smc import ParticleSystem, ResamplingPolicy, effective_sample_size
from .superdiff import SuperDiffOutput, superdiff_sample
from .usf import SolverSchedule, USFScheduler

SCHEDULERS: dict[str, type[DifflabScheduler]] = {
    "euler-ddim": EulerDDIMScheduler,
    "plms-hb": PLMSHBScheduler,
    "ghvb": GHVBScheduler,
    "dpm-hb": DPMSolverHBScheduler,
    "unipc-hb": UniPCHBScheduler,
    "lml": LMLScheduler,
    "usf": USFScheduler,
}

# diffusers schedulers reachable by a short name from the CLI and the benchmarks
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "deis": ("DEISMultistepScheduler", {"solver_order": 2}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
FLOW_EQUIVALENTS = {"euler": "flow-euler", "heun": "flow-heun"}  # the same methods for flow-matching configs


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS) + sorted(DIFFUSERS_SCHEDULERS)


def get_scheduler(name: str, config: dict | None = None):
    """A scheduler by short name (difflab or diffusers) or class name, configured from ``config``.

    ``config`` is another scheduler's config (for example ``pipe.scheduler.config``), so the noise
    schedule of the model is kept, as with diffusers' ``from_config``.
    """
    import diffusers

    config = dict(config or {})
    if name in SCHEDULERS:
        return SCHEDULERS[name].from_config(config)
    for cls in SCHEDULERS.values():
        if cls.__name__ == name:
            return cls.from_config(config)
    is_flow = NoiseSchedule.is_flow_config(config)
    if is_flow and name in FLOW_EQUIVALENTS:
        name = FLOW_EQUIVALENTS[name]
    if is_flow and name in ("ddim", "ddpm"):
        raise ValueError(f"diffusers' {name} scheduler has no flow-matching mode; for a flow model use one of "
                         f"{sorted(SCHEDULERS)} or flow-euler, flow-heun, dpm++2m, dpm++3m, unipc, deis.")
    if name in DIFFUSERS_SCHEDULERS:
        cls_name, overrides = DIFFUSERS_SCHEDULERS[name]
        cls = getattr(diffusers, cls_name)
        if cls_name.startswith("FlowMatch"):
            return cls.from_config(config, **overrides)
        if is_flow:
            overrides = {**overrides, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                         "flow_shift": config.get("shift", 1.0)}
            config = {"num_train_timesteps": config.get("num_train_timesteps", 1000)}
        return cls.from_config(config, **overrides)
    if hasattr(diffusers, name) and name.endswith("Scheduler"):
        return getattr(diffusers, name).from_config(config)
    raise ValueError(f"Unknown scheduler {name!r}; use one of {scheduler_names()} or a diffusers scheduler class name.")


__all__ = [
    "COMMON_CONFIG",
    "DIFFUSERS_SCHEDULERS",
    "DPMSolverHBScheduler",
    "DifflabScheduler",
    "EulerDDIMScheduler",
    "FKCTarget",
    "ParticleOutput",
    "ParticleSystem",
    "ResamplingPolicy",
    "SuperDiffOutput",
    "effective_sample_size",
    "fkc_sample",
    "superdiff_sample",
    "GHVBScheduler",
    "LMLScheduler",
    "PLMSHBScheduler",
    "UniPCHBScheduler",
    "USFScheduler",
    "SolverSchedule",
    "SCHEDULERS",
    "SchedulerOutput",
    "StepState",
    "get_scheduler",
    "lml_correct",
    "scheduler_config",
    "scheduler_names",
]
