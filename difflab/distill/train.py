"""Train a one-step generator by f-distill or DisBack on a built-in Gaussian mixture, with accelerate.

Runs as ``difflab distill f-distill --output_dir out``, ``difflab distill disback --output_dir out``,
``python -m difflab.distill.train {f-distill,disback} ...`` or ``accelerate launch -m
difflab.distill.train {f-distill,disback} ...`` on several processes. Methods:

* ``f-distill``: Xu, Nie, Vahdat 2025 (arXiv 2502.15681), divergence chosen by ``--divergence``
  (``rkl`` is DMD2); :mod:`difflab.distill.lowdim` holds the steps.
* ``disback``: Zhang et al., ICLR 2025 (arXiv 2408.15991): degradation recording, then backtracking
  along the saved nodes to the teacher (:mod:`difflab.distill.disback`), with f-distill / DMD2 steps.

Data and teacher, one of:

* ``--model digits-ddpm`` / ``digits-flow`` / a DigitsPipeline directory: the pipeline's
  class-conditional UNet is the teacher (CFG ``--guidance_scale``), the train-split digits are the
  discriminator's real data (:mod:`difflab.distill.digits`). Validation every ``--validation_steps``
  logs FD-digits and class accuracy of the EMA generator and writes ``validation-N.png``; the result is
  a one-step DigitsPipeline directory (``difflab sample --model OUTPUT_DIR`` uses one step, no guidance).
* ``--model DIR`` of a diffusers DDPMPipeline, Stable Diffusion 1.x / 2.x / XL / 3 or Flux pipeline, with real
  images (and captions) in ``--train_data_dir`` (:mod:`difflab.distill.pipelines`); the result is a one-step
  pipeline of the teacher's class.
* otherwise the built-in mixture (``--mixture ring8``: the 2-D ring of 8 unequal modes of
  ``difflab bench distill``; ``--mixture random``: ``--num_modes`` random modes in ``--dim``
  dimensions), whose exact denoiser (``GMMDenoiser``) is the teacher score and whose exact samples are
  the discriminator's real data. The student and the fake score start from an MLP teacher network
  fitted to the exact denoiser (``--teacher_steps``; deterministic, so every process and every resumed
  run fits the same one).

Conventions of the diffusers ``examples/`` trainers: ``--output_dir``, ``--max_train_steps``,
``--checkpointing_steps``, ``--resume_from_checkpoint latest``, ``--seed``, ``--mixed_precision`` (``bf16``:
bfloat16 autocast of the training forward passes; ``fp16``: float16 autocast with loss scaling), ``--report_to``
(losses and validation metrics to accelerate's trackers, e.g. tensorboard under ``output_dir/logs``);
an ``Accelerator`` whose ``prepare`` wraps the trained networks (gradients all-reduced across
processes), the f-distill normalizations all-reduced by :func:`~difflab.distill.engine.global_sum`.
Pipeline teachers (digits included) train on the process's GPU when CUDA is available, else on the CPU;
random draws always come from seeded CPU generators, so a run repeats itself on either. The 2-D mixture's
networks are tiny and stay on the CPU. Checkpoints are written by the main process
as ``output_dir/checkpoint-{step}/state.pt`` (the newest ``--checkpoints_total_limit`` are kept); a
run resumed from one ends at the weights of an uninterrupted run. The result of a mixture run:
``generator.safetensors`` (EMA weights), ``generator_config.json`` (rebuild with
:func:`load_generator`), ``samples.png`` and ``train_summary.json``; of a digits run: the pipeline
directory, ``samples.png`` and ``train_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import cpu_without_cuda, end_training
from ..tracking import accelerator_tracking_kwargs, add_tracking_arguments, start_tracking

METHODS = ("f-distill", "disback")
MIXTURES = ("ring8", "random")
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
DEFAULT_DIVERGENCE = {"f-distill": "js", "disback": "rkl"}
# Defaults that differ between the two kinds of problem (flags left at None take these).
PROBLEM_DEFAULTS = {
    "mixture": dict(max_train_steps=3000, train_batch_size=512, learning_rate=3e-5, critic_learning_rate=1e-3,
                    ema_decay=0.99),
    "digits": dict(max_train_steps=6000, train_batch_size=32, learning_rate=3e-5, critic_learning_rate=1e-4,
                   ema_decay=0.99),
}

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, method: str) -> argparse.ArgumentParser:
    """Attach the flags of ``method`` (``f-distill`` or ``disback``) to ``parser``."""
    from .lowdim import FDistillConfig

    parser.set_defaults(method=method)
    add = parser.add_argument
    add("--output_dir", required=True, help="Where checkpoints, nodes (DisBack) and the final generator go.")
    add("--model", default=None,
        help="Teacher pipeline: digits-ddpm, digits-flow, a DigitsPipeline directory, or a diffusers DDPMPipeline, "
             "Stable Diffusion 1.x / 2.x / XL / 3 or Flux directory with --train_data_dir (default: a Gaussian "
             "mixture, see --mixture).")
    add("--train_data_dir", default=None,
        help="Real training images for a --model that is not a digits model (the discriminator's data): a folder of "
             "images, with a metadata.jsonl of {\"file_name\": ..., \"text\": CAPTION} lines for text pipelines.")
    add("--caption_column", default="text", help="Text pipelines: the caption key of --train_data_dir's metadata.jsonl.")
    add("--resolution", type=int, default=None,
        help="SDXL and Flux teachers: the image size in pixels the student learns (default: the pipeline's own, "
             "1024 for SDXL and FLUX.1); the training images are resized to it.")
    add("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance of a --model teacher (1 = none).")
    add("--generator_timestep", default="auto",
        help="Diffusers timestep at which the generator's UNet sees pure noise: a number, 'max', or 'auto' (the "
             "largest one, except for eps models whose alpha there is below 0.05: the largest timestep with "
             "alpha >= 0.15; digits-ddpm: 610).")
    add("--init_generator", default=None, metavar="DIR",
        help="Start the generator from this one-step pipeline (a difflab distill result of the same teacher) "
             "instead of a teacher copy: refine a student, or go on with another method or divergence. Its "
             "timestep is the generator timestep; DisBack records its degradation path toward it.")
    add("--max_train_steps", type=int, default=None,
        help="Distillation iterations (critic and generator updates together; DisBack: stage 2). Default 3000 "
             "(mixture) / 6000 (--model).")
    add("--train_batch_size", type=int, default=None, help="Batch size per process (default 512 / 32 for --model).")
    add("--divergence", default=DEFAULT_DIVERGENCE[method],
        help="f-divergence of the weighting h(r): rkl (DMD2), kl, js, sh, srkl, jeffreys, neyman.")
    add("--critic_updates", type=int, default=4, help="Fake-score / discriminator updates per generator update.")
    add("--learning_rate", type=float, default=None, help="AdamW learning rate of the generator (default 3e-5).")
    add("--critic_learning_rate", type=float, default=None,
        help="AdamW learning rate of the fake score and head (default 1e-3 / 1e-4 for --model).")
    add("--adam_weight_decay", type=float, default=0.01)
    add("--gan_weight", type=float, default=1e-3, help="Weight of the generator's GAN term (must be > 0).")
    add("--head_features", choices=("fake", "teacher"), default="fake",
        help="Discriminator head on the fake score's features (paper) or the frozen teacher network's (FastGen).")
    add("--t_range", type=float, nargs=2, default=list(FDistillConfig.t_range), metavar=("LOW", "HIGH"),
        help="Fractions of the largest timestep between which t is drawn (DMD2: 0.02 0.98). On the 2-D ring the "
             "divergences differ only with a low-noise range such as 0.001 0.05 (docs/benchmarks/distill.md).")
    add("--ratio_ema", type=float, default=0.0, help="EMA rate of the per-time-bin ratio means (0: batch means).")
    add("--ema_decay", type=float, default=None, help="Decay of the generator's EMA (the saved weights; 0.99).")
    add("--max_grad_norm", type=float, default=10.0, help="Gradient clipping norm (0 disables).")
    add("--seed", type=int, default=0, help="Seed of every random draw (and of the head's init).")
    add("--checkpointing_steps", type=int, default=500, help="Write a checkpoint every N (global) steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    add("--validation_steps", type=int, default=500,
        help="--model runs: FD-digits, accuracy and a validation-N.png grid of the EMA generator every N iterations.")
    add("--validation_per_class", type=int, default=50, help="--model runs: samples per class of each validation.")
    add("--resume_from_checkpoint", default=None,
        help="A checkpoint-N directory, or 'latest' for the newest one in --output_dir.")
    add("--mixed_precision", choices=("no", "bf16", "fp16"), default="no",
        help="bf16: forward passes of training under bfloat16 autocast; fp16: under float16 autocast with dynamic "
             "loss scaling (a GPU; on the CPU accelerate keeps float32). Weights and optimizer states stay float32.")
    add("--stop_after_steps", type=int, default=None,
        help="Stop after this global step without writing the result, as if killed (resume later).")
    add_tracking_arguments(parser)
    add("--mixture", choices=MIXTURES, default="ring8", help="ring8: 2-D ring of 8 unequal modes; random: see --dim.")
    add("--dim", type=int, default=2, help="Dimension of --mixture random.")
    add("--num_modes", type=int, default=8, help="Modes of --mixture random.")
    add("--teacher_steps", type=int, default=2000, help="Steps of the MLP teacher-network fit.")
    add("--teacher_hidden", type=int, default=128, help="Width of the MLP networks.")
    add("--teacher_depth", type=int, default=3, help="Hidden layers of the MLP networks.")
    add("--num_samples", type=int, default=2000, help="Samples for the final scatter plot and energy distance.")
    add("--log_every", type=int, default=50, help="Keep training statistics every N iterations.")
    add("--no_progress", action="store_true", help="No progress bars.")
    if method == "disback":
        add("--num_nodes", type=int, default=4, help="Stage 1: nodes N after node 0 (the teacher).")
        add("--node_interval", type=int, default=100, help="Stage 1: DSM steps between nodes.")
        add("--degradation_learning_rate", type=float, default=1e-3, help="Stage 1: AdamW learning rate.")
        add("--backtrack_interval", type=int, default=300, help="Stage 2: iterations per target (at most).")
        add("--switch", choices=("fixed", "plateau"), default="fixed",
            help="Stage 2: advance every --backtrack_interval iterations, or also earlier when the fake score's "
                 "DSM loss plateaus (relative drop between two windows below --plateau_tol).")
        add("--plateau_window", type=int, default=50, help="Critic updates per window of the plateau test.")
        add("--plateau_tol", type=float, default=0.01, help="Relative DSM-loss drop below which a target is done.")
        add("--min_node_steps", type=int, default=50, help="Iterations at a target before the plateau test.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m difflab.distill.train METHOD ...``."""
    parser = argparse.ArgumentParser(prog="python -m difflab.distill.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method in METHODS:
        add_arguments(sub.add_parser(method, help=f"{method} on a built-in Gaussian mixture"), method)
    return parser


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give flags left at None the defaults of the problem kind (mixture or ``--model``)."""
    kind = "digits" if args.model is not None else "mixture"
    for name, value in PROBLEM_DEFAULTS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def parse_generator_timestep(value: str) -> float | str:
    """``--generator_timestep``: 'auto', 'max' or a non-negative number."""
    if value in ("auto", "max"):
        return value
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"--generator_timestep must be 'auto', 'max' or a number, got {value!r}.") from None
    if t < 0:
        raise ValueError(f"--generator_timestep must be >= 0, got {t}.")
    return t


def build_config(args: argparse.Namespace):
    """FDistillConfig (f-distill) or DisBackConfig (disback) from the flags; ValueError on bad values."""
    from .disback import DisBackConfig
    from .lowdim import FDistillConfig

    fill_defaults(args)
    for name in ("max_train_steps", "train_batch_size", "checkpointing_steps", "teacher_steps", "num_samples",
                 "log_every", "validation_steps", "validation_per_class"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if args.mixture == "ring8" and args.dim != 2:
        raise ValueError(f"--mixture ring8 is 2-D; use --mixture random for --dim {args.dim}.")
    if args.model is None and args.guidance_scale != 1.0:
        raise ValueError("--guidance_scale applies to a --model teacher; the mixture teacher is the exact score.")
    if args.model is None and args.train_data_dir is not None:
        raise ValueError("--train_data_dir applies to a --model teacher; the mixture's real data are exact samples.")
    if args.model is None and args.resolution is not None:
        raise ValueError("--resolution applies to an SDXL or Flux --model teacher, not to the mixture.")
    if args.model is None and args.init_generator is not None:
        raise ValueError("--init_generator applies to a --model teacher (a one-step pipeline directory).")
    parse_generator_timestep(args.generator_timestep)
    base = FDistillConfig(
        divergence=args.divergence, max_train_steps=args.max_train_steps, batch_size=args.train_batch_size,
        critic_updates=args.critic_updates, lr_generator=args.learning_rate, lr_fake=args.critic_learning_rate,
        lr_head=args.critic_learning_rate, weight_decay=args.adam_weight_decay, gan_weight=args.gan_weight,
        head_features=args.head_features, t_range=tuple(args.t_range), ratio_ema=args.ratio_ema,
        ema_decay=args.ema_decay,
        max_grad_norm=args.max_grad_norm, seed=args.seed, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit)
    if base.gan_weight <= 0:
        raise ValueError(f"--gan_weight must be > 0 (f-distill's density ratio comes from the discriminator), "
                         f"got {base.gan_weight}.")
    if args.method == "f-distill":
        return base
    return DisBackConfig(base=base, num_nodes=args.num_nodes, node_interval=args.node_interval,
                         degradation_lr=args.degradation_learning_rate, backtrack_interval=args.backtrack_interval,
                         switch=args.switch, plateau_window=args.plateau_window, plateau_tol=args.plateau_tol,
                         min_node_steps=args.min_node_steps)


def set_generator_timestep(config, args: argparse.Namespace, problem) -> float:
    """Store ``--generator_timestep`` in the (base) config ('auto': None, the default rule of
    :func:`difflab.distill.lowdim.generator_timestep`) and return the timestep it resolves to."""
    from .lowdim import generator_timestep

    value = parse_generator_timestep(args.generator_timestep)
    t_max = float(problem.schedule.t_max)
    base = getattr(config, "base", config)
    base.generator_timestep = {"auto": None, "max": t_max}.get(value, value)
    resolved = generator_timestep(base, problem)
    if resolved > t_max:
        raise ValueError(f"--generator_timestep {resolved} is beyond the teacher's largest timestep {t_max}.")
    return resolved


def run_settings(args: argparse.Namespace, config) -> dict[str, Any]:
    """What decides a run's trajectory (written to ``output_dir/run_settings.json`` when it starts): the
    method, teacher, starting student, data and every hyper-parameter but the length and checkpointing."""
    hyper = config.to_dict() if hasattr(config, "to_dict") else asdict(config)
    base = hyper.get("base", hyper)
    for key in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
        base.pop(key, None)
    run = {k: getattr(args, k, None) for k in ("method", "model", "init_generator", "train_data_dir", "guidance_scale",
                                             "resolution", "mixed_precision", "mixture", "dim", "num_modes",
                                             "teacher_steps")}
    return json.loads(json.dumps({**run, "generator_timestep": args.generator_timestep, **hyper}))


def set_initial_generator(problem, args: argparse.Namespace) -> None:
    """Put the UNet weights of the one-step pipeline ``--init_generator`` into ``problem.initial_generator``
    and make its timestep the generator timestep (an explicit, different ``--generator_timestep``: ValueError)."""
    path = Path(args.init_generator).expanduser()
    unet, timestep = load_one_step_student(path, problem)
    requested = parse_generator_timestep(args.generator_timestep)
    requested = float(problem.schedule.t_max) if requested == "max" else requested
    if requested != "auto" and float(requested) != timestep:
        raise ValueError(f"--init_generator {path} makes its step at timestep {timestep:g}, not at --generator_timestep "
                         f"{args.generator_timestep}; leave --generator_timestep at auto.")
    args.generator_timestep = str(timestep)
    problem.initial_generator = {k: v.detach().float().cpu() for k, v in unet.state_dict().items()}


def load_one_step_student(path: Path, problem) -> tuple[torch.nn.Module, float]:
    """(UNet or transformer, timestep of its one step) of a one-step pipeline that ``difflab distill`` wrote for the teacher of
    ``problem``, or a ValueError saying why it is not one."""
    from ..models import load
    from ..schedule import NoiseSchedule, canonical_prediction_type
    from .digits import SAMPLING_FILE
    from .nets import inner_module, state_dict_mismatch

    settings = path / SAMPLING_FILE
    if not settings.is_file() or json.loads(settings.read_text()).get("num_inference_steps") != 1:
        raise ValueError(f"--init_generator {path} is not a one-step pipeline written by difflab distill (no "
                         f"{SAMPLING_FILE} with num_inference_steps 1); pass the output_dir of a finished run.")
    pipeline = load(str(path))
    unet, teacher_unet = getattr(pipeline, problem.component, None), inner_module(problem.teacher_net)
    if type(unet) is not type(teacher_unet):
        raise ValueError(f"--init_generator {path} holds a {type(unet).__name__}, the teacher a "
                         f"{type(teacher_unet).__name__}; pass a student of this teacher.")
    student_type = NoiseSchedule.model_prediction_type(dict(pipeline.scheduler.config))
    if canonical_prediction_type(student_type) != canonical_prediction_type(problem.prediction_type):
        raise ValueError(f"--init_generator {path} predicts {student_type!r}, the teacher {problem.prediction_type!r}; "
                         "pass a student of this teacher.")
    mismatch = state_dict_mismatch(teacher_unet.state_dict(), unet.state_dict())
    if mismatch:
        raise ValueError(f"--init_generator {path}: its {problem.component}'s weights do not match the teacher's ({mismatch}: "
                         "another architecture); pass a student of this teacher.")
    pipeline.scheduler.set_timesteps(1)
    return unet, float(pipeline.scheduler.timesteps[0])


# --------------------------------------------------------------------------------------------
# Data, teacher and the result
# --------------------------------------------------------------------------------------------


def build_mixture(args: argparse.Namespace):
    """The built-in mixture named by ``--mixture`` (random modes are seeded by 0, not ``--seed``)."""
    from ..models.gmm import GaussianMixture

    if args.mixture == "ring8":
        from ..models.gmm import unequal_ring

        return unequal_ring()
    if args.dim < 1 or args.num_modes < 1:
        raise ValueError(f"--dim and --num_modes must be >= 1, got {args.dim}, {args.num_modes}.")
    g = torch.Generator().manual_seed(0)
    means = 0.8 * torch.randn(args.num_modes, args.dim, generator=g, dtype=torch.float64)
    weights = 1.0 + 2.0 * torch.rand(args.num_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, 0.1**2, weights)


def mixture_spec(mixture) -> dict:
    return {"means": mixture.means.tolist(), "variances": mixture.variances.tolist(), "weights": mixture.weights.tolist()}


def save_result(output_dir: Path, generator, args: argparse.Namespace, mixture) -> None:
    """``generator.safetensors`` (the generator's denoiser weights) and ``generator_config.json``."""
    from safetensors.torch import save_file

    net = generator.denoiser
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              str(output_dir / "generator.safetensors"))
    config = {"method": args.method, "dim": net.dim, "hidden": net.hidden, "depth": net.depth,
              "prediction_type": net.prediction_type, "time_embedding_dim": net.time_embedding_dim,
              "timestep": generator.timestep, "schedule": SCHEDULE, "mixture": mixture_spec(mixture)}
    (output_dir / "generator_config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_generator(output_dir: str | Path):
    """The trained one-step generator of an output directory (``z -> x0``)."""
    from safetensors.torch import load_file

    from ..schedule import NoiseSchedule
    from .nets import MLPDenoiser, OneStepGenerator, strict_load

    output_dir = Path(output_dir)
    path = output_dir / "generator_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} has no generator_config.json; is it a finished distill run?")
    cfg = json.loads(path.read_text())
    net = MLPDenoiser(cfg["dim"], cfg["hidden"], cfg["depth"], cfg["prediction_type"], cfg["time_embedding_dim"])
    strict_load(net, load_file(str(output_dir / "generator.safetensors")), "generator.safetensors")
    return OneStepGenerator(net, NoiseSchedule.from_config(cfg["schedule"]), cfg["timestep"]).eval()


def require_matplotlib() -> None:
    """ValueError naming the extra to install when matplotlib (the mixture run's scatter plot) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ValueError("a Gaussian-mixture run ends with a scatter plot, which needs matplotlib: "
                         "pip install 'difflab[train]'") from err


def scatter_png(samples: torch.Tensor, reference: torch.Tensor, png: Path, title: str) -> None:
    """Student samples over exact samples (first two coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ref, pts = reference[:, :2].cpu(), samples[:, :2].cpu()
    ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.25, color="tab:gray", label="exact")
    if pts.shape[1] > 1:
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.35, color="tab:blue", label="student")
    else:
        ax.hist([ref[:, 0].numpy(), pts[:, 0].numpy()], bins=60, label=["exact", "student"])
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal" if pts.shape[1] > 1 else "auto")
    ax.legend(markerscale=6, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _train_fdistill(config, problem, output_dir: Path, resume, stop: int, runtime, progress: bool, log_every: int,
                    on_step=None):
    """The f-distill loop under a Runtime; returns the final FDistillState."""
    from .loop import fdistill_iteration, write_checkpoint
    from .lowdim import build_state

    state = build_state(config, problem)
    if resume is not None:
        payload = torch.load(resume / "state.pt", map_location="cpu", weights_only=False)
        if payload.get("method", "f-distill") != "f-distill":
            raise ValueError(f"{resume} is a {payload['method']} checkpoint, not an f-distill one; use a fresh --output_dir.")
        state.load_state_dict(payload["state"])
        runtime.restore_scaler(payload)
    runtime.register(state.generator, state.fake, state.head)
    bar = tqdm(total=config.max_train_steps, initial=state.step, desc=f"f-distill {config.divergence}",
               disable=not (progress and runtime.is_main))
    latest: dict = {}
    if on_step is not None and state.step == 0:
        on_step(state)  # the initial generator's validation
    while state.step < stop:
        stats = fdistill_iteration(state, problem, config, runtime)
        latest.update(stats)
        runtime.log(stats, state.step)
        if state.step % log_every == 0:
            state.history.append({"step": state.step, **latest})
        bar.update(1)
        bar.set_postfix(dsm=f"{latest.get('dsm_loss', float('nan')):.3f}", disc=f"{latest.get('disc_loss', float('nan')):.3f}")
        if on_step is not None:
            on_step(state)
        if state.step % config.checkpointing_steps == 0 and runtime.is_main:
            payload = {"method": "f-distill", "config": asdict(config), "state": state.state_dict()}
            write_checkpoint(output_dir, state.step, runtime.with_scaler(payload), config.checkpoints_total_limit)
        if state.step % config.checkpointing_steps == 0:
            runtime.barrier()
    bar.close()
    return state


def build_problem(args: argparse.Namespace, progress: bool):
    """(problem, mixture or None): the digits problem of ``--model``, or the mixture with its fitted MLP teacher."""
    from ..schedule import NoiseSchedule
    from .lowdim import LowDimProblem, exact_teacher, fit_mlp_teacher

    if args.model is not None:
        from .pipelines import distill_problem

        return distill_problem(args.model, args.guidance_scale, args.train_data_dir, progress,
                               args.caption_column, args.resolution), None
    mixture, schedule = build_mixture(args), NoiseSchedule.from_config(SCHEDULE)
    teacher_net = fit_mlp_teacher(mixture, schedule, "epsilon", steps=args.teacher_steps, hidden=args.teacher_hidden,
                                  depth=args.teacher_depth, seed=args.seed, progress=progress)
    teacher_net.requires_grad_(False)
    return LowDimProblem(mixture, schedule, exact_teacher(mixture, schedule), teacher_net), mixture


def validator(args: argparse.Namespace, problem, output_dir: Path, runtime):
    """``on_step(state)``: every ``--validation_steps`` iterations (main process), a ``validation-N.png`` grid of
    the EMA generator, and for digits its FD-digits and accuracy into ``state.history``."""
    from .digits import evaluate_student, save_student_grid
    from .pipelines import save_pipeline_student_grid

    def on_step(state) -> None:
        if state.step % args.validation_steps or not runtime.is_main:
            return
        if not problem.is_digits:
            save_pipeline_student_grid(state.ema.model, problem, output_dir / f"validation-{state.step}.png",
                                       seed=args.seed + 1)
            return
        score = evaluate_student(state.ema.model, problem, args.validation_per_class, seed=args.seed + 1)
        metrics = {"fd_digits": score["fd_digits"], "accuracy": score["accuracy"]}
        state.history.append({"step": state.step, "validation": True, **metrics})
        runtime.log(metrics, state.step)
        save_student_grid(state.ema.model, problem, output_dir / f"validation-{state.step}.png", seed=args.seed + 1)
        tqdm.write(f"step {state.step}: FD-digits {score['fd_digits']:.1f} (floor {score['noise_floor']:.1f}), "
                   f"accuracy {score['accuracy']:.3f}")

    return on_step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with parsed ``args`` (see :func:`add_arguments`); returns a summary dict."""
    from accelerate import Accelerator

    from .disback import train_disback
    from .loop import Runtime, record_run_settings
    from .lowdim import resolve_checkpoint

    config = build_config(args)
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)  # clear error before any work
    if args.model is None:
        require_matplotlib()  # the mixture run ends with a scatter plot: fail now, not after training
    # UNet teachers train on the GPU when there is one; the 2-D mixture's tiny MLPs stay on the CPU
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.model is None or cpu_without_cuda(),
                              **accelerator_tracking_kwargs(args))
    runtime = Runtime.from_accelerator(accelerator)
    progress = not args.no_progress
    problem, mixture = build_problem(args, progress and runtime.is_main)  # a bad teacher or data: nothing written
    if args.init_generator is not None:
        set_initial_generator(problem, args)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    start_tracking(accelerator, f"difflab-distill-{args.method}", args)
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint found in {output_dir}; starting a new run.")
    record_run_settings(output_dir, run_settings(args, config), resume is not None, runtime, accelerator.print)
    if mixture is None:
        problem.to(accelerator.device)
    generator_timestep = set_generator_timestep(config, args, problem)
    if mixture is None and not problem.is_digits:
        from .pipelines import check_one_step_timestep

        check_one_step_timestep(problem, generator_timestep)
    on_step = validator(args, problem, output_dir, runtime) if mixture is None else None
    start = time.perf_counter()
    if args.method == "f-distill":
        stop = min(config.max_train_steps, args.stop_after_steps or config.max_train_steps)
        state = _train_fdistill(config, problem, output_dir, resume, stop, runtime, progress, args.log_every, on_step)
        done, extra = state.step >= config.max_train_steps, {}
    else:
        result = train_disback(config, problem, output_dir, resume_from=resume, stop_after=args.stop_after_steps,
                               progress=progress, log_every=args.log_every, runtime=runtime, on_step=on_step)
        state = result.state
        done = state is not None and state.step >= config.base.max_train_steps
        extra = {"degradation_steps": result.degradation.step, "nodes_dir": str(result.nodes_dir),
                 "switches": [] if result.backtracker is None else result.backtracker.switches}
    seconds = time.perf_counter() - start
    summary = {"method": args.method, "divergence": args.divergence, "steps": 0 if state is None else state.step,
               "finished": done, "train_seconds": seconds, "num_processes": accelerator.num_processes,
               "generator_timestep": generator_timestep, **extra}
    accelerator.wait_for_everyone()
    if done and runtime.is_main:
        if mixture is not None:
            finish = _finish_mixture(args, output_dir, state, mixture)
        else:
            finish = (_finish_digits if problem.is_digits else _finish_pipeline)(args, output_dir, state, problem)
        summary.update(finish)
        with open(output_dir / "train_summary.json", "w") as f:
            json.dump({**summary, "history": state.history, "args": vars(args)}, f, indent=1, default=str)
    end_training(accelerator, runtime.wrapped)
    return summary


def _finish_mixture(args: argparse.Namespace, output_dir: Path, state, mixture) -> dict:
    """Save the EMA generator, plot its samples, measure the energy distance to exact samples."""
    from ..eval.energy import energy_distance

    ema = state.ema.model.eval()
    save_result(output_dir, ema, args, mixture)
    with torch.no_grad():
        z = torch.randn(args.num_samples, mixture.dim, generator=torch.Generator().manual_seed(args.seed + 1))
        samples = ema(z).double()
    reference = mixture.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed + 2))
    energy = energy_distance(samples, reference)
    title = f"{args.method} ({args.divergence}), {state.step} iterations: energy distance {energy:.4f}"
    scatter_png(samples, reference, output_dir / "samples.png", title)
    print(f"wrote {output_dir / 'generator.safetensors'} and {output_dir / 'samples.png'}; energy distance to exact "
          f"samples {energy:.4f}")
    return {"energy_distance": energy}


def _finish_digits(args: argparse.Namespace, output_dir: Path, state, problem) -> dict:
    """Save the EMA generator as a one-step DigitsPipeline directory with a sample grid and its FD-digits."""
    from .digits import evaluate_student, save_one_step_pipeline, save_student_grid

    ema = state.ema.model.eval()
    score = evaluate_student(ema, problem, args.validation_per_class, seed=args.seed + 1)
    save_one_step_pipeline(ema, problem, output_dir, {"teacher": args.model, "method": args.method,
                                                       "divergence": args.divergence})
    save_student_grid(ema, problem, output_dir / "samples.png", seed=args.seed + 1)
    print(f"wrote the one-step pipeline {output_dir} and {output_dir / 'samples.png'}; FD-digits "
          f"{score['fd_digits']:.1f} (noise floor {score['noise_floor']:.1f}), accuracy {score['accuracy']:.3f}")
    return {"fd_digits": score["fd_digits"], "accuracy": score["accuracy"], "noise_floor": score["noise_floor"]}


def _finish_pipeline(args: argparse.Namespace, output_dir: Path, state, problem) -> dict:
    """Save the EMA generator as a one-step pipeline of the teacher's class, with a sample grid."""
    from .digits import save_one_step_pipeline
    from .pipelines import save_pipeline_student_grid

    ema = state.ema.model.eval()
    save_one_step_pipeline(ema, problem, output_dir, {"teacher": args.model, "method": args.method,
                                                       "divergence": args.divergence})
    save_pipeline_student_grid(ema, problem, output_dir / "samples.png", seed=args.seed + 1, write_prompts=True)
    call = ", ".join(f"{key}={value:g}" for key, value in problem.call_settings().items())
    print(f"wrote the one-step {type(problem.pipeline).__name__} {output_dir} and {output_dir / 'samples.png'} "
          f"(call it with {call})")
    return {}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of ``python -m difflab.distill.train`` (errors in the flags: a message, exit status 2)."""
    from .loop import trainer_main

    return trainer_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
