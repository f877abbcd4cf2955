"""f-distill trainer for low-dimensional data (Gaussian-mixture test beds), in plain Python.

The teacher is any :class:`~difflab.distill.engine.ScoreModel` (by default the exact
:class:`~difflab.models.gmm.GMMDenoiser` of the mixture); "real" data for the discriminator are exact
mixture samples. The student starts from a teacher *network* (an :class:`MLPDenoiser`, e.g. fitted to
the exact denoiser by :func:`fit_mlp_teacher`): the generator is a copy evaluated at the largest
timestep on pure noise, and the fake score starts as a second copy (DMD2 initialization).

One iteration is either a critic update (fake score by DSM on generator samples, plus the
discriminator head with the logistic loss on fake x_t and real x_t' at an independent t') or, every
``critic_updates + 1``-th iteration, a generator update (:func:`difflab.distill.fdistill.generator_loss`),
followed by the generator's EMA update: the two-time-scale rule of DMD2 / f-distill.

Every random draw of iteration k comes from :func:`~difflab.distill.engine.step_generator` (seed, k),
so a run resumed from ``checkpoint-k`` (networks, optimizers, EMA, ratio bins, RNG state) ends at the
weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.gmm import GaussianMixture, GMMDenoiser
from ..schedule import NoiseSchedule
from .engine import (
    EMA,
    ScoreModel,
    backward,
    clip_and_step,
    dsm_loss,
    frozen,
    gan_discriminator_loss,
    noised,
    sample_timesteps,
    step_generator,
)
from .fdistill import RatioNormalizer, canonical_divergence, fdistill_weights, generator_loss
from .nets import (
    DiscriminatorHead,
    MLPDenoiser,
    OneStepGenerator,
    default_generator_timestep,
    inner_module,
    strict_load,
)

HEAD_FEATURES = ("fake", "teacher")


@dataclass
class FDistillConfig:
    """Hyper-parameters of a low-dimensional f-distill run (paper defaults where they transfer).

    ``max_train_steps`` counts iterations (critic and generator updates together, as FastGen does);
    ``critic_updates`` fake-score / discriminator updates come before each generator update.
    ``t_range`` is the fraction of the largest timestep where t is drawn (DMD2: 0.02 to 0.98).
    ``generator_timestep`` is the diffusers timestep at which the generator's denoiser sees pure noise
    (DMD2's conditioning timestep; None: :func:`~difflab.distill.nets.default_generator_timestep`, the
    largest one unless an eps model's alpha there is tiny: x0 = (z - sigma eps) / alpha amplifies every
    change of eps by 1 / alpha, and a lower conditioning timestep gives a better-conditioned generator).
    """

    divergence: str = "js"
    max_train_steps: int = 3000
    batch_size: int = 512
    critic_updates: int = 4
    lr_generator: float = 1e-4
    lr_fake: float = 1e-3
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    gan_weight: float = 1e-3
    disc_weight: float = 1.0
    head_features: str = "fake"
    head_hidden: int = 64
    t_range: tuple[float, float] = (0.02, 0.98)
    num_bins: int = 10
    ratio_ema: float = 0.0
    ratio_range: tuple[float, float] = (0.1, 20.0)
    logit_clamp: float = 10.0
    normalize_h: bool = True
    ema_decay: float = 0.99
    max_grad_norm: float = 10.0
    seed: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    generator_timestep: float | None = None

    def __post_init__(self) -> None:
        self.divergence = canonical_divergence(self.divergence)
        if self.head_features not in HEAD_FEATURES:
            raise ValueError(f"head_features {self.head_features!r}; use one of {list(HEAD_FEATURES)}.")
        for name in ("max_train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.critic_updates < 0:
            raise ValueError(f"critic_updates must be >= 0, got {self.critic_updates}.")
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range (--t_range) must be fractions 0 <= low < high <= 1 of the largest timestep, "
                             f"got {self.t_range}.")

    def is_generator_step(self, step: int) -> bool:
        """True if iteration ``step`` (0-based) updates the generator: the last of each TTUR cycle."""
        return (step + 1) % (self.critic_updates + 1) == 0


@dataclass
class FDistillState:
    """Everything a low-dimensional run trains or carries between iterations (saved in checkpoints)."""

    generator: OneStepGenerator
    fake: MLPDenoiser
    head: DiscriminatorHead
    normalizer: RatioNormalizer
    opt_generator: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    opt_head: torch.optim.Optimizer
    ema: EMA
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "generator": self.generator.state_dict(),
                "fake": self.fake.state_dict(), "head": self.head.state_dict(),
                "normalizer": self.normalizer.state_dict(), "opt_generator": self.opt_generator.state_dict(),
                "opt_fake": self.opt_fake.state_dict(), "opt_head": self.opt_head.state_dict(),
                "ema": self.ema.state_dict(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        for name in ("generator", "fake", "head", "normalizer", "opt_generator", "opt_fake", "opt_head", "ema"):
            getattr(self, name).load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"])


# --------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------


@dataclass
class LowDimProblem:
    """The fixed parts of a run: data, schedule, teacher, and the network whose features the head reads.

    The step functions only use the methods below, so an image problem
    (:class:`difflab.distill.digits.UNetDistillProblem`) plugs into the same steps.
    """

    mixture: GaussianMixture
    schedule: NoiseSchedule
    teacher: ScoreModel
    teacher_net: MLPDenoiser
    initial_generator: dict | None = None  # state dict of a student to start from (see new_generator)

    @property
    def prediction_type(self) -> str:
        return self.teacher_net.prediction_type

    @property
    def feature_dim(self) -> int:
        return self.teacher_net.feature_dim

    @property
    def device(self) -> torch.device:
        """Where the networks live and every batch goes (the teacher network's device)."""
        return next(self.teacher_net.parameters()).device

    def t_bounds(self, config: FDistillConfig) -> tuple[float, float]:
        """The timestep interval of ``config.t_range`` on this schedule."""
        return config.t_range[0] * self.schedule.t_max, config.t_range[1] * self.schedule.t_max

    def draw_noise(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator inputs: (z, class labels or None)."""
        return torch.randn(n, self.mixture.dim, generator=g).to(self.device), None

    def draw_real(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Real data for the discriminator: (x, class labels or None)."""
        return self.mixture.sample(n, generator=g).float().to(self.device), None

    def score(self, module: nn.Module) -> ScoreModel:
        """A trained denoiser (the fake score) as the engine sees it."""
        return ScoreModel(module, self.prediction_type)

    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Features of the frozen teacher network (the ``head_features='teacher'`` option)."""
        return self.teacher_net(x_t, t, return_features=True).features


def generator_timestep(config: FDistillConfig, problem: LowDimProblem) -> float:
    """The configured generator timestep, or the default rule on the problem's schedule."""
    if config.generator_timestep is not None:
        return float(config.generator_timestep)
    return default_generator_timestep(problem.schedule, problem.prediction_type)


def new_generator(config: FDistillConfig, problem: LowDimProblem) -> OneStepGenerator:
    """A run's starting generator: a copy of the teacher network seeing pure noise at the generator timestep
    (the DMD2 / f-distill initialization), with the weights of ``problem.initial_generator`` when it holds
    some (a student to refine: the state dict of the network inside the generator, strictly loaded)."""
    generator = OneStepGenerator(copy.deepcopy(problem.teacher_net), problem.schedule,
                                 generator_timestep(config, problem), prediction_type=problem.prediction_type)
    if problem.initial_generator is not None:
        strict_load(inner_module(generator.denoiser), problem.initial_generator, "the initial generator")
    return generator


def build_state(config: FDistillConfig, problem: LowDimProblem) -> FDistillState:
    """Generator from :func:`new_generator`, fake score copied from the problem's teacher network; a seeded
    fresh head; optimizers; EMA (the DMD2 / f-distill initialization)."""
    generator = new_generator(config, problem).train()
    fake = copy.deepcopy(problem.teacher_net).train().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = DiscriminatorHead(problem.feature_dim, config.head_hidden).to(problem.device)
    normalizer = RatioNormalizer((0.0, problem.schedule.t_max), config.num_bins, config.ratio_ema).to(problem.device)
    kw = dict(betas=config.adam_betas, weight_decay=config.weight_decay)
    generator.requires_grad_(True)
    return FDistillState(
        generator=generator, fake=fake, head=head, normalizer=normalizer,
        opt_generator=torch.optim.AdamW(generator.parameters(), lr=config.lr_generator, **kw),
        opt_fake=torch.optim.AdamW(fake.parameters(), lr=config.lr_fake, **kw),
        opt_head=torch.optim.AdamW(head.parameters(), lr=config.lr_head, **kw),
        ema=EMA(generator, config.ema_decay),
    )


def _features(problem: LowDimProblem, config: FDistillConfig, x_t: torch.Tensor, t: torch.Tensor,
              labels: torch.Tensor | None, fake_features: torch.Tensor | None) -> torch.Tensor:
    """Head input: the fake score's features (paper default) or the frozen teacher network's (FastGen)."""
    if config.head_features == "fake":
        return fake_features
    return problem.teacher_features(x_t, t, labels)


def critic_step(state: FDistillState, problem: LowDimProblem, config: FDistillConfig, g: torch.Generator,
                scaler: Any = None) -> dict:
    """Fake-score DSM on generator samples plus the discriminator's logistic loss; steps both (``scaler``: the
    float16 loss scaler, :func:`~difflab.distill.engine.clip_and_step`)."""
    sched, n, on_fake = problem.schedule, config.batch_size, config.head_features == "fake"
    z, labels = problem.draw_noise(n, g)
    with torch.no_grad():
        x0 = state.generator(z, labels)
    t = sample_timesteps(n, problem.t_bounds(config), g, x0.device)
    x_t, eps = noised(sched, x0, t, g)
    fake = problem.score(state.fake)
    dsm, feats_fake = dsm_loss(fake, sched, x0, x_t, eps, t, with_features=on_fake, class_labels=labels)
    x_real, labels_real = problem.draw_real(n, g)
    t_real = sample_timesteps(n, problem.t_bounds(config), g, x0.device)  # independent t' (gan_use_same_t_noise=False)
    x_t_real, _ = noised(sched, x_real, t_real, g)
    feats_real = fake(x_t_real, t_real, True, labels_real)[1] if on_fake else None
    logits_fake = state.head(_features(problem, config, x_t, t, labels, feats_fake))
    logits_real = state.head(_features(problem, config, x_t_real, t_real, labels_real, feats_real))
    disc = gan_discriminator_loss(logits_fake, logits_real)
    loss = dsm + config.disc_weight * disc
    backward(loss, scaler)
    _clip_and_step(config, [(state.fake, state.opt_fake), (state.head, state.opt_head)], scaler)
    acc = 0.5 * ((logits_fake < 0).float().mean() + (logits_real > 0).float().mean())
    return {"dsm_loss": dsm.item(), "disc_loss": disc.item(), "disc_acc": acc.item()}


def generator_step(state: FDistillState, problem: LowDimProblem, config: FDistillConfig, g: torch.Generator,
                   scaler: Any = None) -> dict:
    """The f-distill generator update (fake score and head frozen), then the EMA update."""
    sched, n = problem.schedule, config.batch_size
    fake = problem.score(state.fake)
    with frozen(state.fake, state.head, problem.teacher_net):
        z, labels = problem.draw_noise(n, g)
        x0 = state.generator(z, labels)
        t = sample_timesteps(n, problem.t_bounds(config), g, x0.device)
        x_t, _ = noised(sched, x0, t, g)
        with torch.no_grad():
            x0_teacher, _ = problem.teacher.x0(sched, x_t.detach(), t, class_labels=labels)
        x0_fake, feats = fake.x0(sched, x_t, t, with_features=config.head_features == "fake", class_labels=labels)
        logits = state.head(_features(problem, config, x_t, t, labels, feats))
        h, r = fdistill_weights(logits, t, config.divergence, state.normalizer, config.logit_clamp,
                                config.ratio_range, config.normalize_h)
        loss, stats = generator_loss(x0, x0_teacher, x0_fake.detach(), logits, h, config.gan_weight)
        backward(loss, scaler)
    _clip_and_step(config, [(state.generator, state.opt_generator)], scaler)
    state.fake.zero_grad(set_to_none=True)
    state.head.zero_grad(set_to_none=True)
    state.ema.update(state.generator)
    return {**stats, "r_mean": float(r.mean()), "h_max": float(h.max())}


def _clip_and_step(config: FDistillConfig, pairs: list[tuple[nn.Module, torch.optim.Optimizer]],
                   scaler: Any = None) -> None:
    clip_and_step(pairs, config.max_grad_norm, scaler)
    for _, opt in pairs:
        opt.zero_grad(set_to_none=True)


def train_iteration(state: FDistillState, problem: LowDimProblem, config: FDistillConfig) -> dict:
    """Run iteration ``state.step`` (critic or generator update, by the TTUR cycle) and advance it."""
    g = step_generator(config.seed, state.step)
    if config.is_generator_step(state.step):
        stats = generator_step(state, problem, config, g)
    else:
        stats = critic_step(state, problem, config, g)
    for key, value in stats.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{key} became {value} at iteration {state.step + 1}; lower the learning "
                                     "rates or the GAN weight.")
    state.step += 1
    return stats


# --------------------------------------------------------------------------------------------
# Checkpoints and the training loop
# --------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories of ``output_dir`` (with their state.pt), oldest first; one a
    killed process left without state.pt is skipped."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(state: FDistillState, config: FDistillConfig, output_dir: str | Path) -> Path:
    """Write ``output_dir/checkpoint-{step}/state.pt`` (atomically: a temporary file, then a rename)."""
    path = Path(output_dir) / f"checkpoint-{state.step}"
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"config": asdict(config), "state": state.state_dict()}, tmp)
    tmp.replace(path / "state.pt")
    return path


