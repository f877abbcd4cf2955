"""Process-aware pieces of the low-dimensional distillation loops (f-distill, DisBack).

The step functions of :mod:`difflab.distill.lowdim` take a :class:`~difflab.distill.lowdim.FDistillState`
and call its modules directly. Under ``accelerate`` with several processes the module being *trained*
in a step must be called through its DistributedDataParallel wrapper (made by ``accelerator.prepare``),
so that its gradients are all-reduced, while frozen modules must be called unwrapped (a DDP module
whose parameters get no gradient in a backward pass would wait for them forever). :class:`Runtime`
keeps the wrappers, and :func:`fdistill_iteration` hands each step a *view* of the state with the right
modules swapped in: the generator step sees the wrapped generator, the critic step the wrapped fake
score and discriminator head (the two-time-scale rule of DMD2 / f-distill, Xu, Nie, Vahdat 2025).

Random draws of iteration k on process p come from ``step_generator(seed, k, p)``, so every process
sees different samples and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine import step_generator
from .lowdim import FDistillConfig, FDistillState, LowDimProblem, checkpoint_dirs, critic_step, generator_step

FORWARDED_ATTRIBUTES = ("prediction_type", "supports_features")
SETTINGS_FILE = "run_settings.json"  # the settings a run started with; a resume with others gets a warning


def _identity(module: nn.Module) -> nn.Module:
    return module


def _no_barrier() -> None:
    return None


def _no_log(values: dict, step: int) -> None:
    return None


@dataclass
class Runtime:
    """This process's place in a run: rank, the wrappers of trained modules, a barrier, the precision.

    The default is a single plain process (no wrapping, float32). :meth:`from_accelerator` wraps modules
    with ``accelerator.prepare`` (DDP when several processes run) as they are registered, and every
    training iteration runs its forward passes (frozen teacher included) under ``accelerator.autocast()``:
    bfloat16 with ``mixed_precision="bf16"``, float16 with ``"fp16"`` on a GPU; the weights and optimizer states
    stay float32 (``prepare`` also puts the trained modules' own forward under autocast, outputs cast back to
    float32). Under float16, ``scaler`` is accelerate's loss scaler: every backward pass goes through it
    (:func:`~difflab.distill.engine.backward`, :func:`~difflab.distill.engine.clip_and_step`) and checkpoints
    keep its scale (:meth:`with_scaler`, :meth:`restore_scaler`).
    """

    rank: int = 0
    num_processes: int = 1
    is_main: bool = True
    prepare: Callable[[nn.Module], nn.Module] = _identity
    barrier: Callable[[], None] = _no_barrier
    autocast: Callable[[], AbstractContextManager] = nullcontext
    log: Callable[[dict, int], None] = _no_log  # statistics of a step to the experiment trackers (--report_to)
    scaler: Any = None  # torch.amp.GradScaler under mixed_precision="fp16" (accelerator.scaler), else None
    wrapped: dict[int, nn.Module] = field(default_factory=dict)

    @classmethod
    def from_accelerator(cls, accelerator) -> Runtime:
        """A runtime that prepares modules with ``accelerator``, waits with ``wait_for_everyone``, runs
        iterations under its autocast and logs to its trackers."""
        from ..tracking import scalars

        if accelerator.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={accelerator.mixed_precision!r} is not supported by these trainers; "
                             "use 'no', 'bf16' or 'fp16'.")
        if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.is_main_process:
            print(f"Warning: mixed_precision='fp16' needs a GPU: accelerate runs this {accelerator.device.type} "
                  "process in float32. Use 'bf16' for reduced precision on the CPU.", file=sys.stderr)
        return cls(rank=accelerator.process_index, num_processes=accelerator.num_processes,
                   is_main=accelerator.is_main_process, prepare=accelerator.prepare,
                   barrier=accelerator.wait_for_everyone, autocast=accelerator.autocast,
                   log=lambda values, step: accelerator.log(scalars(values), step=step), scaler=accelerator.scaler)

    def register(self, *modules: nn.Module) -> None:
        """Wrap each module for training (idempotent); the wrapper keeps ``FORWARDED_ATTRIBUTES``."""
        for module in modules:
            if id(module) in self.wrapped:
                continue
            wrapper = self.prepare(module)
            if wrapper is not module:  # ScoreModel reads these from the module it is given, wrapped or not
                for name in FORWARDED_ATTRIBUTES:
                    if hasattr(module, name):
                        setattr(wrapper, name, getattr(module, name))
            self.wrapped[id(module)] = wrapper

    def with_scaler(self, payload: dict) -> dict:
        """A checkpoint payload with the float16 loss scale added (unchanged without a scaler)."""
        return payload if self.scaler is None else {**payload, "scaler": self.scaler.state_dict()}

    def restore_scaler(self, payload: dict) -> None:
        """Resume the loss scale of a checkpoint written under the same precision (a run resumed under another
        precision starts a fresh scale; ``run_settings.json`` reports the change)."""
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])

    def train_view(self, module: nn.Module) -> nn.Module:
        """The module to call when it is being trained: its wrapper, or itself."""
        return self.wrapped.get(id(module), module)


def fdistill_iteration(state: FDistillState, problem: LowDimProblem, config: FDistillConfig,
                       runtime: Runtime | None = None) -> dict:
    """Iteration ``state.step`` of f-distill (critic or generator update by the TTUR cycle); advances it.

    Equal to :func:`difflab.distill.lowdim.train_iteration` in a single process.
    """
    runtime = runtime or Runtime()
    g = step_generator(config.seed, state.step, runtime.rank)
    with runtime.autocast():
        if config.is_generator_step(state.step):
            stats = generator_step(replace(state, generator=runtime.train_view(state.generator)), problem, config, g,
                                   runtime.scaler)
        else:
            view = replace(state, fake=runtime.train_view(state.fake), head=runtime.train_view(state.head))
            stats = critic_step(view, problem, config, g, runtime.scaler)
    check_finite(stats, state.step)
    state.step += 1
    return stats


def check_finite(stats: dict, step: int) -> None:
    """FloatingPointError naming the statistic and the (1-based) iteration if any value is NaN / inf."""
    for key, value in stats.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(f"{key} became {value} at iteration {step + 1}; lower the learning rates or "
                                     "the GAN weight.")


def trainer_main(parser, run: Callable, argv: list[str] | None = None):
    """``main`` of a trainer module: parse, run, and turn a user error into a message and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, ArithmeticError) as err:
        parser.exit(2, f"{parser.prog} {args.method}: error: {err}\n")
    return None


