"""Heavy-ball schedulers: momentum = 1 reproduces the base solvers; measured convergence orders."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from difflab.models.gmm import GaussianMixture, GMMDenoiser, probability_flow_ode
from difflab.samplers import DPMSolverHBScheduler, GHVBScheduler, PLMSHBScheduler, UniPCHBScheduler
from difflab.samplers.momentum import AB_COEFFICIENTS, ghvb_coefficients
from difflab.schedule import NoiseSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NS = NoiseSchedule.vp(**SD)


def run(scheduler, model, x, n=None, timesteps=None, stop_before_last=False):
    scheduler.set_timesteps(n) if timesteps is None else scheduler.set_timesteps(timesteps=timesteps)
    steps = scheduler.timesteps[:-1] if stop_before_last else scheduler.timesteps
    for t in steps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def gmm_model(prediction_type="epsilon", std_range=(0.08, 0.25), dim=16):
    return GMMDenoiser(GaussianMixture.random(dim, 8, seed=1, std_range=std_range), NS, prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [5, 10, 20])
def test_dpm_hb_without_momentum_is_dpm_solver_pp_2m(prediction_type, n):
    # diffusers' multistep schedulers step in float32 whatever the input dtype: compare in float32
    model = gmm_model(prediction_type)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    expected = run(DPMSolverMultistepScheduler(prediction_type=prediction_type, solver_order=2, **SD), model, x, n)
    ours = DPMSolverHBScheduler(momentum=1.0, prediction_type=prediction_type, **SD)
    assert (run(ours, model, x, n) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("order,solver_type", [(2, "bh2"), (3, "bh2"), (2, "bh1"), (3, "bh1")])
@pytest.mark.parametrize("n", [5, 10])
def test_unipc_hb_without_momentum_is_unipc(order, solver_type, n):
    # diffusers' bh1 returns NaN on a final step to sigma = 0 (B(h) = -inf times a zero residual),
    # so bh1 is compared with the final step to the smallest training noise level.
    final = "zero" if solver_type == "bh2" else "sigma_min"
    model = gmm_model()
    kwargs = dict(solver_order=order, solver_type=solver_type, final_sigmas_type=final, **SD)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    expected = run(UniPCMultistepScheduler(**kwargs), model, x, n)
    assert (run(UniPCHBScheduler(momentum=1.0, **kwargs), model, x, n) - expected).abs().max() < 1e-5


def plms_reference(model, x, timesteps, order):
    """Independent Adams-Bashforth-k on d x_bar / d sigma_bar = eps with the usual warm-up."""
    t_all = list(timesteps) + [None]
    eps_hist = []
    for t, t_next in zip(t_all[:-1], t_all[1:]):
        alpha, sigma = (float(v) for v in NS.alpha_sigma(float(t)))
        alpha_n, sigma_n = (1.0, 0.0) if t_next is None else (float(v) for v in NS.alpha_sigma(float(t_next)))
        eps_hist.insert(0, model(x, t).sample)
        k = min(order, len(eps_hist))
        slope = sum(c * e for c, e in zip(AB_COEFFICIENTS[k], eps_hist))
        x = alpha_n * (x / alpha + (sigma_n / alpha_n - sigma / alpha) * slope) if alpha_n > 0 else x
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_plms_hb_and_integer_ghvb_without_momentum_are_plms(order):
    model = gmm_model()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plms = PLMSHBScheduler(solver_order=order, momentum=1.0, **SD)
    plms.set_timesteps(10)
    expected = plms_reference(model, x, plms.timesteps.tolist(), order)
    assert (run(plms, model, x, 10) - expected).abs().max() < 1e-9
    assert (run(GHVBScheduler(order=order, **SD), model, x, 10) - expected).abs().max() < 1e-9


def test_ghvb_coefficients_reduce_to_adams_bashforth():
    for m in (1, 2, 3, 4):
        assert ghvb_coefficients(m, 1.0) == pytest.approx(AB_COEFFICIENTS[m])
    assert GHVBScheduler.split_order(3.8) == (4, pytest.approx(0.8))
    assert GHVBScheduler.split_order(2.0) == (2, 1.0)


def convergence_slope(make, ns=(80, 160, 320)):
    """log2 error ratio at the finest doubling, on a window uniform in sigma_bar = sigma/alpha.

    PLMS-type methods use constant-step Adams-Bashforth weights, so their order shows on a grid
    uniform in the ODE variable sigma_bar; the window stops at sigma_bar = 0.5 (before the final
    jump to clean data, whose step does not shrink with the number of steps).
    """
    model = gmm_model(std_range=(0.6, 1.0), dim=4)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_end = float(NS.timestep_from_sigma(torch.tensor(0.5, dtype=torch.float64)))
    ref = probability_flow_ode(model.mixture, NS, x, 999, rtol=1e-12, atol=1e-12, t_end=t_end, denoise=False)
    errors = []
    for n in ns:
        sigma_bar = torch.linspace(float(NS.diffusers_sigma(999.0)), 0.5, n + 1, dtype=torch.float64)
        out = run(make(), model, x, timesteps=NS.timestep_from_sigma(sigma_bar).tolist(), stop_before_last=True)
        errors.append((out - ref).pow(2).mean().sqrt().item())
    return math.log2(errors[-2] / errors[-1]), errors


@pytest.mark.parametrize("r", [1.5, 2.5, 3.8])
def test_ghvb_convergence_order_is_ceil_r(r):
    slope, errors = convergence_slope(lambda: GHVBScheduler(order=r, **SD))
    assert abs(slope - math.ceil(r)) < 0.3, (slope, errors)


@pytest.mark.parametrize("beta", [0.8, 0.9])
def test_heavy_ball_with_beta_below_one_is_first_order(beta):
    slope, errors = convergence_slope(lambda: PLMSHBScheduler(solver_order=4, momentum=beta, **SD))
    assert abs(slope - 1.0) < 0.3, (slope, errors)


@pytest.mark.parametrize("cls", [PLMSHBScheduler, DPMSolverHBScheduler, UniPCHBScheduler])
def test_momentum_changes_the_result(cls):
    model = gmm_model()
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (run(cls(momentum=0.8, **SD), model, x, 8) - run(cls(momentum=1.0, **SD), model, x, 8)).abs().max() > 1e-3


def test_unipc_hb_predictor_carries_momentum():
    """With every corrector disabled only the predictor is left: momentum must still act there."""
    model = gmm_model()
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    off = list(range(20))
    a = run(UniPCHBScheduler(momentum=0.8, disable_corrector=off, **SD), model, x, 8)
    b = run(UniPCHBScheduler(momentum=1.0, disable_corrector=off, **SD), model, x, 8)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [PLMSHBScheduler, GHVBScheduler, DPMSolverHBScheduler, UniPCHBScheduler])
def test_flow_models(cls):
    """Flow-matching configs: the first step from pure noise (alpha = 0) and convergence to the ODE."""
    ns = NoiseSchedule.flow()
    model = GMMDenoiser(GaussianMixture.random(4, 4, seed=2, std_range=(0.3, 0.5)), ns, "flow_prediction")
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = probability_flow_ode(model.mixture, ns, x, ns.t_max)
    sched = cls.from_config(FlowMatchEulerDiscreteScheduler().config)
    errors = [(run(sched, model, x, n) - ref).pow(2).mean().sqrt().item() for n in (10, 80)]
    assert math.isfinite(errors[0]) and errors[1] < errors[0] / 3, errors