def resolve_checkpoint(output_dir: str | Path | None, resume_from: str | Path | None) -> Path | None:
    """An explicit checkpoint directory, the newest one for ``'latest'`` (None if there is none), or None."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        if output_dir is None:
            raise ValueError("resume_from='latest' needs output_dir.")
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no state.pt); pass checkpoint-N or 'latest'.")
    return path


@dataclass
class FDistillRun:
    """Result of :func:`train_fdistill_lowdim`."""

    generator: OneStepGenerator
    ema_generator: OneStepGenerator
    state: FDistillState
    seconds: float
    history: list[dict]


def exact_teacher(mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> ScoreModel:
    """The exact mixture denoiser as a teacher ScoreModel."""
    return ScoreModel(GMMDenoiser(mixture, schedule, prediction_type), prediction_type)


def train_fdistill_lowdim(
    config: FDistillConfig,
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    teacher_net: MLPDenoiser,
    teacher: ScoreModel | None = None,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log_every: int = 100,
    init_generator: OneStepGenerator | None = None,
) -> FDistillRun:
    """Distill a one-step generator of ``mixture`` with f-distill.

    Args:
        config: hyper-parameters (divergence, steps, learning rates, ...).
        mixture: the data distribution; its exact samples are the discriminator's real data.
        schedule: the teacher's noise schedule.
        teacher_net: a teacher network with features; the generator and the fake score start as copies.
        teacher: the teacher score (default: the exact GMMDenoiser in ``teacher_net``'s prediction type).
        output_dir: where ``checkpoint-N`` directories go (every ``config.checkpointing_steps``).
        resume_from: a checkpoint directory or ``'latest'``.
        stop_after: stop after this iteration, as if killed (for resume tests).
        progress: show a tqdm bar.
        log_every: keep the iteration statistics every this many iterations in ``history``.
        init_generator: start the generator (and its EMA) from these weights instead of the teacher
            copy (a warm start from an earlier one-step generator of the same architecture).
    """
    teacher = teacher or exact_teacher(mixture, schedule, teacher_net.prediction_type)
    teacher_net = copy.deepcopy(teacher_net).eval().requires_grad_(False)
    problem = LowDimProblem(mixture, schedule, teacher, teacher_net)
    state = build_state(config, problem)
    if init_generator is not None:
        state.generator.load_state_dict(init_generator.state_dict())
        state.ema.model.load_state_dict(init_generator.state_dict())
    ckpt = resolve_checkpoint(output_dir, resume_from)
    if ckpt is not None:
        state.load_state_dict(torch.load(ckpt / "state.pt", weights_only=False)["state"])
    stop = min(config.max_train_steps, stop_after if stop_after is not None else config.max_train_steps)
    bar = tqdm(total=config.max_train_steps, initial=state.step, desc=f"f-distill {config.divergence}",
               disable=not progress, leave=False)
    start, latest = time.perf_counter(), {}
    while state.step < stop:
        latest.update(train_iteration(state, problem, config))  # the newest critic and generator statistics
        if state.step % log_every == 0:
            state.history.append({"step": state.step, **latest})
        bar.update(1)
        if config.checkpointing_steps and output_dir is not None and state.step % config.checkpointing_steps == 0:
            save_checkpoint(state, config, output_dir)
    bar.close()
    return FDistillRun(state.generator, state.ema.model, state, time.perf_counter() - start, state.history)


# --------------------------------------------------------------------------------------------
# The teacher network
# --------------------------------------------------------------------------------------------


def fit_mlp_teacher(mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                    steps: int = 3000, batch_size: int = 512, lr: float = 2e-3, hidden: int = 128, depth: int = 3,
                    seed: int = 0, progress: bool = True) -> MLPDenoiser:
    """An MLP denoiser regressed onto the exact mixture denoiser (a low-variance stand-in for DSM).

    At x_t = alpha_t x0 + sigma_t eps with x0 from the mixture and t uniform on [0, t_max], the target
    is the exact GMMDenoiser output in ``prediction_type``; cosine learning-rate decay.
    """
    exact = GMMDenoiser(mixture, schedule, prediction_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MLPDenoiser(mixture.dim, hidden, depth, prediction_type)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in tqdm(range(steps), desc="fit MLP teacher", disable=not progress, leave=False):
        g = step_generator(seed + 7777, step)
        x0 = mixture.sample(batch_size, generator=g).float()
        t = sample_timesteps(batch_size, (0.0, schedule.t_max), g)
        x_t, _ = noised(schedule, x0, t, g)
        loss = torch.nn.functional.mse_loss(net(x_t, t).sample, exact(x_t, t).sample)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr_sched.step()
    return net.eval()
