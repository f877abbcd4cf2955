"""S^3: search a USF decision list for a model and an NFE budget (Liu et al., ICLR 2024, Sec. 4).

The paper's predictor-based multi-stage search: evaluate a seed population of decision lists,
fit a small performance predictor (an ensemble of MLPs over a fixed-length encoding of the
decisions), run an evolutionary search *against the predictor*, evaluate the most promising
candidates for real, add them to the training set and repeat. ``mode="evolution"`` is the plain
evolutionary baseline (every child evaluated for real), as in the released code.

A candidate (:class:`Candidate`) is a genome that maps to a USF decision dict
(:meth:`Candidate.decisions`): the positions of the timesteps, uniform in lambda between the
model's largest timestep and ``t_min`` (the first point is always the largest timestep), the
analytical first step, and per step the prediction type, Taylor order, one extra active point or
not, the first-derivative relaxation and an optional pseudo corrector.

An objective maps a decision dict and a split (``"search"`` or ``"heldout"``) to a score, lower
is better (:class:`ReferenceObjective`: RMSE to a high-accuracy solution from the same starting
noise). The search only ever sees the ``"search"`` split; the final score of the best schedule
is measured on held-out starting noise. Every evaluation is appended to a JSON-lines log; a
search started again with the same log resumes from it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..schedule import NoiseSchedule
from .usf import MAX_ORDER, USFScheduler

RELAX_KINDS = ("none", "linear", "bh1", "bh2")
ORDER_PRIOR = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}  # the reference search's mutation distribution
SPACINGS = ("uniform_logsnr", "linspace", "karras", "exponential")


# ---------------------------------------------------------------------------- genome
@dataclass
class StepGene:
    prediction: str = "x0"
    order: int = 1
    extra_point: bool = False  # one more active point than order - 1 (a higher-accuracy estimate)
    relax: str = "none"
    relax_c: float = 0.0
    corrector: bool = False
    corrector_order: int = 2
    corrector_relax: str = "none"
    corrector_c: float = 0.0


@dataclass
class Candidate:
    """Genome of a decision list: ``u`` are the positions (in [0, 1], uniform in lambda) of points 1..n-1."""

    u: list[float]
    steps: list[StepGene]
    afs: bool = False

    def key(self) -> tuple:
        """Identity of the genome (positions rounded), for not evaluating a schedule twice."""
        steps = tuple((g.prediction, g.order, g.extra_point, g.relax, round(g.relax_c, 4), g.corrector,
                       g.corrector_order, g.corrector_relax, round(g.corrector_c, 4)) for g in self.steps)
        return self.afs, tuple(round(x, 5) for x in self.u), steps

    def clone(self) -> Candidate:
        return Candidate(list(self.u), [replace(g) for g in self.steps], self.afs)

    def decisions(self, space: SearchSpace) -> dict:
        steps = []
        for i, g in enumerate(self.steps):
            available = i
            k = min(available, g.order - 1 + (1 if g.extra_point else 0))
            step: dict[str, Any] = {"prediction": g.prediction, "order": g.order,
                                    "points": [-j for j in range(1, k + 1)],
                                    "relaxation": _relax_json(g.relax, g.relax_c)}
            if g.corrector:
                older = min(available, g.corrector_order - 2)
                step["corrector"] = {"order": g.corrector_order, "points": [1, *(-j for j in range(1, older + 1))],
                                     "relaxation": _relax_json(g.corrector_relax, g.corrector_c)}
            steps.append(step)
        out: dict[str, Any] = {"timesteps": space.timesteps(self.u), "steps": steps}
        if self.afs:
            out["afs"] = "zero_x0"
        return out


def _relax_json(kind: str, c: float) -> Any:
    return {"linear": round(c, 4)} if kind == "linear" else kind


@dataclass
class SearchSpace:
    """Where timesteps may go for a model's noise schedule, and the NFE budget."""

    schedule: NoiseSchedule
    nfe: int
    t_min: float | None = None  # lowest evaluation timestep; default 0 (VP) or 1 (flow, sigma = 0.001)
    allow_afs: bool = True
    max_order: int = MAX_ORDER

    def __post_init__(self) -> None:
        if self.nfe < 1:
            raise ValueError(f"the NFE budget must be >= 1, got {self.nfe}.")
        if self.t_min is None:
            self.t_min = 1.0 if self.schedule.kind == "flow" else 0.0
        t_max = self.schedule.t_max
        lam_top = float(self.schedule.lambda_(t_max))
        if not math.isfinite(lam_top):  # flow start at sigma = 1: place points from just below it
            lam_top = float(self.schedule.lambda_(t_max * 0.999))
        self.t_max = float(t_max)
        self.lam_lo, self.lam_hi = lam_top, float(self.schedule.lambda_(self.t_min))

    def timesteps(self, u: Sequence[float]) -> list[float]:
        lam = torch.tensor([self.lam_lo + x * (self.lam_hi - self.lam_lo) for x in u], dtype=torch.float64)
        inner = self.schedule.timestep_from_lambda(lam).tolist() if len(u) else []
        return [self.t_max] + [round(float(t), 3) for t in inner]

    def positions(self, timesteps: Sequence[float]) -> list[float]:
        """Inverse of :meth:`timesteps` for points 1.. (clipped into (0, 1])."""
        lam = self.schedule.lambda_(torch.tensor(list(timesteps[1:]), dtype=torch.float64))
        return [min(1.0, max(1e-4, (float(v) - self.lam_lo) / (self.lam_hi - self.lam_lo))) for v in lam]

    # ------------------------------------------------------------------ repair / random / mutate
    def repair(self, c: Candidate) -> Candidate:
        """Make a genome valid: step count, sorted distinct positions, orders, last step, correctors."""
        n_steps = self.nfe + (1 if c.afs else 0)
        while len(c.steps) < n_steps:
            c.steps.append(StepGene())
        del c.steps[n_steps:]
        u = sorted(min(1.0, max(1e-3, x)) for x in c.u)
        while len(u) < n_steps - 1:
            u.append(min(1.0, (u[-1] if u else 0.5) + 0.05))
            u.sort()
        u = u[: n_steps - 1]
        for j in range(1, len(u)):  # keep points apart so every step has a positive length
            u[j] = max(u[j], u[j - 1] + 1e-3)
        c.u = [min(x, 1.0 - 1e-3 * (len(u) - 1 - j)) for j, x in enumerate(u)]
        for i, g in enumerate(c.steps):
            available = i
            last = i == n_steps - 1
            g.order = 1 if last else max(1, min(g.order, available + 1, self.max_order))
            g.corrector = g.corrector and not last
            g.corrector_order = max(2, min(g.corrector_order, available + 2, self.max_order))
            if g.relax not in RELAX_KINDS:
                g.relax = "none"
            g.relax_c = min(0.6, max(-0.6, g.relax_c))
            g.corrector_c = min(0.6, max(-0.6, g.corrector_c))
        return c

    def from_preset(self, preset: str, spacing: str, afs: bool = False) -> Candidate:
        """A classic solver on a classic spacing, as a genome (the seed population)."""
        n_steps = self.nfe + (1 if afs else 0)
        t = self.schedule.timesteps(n_steps, spacing).tolist()
        steps = []
        for i in range(n_steps):
            last, first = i == n_steps - 1, i == 0
            order = 1 if first or last else {"dpm++2m": 2, "unipc-bh2": 2, "dpm++3m": 3, "ddim": 1}[preset]
            relax = "bh2" if order == 2 else "none"
            corr = preset == "unipc-bh2" and not last
            steps.append(StepGene("x0", order, False, relax, 0.0, corr, order + 1, "bh2" if order == 1 else "none"))
        return self.repair(Candidate(self.positions(t), steps, afs))

    def random_candidate(self, rng: random.Random) -> Candidate:
        base = self.from_preset(rng.choice(["dpm++2m", "unipc-bh2", "dpm++3m"]), rng.choice(SPACINGS),
                                afs=self.allow_afs and rng.random() < 0.3)
        for _ in range(rng.randint(1, 4)):
            base = self.mutate(base, rng)
        return base

    def mutate(self, parent: Candidate, rng: random.Random) -> Candidate:
        """One of the reference search's mutations (timestep jitter, order, prediction, relaxation, corrector, AFS)."""
        c = parent.clone()
        kind = rng.choices(["time", "order", "prediction", "relax", "corrector", "points", "afs"],
                           weights=[3, 2, 1, 2, 2, 1, 0.5 if self.allow_afs else 0])[0]
        i = rng.randrange(len(c.steps))
        g = c.steps[i]
        if kind == "time" and c.u:
            j = rng.randrange(len(c.u))
            c.u[j] += rng.gauss(0.0, 0.08)
        elif kind == "order":
            g.order = rng.choices(list(ORDER_PRIOR), weights=list(ORDER_PRIOR.values()))[0]
        elif kind == "prediction":
            g.prediction = "eps" if g.prediction == "x0" else "x0"
        elif kind == "relax":
            if rng.random() < 0.5:
                g.relax = rng.choice(RELAX_KINDS)
            g.relax_c += rng.gauss(0.0, 0.06) if g.relax == "linear" else 0.0
        elif kind == "corrector":
            if rng.random() < 0.5:
                g.corrector = not g.corrector
            g.corrector_order = rng.choices([2, 3, 4], weights=[0.4, 0.45, 0.15])[0]
            g.corrector_relax = rng.choice(RELAX_KINDS)
            g.corrector_c = rng.gauss(0.0, 0.2) if g.corrector_relax == "linear" else 0.0
        elif kind == "points":
            g.extra_point = not g.extra_point
        elif kind == "afs":
            c.afs = not c.afs
            if c.afs:
                c.u.insert(0, (c.u[0] if c.u else 0.5) / 2)
                c.steps.insert(0, StepGene())
            elif c.u:
                c.u.pop(0)
                c.steps.pop(0)
        return self.repair(c)

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        """Per-step swap of decisions and per-point swap of positions (same AFS choice as ``a``)."""
        c = a.clone()
        if a.afs == b.afs:
            c.u = [x if rng.random() < 0.5 else y for x, y in zip(a.u, b.u)]
            c.steps = [replace(x if rng.random() < 0.5 else y) for x, y in zip(a.steps, b.steps)]
        return self.repair(c)

    # ------------------------------------------------------------------ encoding for the predictor
    @property
    def feature_size(self) -> int:
        return 1 + 12 * (self.nfe + 1)

    def encode(self, c: Candidate) -> np.ndarray:
        out = np.zeros(self.feature_size, dtype=np.float32)
        out[0] = float(c.afs)
        us = [0.0, *c.u]
        for i, g in enumerate(c.steps):
            f = out[1 + 12 * i: 13 + 12 * i]
            f[:] = [us[i], g.prediction == "x0", g.order / 4, g.extra_point,
                    g.relax_c if g.relax == "linear" else 0.0, g.relax == "bh1", g.relax == "bh2",
                    g.corrector, g.corrector_order / 4 if g.corrector else 0.0,
                    g.corrector_c if g.corrector and g.corrector_relax == "linear" else 0.0,
                    g.corrector and g.corrector_relax == "bh1", g.corrector and g.corrector_relax == "bh2"]
        return out


