"""Heavy-ball momentum for multistep diffusion solvers (Wizadwongsa et al., ICLR 2024, arXiv 2307.11118).

High-order multistep solvers have small stability regions, which shows up as divergence artifacts
at few steps and high guidance. Polyak's heavy ball (HB) replaces the solver's slope Phi_n by an
exponential moving average of slopes,

    v_n = (1 - beta) v_{n-1} + beta Phi_n,    v_0 = Phi_0,                        (paper eq. 11)

which enlarges the stability region; beta = 1 recovers the base solver, beta < 1 is first order.
Generalized heavy ball, GHVB(r), averages the noise predictions and then applies beta-dependent
Adams-Bashforth-like weights to the last ceil(r) averages, keeping order ceil(r) (paper eq. 13).

Schedulers here (all VP eps / v / x0 and flow-matching models, zero extra model calls):

* :class:`PLMSHBScheduler`      PLMS (Adams-Bashforth 1-4 on eps) with HB on the slope.
* :class:`GHVBScheduler`        GHVB(r); integer r is PLMS-r.
* :class:`DPMSolverHBScheduler` DPM-Solver++ 2M with HB on the data-prediction slope.
* :class:`UniPCHBScheduler`     UniPC (predictor and corrector) with HB in both. The released
  reference code overwrites the predictor's velocity with the raw value; here the corrector
  recomputes the step with the velocity the predictor started from, so both carry momentum.

The eps-space methods (PLMS, GHVB) step along the probability-flow ODE written as
d x_bar / d sigma_bar = eps with x_bar = x / alpha and sigma_bar = sigma / alpha (paper eq. 5).
"""

from __future__ import annotations

import math

import torch

from .base import DifflabScheduler, HistoryEntry, StepState, scheduler_config

