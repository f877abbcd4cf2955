"""The alignment harness shared by AWM and the DDPO baseline: problems, state, one iteration, evaluation.

One iteration = one on-policy round: draw ``num_groups x group_size`` samples from the current policy
(AWM: any scheduler, ODE by default; DDPO: the stochastic DDIM-eta step with log-likelihoods on the same
timestep grid), score them with the reward, turn rewards into group advantages, take ONE optimizer step
on the method's loss (gradient-norm clipping at 1, as both reference codes), update the EMA anchor.
Both methods share everything but the loss (:mod:`~difflab.distill.awm`, :mod:`~difflab.distill.ddpo`),
so "reward per generated sample" compares the losses and nothing else.

Problems (:class:`AlignProblem`): a built-in digits model (``digits-flow``, ``digits-ddpm`` or any
DigitsPipeline directory; labels = one class or the null class), a 2-D Gaussian mixture whose
denoiser is an MLP fitted to the exact one (:func:`mixture_problem`), where the ideal aligned
distribution -- the mixture restricted to the reward region -- is known exactly, and diffusers
pipelines (:func:`pipeline_problem`: DDPMPipeline, or Stable Diffusion 1.x / 2.x / XL / 3 or Flux with a
prompt list, whose latents are decoded by the VAE before the reward sees them; the reward gets the prompts).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..schedule import NoiseSchedule
from .awm import WEIGHTINGS, awm_rows, awm_rows_loss
from .ddpo import ddpo_rows, ddpo_rows_loss, trainable_steps
from .engine import backward, clip_and_step, global_mean, step_generator
from .loop import Runtime, check_finite
from .rewards import Reward, group_advantages
from .rollout import ode_rollout, sde_rollout, training_timestep_indices

METHODS = ("awm", "ddpo")


@dataclass
class AlignConfig:
    """Settings of an alignment run. Defaults: AWM reference configuration where it applies (see docs)."""

    method: str = "awm"
    max_train_steps: int = 100  # rollout + update rounds
    num_groups: int = 4  # groups (prompts) per round and process
    group_size: int = 16
    num_inference_steps: int = 10
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0  # linear warmup over the first rounds (diffusers' constant_with_warmup)
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    advantage_std: str = "global"
    advantage_clip: float = 5.0
    advantage_max: float = 1.0
    # AWM
    train_timesteps: int = 6
    skip_last_fraction: float = 0.1  # AWM never trains on the last 10% of the grid (reference default)
    weighting: str = "ghuber"
    kl_beta: float = 0.003
    ema_beta: float = 1.0
    ema_decay_max: float = 0.3  # anchor decay min(ema_decay_max, ema_decay_ramp * step)
    ema_decay_ramp: float = 0.001
    # evaluation EMA of the policy weights (diffusers' --use_ema; not the anchor above): validations and the
    # saved model use it. Decay min(ema_decay, (1 + k) / (10 + k)) after k earlier updates (the first update
    # copies), as diffusers' EMAModel and the AWM reference code (0.99) have it.
    use_ema: bool = False
    ema_decay: float = 0.99
    # DDPO
    eta: float = 1.0
    clip_range: float = 1e-4
    ddpo_kl_beta: float = 0.0
    seed: int = 0
    checkpointing_steps: int = 50
    train_batch_size: int | None = None  # rows (sample x training step) per backward pass; None: all at once

    def validate(self) -> None:
        """ValueError naming the setting when one is out of range."""
        if self.method not in METHODS:
            raise ValueError(f"unknown alignment method {self.method!r}; use one of {', '.join(METHODS)}.")
        for name in ("max_train_steps", "num_groups", "group_size", "num_inference_steps", "train_timesteps",
                     "checkpointing_steps", "train_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_inference_steps < 3:
            raise ValueError(f"num_inference_steps must be >= 3 (AWM skips the first step and the last 10%), "
                             f"got {self.num_inference_steps}.")
        if not 0.0 <= self.skip_last_fraction < 1.0:
            raise ValueError(f"skip_last_fraction must be in [0, 1), got {self.skip_last_fraction}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown AWM weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}.")
        if self.eta <= 0 and self.method == "ddpo":
            raise ValueError("the DDPO baseline needs stochastic rollouts: eta must be > 0 (1 = DDPM / SDE).")

    @property
    def batch_size(self) -> int:
        return self.num_groups * self.group_size

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of round ``step`` (0-based): linear warmup to ``learning_rate`` over
        ``lr_warmup_steps`` rounds, then constant. A function of the round alone, so resuming repeats it."""
        if self.lr_warmup_steps == 0:
            return self.learning_rate
        return self.learning_rate * min(1.0, (step + 1) / self.lr_warmup_steps)


