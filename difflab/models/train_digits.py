"""Train the built-in digits models: a class-conditional DDPM, its flow-matching twin, a classifier.

Runs as ``python -m difflab.models.train_digits --model digits-ddpm --output_dir out`` or with
``accelerate launch -m difflab.models.train_digits ...`` on several processes. It follows the
diffusers ``examples/`` conventions: an ``Accelerator`` with a ``ProjectConfiguration``,
``--checkpointing_steps`` / ``--checkpoints_total_limit`` / ``--resume_from_checkpoint latest``
(``accelerate.save_state`` into ``output_dir/checkpoint-{step}``, the EMA state included), EMA
weights via ``diffusers.training_utils.EMAModel``, ``--report_to tensorboard`` (loss and learning rate
per step, under ``output_dir/logs``), and a pipeline directory written with ``save_pretrained`` at the end.

Losses:

* ``digits-ddpm``: eps prediction on a DDPMScheduler-style linear 1000-step beta schedule,
  ``t ~ U{0..999}``, ``x_t = alpha_t x0 + sigma_t eps`` and the target from ``NoiseSchedule``
  (Ho et al. 2020, eq. 14, the "simple" MSE loss). Shipped with a DPMSolverMultistepScheduler.
* ``digits-flow``: rectified-flow velocity ``u = eps - x0`` at ``x_s = (1 - s) x0 + s eps`` with
  ``s ~ U(0, 1)`` (or logit-normal, Esser et al. 2024, eq. 19) and timestep ``1000 s``
  (Liu et al. 2022; Lipman et al. 2023). Shipped with a FlowMatchEulerDiscreteScheduler.
* both: labels replaced by ``NULL_CLASS`` with probability ``--label_dropout`` so the same network
  is the unconditional model of classifier-free guidance (Ho & Salimans 2022, Alg. 1).
* ``digits-classifier``: cross-entropy with random shifts of up to 2 pixels.

Every random draw of step ``k`` comes from a generator seeded by ``(seed, k, process)`` and the
batches of step ``k`` are a fixed function of ``(seed, k)``, so a killed run resumed from its
last checkpoint reaches exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distributed import cpu_without_cuda, end_training
from ..schedule import NoiseSchedule
from ..tracking import accelerator_tracking_kwargs, add_tracking_arguments, start_tracking
from .digits import NULL_CLASS, DigitsClassifier, DigitsPipeline, digits_unet_config, load_digits_dataset

MODELS = ("digits-ddpm", "digits-flow", "digits-classifier")
PREDICTION_TYPES = {"digits-ddpm": "epsilon", "digits-flow": "flow_prediction"}
DEFAULT_STEPS = {"digits-ddpm": 5000, "digits-flow": 5000, "digits-classifier": 1500}
DEFAULT_LR = {"digits-ddpm": 3e-4, "digits-flow": 3e-4, "digits-classifier": 1e-3}
DDPM_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}

# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Attach the training flags to ``parser`` (also used by the ``difflab models train-digits`` CLI)."""
    parser.add_argument("--model", choices=MODELS, required=True, help="Which built-in model to train.")
    parser.add_argument("--output_dir", required=True, help="Where checkpoints and the final model are written.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"Optimizer steps (default per model: {DEFAULT_STEPS}).")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    parser.add_argument("--learning_rate", type=float, default=None, help=f"AdamW peak learning rate (default {DEFAULT_LR}).")
    parser.add_argument("--lr_scheduler", default="cosine",
                        help="diffusers.optimization scheduler name: cosine, constant_with_warmup, linear, ...")
    parser.add_argument("--lr_warmup_steps", type=int, default=200, help="Linear warm-up steps.")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save accelerate state every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="A checkpoint directory, or 'latest' for the newest output_dir/checkpoint-N.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the batches, noise, timesteps and init.")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                        help="Keep an EMA of the weights and save it (default: on for diffusion models).")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay (with the (1+s)/(10+s) warm-up).")
    parser.add_argument("--label_dropout", type=float, default=0.1, help="Probability of the null class (CFG).")
    parser.add_argument("--flow_timestep_sampling", choices=("uniform", "logit_normal"), default="uniform",
                        help="Distribution of the flow time s (digits-flow only).")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--save_fp16", action="store_true", help="Write the final weights in float16 (as shipped).")
    parser.add_argument("--stop_after_steps", type=int, default=None,
                        help="Stop after this global step without writing the final model, as if the run were "
                             "killed (resume it later with --resume_from_checkpoint latest).")
    add_tracking_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags and fill the per-model defaults."""
    parser = argparse.ArgumentParser(description="Train a built-in difflab digits model.")
    return finalize_args(add_arguments(parser).parse_args(argv))


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill per-model defaults and validate values (call it after parsing with :func:`add_arguments`)."""
    if args.max_train_steps is None:
        args.max_train_steps = DEFAULT_STEPS[args.model]
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.model]
    if args.use_ema is None:
        args.use_ema = args.model != "digits-classifier"
    for name in ("max_train_steps", "train_batch_size", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label_dropout must be in [0, 1), got {args.label_dropout}.")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    return args


# --------------------------------------------------------------------------------------------
# Deterministic batches and randomness
# --------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for the random draws of one process at one global step."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1024 + rank) % (2**63 - 1))


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches of steps ``start..stop-1``: epoch permutations seeded by ``(seed, epoch)``.

    Process ``rank`` of ``world`` takes its slice of each global batch, so batches depend only on
    the global step and resuming mid-epoch sees exactly the batches an uninterrupted run sees.
    """

    def __init__(self, n: int, batch_size: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size * world > n:
            raise ValueError(f"The global batch {batch_size * world} exceeds the data set size {n}; lower --train_batch_size.")
        self.n, self.bs, self.start, self.stop = n, batch_size, start, stop
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        per_epoch = self.n // (self.bs * self.world)
        epoch, perm = -1, None
        for step in range(self.start, self.stop):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            lo = ((step % per_epoch) * self.world + self.rank) * self.bs
            yield perm[lo: lo + self.bs].tolist()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy: dy + h, dx: dx + w] for i, (dy, dx) in enumerate(offs)])


# --------------------------------------------------------------------------------------------
# Models, schedules and losses
# --------------------------------------------------------------------------------------------


def build_model(model: str) -> torch.nn.Module:
    """A freshly initialised network for ``model`` (uses the global torch seed)."""
    if model == "digits-classifier":
        return DigitsClassifier()
    from diffusers import UNet2DModel

    return UNet2DModel(**digits_unet_config())


def training_scheduler_config(model: str) -> dict[str, Any]:
    """Scheduler config of the training noise schedule (DDPM linear betas, or flow matching)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if model == "digits-flow":
        return dict(FlowMatchEulerDiscreteScheduler().config)
    return dict(DDPMScheduler(**DDPM_BETAS, prediction_type="epsilon", clip_sample=False).config)


def sampling_scheduler(model: str):
    """Scheduler shipped with the pipeline: DPM-Solver++(2M) for the eps model, FlowMatchEuler for flow."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if model == "digits-flow":
        return FlowMatchEulerDiscreteScheduler()
    return DPMSolverMultistepScheduler(**DDPM_BETAS, prediction_type="epsilon")


def diffusion_loss(
    model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, ns: NoiseSchedule, args: argparse.Namespace,
    g: torch.Generator,
) -> torch.Tensor:
    """MSE between the network output and the NoiseSchedule target at random timesteps."""
    b = x0.shape[0]
    if args.model == "digits-flow":
        s = torch.rand(b, generator=g) if args.flow_timestep_sampling == "uniform" else torch.randn(b, generator=g).sigmoid()
        t = s * ns.num_train_timesteps
    else:
        t = torch.randint(0, ns.num_train_timesteps, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    drop = torch.rand(b, generator=g).to(labels.device) < args.label_dropout
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    x_t = ns.add_noise(x0, noise, t)
    target = ns.training_target(x0, noise, t, PREDICTION_TYPES[args.model])
    pred = model(x_t, t.to(x0.device), class_labels=labels).sample
    return F.mse_loss(pred.float(), target.float())


def classifier_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Cross-entropy on randomly shifted digits."""
    x = random_shift(x0.cpu(), 2, g).to(x0.device)
    return F.cross_entropy(model(x), labels)


@torch.no_grad()
def heldout_accuracy(classifier: DigitsClassifier, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of the classifier on the held-out digits."""
    images, labels = load_digits_dataset("heldout")
    was_training = classifier.training
    classifier.eval()
    pred = classifier(images.to(device)).argmax(-1).cpu()
    classifier.train(was_training)
    return float((pred == labels).float().mean())


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    """The checkpoint to resume from: an explicit path, the newest one ('latest'), or None."""
    if resume is None:
        return None
    if resume == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a directory; pass a checkpoint-N "
                                f"directory or 'latest'.")
    return path


def save_checkpoint(accelerator, args: argparse.Namespace, step: int) -> None:
    """``accelerator.save_state`` to ``checkpoint-{step}``, first pruning to ``checkpoints_total_limit``."""
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        old = _checkpoints(args.output_dir)
        for path in old[: max(0, len(old) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(path)
    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace):
    """Accelerator, model, optimizer, LR schedule and EMA, prepared and registered for checkpointing."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu_without_cuda(),
                              **accelerator_tracking_kwargs(args))
    start_tracking(accelerator, f"difflab-train-{args.model}", args)
    set_seed(args.seed)
    model = build_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n,
                                 num_training_steps=args.max_train_steps * n)
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=type(model), model_config=model.config)
        ema.to(accelerator.device)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return accelerator, model, optimizer, lr_scheduler, ema


