"""DisBack: distribution backtracking for one-step distillation, as a wrapper of the f-distill / DMD engine.

Zhang, Yang, Li et al., "Distribution Backtracking Builds a Faster Convergence Trajectory for
(One-step) Diffusion Distillation", ICLR 2025 (arXiv 2408.15991). Early in distillation the
student's samples lie where the teacher score is inaccurate ("score mismatch"); DisBack replaces the
single teacher by a path of intermediate targets that starts near the initial student and ends at
the teacher.

* Stage 1, degradation recording (README eq. 7): a copy s' of the teacher score is fine-tuned by
  denoising score matching (the teacher's own objective) on noised samples of the *frozen* initial
  student G^0. Every ``node_interval`` steps s' is saved: node 0 = the teacher, ..., node N ~ the
  score of G^0's distribution.
* Stage 2, backtracking: targets T_j = node N - j (T_0 = node N, T_N = node 0 = the teacher). The
  fake score starts at node N (it already fits G^0), the target index at j = 1, and the usual
  distribution-matching update (score difference s_fake - s_target, eq. 8; here the f-distill /
  DMD2 step of :mod:`difflab.distill.lowdim`, rkl = DMD2) runs against T_j. j advances every
  ``backtrack_interval`` iterations (the released code's fixed schedule) or, with
  ``switch="plateau"``, earlier when the fake score's DSM loss has stopped falling (see
  :class:`Backtracker`). At j = N the target is the trainer's teacher and the run continues as plain
  f-distill / DMD2.

Nodes live on disk (``output_dir/nodes/node-K.pt``, plain state dicts) and are loaded one at a time into
one network; every load is strict (all keys and shapes must match, :func:`strict_load`), the silent
``strict=False`` no-op of the released code being a known pitfall. Both stages write resumable
checkpoints ``checkpoint-{global step}`` (stage-1 steps first, then stage-2 iterations).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.gmm import GaussianMixture
from ..schedule import NoiseSchedule
from .engine import (
    ScoreModel,
    backward,
    clip_and_step,
    dsm_loss,
    global_sum,
    noised,
    sample_timesteps,
    step_generator,
)
from .loop import Runtime, check_finite, fdistill_iteration, write_checkpoint
from .lowdim import (
    FDistillConfig,
    FDistillState,
    LowDimProblem,
    build_state,
    exact_teacher,
    new_generator,
    resolve_checkpoint,
)
from .nets import MLPDenoiser, OneStepGenerator, strict_load

SWITCH_RULES = ("fixed", "plateau")
DEGRADATION_SEED_SALT = 104_729  # stage-1 draws use their own stream: step_generator(seed + salt, k, rank)


@dataclass
class DisBackConfig:
    """DisBack hyper-parameters; ``base`` is the distribution-matching run of stage 2 (default DMD2 = rkl).

    ``num_nodes`` N checkpoints after node 0, ``node_interval`` stage-1 steps apart (released SDXL
    setting: 10 nodes, 100 steps apart). Stage 2 runs ``base.max_train_steps`` iterations and moves
    to the next target after ``backtrack_interval`` iterations at a target (released: 1000), or with
    ``switch="plateau"`` as soon as the fake score's DSM loss plateaus (:class:`Backtracker`).
    """

    base: FDistillConfig = field(default_factory=lambda: FDistillConfig(divergence="rkl"))
    num_nodes: int = 4
    node_interval: int = 100
    degradation_lr: float = 1e-3
    degradation_batch_size: int | None = None
    backtrack_interval: int = 300
    switch: str = "fixed"
    plateau_window: int = 50
    plateau_tol: float = 0.01
    min_node_steps: int = 50

    def __post_init__(self) -> None:
        if self.switch not in SWITCH_RULES:
            raise ValueError(f"switch {self.switch!r}; use one of {list(SWITCH_RULES)}.")
        for name in ("num_nodes", "node_interval", "backtrack_interval", "plateau_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.min_node_steps < 0 or self.plateau_tol < 0:
            raise ValueError("min_node_steps and plateau_tol must be >= 0.")

    @property
    def degradation_steps(self) -> int:
        """Stage-1 length N * node_interval."""
        return self.num_nodes * self.node_interval

    @property
    def total_steps(self) -> int:
        """Global steps of the whole run: stage 1, then stage 2."""
        return self.degradation_steps + self.base.max_train_steps

    def to_dict(self) -> dict:
        return {**asdict(self), "base": asdict(self.base)}


# --------------------------------------------------------------------------------------------
# Nodes on disk
# --------------------------------------------------------------------------------------------


def node_path(nodes_dir: str | Path, k: int) -> Path:
    """File of node k."""
    return Path(nodes_dir) / f"node-{k:03d}.pt"


def save_node(module: nn.Module, nodes_dir: str | Path, k: int) -> Path:
    """Write ``module``'s state dict as node k (atomically)."""
    path = node_path(nodes_dir, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({name: t.detach().cpu().clone() for name, t in module.state_dict().items()}, tmp)
    tmp.replace(path)
    return path


def load_node(module: nn.Module, nodes_dir: str | Path, k: int) -> nn.Module:
    """Strictly load node k from disk into ``module``; returns the module."""
    path = node_path(nodes_dir, k)
    if not path.is_file():
        raise FileNotFoundError(f"DisBack node {k} is missing ({path}); run stage 1 (degradation recording) "
                                "again or resume it from its checkpoint.")
    strict_load(module, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return module


# --------------------------------------------------------------------------------------------
# Stage 1: degradation recording
# --------------------------------------------------------------------------------------------


@dataclass
class DegradationState:
    """Stage 1: the score copy being degraded toward the student, its optimizer, the step."""

    score: MLPDenoiser
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, config: DisBackConfig, teacher_net: MLPDenoiser) -> DegradationState:
        score = copy.deepcopy(teacher_net).train().requires_grad_(True)
        opt = torch.optim.AdamW(score.parameters(), lr=config.degradation_lr, betas=config.base.adam_betas,
                                weight_decay=config.base.weight_decay)
        return cls(score, opt)

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": self.losses, "score": self.score.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses = int(state["step"]), list(state["losses"])
        strict_load(self.score, state["score"], "stage-1 checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])


def initial_student(problem: LowDimProblem, config: FDistillConfig | None = None) -> OneStepGenerator:
    """G^0, the frozen initial student: the generator stage 2 starts from (:func:`difflab.distill.lowdim.
    new_generator`: the teacher network at the generator timestep on pure noise, or a given student)."""
    return new_generator(config or FDistillConfig(), problem).eval().requires_grad_(False)


def degradation_step(deg: DegradationState, student: OneStepGenerator, problem: LowDimProblem,
                     config: DisBackConfig, runtime: Runtime) -> float:
    """One DSM step of the score copy on noised samples of the frozen student (README eq. 7)."""
    base = config.base
    n = config.degradation_batch_size or base.batch_size
    g = step_generator(base.seed + DEGRADATION_SEED_SALT, deg.step, runtime.rank)
    z, labels = problem.draw_noise(n, g)
    with runtime.autocast():
        with torch.no_grad():
            x0 = student(z, labels).float()
        t = sample_timesteps(n, problem.t_bounds(base), g, x0.device)
        x_t, eps = noised(problem.schedule, x0, t, g)
        score = problem.score(runtime.train_view(deg.score))
        loss, _ = dsm_loss(score, problem.schedule, x0, x_t, eps, t, class_labels=labels)
    backward(loss, runtime.scaler)
    clip_and_step([(deg.score, deg.optimizer)], base.max_grad_norm, runtime.scaler)
    deg.optimizer.zero_grad(set_to_none=True)
    check_finite({"degradation_dsm_loss": loss.item()}, deg.step)
    deg.step += 1
    return loss.item()


@torch.no_grad()
def node_dsm_losses(nodes_dir: str | Path, num_nodes: int, template: MLPDenoiser, student: nn.Module,
                    schedule: NoiseSchedule, t_bounds: tuple[float, float], n: int = 4096,
                    seed: int = 0) -> list[float]:
    """DSM loss of every node on the same noised student samples: it falls along the path 0 -> N."""
    g = torch.Generator().manual_seed(seed)
    x0 = student(torch.randn(n, template.dim, generator=g))
    t = sample_timesteps(n, t_bounds, g)
    x_t, eps = noised(schedule, x0, t, g)
    net = copy.deepcopy(template).eval()
    losses = []
    for k in range(num_nodes + 1):
        load_node(net, nodes_dir, k)
        losses.append(dsm_loss(ScoreModel(net, net.prediction_type), schedule, x0, x_t, eps, t)[0].item())
    return losses


# --------------------------------------------------------------------------------------------
# Stage 2: the target schedule
# --------------------------------------------------------------------------------------------


class Backtracker:
    """The moving target of stage 2: T_j = node N - j for j < N, the teacher at j = N.

    Starts at j = 1 (T_0 = node N is where the fake score starts, so it would give no signal). After
    each iteration :meth:`update` counts the iterations at the current target and advances j when

    * ``fixed`` (paper / released code): ``backtrack_interval`` iterations were spent at it;
    * ``plateau``: the same cap, or earlier once at least ``min_node_steps`` iterations were spent at
      it and the fake score's DSM loss stopped falling: with m1 the mean DSM loss of the last
      ``plateau_window`` critic updates and m0 that of the window before, both at this target and
      averaged over processes, ``(m0 - m1) / m0 < plateau_tol``. The fake score chases the student, so
      its loss keeps falling while the student still moves toward the target; once the student has
      fitted the target the loss only fluctuates. (Our criterion; the paper motivates switching
      "when the student has fitted the node" but releases only the fixed interval.)

    Only the current node is in memory: it is loaded from disk into one network at each switch.
    """

    def __init__(self, nodes_dir: str | Path, num_nodes: int, problem: LowDimProblem, config: DisBackConfig):
        self.nodes_dir, self.num_nodes, self.config = Path(nodes_dir), num_nodes, config
        self.teacher, self.score = problem.teacher, problem.score
        self.net = copy.deepcopy(problem.teacher_net).eval().requires_grad_(False)
        self.index, self.steps_at_target, self.losses, self.switches = 1, 0, [], []
        self._load()

    @property
    def at_teacher(self) -> bool:
        return self.index >= self.num_nodes

    @property
    def node(self) -> int | None:
        """Node number of the current target (None once it is the teacher)."""
        return None if self.at_teacher else self.num_nodes - self.index

    @property
    def target(self) -> ScoreModel:
        """The current target score, as the engine's teacher."""
        return self.teacher if self.at_teacher else self.score(self.net)

    def _load(self) -> None:
        if not self.at_teacher:
            load_node(self.net, self.nodes_dir, self.node)

    def update(self, stats: dict, iteration: int) -> bool:
        """Record one iteration's statistics; advance the target if due. True if it advanced."""
        self.steps_at_target += 1
        if "dsm_loss" in stats:
            self.losses.append(float(stats["dsm_loss"]))
        if self.at_teacher or not self._due():
            return False
        self.index += 1
        self.switches.append({"iteration": iteration, "index": self.index, "node": self.node})
        self.steps_at_target, self.losses = 0, []
        self._load()
        return True

    def _due(self) -> bool:
        cfg = self.config
        if self.steps_at_target >= cfg.backtrack_interval:
            return True
        if cfg.switch != "plateau" or self.steps_at_target < cfg.min_node_steps or len(self.losses) < 2 * cfg.plateau_window:
            return False
        w = cfg.plateau_window
        recent, previous = sum(self.losses[-w:]) / w, sum(self.losses[-2 * w:-w]) / w
        totals = global_sum(torch.tensor([recent, previous, 1.0], dtype=torch.float64))  # same decision everywhere
        recent, previous = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        return (previous - recent) / max(previous, 1e-12) < cfg.plateau_tol

    def state_dict(self) -> dict:
        return {"index": self.index, "steps_at_target": self.steps_at_target, "losses": list(self.losses),
                "switches": list(self.switches)}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.steps_at_target = int(state["index"]), int(state["steps_at_target"])
        self.losses, self.switches = list(state["losses"]), list(state["switches"])
        self._load()


# --------------------------------------------------------------------------------------------
# The two-stage run
# --------------------------------------------------------------------------------------------


@dataclass
class DisBackRun:
    """Result of :func:`train_disback_lowdim` (``state`` / ``backtracker`` are None if it stopped in stage 1)."""

    nodes_dir: Path
    degradation: DegradationState
    state: FDistillState | None
    backtracker: Backtracker | None
    seconds: float
    history: list[dict]

    @property
    def generator(self) -> OneStepGenerator | None:
        return None if self.state is None else self.state.generator

    @property
    def ema_generator(self) -> OneStepGenerator | None:
        return None if self.state is None else self.state.ema.model


def _payload(config: DisBackConfig, stage: int, **parts: dict) -> dict:
    return {"method": "disback", "stage": stage, "config": config.to_dict(), **parts}


def _load_resume(output_dir: Path, resume_from: str | Path | None) -> dict | None:
    ckpt = resolve_checkpoint(output_dir, resume_from)
    if ckpt is None:
        return None
    payload = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if payload.get("method") != "disback":
        raise ValueError(f"{ckpt} is not a DisBack checkpoint (it was written by another trainer); use a fresh "
                         "--output_dir.")
    return payload


def run_degradation(deg: DegradationState, config: DisBackConfig, problem: LowDimProblem, output_dir: Path,
                    stop: int, runtime: Runtime, progress: bool) -> None:
    """Stage 1 up to global step ``min(stop, N * node_interval)``: DSM steps, nodes, checkpoints."""
    nodes_dir = output_dir / "nodes"
    student = initial_student(problem, config.base)
    runtime.register(deg.score)
    if deg.step == 0 and runtime.is_main:
        save_node(problem.teacher_net, nodes_dir, 0)  # node 0 = the teacher network itself
    end = min(stop, config.degradation_steps)
    bar = tqdm(total=config.degradation_steps, initial=deg.step, desc="DisBack stage 1 (degradation)",
               disable=not (progress and runtime.is_main), leave=False)
    while deg.step < end:
        deg.losses.append(degradation_step(deg, student, problem, config, runtime))
        runtime.log({"degradation_dsm_loss": deg.losses[-1]}, deg.step)
        bar.update(1)
        bar.set_postfix(dsm=f"{deg.losses[-1]:.4f}")
        if runtime.is_main and deg.step % config.node_interval == 0:
            save_node(deg.score, nodes_dir, deg.step // config.node_interval)
        if config.base.checkpointing_steps and deg.step % config.base.checkpointing_steps == 0 and runtime.is_main:
            write_checkpoint(output_dir, deg.step, runtime.with_scaler(_payload(config, 1, degradation=deg.state_dict())),
                             config.base.checkpoints_total_limit)
    bar.close()
    runtime.barrier()


def run_backtracking(state: FDistillState, tracker: Backtracker, config: DisBackConfig, problem: LowDimProblem,
                     output_dir: Path, stop: int, runtime: Runtime, progress: bool, log_every: int,
                     on_step: Callable[[FDistillState], None] | None = None) -> None:
    """Stage 2 up to global step ``stop``: f-distill / DMD2 iterations against the moving target."""
    base, offset = config.base, config.degradation_steps
    runtime.register(state.generator, state.fake, state.head)
    bar = tqdm(total=base.max_train_steps, initial=state.step, desc=f"DisBack stage 2 ({base.divergence})",
               disable=not (progress and runtime.is_main), leave=False)
    latest: dict = {}
    if on_step is not None and state.step == 0:
        on_step(state)  # the initial generator's validation
    while state.step < base.max_train_steps and offset + state.step < stop:
        stats = fdistill_iteration(state, replace(problem, teacher=tracker.target), base, runtime)
        tracker.update(stats, state.step)
        latest.update(stats)
        latest["target_node"] = -1 if tracker.node is None else tracker.node
        runtime.log({**stats, "target_node": latest["target_node"]}, state.step)
        if state.step % log_every == 0:
            state.history.append({"step": state.step, **latest})
        bar.update(1)
        bar.set_postfix(node="teacher" if tracker.at_teacher else tracker.node)
        if on_step is not None:
            on_step(state)
        global_step = offset + state.step
        if base.checkpointing_steps and global_step % base.checkpointing_steps == 0 and runtime.is_main:
            payload = _payload(config, 2, state=state.state_dict(), backtrack=tracker.state_dict())
            write_checkpoint(output_dir, global_step, runtime.with_scaler(payload),
                             base.checkpoints_total_limit)
    bar.close()
    runtime.barrier()


def train_disback_lowdim(
    config: DisBackConfig,
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    teacher_net: MLPDenoiser,
    output_dir: str | Path,
    teacher: ScoreModel | None = None,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    log_every: int = 100,
    runtime: Runtime | None = None,
) -> DisBackRun:
    """Distill a one-step generator of ``mixture`` with DisBack (stage 1, then stage 2).

    Args:
        config: DisBack settings; ``config.base`` is the stage-2 f-distill / DMD2 run.
        mixture: the data distribution (exact samples are the discriminator's real data).
        schedule: the teacher's noise schedule.
        teacher_net: the teacher network: node 0, and the initialization of the student and score copies.
        output_dir: where ``nodes/`` and ``checkpoint-N`` go (needed: the nodes live on disk).
        teacher: the final target (default: the exact mixture denoiser in ``teacher_net``'s prediction type).
        resume_from: a checkpoint directory or ``'latest'``.
        stop_after: stop after this global step (stage-1 steps + stage-2 iterations), as if killed.
        progress: show progress bars.
        log_every: keep stage-2 statistics every this many iterations.
        runtime: processes and DDP wrappers (default: one plain process).
    """
    teacher = teacher or exact_teacher(mixture, schedule, teacher_net.prediction_type)
    teacher_net = copy.deepcopy(teacher_net).eval().requires_grad_(False)
    problem = LowDimProblem(mixture, schedule, teacher, teacher_net)
    return train_disback(config, problem, output_dir, resume_from, stop_after, progress, log_every, runtime)


def train_disback(config: DisBackConfig, problem: LowDimProblem, output_dir: str | Path,
                  resume_from: str | Path | None = None, stop_after: int | None = None, progress: bool = True,
                  log_every: int = 100, runtime: Runtime | None = None,
                  on_step: Callable[[FDistillState], None] | None = None) -> DisBackRun:
    """DisBack on any distillation problem (a :class:`LowDimProblem` or an image problem with the same
    methods); arguments as in :func:`train_disback_lowdim`; ``on_step(state)`` runs after every stage-2
    iteration (validation)."""
    runtime = runtime or Runtime()
    output_dir = Path(output_dir)
    stop = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
    start, payload = time.perf_counter(), _load_resume(output_dir, resume_from)
    deg = DegradationState.build(config, problem.teacher_net)
    if payload is not None:
        runtime.restore_scaler(payload)
        deg_state = payload["degradation"] if payload["stage"] == 1 else None
        if deg_state is not None:
            deg.load_state_dict(deg_state)
        else:
            deg.step = config.degradation_steps
    if deg.step < config.degradation_steps:
        run_degradation(deg, config, problem, output_dir, stop, runtime, progress)
    if deg.step < config.degradation_steps:
        return DisBackRun(output_dir / "nodes", deg, None, None, time.perf_counter() - start, [])
    state, tracker = start_backtracking(config, problem, output_dir / "nodes")
    if payload is not None and payload["stage"] == 2:
        state.load_state_dict(payload["state"])
        tracker.load_state_dict(payload["backtrack"])
    run_backtracking(state, tracker, config, problem, output_dir, stop, runtime, progress, log_every, on_step)
    return DisBackRun(output_dir / "nodes", deg, state, tracker, time.perf_counter() - start, state.history)


def start_backtracking(config: DisBackConfig, problem: LowDimProblem,
                       nodes_dir: Path) -> tuple[FDistillState, Backtracker]:
    """Stage-2 state (generator = G^0, fake score = node N, fresh head) and the target schedule at j = 1."""
    for k in range(config.num_nodes + 1):
        if not node_path(nodes_dir, k).is_file():
            raise FileNotFoundError(f"DisBack node {k} is missing in {nodes_dir}; stage 1 did not finish.")
    state = build_state(config.base, problem)
    load_node(state.fake, nodes_dir, config.num_nodes)  # the fake score starts at the student end of the path
    tracker = Backtracker(nodes_dir, config.num_nodes, problem, config)
    return state, tracker
