"""Align a model to a reward with AWM or the DDPO baseline, with accelerate.

Runs as ``difflab align awm --output_dir out``, ``difflab align ddpo ...``, ``python -m
difflab.distill.align {awm,ddpo} ...`` or ``accelerate launch -m difflab.distill.align {awm,ddpo} ...``.

* ``awm``: Advantage Weighted Matching (Xue et al. 2025): the pretraining loss on the rollouts' clean
  samples, weighted by group advantages (:mod:`difflab.distill.awm`).
* ``ddpo``: the DDPO / Flow-GRPO-style policy gradient over the steps of stochastic rollouts
  (:mod:`difflab.distill.ddpo`), sharing rollouts, rewards, advantages and logging with AWM.

Models: ``--model digits-flow`` / ``digits-ddpm`` / a DigitsPipeline directory (rollouts with the
pipeline's own scheduler, or for AWM any difflab / diffusers one by ``--scheduler``; ``--label`` = a class
or ``null`` for the unconditional prompt), a diffusers DDPMPipeline, Stable Diffusion 1.x / 2.x / XL /
3 or Flux directory (``--prompts``; Flux at ``--resolution``), or ``--model mixture`` (the 2-D
ring of 8 unequal modes, an MLP fitted to its exact denoiser). Rewards: ``--reward class:3``, ``ink``,
``region:X,Y,R``, or weighted sums (``class:3*1+ink*0.5``); see
:func:`~difflab.distill.rewards.build_reward`. Full fine-tuning, or LoRA adapters (``--lora_rank``,
needs ``peft``).

Conventions of the diffusers ``examples/`` trainers: ``--output_dir``, ``--max_train_steps`` (rollout +
update rounds), ``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint
latest``, ``--seed``, ``--train_batch_size`` / ``--sample_batch_size`` (micro-batches for memory; gradients
accumulate into the round's single update), ``--mixed_precision`` (``bf16``: rollouts and losses under bfloat16 autocast,
float32 weights; ``fp16``: float16 with loss scaling), ``--report_to`` (rewards, losses and validation to accelerate's trackers, e.g.
tensorboard); each process draws its own groups; advantages use the all-reduced reward std; gradients
are all-reduced by the DDP wrapper of ``accelerator.prepare``. Every ``--validation_steps``
the main process logs the reward of fixed-noise ODE samples (and, for digits, the target-class share,
FD-digits to the real target-class digits and a grid ``validation-{step}.png``). The result: a
DigitsPipeline directory (``difflab sample --model OUT``) or ``policy.safetensors`` +
``policy_config.json`` for the mixture, and ``train_summary.json`` with the history. The settings a run
started with are in ``run_settings.json``; resuming with other ones prints each change.
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

METHODS = ("awm", "ddpo")


def add_arguments(parser: argparse.ArgumentParser, method: str) -> argparse.ArgumentParser:
    """Attach the flags of ``method`` (``awm`` or ``ddpo``) to ``parser``."""
    from .aligner import AlignConfig

    d = AlignConfig()
    parser.set_defaults(method=method)
    add = parser.add_argument
    add("--output_dir", required=True, help="Where checkpoints, validation grids and the aligned model go.")
    add("--model", default="digits-flow",
        help="digits-flow, digits-ddpm, a DigitsPipeline directory, mixture, or a diffusers DDPMPipeline, Stable "
             "Diffusion 1.x / 2.x / XL / 3 or Flux directory (text pipelines with --prompts).")
    add("--prompts", nargs="+", default=None,
        help="Text pipelines: the prompts (or one .txt file with a prompt per line); the groups take them in turn.")
    add("--reward", default=None, help="class:K, ink, region:X,Y,R or a weighted sum (default: class:3 for digits, "
                                       "region:0.8,0,0.3 for the mixture).")
    add("--resolution", type=int, default=None,
        help="SDXL and Flux pipelines: the image size in pixels the rollouts are made at (default: the pipeline's "
             "own, 1024 for SDXL and FLUX.1).")
    add("--label", default="null", help="Digits: the class the samples are drawn for, or 'null' (unconditional).")
    add("--max_train_steps", type=int, default=d.max_train_steps, help="Rollout + update rounds.")
    add("--num_groups", type=int, default=d.num_groups, help="Groups (prompts) per round and process.")
    add("--group_size", type=int, default=d.group_size, help="Samples per group.")
    add("--num_inference_steps", type=int, default=d.num_inference_steps, help="Sampling steps of the rollouts.")
    add("--learning_rate", type=float, default=d.learning_rate)
    add("--lr_warmup_steps", type=int, default=d.lr_warmup_steps,
        help="Rounds of linear learning-rate warmup (0: none). One full-size first Adam step can wreck an eps model "
             "with linear betas (digits-ddpm at 3e-4: every sample black after round 1); 3 rounds avoid it.")
    add("--train_batch_size", type=int, default=None,
        help="Memory: rows (sample x training timestep for AWM, sample x step for DDPO) per backward pass; the "
             "gradients of all rows accumulate into the round's one update, so the result does not change (up to "
             "float rounding). Default: all rows at once.")
    add("--sample_batch_size", type=int, default=None,
        help="Memory: samples per network call in rollouts and validations (the same samples for an ODE "
             "sampler). Default: all at once.")
    add("--use_ema", action="store_true",
        help="Keep an EMA of the policy weights (diffusers' EMAModel; the AWM reference code evaluates one): "
             "validations and the saved model use it. Not the EMA anchor of AWM's loss (--ema_beta).")
    add("--ema_decay", type=float, default=d.ema_decay,
        help="Decay of the --use_ema weights, reached through the warmup (1 + k) / (10 + k) after k updates "
             "(reference: 0.99).")
    add("--adam_weight_decay", type=float, default=d.weight_decay)
    add("--max_grad_norm", type=float, default=d.max_grad_norm, help="Gradient clipping norm (0 disables).")
    add("--advantage_std", choices=("global", "group", "none"), default=d.advantage_std,
        help="Std of the advantage normalization: all rewards (AWM default), each group's, or none.")
    add("--lora_rank", type=int, default=0, help="Train LoRA adapters of this rank (needs peft); 0: full fine-tuning.")
    add("--seed", type=int, default=d.seed)
    add("--checkpointing_steps", type=int, default=d.checkpointing_steps, help="Save a checkpoint every N rounds.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", default=None, help="A checkpoint-N directory, or 'latest' in --output_dir.")
    add("--mixed_precision", choices=("no", "bf16", "fp16"), default="no",
        help="bf16: forward passes of training under bfloat16 autocast; fp16: under float16 autocast with dynamic "
             "loss scaling (a GPU; on the CPU accelerate keeps float32). Weights and optimizer states stay float32.")
    add("--validation_steps", type=int, default=10, help="Validate every N rounds (0: only at the end).")
    add("--num_validation_samples", type=int, default=256)
    add("--stop_after_steps", type=int, default=None, help="Stop after this round as if killed (resume later).")
    add("--teacher_steps", type=int, default=2000, help="Mixture: steps of the MLP fit to the exact denoiser.")
    add("--no_progress", action="store_true")
    add_tracking_arguments(parser)
    add("--scheduler", default=None,
        help="AWM: the sampler of the rollouts and validations, by difflab or diffusers name (dpm++2m, unipc, usf, "
             "DEISMultistepScheduler, ...); it keeps the model's noise schedule, and the aligned pipeline is saved "
             "with it. Default: the model's own scheduler. DDPO always rolls out with its stochastic step.")
    if method == "awm":
        add("--train_timesteps", type=int, default=d.train_timesteps, help="Training timesteps K per sample.")
        add("--skip_last_fraction", type=float, default=d.skip_last_fraction,
            help="Share of the low-noise end of the sampler grid never trained on (reference: 0.1).")
        add("--weighting", choices=("uniform", "ghuber"), default=d.weighting,
            help="psi(l): the plain MSE (paper equation) or the reference code's ghuber (default).")
        add("--kl_beta", type=float, default=d.kl_beta, help="Weight of the velocity/eps-MSE KL to the reference.")
        add("--ema_beta", type=float, default=d.ema_beta, help="Weight of the MSE to the EMA anchor.")
    else:
        add("--eta", type=float, default=d.eta, help="Noise of the stochastic rollouts (1: DDPM / SDE step).")
        add("--clip_range", type=float, default=d.clip_range, help="PPO ratio clipping.")
        add("--kl_beta", type=float, default=d.ddpo_kl_beta, help="Weight of the per-step KL to the reference.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m difflab.distill.align", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for method in METHODS:
        add_arguments(sub.add_parser(method, help=f"{method} on a built-in model"), method)
    return parser


def build_config(args: argparse.Namespace):
    """AlignConfig from the flags (ValueError on bad values)."""
    from .aligner import AlignConfig

    common = dict(method=args.method, max_train_steps=args.max_train_steps, num_groups=args.num_groups,
                  group_size=args.group_size, num_inference_steps=args.num_inference_steps,
                  learning_rate=args.learning_rate, lr_warmup_steps=args.lr_warmup_steps,
                  weight_decay=args.adam_weight_decay,
                  max_grad_norm=args.max_grad_norm, advantage_std=args.advantage_std, seed=args.seed,
                  checkpointing_steps=args.checkpointing_steps, train_batch_size=args.train_batch_size,
                  use_ema=args.use_ema, ema_decay=args.ema_decay)
    if args.method == "awm":
        config = AlignConfig(**common, train_timesteps=args.train_timesteps, weighting=args.weighting,
                             skip_last_fraction=args.skip_last_fraction,
                             kl_beta=args.kl_beta, ema_beta=args.ema_beta)
    else:
        config = AlignConfig(**common, eta=args.eta, clip_range=args.clip_range, ddpo_kl_beta=args.kl_beta)
    config.validate()
    if args.method == "ddpo" and args.scheduler:
        raise ValueError("--scheduler applies to awm: DDPO needs the log-likelihood of every step, so it rolls out "
                         "with its own stochastic DDIM-eta step on the model's timestep grid; drop --scheduler.")
    if args.sample_batch_size is not None and args.sample_batch_size < 1:
        raise ValueError(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}.")
    if args.validation_steps < 0 or args.lora_rank < 0:
        raise ValueError("--validation_steps and --lora_rank must be >= 0.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (leave it out to keep every checkpoint).")
    return config


def build_problem(args: argparse.Namespace):
    """The AlignProblem of ``--model`` with ``--reward``, ``--label`` and (AWM) the rollout ``--scheduler``."""
    problem = _model_problem(args)
    problem.sample_batch_size = args.sample_batch_size
    if args.scheduler:
        use_rollout_scheduler(problem, args.scheduler)
    return problem


def use_rollout_scheduler(problem, name: str) -> None:
    """Roll out (and validate) ``problem`` with the scheduler ``name`` on the model's own noise schedule.

    AWM trains on the clean samples alone, so any sampler may produce them; its training timesteps come from
    this scheduler's grid. ValueError (with the known names) for an unknown name.
    """
    from ..samplers import get_scheduler

    config = dict(problem.make_scheduler().config)
    get_scheduler(name, config)  # an unknown name or a mismatched model fails here, before any work
    problem.make_scheduler = lambda: get_scheduler(name, config)
    problem.saved_scheduler = None  # the result keeps the sampler it was aligned with


def _model_problem(args: argparse.Namespace):
    from .aligner import digits_problem, mixture_problem
    from .rewards import CompositeReward, DigitsClassReward, build_reward

    if args.model == "mixture":
        if args.resolution is not None:
            raise ValueError("--resolution applies to SDXL and Flux pipelines, not to the 2-D mixture.")
        reward = build_reward(args.reward or "region:0.8,0,0.3")
        return mixture_problem(reward, teacher_steps=args.teacher_steps, seed=args.seed,
                               eval_samples=args.num_validation_samples)
    from ..models import load
    from .pipelines import is_digits_pipeline

    pipeline = load(args.model)
    if not is_digits_pipeline(pipeline):
        from .aligner import pipeline_problem

        if args.label != "null":
            raise ValueError("--label applies to the digits models; a text pipeline takes --prompts.")
        return pipeline_problem(pipeline, build_reward(args.reward or "ink"), read_prompts(args.prompts),
                                eval_samples=args.num_validation_samples, name=str(args.model),
                                resolution=args.resolution)
    if args.prompts:
        raise ValueError("--prompts applies to text pipelines; the digits models take --label.")
    if args.resolution is not None:
        raise ValueError("--resolution applies to SDXL and Flux pipelines; the digits models are 16x16.")
    reward = build_reward(args.reward or "class:3")
    label = None if args.label == "null" else _label(args.label)
    terms = reward.terms if isinstance(reward, CompositeReward) else [(reward, 1.0)]
    classes = [term.target_class for term, _ in terms if isinstance(term, DigitsClassReward)]
    target = classes[0] if classes else label  # FD-digits against the real digits of this class
    return digits_problem(pipeline, reward, label, eval_samples=args.num_validation_samples, target_class=target,
                          name=str(args.model))


def read_prompts(values: list[str] | None) -> list[str] | None:
    """``--prompts``: the prompts themselves, or one existing .txt file with a prompt per line."""
    if not values:
        return None
    if len(values) == 1 and values[0].endswith(".txt"):
        path = Path(values[0]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path} does not exist; pass a .txt file with one prompt per line, "
                                    "or the prompts themselves.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {path} holds no prompts.")
        return prompts
    return list(values)


def _label(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 9:
        raise ValueError(f"--label must be a digit 0..9 or 'null', got {text!r}.")
    return value


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


def merged_policy(state, problem) -> torch.nn.Module:
    """The policy as a plain copy of the original network (LoRA adapters merged in)."""
    import copy

    net = state.policy
    if not any("lora_" in name for name, _ in net.named_parameters()):
        return net
    lora_layers = [m for m in net.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    for module in lora_layers:
        module.merge()
    weights = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if "lora_" not in k}
    plain = copy.deepcopy(state.reference)
    plain.load_state_dict(weights, strict=True)
    for module in lora_layers:  # the policy itself stays as it was
        module.unmerge()
    return plain


def save_result(output_dir: Path, args: argparse.Namespace, state, problem) -> None:
    """A DigitsPipeline directory (digits), the aligned pipeline (diffusers pipelines), or
    policy.safetensors + policy_config.json (mixture)."""
    net = merged_policy(state, problem).eval()
    if problem.pipeline is not None:
        from .nets import inner_module
        from .pipelines import with_components

        components = {problem.component: inner_module(net),
                      "scheduler": (problem.saved_scheduler or problem.make_scheduler)()}
        with_components(problem.pipeline, **components).save_pretrained(output_dir)
        return
    if args.model == "mixture":
        from safetensors.torch import save_file

        from .train import SCHEDULE

        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(output_dir / "policy.safetensors"))
        config = {"dim": net.dim, "hidden": net.hidden, "depth": net.depth, "prediction_type": net.prediction_type,
                  "time_embedding_dim": net.time_embedding_dim, "schedule": SCHEDULE}
        (output_dir / "policy_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return
    from ..models.digits import DigitsPipeline

    DigitsPipeline(unet=net, scheduler=problem.make_scheduler()).save_pretrained(output_dir)


def load_mixture_policy(output_dir: str | Path):
    """The aligned MLP denoiser of a ``--model mixture`` run."""
    from safetensors.torch import load_file

    from .nets import MLPDenoiser, strict_load

    path = Path(output_dir) / "policy_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} has no policy_config.json; is it a finished `align --model mixture` run?")
    cfg = json.loads(path.read_text())
    net = MLPDenoiser(cfg["dim"], cfg["hidden"], cfg["depth"], cfg["prediction_type"], cfg["time_embedding_dim"])
    strict_load(net, load_file(str(Path(output_dir) / "policy.safetensors")), "policy.safetensors")
    return net.eval()


def validate(state, problem, args: argparse.Namespace, output_dir: Path) -> dict:
    """Evaluation of the current policy (main process); a grid ``validation-{step}.png`` for digits."""
    from .aligner import policy_samples

    stats = problem.evaluate(state.policy, args.num_inference_steps)
    if args.model == "mixture":
        return stats
    x = policy_samples(problem, state.policy, 64 if problem.decode is None else 16, args.num_inference_steps)
    png = output_dir / f"validation-{state.step}.png"
    if problem.pipeline is not None:
        from .pipelines import save_image_grid

        save_image_grid(x if problem.decode is None else problem.decode(x), png, 8)
    else:
        from ..models.digits import make_grid

        make_grid((x.clamp(-1, 1) + 1) / 2, nrow=8).save(png)
    return stats


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def run_settings(args: argparse.Namespace, config, problem) -> dict[str, Any]:
    """What decides an alignment run's trajectory (recorded in ``output_dir/run_settings.json``): the method,
    model, reward (as resolved: a default and the same reward spelled out agree), label, prompts, LoRA rank
    and every hyper-parameter but the length, checkpointing and the micro-batch size (which only sets memory)."""
    hyper = {k: v for k, v in asdict(config).items()
             if k not in ("max_train_steps", "checkpointing_steps", "train_batch_size")}
    run = {k: getattr(args, k, None)
           for k in ("method", "model", "label", "prompts", "lora_rank", "teacher_steps", "scheduler", "resolution",
                     "mixed_precision")}
    return json.loads(json.dumps({**run, "reward": repr(problem.reward), **hyper}))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with parsed ``args``; returns a summary dict."""
    from accelerate import Accelerator

    from .aligner import align_iteration, build_state, evaluation_weights
    from .loop import Runtime, record_run_settings, write_checkpoint
    from .lowdim import resolve_checkpoint

    config = build_config(args)
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    tracking = accelerator_tracking_kwargs(args)
    problem = build_problem(args)  # bad --model / --reward / --scheduler: an error before anything is written
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu_without_cuda(), **tracking)
    runtime = Runtime.from_accelerator(accelerator)
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    start_tracking(accelerator, f"difflab-align-{args.method}", args)
    problem.to(accelerator.device)
    state = build_state(problem, config, args.lora_rank)
    if resume is not None:
        payload = torch.load(resume / "state.pt", map_location="cpu", weights_only=False)
        if payload.get("method") != args.method:
            raise ValueError(f"{resume} is a {payload.get('method')} checkpoint, not a {args.method} one; use a fresh "
                             "--output_dir.")
        state.load_state_dict(payload["state"])
        runtime.restore_scaler(payload)
        accelerator.print(f"Resuming from {resume} (round {state.step})")
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint found in {output_dir}; starting a new run.")
    record_run_settings(output_dir, run_settings(args, config, problem), resume is not None, runtime,
                        accelerator.print)
    runtime.register(state.policy)
    stop = min(config.max_train_steps, args.stop_after_steps or config.max_train_steps)
    bar = tqdm(total=config.max_train_steps, initial=state.step, desc=f"align {args.method}",
               disable=args.no_progress or not runtime.is_main)
    start = time.perf_counter()
    while state.step < stop:
        stats = align_iteration(state, problem, config, runtime)
        entry = {"step": state.step, "samples": state.samples, **stats}
        if args.validation_steps and state.step % args.validation_steps == 0 and runtime.is_main:
            with evaluation_weights(state):
                entry.update(validate(state, problem, args, output_dir))
        state.history.append(entry)
        runtime.log(entry, state.step)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", samples=state.samples)
        if state.step % config.checkpointing_steps == 0:
            if runtime.is_main:
                payload = {"method": args.method, "config": asdict(config), "state": state.state_dict()}
                write_checkpoint(output_dir, state.step, runtime.with_scaler(payload), args.checkpoints_total_limit)
            runtime.barrier()
    bar.close()
    done = state.step >= config.max_train_steps
    summary = {"method": args.method, "model": args.model, "reward": repr(problem.reward), "steps": state.step,
               "samples": state.samples, "finished": done, "train_seconds": time.perf_counter() - start,
               "num_processes": accelerator.num_processes}
    accelerator.wait_for_everyone()
    if done and runtime.is_main:
        with evaluation_weights(state):
            final = validate(state, problem, args, output_dir)
            save_result(output_dir, args, state, problem)
        runtime.log(final, state.step)
        summary["final"] = final
        with open(output_dir / "train_summary.json", "w") as f:
            json.dump({**summary, "history": state.history, "config": asdict(config), "args": vars(args)}, f,
                      indent=1, default=str)
        accelerator.print(f"wrote {output_dir}: final validation {json.dumps(final)}")
    end_training(accelerator, runtime.wrapped)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of ``python -m difflab.distill.align`` (errors in the flags: a message, exit status 2)."""
    from .loop import trainer_main

    return trainer_main(build_parser(), run, argv)


if __name__ == "__main__":
    main()