# ---------------------------------------------------------------------------- predictor
class _MLPEnsemble(torch.nn.Module):
    """``n`` independent two-hidden-layer MLPs evaluated as one batched network."""

    def __init__(self, n: int, d_in: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def layer(a: int, b: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(n, a, b, generator=g) / math.sqrt(a))

        self.w1, self.w2, self.w3 = layer(d_in, hidden), layer(hidden, hidden), layer(hidden, 1)
        self.b1, self.b2 = (torch.nn.Parameter(torch.zeros(n, 1, hidden)) for _ in range(2))
        self.b3 = torch.nn.Parameter(torch.zeros(n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d) -> (n, N)
        h = torch.nn.functional.silu(x @ self.w1 + self.b1)
        h = torch.nn.functional.silu(h @ self.w2 + self.b2)
        return (h @ self.w3 + self.b3).squeeze(-1)


class PerformancePredictor:
    """Ensemble of small MLPs: encoding -> standardized log score.

    Each stage continues training the previous stage's networks on the grown data set
    (``steps`` full-batch Adam steps; the first fit trains ``3 * steps``).
    """

    def __init__(self, n_members: int = 3, hidden: int = 64, steps: int = 150, seed: int = 0):
        self.n_members, self.hidden, self.steps, self.seed = n_members, hidden, steps, seed
        self.net: _MLPEnsemble | None = None

    def fit(self, features: np.ndarray, scores: np.ndarray) -> None:
        x = torch.as_tensor(features, dtype=torch.float32)
        y = torch.as_tensor(np.log(np.maximum(scores, 1e-12)), dtype=torch.float32)
        self.mu, self.sd = float(y.mean()), float(y.std()) + 1e-6
        y = (y - self.mu) / self.sd
        steps = self.steps
        if self.net is None or self.net.w1.shape[1] != x.shape[1]:
            self.net, steps = _MLPEnsemble(self.n_members, x.shape[1], self.hidden, self.seed), 3 * self.steps
        opt = torch.optim.Adam(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(steps):
            loss = (self.net(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(features, dtype=torch.float32)
        return self.net(x).mean(0).numpy() * self.sd + self.mu


# ---------------------------------------------------------------------------- objectives
class ReferenceObjective:
    """RMSE of a schedule's samples against a high-accuracy solution from the same starting noise.

    ``sample(scheduler, split, num_inference_steps)`` runs a scheduler from the split's fixed
    starting noise; ``reference(split)`` is the accurate solution from that noise (computed once).
    Scores of different schedules are thus comparable; the ``heldout`` split is never searched on.
    """

    def __init__(self, sample: Callable[[Any, str, int | None], torch.Tensor], scheduler_config: dict,
                 reference: Callable[[str], torch.Tensor]):
        self.sample, self.config, self._reference_fn = sample, dict(scheduler_config), reference
        self._reference: dict[str, torch.Tensor] = {}

    def reference(self, split: str) -> torch.Tensor:
        if split not in self._reference:
            self._reference[split] = self._reference_fn(split)
        return self._reference[split]

    def score_samples(self, x: torch.Tensor, split: str) -> float:
        err = (x.double() - self.reference(split).double()).pow(2).mean().sqrt().item()
        return err if math.isfinite(err) else float("inf")

    def __call__(self, decisions: dict, split: str = "search") -> float:
        sched = USFScheduler.from_config(self.config, decisions=decisions)
        try:
            x = self.sample(sched, split, None)
        except FloatingPointError:
            return float("inf")
        return self.score_samples(x, split)


@torch.no_grad()
def drive(scheduler: Any, denoise: Callable, noise: torch.Tensor, num_inference_steps: int | None = None) -> torch.Tensor:
    """Run a scheduler as a diffusers pipeline does (``init_noise_sigma``, ``scale_model_input``, ``step``)."""
    if num_inference_steps is None:
        num_inference_steps = scheduler.available_nfes[0]
    scheduler.set_timesteps(num_inference_steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # FlowMatch schedulers have none
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(scale(x, t), t), t, x).prev_sample
    return x


# ---------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    best: dict
    search_score: float
    heldout_score: float | None
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # best search score after each evaluation

    def as_dict(self) -> dict:
        return asdict(self)


class _Log:
    """JSON-lines record of every evaluation: ``{"genome": ..., "score": ...}`` (resume source)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: list[tuple[Candidate, float]] = []
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    genome = row["genome"]
                    cand = Candidate(genome["u"], [StepGene(**g) for g in genome["steps"]], genome["afs"])
                    self.entries.append((cand, float(row["score"])))

    def add(self, cand: Candidate, score: float, decisions: dict) -> None:
        self.entries.append((cand, score))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write(json.dumps({"genome": asdict(cand), "score": score, "decisions": decisions}) + "\n")


def s3_search(
    objective: Callable[[dict, str], float],
    space: SearchSpace,
    *,
    mode: str = "predictor",
    max_evaluations: int = 300,
    max_minutes: float | None = None,
    population: int = 24,
    candidates_per_stage: int = 8,
    generations: int = 6,
    seed: int = 0,
    log_path: str | Path | None = None,
    heldout: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Search a decision list for ``space.nfe`` model calls; lower objective is better.

    ``mode="predictor"`` is S^3's multi-stage predictor-based search, ``"evolution"`` the baseline
    that evaluates every child. The budget is ``max_evaluations`` real evaluations (including the
    ones found in ``log_path`` when resuming) and optionally ``max_minutes`` of wall time.
    """
    if mode not in ("predictor", "evolution"):
        raise ValueError(f"mode must be 'predictor' or 'evolution', got {mode!r}.")
    start = time.time()
    log = _Log(log_path)
    rng = random.Random(f"{seed}-{len(log.entries)}")  # a resumed search continues with fresh, seeded draws
    seen = {c.key() for c, _ in log.entries}
    bar = tqdm(total=max_evaluations, initial=min(len(log.entries), max_evaluations), desc=f"S^3 NFE {space.nfe}",
               unit="eval", disable=not progress)

    def out_of_budget() -> bool:
        over_time = max_minutes is not None and (time.time() - start) / 60 > max_minutes
        return len(log.entries) >= max_evaluations or over_time

    def evaluate(cand: Candidate) -> None:
        key = cand.key()
        if key in seen or out_of_budget():
            return
        seen.add(key)
        decisions = cand.decisions(space)
        try:
            score = float(objective(decisions, "search"))
        except ValueError:  # a decision list the scheduler rejects (should not happen after repair)
            score = float("inf")
        log.add(cand, score, decisions)
        bar.update(1)
        bar.set_postfix(best=f"{min(s for _, s in log.entries):.4g}")

    seeds = [space.from_preset(p, s) for p in ("dpm++2m", "unipc-bh2", "dpm++3m") for s in SPACINGS]
    for cand in seeds:
        evaluate(cand)
    while len(log.entries) < population and not out_of_budget():
        evaluate(space.random_candidate(rng))
    predictor = PerformancePredictor(seed=seed)
    while not out_of_budget():
        ranked = sorted((e for e in log.entries if math.isfinite(e[1])), key=lambda e: e[1])
        parents = [c for c, _ in ranked[:15]] or [space.random_candidate(rng)]
        if mode == "evolution":
            for _ in range(candidates_per_stage):
                evaluate(_child(space, parents, rng))
            continue
        finite = [(c, s) for c, s in log.entries if math.isfinite(s)]
        predictor.fit(np.stack([space.encode(c) for c, _ in finite]), np.array([s for _, s in finite]))
        pool = list(parents)
        for _ in range(generations):  # evolution against the predictor
            children = [_child(space, pool, rng) for _ in range(120)]
            children = [c for c in children if c.key() not in seen]
            if not children:
                break
            pred = predictor.predict(np.stack([space.encode(c) for c in children]))
            order = np.argsort(pred)
            pool = [children[j] for j in order[:20]] + parents[:5]
        picked, keys = [], set()
        for cand in pool:
            if cand.key() not in seen and cand.key() not in keys:
                picked.append(cand)
                keys.add(cand.key())
        picked = picked[:candidates_per_stage - 2]
        picked += [_child(space, parents[:3], rng) for _ in range(2)]  # a little real exploration each stage
        for cand in picked:
            evaluate(cand)
    bar.close()
    best_cand, best_score = min(log.entries, key=lambda e: e[1])
    decisions = best_cand.decisions(space)
    decisions["metadata"] = {"nfe": space.nfe, "search_score": best_score, "mode": mode, "seed": seed,
                             "evaluations": len(log.entries)}
    held = float(objective(decisions, "heldout")) if heldout else None
    running, history = float("inf"), []
    for _, s in log.entries:
        running = min(running, s)
        history.append(running)
    return SearchResult(decisions, best_score, held, len(log.entries), time.time() - start, history)


def _child(space: SearchSpace, parents: list[Candidate], rng: random.Random) -> Candidate:
    if len(parents) > 1 and rng.random() < 0.3:
        a, b = rng.sample(parents, 2)
        child = space.crossover(a, b, rng)
    else:
        child = rng.choice(parents).clone()
    for _ in range(rng.choice([1, 1, 2, 3])):
        child = space.mutate(child, rng)
    return child