@dataclass
class AlignProblem:
    """What is aligned: a trainable denoiser, its schedule and sampler, labels, a reward, evaluation."""

    net: nn.Module
    schedule: NoiseSchedule
    prediction_type: str
    make_scheduler: Callable[[], Any]
    sample_shape: tuple[int, ...]
    reward: Reward
    group_labels: torch.Tensor | None  # the labels groups are drawn for, in turn, or None (unconditional)
    evaluate: Callable[[nn.Module, int], dict] | None = None
    name: str = ""
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # model space -> images (a VAE), or identity
    prompts: list[str] | None = None  # text pipelines: group_labels index these
    pipeline: Any = None  # diffusers pipelines: the pipeline the aligned denoiser is saved into
    component: str = "unet"  # the pipeline component the denoiser is ("transformer": Stable Diffusion 3, Flux)
    saved_scheduler: Callable[[], Any] | None = None  # saved with the result instead of make_scheduler's (Flux)
    sample_batch_size: int | None = None  # samples per network call in rollouts and evaluations (None: all)

    def labels(self, num_groups: int, group_size: int, rank: int = 0, round_index: int = 0,
               num_processes: int = 1) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(labels (B,) or None, group ids (B,)); groups of process ``rank`` get their own ids, and successive
        groups (over processes and rounds) take the group labels in turn."""
        groups = torch.arange(num_groups).repeat_interleave(group_size) + rank * num_groups
        if self.group_labels is None:
            return None, groups
        first = (round_index * num_processes + rank) * num_groups
        labels = self.group_labels[(first + torch.arange(num_groups)) % len(self.group_labels)]
        return labels.repeat_interleave(group_size), groups

    def to(self, device: torch.device | str) -> AlignProblem:
        """Move the trained network (and a latent pipeline's VAE, which decodes every rollout) to ``device``."""
        self.net.to(device)
        vae = getattr(self.pipeline, "vae", None)
        if vae is not None:
            vae.to(device)
        return self

    def rewards(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The reward of model-space samples: decoded first, with the prompts (text pipelines) or labels."""
        images = x0 if self.decode is None else self.decode(x0)
        if self.prompts is not None and labels is not None:
            return self.reward(images, [self.prompts[i] for i in labels.tolist()])
        return self.reward(images, labels)


@dataclass
class AlignState:
    """Everything a checkpoint holds: policy, frozen reference, EMA anchor, optimizer, counters, history, and
    the evaluation EMA (``diffusers.training_utils.EMAModel`` of the policy's parameters) with ``use_ema``."""

    policy: nn.Module
    reference: nn.Module
    anchor: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    samples: int = 0
    history: list[dict] = field(default_factory=list)
    ema: Any = None

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "anchor": self.anchor.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "samples": self.samples,
                "history": self.history, "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if (self.ema is None) != (state.get("ema") is None):
            raise ValueError("the checkpoint was saved " + ("without" if self.ema is not None else "with")
                             + " --use_ema; resume with the same --use_ema setting (or start a new --output_dir).")
        self.policy.load_state_dict(state["policy"], strict=True)
        self.anchor.load_state_dict(state["anchor"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.samples, self.history = state["step"], state["samples"], list(state["history"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(next(self.policy.parameters()).device)  # checkpoints load on the CPU


@contextmanager
def evaluation_weights(state: AlignState) -> Iterator[nn.Module]:
    """The policy to evaluate or save: with the evaluation EMA, its weights copied in (and the training weights
    put back afterwards); otherwise the policy as it is."""
    if state.ema is None:
        yield state.policy
        return
    params = list(state.policy.parameters())
    state.ema.store(params)
    state.ema.copy_to(params)
    try:
        yield state.policy
    finally:
        state.ema.restore(params)


def build_state(problem: AlignProblem, config: AlignConfig, lora_rank: int = 0) -> AlignState:
    """Policy (the problem's network, or LoRA adapters on it), frozen reference copy and EMA anchor, AdamW."""
    config.validate()
    reference = copy.deepcopy(problem.net).eval().requires_grad_(False)
    policy = problem.net.train()
    if lora_rank > 0:
        policy = add_lora(policy, lora_rank)
    anchor = copy.deepcopy(policy).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999))
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(policy.parameters(), decay=config.ema_decay)
    return AlignState(policy, reference, anchor, optimizer, ema=ema)


def add_lora(net: nn.Module, rank: int) -> nn.Module:
    """LoRA adapters (``peft``) on the attention / linear projections; only they are trained."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError("LoRA needs the `peft` package: pip install peft (or drop --lora_rank for full "
                          "fine-tuning).") from None
    targets = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]  # full names: exact matches
    net.requires_grad_(False)
    net = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True),
                                  net)
    return net


@torch.no_grad()
def update_anchor(state: AlignState, config: AlignConfig) -> None:
    """EMA anchor of AWM (a trust region): decay min(ema_decay_max, ema_decay_ramp * step), as the reference."""
    decay = min(config.ema_decay_max, config.ema_decay_ramp * state.step)
    for a, p in zip(state.anchor.parameters(), state.policy.parameters()):
        a.lerp_(p.detach(), 1.0 - decay)


def align_iteration(state: AlignState, problem: AlignProblem, config: AlignConfig,
                    runtime: Runtime | None = None) -> dict:
    """One rollout round and one optimizer step of ``config.method``; returns statistics, advances the state."""
    runtime = runtime or Runtime()
    g = step_generator(config.seed, state.step, runtime.rank)
    labels, groups = problem.labels(config.num_groups, config.group_size, runtime.rank, state.step,
                                    runtime.num_processes)
    shape = (config.batch_size, *problem.sample_shape)
    scheduler = problem.make_scheduler()
    state.policy.eval()
    with runtime.autocast():
        if config.method == "awm":
            x0, grid = ode_rollout(state.policy, scheduler, config.num_inference_steps, labels, shape, g,
                                   problem.sample_batch_size)
        else:
            scheduler.set_timesteps(config.num_inference_steps)
            grid = scheduler.timesteps.detach().float().cpu()
            trajectory = sde_rollout(state.policy, problem.schedule, problem.prediction_type, grid, labels, shape,
                                     g, config.eta, problem.sample_batch_size)
            x0 = trajectory.final
    x0 = x0.float()  # diffusers schedulers return the model output's dtype (bfloat16 under autocast)
    rewards = problem.rewards(x0, labels).double().cpu()
    advantages = group_advantages(rewards, groups, config.advantage_std, config.advantage_clip, config.advantage_max)
    state.policy.train()
    trained = runtime.train_view(state.policy)
    if config.method == "awm":
        steps = training_timestep_indices(len(grid), config.train_timesteps, g, config.skip_last_fraction)
        rows = awm_rows(problem.schedule, problem.prediction_type, x0, labels, advantages.to(x0.device),
                        grid[steps], g)

        def loss_of(part):
            return awm_rows_loss(trained, part, config.weighting, state.reference, config.kl_beta, state.anchor,
                                 config.ema_beta)
    else:
        rows = ddpo_rows(problem.schedule, trajectory, labels, advantages.to(x0.device), trainable_steps(trajectory))

        def loss_of(part):
            return ddpo_rows_loss(trained, problem.schedule, problem.prediction_type, part, config.clip_range,
                                  state.reference, config.ddpo_kl_beta)
    state.optimizer.zero_grad(set_to_none=True)
    for group in state.optimizer.param_groups:
        group["lr"] = config.learning_rate_at(state.step)
    parts = accumulate_gradients(trained, rows, loss_of, config.train_batch_size, runtime)
    grad_norm = clip_and_step([(state.policy, state.optimizer)], config.max_grad_norm, runtime.scaler)[0]
    state.step += 1
    if config.method == "awm" and config.ema_beta > 0:
        update_anchor(state, config)
    if state.ema is not None:
        state.ema.step(state.policy.parameters())
    state.samples += config.batch_size * runtime.num_processes
    stats = {"reward": global_mean(rewards.mean().reshape(1)).item(), "grad_norm": grad_norm,
             "zero_advantage": (advantages == 0).double().mean().item(), **parts}
    if runtime.scaler is not None and not math.isfinite(grad_norm):  # float16 overflow: the scaler skipped the step
        stats["skipped_step"] = 1.0
        del stats["grad_norm"]
    check_finite(stats, state.step - 1)
    return stats


def accumulate_gradients(model: nn.Module, rows: Any, loss_of: Callable[[Any], Any], micro_batch: int | None,
                         runtime: Runtime) -> dict[str, float]:
    """Back-propagate the mean loss over ``rows`` in micro-batches of ``micro_batch`` rows (None: all at once).

    Each micro-batch's mean loss is weighted by its share of the rows, so the accumulated gradient is that of
    the whole batch (up to float rounding) while only one micro-batch's activations are held; processes
    all-reduce once, after the last backward. Returns the row-weighted mean of each logged term.
    """
    n = len(rows)
    chunks = torch.arange(n).split(micro_batch or n)
    stats: dict[str, float] = {}
    for i, index in enumerate(chunks):
        share = len(index) / n
        last = i == len(chunks) - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            with runtime.autocast():
                terms = loss_of(select_rows(rows, index))
            backward(terms.loss * share, runtime.scaler)
        for name, value in terms.stats().items():
            stats[name] = stats.get(name, 0.0) + share * value
    return stats


def select_rows(rows: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a rows dataclass (:class:`~difflab.distill.awm.AWMRows`, ``DDPORows``): every tensor
    field (and each tensor of a tuple field) indexed along its first dimension; None stays None."""
    def pick(value):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(pick(v) for v in value)
        return value[index.to(value.device)]

    return replace(rows, **{f.name: pick(getattr(rows, f.name)) for f in fields(rows)})


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def digits_problem(model: Any, reward: Reward, label: int | None = None, eval_samples: int = 256,
                   target_class: int | None = None, name: str | None = None) -> AlignProblem:
    """A built-in digits model, a DigitsPipeline directory or a loaded DigitsPipeline: labels = ``label``
    (None: the null class)."""
    from ..models import load
    from ..models.digits import NULL_CLASS

    pipe = load(model) if isinstance(model, (str, Path)) else model
    name = str(model) if name is None else name
    if not (hasattr(pipe, "unet") and hasattr(pipe, "scheduler")):
        raise ValueError(f"{model!r} is not a diffusion pipeline (no unet / scheduler); align digits-flow, "
                         "digits-ddpm or a DigitsPipeline directory.")
    scheduler_config = dict(pipe.scheduler.config)
    scheduler_cls = type(pipe.scheduler)
    schedule = NoiseSchedule.from_config(scheduler_config)
    prediction_type = NoiseSchedule.model_prediction_type(scheduler_config)
    group_label = NULL_CLASS if label is None else int(label)
    size = pipe.unet.config.sample_size
    problem = AlignProblem(
        net=pipe.unet, schedule=schedule, prediction_type=prediction_type,
        make_scheduler=lambda: scheduler_cls.from_config(scheduler_config),
        sample_shape=(pipe.unet.config.in_channels, size, size), reward=reward,
        group_labels=torch.tensor([group_label]), name=name)
    problem.evaluate = lambda net, steps: evaluate_digits_policy(problem, net, steps, eval_samples, target_class)
    return problem


@torch.no_grad()
def policy_samples(problem: AlignProblem, net: nn.Module, num_samples: int, steps: int, seed: int = 12345,
                   label: int | None = None) -> torch.Tensor:
    """Deterministic-noise ODE samples of ``net`` with the problem's own scheduler (for evaluation), for
    ``label`` (default: the first group label)."""
    if problem.group_labels is None:
        labels = None
    else:
        labels = torch.full((num_samples,), int(problem.group_labels[0] if label is None else label))
    was_training = net.training
    net.eval()
    x0, _ = ode_rollout(net, problem.make_scheduler(), steps, labels, (num_samples, *problem.sample_shape),
                        torch.Generator().manual_seed(seed), problem.sample_batch_size)
    net.train(was_training)
    return x0


def evaluate_digits_policy(problem: AlignProblem, net: nn.Module, steps: int, num_samples: int,
                           target_class: int | None) -> dict:
    """Reward of fixed-noise ODE samples, class histogram, FD-digits to the real digits of ``target_class``."""
    from ..eval.digits import classifier_outputs, fd_to_class

    x0 = policy_samples(problem, net, num_samples, steps)
    out = {"eval_reward": problem.reward(x0, None).double().mean().item()}
    _, predicted = classifier_outputs(x0)
    if target_class is not None:
        out["eval_class_share"] = float((predicted == target_class).mean())
        out["fd_to_class"] = fd_to_class(x0, target_class)
    return out


def pipeline_problem(pipeline: Any, reward: Reward, prompts: list[str] | None = None, eval_samples: int = 64,
                     name: str = "the pipeline", resolution: int | None = None) -> AlignProblem:
    """A diffusers pipeline with a ``UNet2DModel`` (unconditional: DDPMPipeline), a ``UNet2DConditionModel``
    (Stable Diffusion 1.x / 2.x / XL), an ``SD3Transformer2DModel`` (Stable Diffusion 3) or a
    ``FluxTransformer2DModel`` (Flux); SDXL and Flux at ``resolution`` pixels (default: their own); text pipelines need
    ``prompts``, encoded once, which the groups take in turn. Rollouts run in the denoiser's (latent; for Flux
    packed) space with the pipeline's own scheduler; the reward sees VAE-decoded images in [-1, 1] and the
    prompts."""
    from ..models.conditioning import (
        ModelSpace,
        checked_resolution,
        denoiser_component,
        flux_rollout_scheduler_config,
        is_flux_pipeline,
        is_text_conditioned,
        prompt_conditioned,
    )

    text = is_text_conditioned(pipeline, name)
    if text and not prompts:
        raise ValueError(f"{name} is text-conditioned: pass the prompts to align it on (--prompts).")
    if not text and prompts:
        raise ValueError(f"{name} is unconditional: it takes no prompts; drop --prompts.")
    space = ModelSpace(pipeline, checked_resolution(pipeline, resolution, name))
    component = denoiser_component(pipeline)
    net = prompt_conditioned(pipeline, prompts, space.resolution) if text else getattr(pipeline, component).float()
    scheduler_config, scheduler_cls = dict(pipeline.scheduler.config), type(pipeline.scheduler)
    saved_scheduler = None
    if is_flux_pipeline(pipeline):
        scheduler_config = flux_rollout_scheduler_config(pipeline, space.resolution)
        saved_scheduler = lambda: pipeline.scheduler  # noqa: E731 -- its own (resolution-dependent) shift
    problem = AlignProblem(
        net=net, schedule=NoiseSchedule.from_config(scheduler_config),
        prediction_type=NoiseSchedule.model_prediction_type(scheduler_config),
        make_scheduler=lambda: scheduler_cls.from_config(scheduler_config), sample_shape=space.sample_shape,
        reward=reward, group_labels=torch.arange(len(prompts)) if text else None, name=name,
        decode=space.decode if space.vae is not None else None, prompts=list(prompts) if text else None,
        pipeline=pipeline, component=component, saved_scheduler=saved_scheduler)
    problem.evaluate = lambda net_, steps: evaluate_pipeline_policy(problem, net_, steps, eval_samples)
    return problem


def evaluate_pipeline_policy(problem: AlignProblem, net: nn.Module, steps: int, num_samples: int) -> dict:
    """Mean reward of fixed-noise ODE samples, overall and per prompt (at most 4 prompts)."""
    labels = None if problem.group_labels is None else problem.group_labels[:4]
    per_label = [None] if labels is None else labels.tolist()
    out, means = {}, []
    for label in per_label:
        x0 = policy_samples(problem, net, num_samples, steps, label=label)
        means.append(problem.rewards(x0, None if label is None else torch.full((num_samples,), label)).double().mean())
        if label is not None:
            out[f"eval_reward[{problem.prompts[label]}]"] = means[-1].item()
    return {"eval_reward": torch.stack(means).mean().item(), **out}


def mixture_problem(reward: Reward, hidden: int = 128, depth: int = 3, teacher_steps: int = 2000, seed: int = 0,
                    eval_samples: int = 2000, progress: bool = False) -> AlignProblem:
    """The 2-D ring of 8 unequal modes; the network is an MLP fitted to its exact eps-denoiser."""
    from diffusers import DPMSolverMultistepScheduler

    from ..models.gmm import unequal_ring
    from .lowdim import fit_mlp_teacher
    from .train import SCHEDULE

    mixture = unequal_ring()
    schedule = NoiseSchedule.from_config(SCHEDULE)
    net = fit_mlp_teacher(mixture, schedule, "epsilon", steps=teacher_steps, hidden=hidden, depth=depth, seed=seed,
                          progress=progress)
    problem = AlignProblem(net=net, schedule=schedule, prediction_type="epsilon",
                           make_scheduler=lambda: DPMSolverMultistepScheduler(**SCHEDULE),
                           sample_shape=(mixture.dim,), reward=reward, group_labels=None, name="mixture ring8")
    problem.evaluate = lambda net_, steps: evaluate_mixture_policy(problem, mixture, net_, steps, eval_samples)
    return problem


def restricted_mixture_samples(mixture, reward, n: int, seed: int = 7) -> torch.Tensor:
    """Exact samples of the mixture restricted to the reward's region (rejection sampling)."""
    g = torch.Generator().manual_seed(seed)
    kept, total = [], 0
    for _ in range(1000):
        x = mixture.sample(20 * n, generator=g)
        x = x[reward.inside(x)]
        kept.append(x)
        total += len(x)
        if total >= n:
            return torch.cat(kept)[:n]
    raise ValueError("the reward region holds almost none of the mixture's mass; choose a region on a mode.")


def evaluate_mixture_policy(problem: AlignProblem, mixture, net: nn.Module, steps: int, num_samples: int) -> dict:
    """Reward, share inside the region, energy distance to exact samples of the restricted mixture."""
    from ..eval.energy import energy_distance

    x0 = policy_samples(problem, net, num_samples, steps).double()
    out = {"eval_reward": problem.reward(x0, None).double().mean().item()}
    if hasattr(problem.reward, "inside"):
        out["inside_share"] = problem.reward.inside(x0).double().mean().item()
        target = restricted_mixture_samples(mixture, problem.reward, num_samples)
        out["energy_to_target"] = energy_distance(x0, target)
    return out
