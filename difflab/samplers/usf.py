"""Unified Sampling Framework (USF; Liu, Ning, Yang, Wang, ICLR 2024, arXiv 2312.07243).

A sampler is a list of per-step decisions. Step i goes from lambda_s = lambda(t_i) to lambda_t =
lambda(t_{i+1}), h = lambda_t - lambda_s, with the exponential-integrator update of a Taylor
expansion of the chosen prediction F (data x0 or noise eps) in lambda:

    data form:  x_t = (sigma_t / sigma_s) x_s + alpha_t * sum_j r_j * I_j(-h) * F^(j)_s      (USF eq. 7)
    noise form: x_t = (alpha_t / alpha_s) x_s - sigma_t * sum_j r_j * I_j(+h) * F^(j)_s

with I_j(+-h) = h^(j+1) phi_(j+1)(+-h) = int_0^h e^(+-(h-u)) u^j / j! du (exact integrals of the
Taylor terms), j = 0 .. order-1. The derivatives F^(j)_s come from the Taylor system over the
step's *active points* a_1..a_K (other evaluations): sum_k w_k dl_k^i / i! = [i == j], i = 1..K,
F^(j) ~ sum_k w_k (F_(a_k) - F_s), dl_k = lambda_(a_k) - lambda_s (USF eq. 9; K >= order - 1).
Only the first derivative may be *relaxed* by a factor r_1: ``1 + c h`` (linear), or the fixed
factors of DPM-Solver-2 / UniPC-bh2 ``z (e^z - 1) / (2 (e^z - 1 - z))`` and UniPC-bh1
``z^2 / (2 (e^z - 1 - z))`` with z = -h for data and +h for noise prediction.

A *pseudo corrector* on step i (UniC-style) waits for the model output at t_(i+1), which the
next step needs anyway, recomputes step i with that point as an extra active point, and lets
step i+1 start from the corrected sample while reusing the output taken at the uncorrected one:
no extra model call, hence never on the last step. An *analytical first step* (AFS) replaces the
first model call by an assumption: x0 = 0 (``zero_x0``), eps = x_T (``eps_is_xT``) or x0 = a
given mean. With x0 = 0 or eps = x_T the first step is a pure rescaling of the noise, so it runs
in any diffusers pipeline as ``init_noise_sigma``; a mean is added on the first step.

Decision list (a dict, a JSON file or a preset name; see :class:`SolverSchedule.from_dict`)::

    {"timesteps": [999, 700.5, ...],          # optional; else the config spacing
     "afs": null | "zero_x0" | "eps_is_xT" | {"mean": 0.0 or nested list},
     "steps": [{"prediction": "x0" | "eps", "order": 1-4,
                "points": [-1, -2],           # earlier evaluations, -1 = the latest (default -1..-(order-1))
                "relaxation": "none" | "bh1" | "bh2" | "dpmsolver2" | {"linear": c},
                "corrector": null | {"order": 1-4, "points": [1, -1], "relaxation": ...}}, ...]}

In a corrector, ``+1`` is the new evaluation (required) and ``-k`` are the evaluations before
the corrected step's start. Every step starts from the latest point (USF's "start point -1"):
the singlestep-like starts, DPM-Solver-v3 (EMS) predictions and U-Net skip coefficients of the
reference code are not implemented. Steps over an infinite lambda interval (a flow start at
sigma = 1, a clean end at sigma = 0) are defined only at order 1; points at lambda = -inf are not
used as active points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .base import DifflabScheduler, HistoryEntry, StepState, scheduler_config

logger = logging.get_logger(__name__)

PREDICTIONS = ("x0", "eps")
RELAXATIONS = ("none", "linear", "bh1", "bh2")
AFS_KINDS = ("zero_x0", "eps_is_xT", "mean")
MAX_ORDER = 4
GENERIC_PRESETS = ("ddim", "dpm++2m", "dpm++3m", "unipc-bh2")


# ---------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Relaxation:
    """Factor on the first-derivative term: ``none``, ``linear`` (1 + c h), ``bh1`` or ``bh2``."""

    kind: str = "none"
    coefficient: float = 0.0

    def factor(self, h: float, data_form: bool) -> float:
        if self.kind == "none" or not math.isfinite(h):
            return 1.0
        if self.kind == "linear":
            return 1.0 + self.coefficient * h
        z = -h if data_form else h
        em1mz = _expm1_minus_z(z)  # e^z - 1 - z
        return z * math.expm1(z) / (2 * em1mz) if self.kind == "bh2" else z * z / (2 * em1mz)

    def to_json(self) -> Any:
        return {"linear": self.coefficient} if self.kind == "linear" else self.kind

    @classmethod
    def parse(cls, value: Any, where: str) -> Relaxation:
        if value is None:
            return cls()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls("linear", float(value))
        if isinstance(value, str):
            kind = "bh2" if value == "dpmsolver2" else value
            if kind in ("none", "bh1", "bh2"):
                return cls(kind)
        if isinstance(value, Mapping) and set(value) == {"linear"} and isinstance(value["linear"], (int, float)):
            return cls("linear", float(value["linear"]))
        raise ValueError(f"{where}: relaxation must be 'none', 'bh1', 'bh2', 'dpmsolver2' or {{'linear': c}}, got {value!r}.")


@dataclass(frozen=True)
class CorrectorDecision:
    """Pseudo corrector: redo the step with the next evaluation (+1) among the active points."""

    order: int
    points: tuple[int, ...]
    relaxation: Relaxation = Relaxation()

    def to_json(self) -> dict:
        return {"order": self.order, "points": list(self.points), "relaxation": self.relaxation.to_json()}


@dataclass(frozen=True)
class StepDecision:
    prediction: str = "x0"
    order: int = 1
    points: tuple[int, ...] = ()
    relaxation: Relaxation = Relaxation()
    corrector: CorrectorDecision | None = None
    second_derivative_scale: float = 1.0

    def to_json(self) -> dict:
        out = {"prediction": self.prediction, "order": self.order, "points": list(self.points),
               "relaxation": self.relaxation.to_json()}
        if self.second_derivative_scale != 1.0:
            out["second_derivative_scale"] = self.second_derivative_scale
        if self.corrector is not None:
            out["corrector"] = self.corrector.to_json()
        return out


@dataclass
class SolverSchedule:
    """A validated USF decision list: per-step decisions, optional timesteps and first step."""

    steps: list[StepDecision]
    timesteps: list[float] | None = None
    afs: str | None = None
    afs_mean: Any = None
    metadata: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Model calls of the schedule: one per step, minus the analytical first step."""
        return len(self.steps) - (1 if self.afs else 0)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverSchedule:
        """Parse and validate a decision list; errors name the step and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a USF decision list must be a dict with a 'steps' list, got {type(data).__name__}.")
        unknown = set(data) - {"steps", "timesteps", "afs", "metadata"}
        if unknown:
            raise ValueError(f"unknown decision-list fields {sorted(unknown)}; allowed: steps, timesteps, afs, metadata.")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, Sequence) or isinstance(raw_steps, str) or not raw_steps:
            raise ValueError("a USF decision list needs a non-empty 'steps' list (one dict per step).")
        afs, afs_mean = _parse_afs(data.get("afs"))
        steps = [_parse_step(s, i, len(raw_steps)) for i, s in enumerate(raw_steps)]
        timesteps = data.get("timesteps")
        if timesteps is not None:
            timesteps = [float(t) for t in timesteps]
            if len(timesteps) != len(steps):
                raise ValueError(f"'timesteps' has {len(timesteps)} entries but there are {len(steps)} steps; "
                                 "give one timestep per step (the clean end is implied).")
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"'timesteps' must be strictly decreasing, got {timesteps}.")
        if afs and len(steps) < 2:
            raise ValueError("an analytical first step needs at least one more step (the model is never called otherwise).")
        return cls(steps, timesteps, afs, afs_mean, dict(data.get("metadata") or {}))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"steps": [s.to_json() for s in self.steps]}
        if self.timesteps is not None:
            out["timesteps"] = [float(t) for t in self.timesteps]
        if self.afs:
            out["afs"] = {"mean": self.afs_mean} if self.afs == "mean" else self.afs
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def _parse_afs(value: Any) -> tuple[str | None, Any]:
    if value in (None, "none", False):
        return None, None
    if value in ("zero_x0", "eps_is_xT"):
        return value, None
    if isinstance(value, Mapping) and set(value) == {"mean"}:
        return "mean", value["mean"]
    raise ValueError(f"'afs' must be null, 'zero_x0', 'eps_is_xT' or {{'mean': value}}, got {value!r}.")


def _check_int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{where} must be an integer in {lo}..{hi}, got {value!r}.")
    return value


def _parse_points(value: Any, where: str, order: int, available: int, corrector: bool) -> tuple[int, ...]:
    lowest = 1 if corrector else 0  # a corrector's +1 is the new evaluation
    if value is None:
        value = ([1] if corrector else []) + [-k for k in range(1, order - lowest)]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{where}.points must be a list of point offsets, got {value!r}.")
    points = tuple(value)
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int) or p == 0 or p > (1 if corrector else -1):
            allowed = "+1 (the new evaluation) or -k" if corrector else "-k (-1 = the latest earlier evaluation)"
            raise ValueError(f"{where}.points entries must be {allowed}, got {p!r}.")
        if p < -MAX_ORDER:
            raise ValueError(f"{where}.points entries go back at most {MAX_ORDER} evaluations, got {p}.")
        if p < 0 and -p > available:
            raise ValueError(f"{where}.points uses {p} but only {available} earlier evaluation(s) exist at that step.")
    if len(set(points)) != len(points):
        raise ValueError(f"{where}.points has repeated entries: {list(points)}.")
    if corrector and 1 not in points:
        raise ValueError(f"{where}.points must contain +1, the evaluation the corrector reuses.")
    if len(points) < order - 1:
        raise ValueError(f"{where}: order {order} needs at least {order - 1} active point(s), got {list(points)}.")
    return points


def _parse_step(raw: Any, i: int, n_steps: int) -> StepDecision:
    where = f"step {i}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a dict of decisions, got {raw!r}.")
    allowed = ("prediction", "order", "points", "relaxation", "corrector", "second_derivative_scale")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; allowed: {', '.join(allowed)}.")
    prediction = raw.get("prediction", "x0")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{where}.prediction must be one of {list(PREDICTIONS)}, got {prediction!r}.")
    available = i  # earlier evaluations (an analytical first step counts as the evaluation at step 0)
    order = _check_int(raw.get("order", 1), f"{where}.order", 1, min(MAX_ORDER, available + 1))
    points = _parse_points(raw.get("points"), where, order, available, corrector=False)
    relaxation = Relaxation.parse(raw.get("relaxation"), where)
    corrector = None
    if raw.get("corrector") is not None:
        if i == n_steps - 1:
            raise ValueError(f"{where}: the last step cannot have a corrector (it would need an extra model call).")
        c = raw["corrector"]
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}.corrector must be null or a dict with order / points / relaxation, got {c!r}.")
        c_order = _check_int(c.get("order", order + 1), f"{where}.corrector.order", 1, min(MAX_ORDER, available + 2))
        c_points = _parse_points(c.get("points"), f"{where}.corrector", c_order, available, corrector=True)
        corrector = CorrectorDecision(c_order, c_points, Relaxation.parse(c.get("relaxation"), f"{where}.corrector"))
    scale = raw.get("second_derivative_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{where}.second_derivative_scale must be a number, got {scale!r}.")
    return StepDecision(prediction, order, points, relaxation, corrector, float(scale))


# ---------------------------------------------------------------------------- presets
def generic_preset(name: str, n_steps: int, final_zero: bool = True) -> SolverSchedule:
    """Decision lists of classic solvers for ``n_steps`` steps, as diffusers' defaults run them.

    ``final_zero``: the last step goes to sigma = 0 (diffusers' ``final_sigmas_type="zero"``), where
    DPM-Solver++ steps at order 1; otherwise it does so only below 15 steps (``lower_order_final``).
    """
    n = n_steps
    low_final = final_zero or n < 15
    if name == "ddim":
        steps = [StepDecision("x0", 1)] * n
    elif name == "dpm++2m":  # midpoint 2M = Taylor order 2 with the DPM-Solver-2 relaxation; lower_order_final
        second = StepDecision("x0", 2, (-1,), Relaxation("bh2"))
        steps = ([StepDecision("x0", 1)] + [second] * max(0, n - 2) + [StepDecision("x0", 1) if low_final else second])[:n]
    elif name == "dpm++3m":  # diffusers: order 2 at step 1 and (lower_order_second, n < 15) at step n-2
        steps = []
        for i in range(n):
            order = 1 if i == 0 or (i == n - 1 and low_final) else 2 if i == 1 or (i == n - 2 and n < 15) else 3
            # diffusers (and the DPM-Solver reference code) weight the F'' term by half its Taylor integral
            steps.append(StepDecision("x0", order, tuple(-k for k in range(1, order)),
                                      Relaxation("bh2") if order == 2 else Relaxation(), second_derivative_scale=0.5))
    elif name == "unipc-bh2":  # UniP-2 (= 2M) + UniC of one order more on every step but the last
        steps = []
        for i in range(n):
            order = 1 if i in (0, n - 1) else 2
            corrector = None
            if i < n - 1:
                c_order = order + 1
                corrector = CorrectorDecision(c_order, (1, *(-k for k in range(1, c_order - 1))),
                                              Relaxation("bh2") if c_order == 2 else Relaxation())
            steps.append(StepDecision("x0", order, tuple(-k for k in range(1, order)),
                                      Relaxation("bh2") if order == 2 else Relaxation(), corrector))
    else:
        raise ValueError(f"unknown generic preset {name!r}; use one of {list(GENERIC_PRESETS)}.")
    return SolverSchedule(steps, metadata={"preset": name})


def packaged_presets() -> dict[str, Path]:
    """Searched decision lists shipped with difflab (``difflab/samplers/usf_presets/*.json``)."""
    root = resources.files("difflab.samplers") / "usf_presets"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")} if root.is_dir() else {}


def load_decisions(spec: str | Path | Mapping[str, Any]) -> dict[int, dict] | str:
    """A decision spec -> a generic preset name, or {nfe: decision dict} (a searched preset may hold several NFEs)."""
    if isinstance(spec, Mapping):
        return {SolverSchedule.from_dict(spec).nfe: dict(spec)} if "steps" in spec else _nfe_table(spec, "the dict")
    spec_str = str(spec)
    if spec_str in GENERIC_PRESETS:
        return spec_str
    presets = packaged_presets()
    path = presets.get(spec_str, Path(spec_str))
    if not path.is_file():
        raise ValueError(f"USF decisions {spec_str!r}: not a preset ({sorted([*GENERIC_PRESETS, *presets])}) "
                         "and not a JSON file.")
    data = json.loads(path.read_text())
    return load_decisions(data) if "steps" in data else _nfe_table(data, str(path))


def _nfe_table(data: Mapping[str, Any], where: str) -> dict[int, dict]:
    table = data.get("schedules")
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{where}: expected a decision list (with 'steps') or {{'schedules': {{nfe: decision list}}}}.")
    out = {}
    for key, value in table.items():
        schedule = SolverSchedule.from_dict(value)
        if int(key) != schedule.nfe:
            raise ValueError(f"{where}: the schedule stored under NFE {key} makes {schedule.nfe} model calls.")
        out[int(key)] = dict(value)
    return out


# ---------------------------------------------------------------------------- math
def _expm1_minus_z(z: float) -> float:
    """e^z - 1 - z without cancellation for small z."""
    if abs(z) < 1e-3:
        return z * z / 2 + z ** 3 / 6 + z ** 4 / 24
    return math.expm1(z) - z


def taylor_integral(j: int, h: float, sign: int) -> float:
    """I_j = int_0^h e^(sign (h - u)) u^j / j! du = h^(j+1) phi_(j+1)(sign h) (series for small h)."""
    if h < 2.0:
        total, term = 0.0, h ** (j + 1) / math.factorial(j + 1)
        for m in range(60):
            total += term
            term *= sign * h / (m + j + 2)
            if abs(term) < 1e-18 * abs(total):
                break
        return total
    value = math.expm1(sign * h) / sign  # I_0; then I_j = (I_(j-1) - h^j / j!) / sign
    for k in range(1, j + 1):
        value = (value - h ** k / math.factorial(k)) / sign
    return value


def taylor_derivatives(lam_s: float, f_s: torch.Tensor, points: list[tuple[float, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """Estimates of d^j F / d lambda^j at lam_s, j = 1..n, from K >= n other points (USF eq. 9)."""
    dl = torch.tensor([lam - lam_s for lam, _ in points], dtype=torch.float64)
    K = len(points)
    powers = torch.arange(1, K + 1, dtype=torch.float64)
    system = dl[:, None] ** powers / torch.exp(torch.lgamma(powers + 1))  # system[k, i] = dl_k^i / i!
    weights = torch.linalg.inv(system)  # derivatives = weights @ dF
    diffs = [f - f_s for _, f in points]
    return [sum(float(weights[j, k]) * diffs[k] for k in range(K)) for j in range(n)]


def exponential_integrator_step(
    data_form: bool,
    start: tuple[float, float, float],
    end: tuple[float, float, float],
    f_s: torch.Tensor,
    points: list[tuple[float, torch.Tensor]],
    order: int,
    relaxation: Relaxation,
    second_derivative_scale: float = 1.0,
) -> tuple[float, torch.Tensor]:
    """(c, d) with x_t = c x_s + d for one USF step from ``start`` to ``end`` = (alpha, sigma, lambda)."""
    (a_s, s_s, l_s), (a_t, s_t, l_t) = start, end
    h = l_t - l_s
    usable = [(lam, f) for lam, f in points if math.isfinite(lam)]
    if not math.isfinite(h):
        order = 1  # the flow start (sigma = 1) or the clean end (sigma = 0): only order 1 is defined
    order = min(order, len(usable) + 1)
    if a_s == 0.0:
        data_form = True  # the noise form divides by alpha_s
    if data_form:
        c = s_t / s_s
        d = (a_t - a_s * c) * f_s  # alpha_t I_0(-h) = alpha_t (1 - e^-h)
        scale, sign = a_t, -1
    else:
        c = a_t / a_s
        d = -(s_s * c - s_t) * f_s  # sigma_t I_0(h) = sigma_t (e^h - 1)
        scale, sign = -s_t, 1
    if order > 1:
        derivatives = taylor_derivatives(l_s, f_s, usable, order - 1)
        for j, derivative in enumerate(derivatives, start=1):
            factor = relaxation.factor(h, data_form) if j == 1 else second_derivative_scale if j == 2 else 1.0
            d = d + (scale * factor * taylor_integral(j, h, sign)) * derivative
    return c, d


# ---------------------------------------------------------------------------- scheduler
class USFScheduler(DifflabScheduler):
    """USF sampler driven by a decision list (dict, JSON path, packaged preset or generic preset name).

    Generic presets (``ddim``, ``dpm++2m``, ``dpm++3m``, ``unipc-bh2``) adapt to any
    ``num_inference_steps`` and use the config's timestep spacing. A fixed decision list (or a
    searched preset holding lists for several NFEs) fixes the steps: ``set_timesteps`` then needs
    ``num_inference_steps`` equal to one of its NFEs. ``scheduler.nfe`` counts model calls.
    """

    history_size = MAX_ORDER + 1

    @scheduler_config
    def __init__(self, decisions: Any = "dpm++2m", **common):
        self._decisions = load_decisions(decisions)
        self._setup()
        self.schedule: SolverSchedule | None = None

    @property
    def available_nfes(self) -> list[int] | None:
        """NFEs a fixed decision list supports (None: any, for generic presets)."""
        return None if isinstance(self._decisions, str) else sorted(self._decisions)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._pending_corrector: StepDecision | None = None  # the previous step, if it has a corrector

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None) -> None:
        """Build the step list for this NFE and its grid (custom ``timesteps`` / ``sigmas`` set the grid of lists without their own)."""
        custom = None if timesteps is None and sigmas is None else len(
            timesteps if timesteps is not None else [s for s in sigmas if s != 0])
        schedule = self._schedule_for(num_inference_steps, custom)
        if schedule.timesteps is not None:
            if custom is not None:  # e.g. Flux always passes its own sigmas
                logger.warning("USFScheduler: this decision list has its own (searched) timesteps; the custom "
                               "timesteps / sigmas passed to set_timesteps are ignored. Remove 'timesteps' from the "
                               "decision list to step on a custom grid.")
            full = torch.tensor(schedule.timesteps, dtype=torch.float64)
        elif custom is not None:
            super().set_timesteps(None, device, timesteps, sigmas, mu)
            full = self.timesteps.double()
            if len(full) not in (len(schedule.steps), schedule.nfe):
                raise ValueError(f"{len(full)} custom timesteps given for a schedule of {len(schedule.steps)} steps "
                                 f"({schedule.nfe} NFE).")
        else:
            full = self.noise_schedule.timesteps(len(schedule.steps), self.spacing, self.config.steps_offset, mu)
        self._install(schedule, full, device)

    def _schedule_for(self, num_inference_steps: int | None, custom_count: int | None) -> SolverSchedule:
        """The decision list for this call: a generic preset built for the step count, or the stored list of that NFE."""
        if isinstance(self._decisions, str):
            n = custom_count if custom_count is not None else num_inference_steps
            if n is None:
                raise ValueError("Pass num_inference_steps, timesteps or sigmas to set_timesteps.")
            final_zero = self.is_flow or self.config.final_sigmas_type == "zero"
            return generic_preset(self._decisions, int(n), final_zero)
        n = num_inference_steps if num_inference_steps is not None else custom_count
        if n not in self._decisions:
            raise ValueError(f"this USF decision list is for NFE {self.available_nfes}, not {n}; pass "
                             f"num_inference_steps={self.available_nfes[0]} (or load a list for {n} NFE).")
        return SolverSchedule.from_dict(self._decisions[n])

    def _install(self, schedule: SolverSchedule, full: torch.Tensor, device: Any) -> None:
        """Set the evaluation grid (without the analytical first point) and the AFS scaling."""
        self.schedule = schedule
        if schedule.afs:
            if len(full) == schedule.nfe:  # custom grid of evaluation points: the AFS point is the model's t_max
                full = torch.cat([torch.tensor([self.noise_schedule.t_max], dtype=torch.float64), full])
            t_afs, evals = full[0], full[1:]
        else:
            t_afs, evals = None, full
        self._check_decreasing(full)
        self._set_grid(evals, device)
        self._afs_levels = None
        self.init_noise_sigma = 1.0
        if t_afs is not None:
            a, s = (float(v) for v in self.noise_schedule.alpha_sigma(t_afs))
            self._afs_levels = (a, s, float(self.noise_schedule.lambda_(t_afs)))
            self._afs_step = self._afs_coefficients()
            self.init_noise_sigma = self._afs_step[0]
        ns = self.num_inference_steps
        if not math.isfinite(float(self._lambdas[-1])) and schedule.steps[-1].order > 1:
            raise ValueError(f"step {len(schedule.steps) - 1} ends at sigma = 0, where only order 1 is defined; "
                             f"set its order to 1 or use final_sigmas_type='sigma_min' ({ns} evaluations).")

    def _afs_coefficients(self) -> tuple[float, float]:
        """x_(t_1) = scale * x_T + shift_coef * mean for the analytical first step (data form, order 1)."""
        a_T, s_T, _ = self._afs_levels
        a_1, s_1 = float(self._alphas[0]), float(self._sigmas[0])
        if self.schedule.afs == "eps_is_xT":  # noise form with eps = x_T: x_1 = (a_1/a_T) x_T - (a_1 s_T/a_T - s_1) x_T
            if a_T == 0.0:
                raise ValueError("afs 'eps_is_xT' is undefined at sigma = 1 (flow start): use 'zero_x0'.")
            return a_1 / a_T - (a_1 * s_T / a_T - s_1), 0.0
        return s_1 / s_T, a_1 - a_T * s_1 / s_T

    def _afs_shift(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.schedule is None or self.schedule.afs != "mean":
            return None
        mean = torch.as_tensor(self.schedule.afs_mean, dtype=like.dtype, device=like.device)
        return self._afs_step[1] * mean

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity, except that an AFS with a given mean adds its shift before the first model call."""
        shift = self._afs_shift(sample)
        first = self._step_index in (None, 0) and (self._begin_index in (None, 0))
        return sample + shift if shift is not None and first else sample

    def _level(self, index: int) -> tuple[float, float, float]:
        if index < 0:
            return self._afs_levels
        return float(self._alphas[index]), float(self._sigmas[index]), float(self._lambdas[index])

    def _afs_entry(self, x_1: torch.Tensor) -> HistoryEntry:
        """The analytical first evaluation at T as a history point (x_T recovered from x_1)."""
        a_T, s_T, lam_T = self._afs_levels
        scale, _ = self._afs_step
        shift = self._afs_shift(x_1)
        x_T = (x_1 - (shift if shift is not None else 0.0)) / scale
        if self.schedule.afs == "eps_is_xT":
            eps = x_T
            x0 = (x_T - s_T * eps) / a_T
        else:
            x0 = torch.zeros_like(x_T) if shift is None else torch.as_tensor(self.schedule.afs_mean, dtype=x_T.dtype).expand_as(x_T).clone()
            eps = (x_T - a_T * x0) / s_T
        return HistoryEntry(index=-1, lam=lam_T, x0=x0, eps=eps, sample=x_T)

    def _make_state(self, model_output: torch.Tensor, sample: torch.Tensor, i: int, generator: Any) -> StepState:
        shift = self._afs_shift(sample) if i == 0 else None
        if shift is not None:
            sample = sample + shift
        return super()._make_state(model_output, sample, i, generator)

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        i = state.index
        afs = self._afs_levels is not None
        if i == 0 and afs:
            self.history.append(self._afs_entry(state.sample))
            first = self.schedule.steps[0]
            self._pending_corrector = first if first.corrector is not None else None
        step = self.schedule.steps[i + (1 if afs else 0)]
        if self._pending_corrector is not None:
            state.sample = self._correct(state)
        data_form = step.prediction == "x0"
        f_s = _prediction(state, data_form)
        points = [(self.history[p].lam, _prediction(self.history[p], data_form)) for p in step.points]
        start = (state.alpha, state.sigma, state.lam)
        end = (state.alpha_next, state.sigma_next, state.lam_next)
        coef, increment = exponential_integrator_step(data_form, start, end, f_s, points, step.order, step.relaxation,
                                                      step.second_derivative_scale)
        self._pending_corrector = step if step.corrector is not None else None
        return coef, increment

    def _correct(self, state: StepState) -> torch.Tensor:
        """Recompute the previous step with this step's evaluation as the extra point (+1)."""
        step, last = self._pending_corrector, self.history[-1]
        corrector = step.corrector
        data_form = step.prediction == "x0"
        point_entries = [state if p == 1 else self.history[-1 + p] for p in corrector.points]  # -k: before `last`
        points = [(e.lam, _prediction(e, data_form)) for e in point_entries]
        coef, increment = exponential_integrator_step(
            data_form, self._level(last.index), (state.alpha, state.sigma, state.lam), _prediction(last, data_form),
            points, corrector.order, corrector.relaxation)
        return coef * last.sample + increment


def _prediction(point: StepState | HistoryEntry, data_form: bool) -> torch.Tensor:
    """The prediction a step expands: x0 (data form) or eps (noise form)."""
    return point.x0 if data_form else point.eps