def write_checkpoint(output_dir: str | Path, step: int, payload: dict, total_limit: int | None = None) -> Path:
    """``output_dir/checkpoint-{step}/state.pt`` written atomically (a temporary file, then a rename);
    with ``total_limit``, older checkpoints beyond the newest ``total_limit`` are then removed."""
    path = Path(output_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(path / "state.pt")
    if total_limit is not None and total_limit >= 1:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def changed_settings(output_dir: Path, settings: dict[str, Any]) -> str:
    """``'name: old -> new, ...'`` for the settings that differ from those the run in ``output_dir`` started
    with ('' when they agree, or for a run older than the record)."""
    path = Path(output_dir) / SETTINGS_FILE
    if not path.is_file():
        return ""
    saved = json.loads(path.read_text())

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    old, new = flat(saved), flat(settings)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                     if old.get(k) != new.get(k))


def record_run_settings(output_dir: Path, settings: dict[str, Any], resuming: bool, runtime: Runtime,
                        say: Callable[[str], None]) -> None:
    """A new run writes ``settings`` (JSON-able: what decides its trajectory) to ``output_dir/run_settings.json``;
    a resumed one compares them with that record and warns about each change (a warning, not an error: a
    changed learning rate on resume can be intended)."""
    if not resuming:
        if runtime.is_main:
            (Path(output_dir) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
        return
    changed = changed_settings(output_dir, settings)
    if changed:
        say(f"Warning: {output_dir} was started with other settings ({changed}); the resumed run will not repeat "
            "an uninterrupted one. Pass the original flags to continue it exactly.")
