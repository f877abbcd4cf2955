"""``--report_to`` for difflab's trainers: accelerate's experiment trackers, as in diffusers' examples.

The trainers log their per-step statistics (losses, rewards, learning rate) and their validation
metrics with ``accelerator.log``; ``--report_to tensorboard`` writes them under
``OUTPUT_DIR/logs`` (``--logging_dir``), ``wandb`` / ``comet_ml`` / ``mlflow`` send them to those
services, ``none`` (the default) logs nothing beyond the trainer's own ``train_summary.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

TRACKERS = ("none", "tensorboard", "wandb", "comet_ml", "mlflow", "all")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """``--report_to`` and ``--logging_dir``, with diffusers' names."""
    parser.add_argument("--report_to", choices=TRACKERS, default="none",
                        help="Where to log losses and validation metrics: tensorboard (pip install tensorboard), "
                             "wandb, comet_ml, mlflow, all installed ones, or none.")
    parser.add_argument("--logging_dir", default="logs",
                        help="Tracker directory, relative to --output_dir (tensorboard event files).")


def check_tracker(report_to: str) -> None:
    """ValueError naming the package to install when the chosen tracker's package is missing."""
    if report_to in PACKAGES and importlib.util.find_spec(PACKAGES[report_to]) is None:
        raise ValueError(f"--report_to {report_to} needs the {PACKAGES[report_to]} package: pip install "
                         f"{PACKAGES[report_to]} (or pass --report_to none).")


def accelerator_tracking_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``log_with`` and ``project_config`` for ``Accelerator(...)`` from ``--report_to`` / ``--logging_dir``."""
    from accelerate.utils import ProjectConfiguration

    check_tracker(args.report_to)
    output_dir = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    return {"log_with": None if args.report_to == "none" else args.report_to, "project_config": project}


def start_tracking(accelerator, project_name: str, args: argparse.Namespace) -> None:
    """``accelerator.init_trackers`` with the run's flags as hyper-parameters (scalars only, as tensorboard's
    hparams need; lists and None are written as text)."""
    if args.report_to == "none":
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    accelerator.init_trackers(project_name, config=config)


def scalars(stats: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a statistics dict (what a tracker can plot), but the step itself."""
    return {k: float(v) for k, v in stats.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