def _dataloader(args: argparse.Namespace, accelerator, start: int, stop: int) -> torch.utils.data.DataLoader:
    images, labels = load_digits_dataset("train")
    sampler = StepBatchSampler(len(images), args.train_batch_size, start, stop, args.seed,
                               accelerator.process_index, accelerator.num_processes)
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers)


def _train_step(args, accelerator, model, optimizer, lr_scheduler, ema, ns, batch, step: int) -> float:
    """One optimizer step on ``batch``; returns the loss."""
    x0, labels = (t.to(accelerator.device) for t in batch)
    g = step_generator(args.seed, step, accelerator.process_index)
    with accelerator.autocast():
        if ns is None:
            loss = classifier_loss(model, x0, labels, g)
        else:
            loss = diffusion_loss(model, x0, labels, ns, args, g)
    accelerator.backward(loss)
    if args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(accelerator.unwrap_model(model).parameters())
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"The training loss became {loss.item()} at step {step + 1}; lower --learning_rate "
                                 "or use --mixed_precision no.")
    return loss.item()


def _save_final(args: argparse.Namespace, accelerator, model, ema) -> dict[str, Any]:
    """Write the final pipeline (or classifier) directory with EMA weights; returns summary fields."""
    model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(model.parameters())
    model = model.cpu().float().eval()
    summary: dict[str, Any] = {}
    if args.model == "digits-classifier":
        summary["heldout_accuracy"] = heldout_accuracy(model)
        accelerator.print(f"Held-out accuracy: {summary['heldout_accuracy']:.4f}")
        to_save = model
    else:
        to_save = DigitsPipeline(unet=model, scheduler=sampling_scheduler(args.model))
    if args.save_fp16:
        model.half()
    to_save.save_pretrained(args.output_dir, safe_serialization=True)
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with already-parsed ``args`` (see :func:`add_arguments`); returns a summary dict."""
    args = finalize_args(args)
    accelerator, model, optimizer, lr_scheduler, ema = _setup(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    ns = None if args.model == "digits-classifier" else NoiseSchedule.from_config(training_scheduler_config(args.model))
    step = 0
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        accelerator.load_state(str(resume))
        step = int(resume.name.split("-")[-1])
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint found in {args.output_dir}; starting a new run.")
    stop = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    loader = _dataloader(args, accelerator, step, stop)
    bar = tqdm(total=args.max_train_steps, initial=step, desc=args.model, disable=not accelerator.is_local_main_process)
    model.train()
    start_time, start_step, loss = time.perf_counter(), step, float("nan")
    for batch in loader:
        loss = _train_step(args, accelerator, model, optimizer, lr_scheduler, ema, ns, batch, step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        if step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, step)
    bar.close()
    elapsed = time.perf_counter() - start_time
    done = step - start_step
    accelerator.print(f"Training time: {elapsed:.1f} s for {done} steps ({elapsed / max(done, 1):.3f} s/step)")
    summary = {"model": args.model, "steps": step, "final_loss": loss, "train_seconds": elapsed,
               "steps_this_run": done, "num_processes": accelerator.num_processes}
    accelerator.wait_for_everyone()
    if step >= args.max_train_steps and accelerator.is_main_process:
        summary.update(_save_final(args, accelerator, model, ema))
        with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
            json.dump({**summary, "args": vars(args)}, f, indent=2)
    end_training(accelerator)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m difflab.models.train_digits``."""
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