# Adams-Bashforth weights of eps_n, eps_{n-1}, ... for constant steps (PLMS, Liu et al. 2022)
AB_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ghvb_coefficients(m: int, beta: float) -> tuple[float, ...]:
    """GHVB weights of v_n, v_{n-1}, ... (already divided by beta); beta = 1 gives Adams-Bashforth-m."""
    b = beta
    raw = {
        1: (b,),
        2: ((2 + b) / 2, -(2 - b) / 2),
        3: ((18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12),
        4: ((46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24),
    }[m]
    return tuple(c / b for c in raw)


def heavy_ball(previous: torch.Tensor | None, slope: torch.Tensor, beta: float) -> torch.Tensor:
    """v_n = (1 - beta) v_{n-1} + beta Phi_n, with v_0 = Phi_0 (paper eq. 11)."""
    return slope if previous is None else (1 - beta) * previous + beta * slope


def _check_momentum(beta: float) -> None:
    if not 0 < beta <= 1:
        raise ValueError(f"momentum must be in (0, 1] (1 = no momentum), got {beta}.")


class _EpsSpaceMultistep(DifflabScheduler):
    """Shared step of PLMS-type methods: x_bar' = x_bar + (sigma_bar' - sigma_bar) * slope."""

    def eps_space_step(self, state: StepState, slope: torch.Tensor) -> tuple[float, torch.Tensor]:
        if state.alpha == 0.0:  # flow start (s = 1): x = eps, the first slope is eps, the step is DDIM
            ratio = state.sigma_next / state.sigma
            return ratio, (state.alpha_next - state.alpha * ratio) * state.x0
        # x' = alpha' x_bar' = (alpha'/alpha) x + alpha' (sigma_bar' - sigma_bar) slope
        return state.alpha_next / state.alpha, (state.sigma_next - state.alpha_next * state.sigma / state.alpha) * slope


class PLMSHBScheduler(_EpsSpaceMultistep):
    """PLMS (Adams-Bashforth of order ``solver_order`` on eps) with heavy-ball ``momentum`` beta.

    ``momentum=1`` is plain PLMS of that order (with the Adams-Bashforth warm-up: lower orders
    until enough history exists). The paper's "HB 3.8" is ``solver_order=4, momentum=0.8``.
    """

    @scheduler_config
    def __init__(self, solver_order: int = 4, momentum: float = 0.8, **common):
        if solver_order not in AB_COEFFICIENTS:
            raise ValueError(f"solver_order must be one of {sorted(AB_COEFFICIENTS)}, got {solver_order}.")
        _check_momentum(momentum)
        self.history_size = solver_order
        self._setup()

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        past = [e.eps for e in reversed(self.history)][: self.config.solver_order - 1]
        order = len(past) + 1
        ab_slope = sum(c * e for c, e in zip(AB_COEFFICIENTS[order], [state.eps, *past]))
        previous_v = self.history[-1].extra["v"] if self.history else None
        v = heavy_ball(previous_v, ab_slope, self.config.momentum)
        state.extra["v"] = v
        return self.eps_space_step(state, v)


class GHVBScheduler(_EpsSpaceMultistep):
    """Generalized heavy ball GHVB(r): ceil(r) history points, beta = r - floor(r) (1 if r is an integer).

    ``order`` is the paper's real-valued r (0 < r <= 4); it is a config key and does not change the
    ``scheduler.order`` attribute that pipelines read (one model call per step).
    """

    @scheduler_config
    def __init__(self, order: float = 3.8, **common):
        if not 0 < order <= 4:
            raise ValueError(f"GHVB order r must be in (0, 4], got {order}.")
        self.ghvb_history, self.ghvb_beta = self.split_order(order)
        self.history_size = self.ghvb_history
        self._setup()

    @staticmethod
    def split_order(r: float) -> tuple[int, float]:
        """(number of history points m = ceil(r), beta = fractional part, or 1 for integer r)."""
        m = math.ceil(r - 1e-9)
        beta = r - math.floor(r) if abs(r - round(r)) > 1e-9 else 1.0
        return m, beta

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        previous_v = self.history[-1].extra["v"] if self.history else None
        v = heavy_ball(previous_v, state.eps, self.ghvb_beta)  # EMA of the raw noise predictions
        state.extra["v"] = v
        past = [e.extra["v"] for e in reversed(self.history)][: self.ghvb_history - 1]
        coefs = ghvb_coefficients(len(past) + 1, self.ghvb_beta)
        return self.eps_space_step(state, sum(c * vj for c, vj in zip(coefs, [v, *past])))


class DPMSolverHBScheduler(DifflabScheduler):
    """DPM-Solver++ 2M (Lu et al. 2022) with heavy-ball ``momentum`` on its data-prediction slope.

    Second-order steps use Phi_n = x0_n + (x0_n - x0_{n-1}) / (2 r), r = h_{n-1} / h_n (the midpoint
    form of diffusers' ``DPMSolverMultistepScheduler``); the first step, and the last one (and with
    ``lower_order_final`` the last of fewer than 15 steps) are first order with Phi_n = x0_n. The
    velocity is an EMA over all steps; ``momentum=1`` is DPM-Solver++ 2M exactly.
    """

    @scheduler_config
    def __init__(self, momentum: float = 0.8, lower_order_final: bool = True, **common):
        _check_momentum(momentum)
        self.history_size = 1
        self._setup()

    def _first_order_here(self) -> bool:
        n, i = self.num_inference_steps, self._step_index
        last = i == n - 1
        return not self.history or (last and (self.config.final_sigmas_type == "zero" or
                                              (self.config.lower_order_final and n < 15)))

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        slope = state.x0
        if not self._first_order_here():
            prev = self.history[-1]
            r = (state.lam - prev.lam) / (state.lam_next - state.lam)  # h_{n-1} / h_n
            slope = state.x0 + (state.x0 - prev.x0) / (2 * r)
        v = heavy_ball(self.history[-1].extra["v"] if self.history else None, slope, self.config.momentum)
        state.extra["v"] = v
        return data_prediction_step(state, v)


def data_prediction_step(state: StepState, x0_like: torch.Tensor) -> tuple[float, torch.Tensor]:
    """x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_like  (DPM-Solver++ eq. 5, first-order form)."""
    ratio = state.sigma_next / state.sigma
    return ratio, (state.alpha_next - state.alpha * ratio) * x0_like  # alpha_t (1 - e^{-h}) = alpha_t - alpha_s ratio


class UniPCHBScheduler(DifflabScheduler):
    """UniPC (Zhao et al. 2023; data prediction, B(h) = bh1 or bh2) with heavy-ball ``momentum``.

    Each step first applies the UniC corrector to the incoming sample (reusing this step's model
    output: no extra call), then the UniP predictor. Both combine their x0-space terms into
    Phi = x0 + (B(h) / (e^{-h} - 1)) * sum_k rho_k D_k and step with the HB velocity of Phi. The
    corrector recomputes the previous step from the velocity the predictor started from and
    replaces the predictor's velocity with its own. ``momentum=1`` is diffusers' UniPC exactly.
    """

    @scheduler_config
    def __init__(
        self,
        momentum: float = 0.8,
        solver_order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] | None = None,
        **common,
    ):
        _check_momentum(momentum)
        if solver_type in ("midpoint", "heun", "logrho"):  # a DPM-Solver / DEIS config: as diffusers' UniPC does
            self.register_to_config(solver_type="bh2")
        elif solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}.")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}.")
        self.history_size = solver_order
        self._setup()

    def _reset_state(self) -> None:
        super()._reset_state()
        self._last_order = 0

    def _coefficients(self, h: float, rks: list[float], order: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """(e^{-h} - 1, B(h), R, b) of UniPC's linear system (Zhao et al. 2023, Alg. 1 and 2)."""
        hh = -h
        h_phi_1 = math.expm1(hh)
        bh1 = self.config.solver_type == "bh1" and math.isfinite(h)  # infinite first flow step: B(h) = e^{-h} - 1
        b_h = hh if bh1 else h_phi_1
        h_phi_k, factorial = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0, 1
        R, b = [], []
        r = torch.tensor([*rks, 1.0], dtype=torch.float64)
        for i in range(1, order + 1):
            R.append(r ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial if math.isfinite(hh) else -1.0 / factorial
        return h_phi_1, b_h, torch.stack(R), torch.tensor(b, dtype=torch.float64)

    @staticmethod
    def _differences(m0: torch.Tensor, lam0: float, h: float, older: list[HistoryEntry]) -> tuple[list[float], list[torch.Tensor]]:
        """r_k = (lambda_k - lambda_0) / h and D_k = (x0_k - x0_0) / r_k for older points."""
        rks = [(e.lam - lam0) / h for e in older]
        return rks, [(e.x0 - m0) / rk for e, rk in zip(older, rks)]

    def _corrector(self, state: StepState) -> torch.Tensor:
        """UniC: redo the previous step with this step's model output; returns the corrected sample."""
        last = self.history[-1]
        order = self._last_order
        h = state.lam - last.lam
        older = list(reversed(self.history[:-1]))[: order - 1]
        rks, diffs = self._differences(last.x0, last.lam, h, older)
        h_phi_1, b_h, R, b = self._coefficients(h, rks, order)
        rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        res = sum(float(rho) * d for rho, d in zip(rhos[:-1], diffs)) + float(rhos[-1]) * (state.x0 - last.x0)
        phi = last.x0 + (b_h / h_phi_1) * res
        v = heavy_ball(last.extra.get("v_before"), phi, self.config.momentum)
        last.extra["v"] = v  # the corrected step is the one that happened
        ratio = state.sigma / self._sigmas[last.index].item()
        return ratio * last.sample + (state.alpha - self._alphas[last.index].item() * ratio) * v

    def _use_corrector(self) -> bool:
        disabled = self.config.disable_corrector or []
        return bool(self.history) and (self._step_index - 1) not in disabled

    def update(self, state: StepState) -> tuple[float, torch.Tensor]:
        if self._use_corrector():
            state.sample = self._corrector(state)
        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, self.num_inference_steps - self._step_index)
        order = min(order, len(self.history) + 1)  # warm-up
        self._last_order = order
        phi = state.x0
        if order > 1:
            h = state.lam_next - state.lam
            older = list(reversed(self.history))[: order - 1]
            rks, diffs = self._differences(state.x0, state.lam, h, older)
            h_phi_1, b_h, R, b = self._coefficients(h, rks, order)
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            phi = state.x0 + (b_h / h_phi_1) * sum(float(rho) * d for rho, d in zip(rhos, diffs))
        previous_v = self.history[-1].extra["v"] if self.history else None
        state.extra["v_before"] = previous_v if previous_v is not None else phi
        state.extra["v"] = heavy_ball(previous_v, phi, self.config.momentum)
        if previous_v is None:
            state.extra.pop("v_before")  # the first velocity has no predecessor: v_0 = Phi_0
        return data_prediction_step(state, state.extra["v"])
