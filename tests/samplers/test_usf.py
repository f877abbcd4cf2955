"""USF scheduler: presets reproduce diffusers' solvers, the exponential-integrator math is exact,
decision lists are validated, the analytical first step and pseudo corrector cost what they say."""

import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from difflab.models.gmm import GaussianMixture, GMMDenoiser, probability_flow_ode
from difflab.samplers import USFScheduler
from difflab.samplers.usf import (
    SolverSchedule,
    exponential_integrator_step,
    generic_preset,
    packaged_presets,
    taylor_derivatives,
    taylor_integral,
)
from difflab.schedule import NoiseSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NS = NoiseSchedule.vp(**SD)


def run(scheduler, model, x, n=None, timesteps=None):
    if timesteps is None:
        scheduler.set_timesteps(n)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    calls = 0
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_in, t).sample, t, x).prev_sample
        calls += 1
    return x, calls


def gmm(prediction_type="epsilon", schedule=NS, dim=16):
    return GMMDenoiser(GaussianMixture.random(dim, 8, seed=1), schedule, prediction_type)


DIFFUSERS = {
    "dpm++2m": lambda **kw: DPMSolverMultistepScheduler(solver_order=2, **kw),
    "dpm++3m": lambda **kw: DPMSolverMultistepScheduler(solver_order=3, **kw),
    "unipc-bh2": lambda **kw: UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **kw),
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("preset", sorted(DIFFUSERS))
def test_presets_match_diffusers(preset, n, spacing, prediction_type):
    # diffusers' multistep schedulers compute in float32: compare float32 runs from the same noise
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, **SD)
    model = gmm(prediction_type)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    expected, _ = run(DIFFUSERS[preset](**cfg), model, x, n)
    ours, calls = run(USFScheduler(decisions=preset, **cfg), model, x, n)
    assert calls == n
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize("n", [5, 10, 20])
def test_ddim_preset_matches_diffusers_ddim(n):
    model = gmm()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **SD)
    expected, _ = run(ddim, model, x, n)
    ddim.set_timesteps(n)  # diffusers' DDIM steps to t - 1000 // n: give USF the same points
    ours, _ = run(USFScheduler(decisions="ddim", **SD), model, x, timesteps=ddim.timesteps.tolist())
    assert (ours - expected).abs().max() < 1e-4


def test_ddim_preset_is_flow_match_euler_on_flow_models():
    ns = NoiseSchedule.flow()
    model = gmm("flow_prediction", ns)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    expected, _ = run(FlowMatchEulerDiscreteScheduler(), model, x, 8)
    ours, _ = run(USFScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, decisions="ddim"), model, x, 8)
    assert (ours - expected).abs().max() < 1e-4


# ------------------------------------------------------------------ math
@pytest.mark.parametrize("sign", [-1, 1])
@pytest.mark.parametrize("j", [0, 1, 2, 3])
@pytest.mark.parametrize("h", [1e-4, 0.05, 1.0, 1.999, 2.001, 6.0])
def test_taylor_integral_against_quadrature(h, j, sign):
    u = torch.linspace(0, h, 200001, dtype=torch.float64)
    f = torch.exp(sign * (h - u)) * u ** j / math.factorial(j)
    assert taylor_integral(j, h, sign) == pytest.approx(torch.trapezoid(f, u).item(), rel=1e-8)


def test_taylor_derivatives_are_exact_on_polynomials():
    coeffs = [0.3, -1.2, 0.7, 0.25]  # F(l) = sum_i c_i (l - 0.4)^i
    def f(lam):
        return torch.tensor([sum(c * (lam - 0.4) ** i for i, c in enumerate(coeffs))], dtype=torch.float64)
    points = [(lam, f(lam)) for lam in (0.1, -0.35, -0.9)]
    d1, d2, d3 = taylor_derivatives(0.4, f(0.4), points, 3)
    assert d1.item() == pytest.approx(-1.2) and d2.item() == pytest.approx(1.4) and d3.item() == pytest.approx(1.5)


@pytest.mark.parametrize("data_form", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_step_is_exact_when_the_prediction_is_a_polynomial_in_lambda(order, data_form):
    # x(l) solves the ODE exactly when the chosen prediction is a polynomial of degree < order in lambda
    coeffs = torch.tensor([0.5, -0.3, 0.2, 0.1][:order], dtype=torch.float64)
    lam_s, lam_t = -1.0, 0.3
    def levels(lam):
        alpha, sigma = NS.alpha_sigma_from_lambda(lam)
        return float(alpha), float(sigma), lam
    def f(lam):
        return sum(c * (lam - lam_s) ** i for i, c in enumerate(coeffs)).reshape(1)
    # exact solution by quadrature of the variation-of-constants formula
    a_s, s_s, _ = levels(lam_s)
    a_t, s_t, _ = levels(lam_t)
    u = torch.linspace(lam_s, lam_t, 400001, dtype=torch.float64)
    fu = torch.stack([f(v) for v in u[::100]]).squeeze(-1)
    uu = u[::100]
    x_s = torch.tensor([0.8], dtype=torch.float64)
    if data_form:
        exact = s_t / s_s * x_s + s_t * torch.trapezoid(torch.exp(uu) * fu, uu)
    else:
        exact = a_t / a_s * x_s - a_t * torch.trapezoid(torch.exp(-uu) * fu, uu)
    points = [(lam_s - 0.2 * k, f(lam_s - 0.2 * k)) for k in range(1, order)]
    from difflab.samplers.usf import Relaxation

    c, d = exponential_integrator_step(data_form, levels(lam_s), levels(lam_t), f(lam_s), points, order, Relaxation())
    assert (c * x_s + d).item() == pytest.approx(exact.item(), abs=1e-7)


def test_higher_orders_converge_faster():
    model = gmm(dim=4)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = probability_flow_ode(model.mixture, NS, x, 999)
    errors = {}
    for preset in ("ddim", "dpm++2m", "dpm++3m"):
        sched = USFScheduler(decisions=preset, timestep_spacing="uniform_logsnr", **SD)
        errors[preset] = [(run(sched, model, x, n)[0] - ref).pow(2).mean().sqrt().item() for n in (20, 40)]
    slopes = {k: math.log2(v[0] / v[1]) for k, v in errors.items()}
    assert slopes["ddim"] < slopes["dpm++2m"] and errors["dpm++3m"][1] < errors["dpm++2m"][1] < errors["ddim"][1]


# ------------------------------------------------------------------ decision lists
def steps(*orders, **extra):
    return [{"prediction": "x0", "order": o, **extra} for o in orders]


@pytest.mark.parametrize("data,message", [
    ({"steps": steps(1, 3, 1)}, "step 1.order must be an integer in 1..2"),
    ({"steps": steps(1, 2, 1), "timesteps": [999, 500]}, "'timesteps' has 2 entries but there are 3 steps"),
    ({"steps": steps(1, 2, 1), "timesteps": [999, 500, 600]}, "strictly decreasing"),
    ({"steps": [{"prediction": "v"}]}, "step 0.prediction must be one of"),
    ({"steps": [{"order": 1}, {"order": 2, "points": [-2]}, {"order": 1}]}, "step 1.points uses -2 but only 1"),
    ({"steps": [{"order": 1}, {"order": 1, "corrector": {"order": 2}}]}, "the last step cannot have a corrector"),
    ({"steps": [{"order": 1, "corrector": {"order": 2, "points": [-1]}}, {}]}, "step 0.corrector.points"),
    ({"steps": [{"order": 1, "relaxation": "bh3"}]}, "step 0: relaxation must be"),
    ({"steps": [{"order": 1, "speed": 2}]}, "step 0: unknown fields ['speed']"),
    ({"steps": [{}], "afs": "zero_x0"}, "an analytical first step needs at least one more step"),
    ({"steps": [{}], "afs": "mean_x0"}, "'afs' must be null"),
    ({"stepz": []}, "unknown decision-list fields"),
])
def test_invalid_decision_lists_name_the_step_and_field(data, message):
    with pytest.raises(ValueError) as err:
        SolverSchedule.from_dict(data)
    assert message in str(err.value)


def test_fixed_list_needs_its_own_nfe_and_loads_from_json(tmp_path):
    data = {"timesteps": [999, 600, 250], "steps": steps(1, 2, 1)}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    sched = USFScheduler(decisions=str(path), **SD)
    with pytest.raises(ValueError, match="this USF decision list is for NFE \\[3\\], not 5"):
        sched.set_timesteps(5)
    sched.set_timesteps(3)
    assert sched.timesteps.tolist() == [999, 600, 250]
    with pytest.raises(ValueError, match="not a preset"):
        USFScheduler(decisions="no-such-preset")
    table = {"schedules": {"3": data, "2": {"timesteps": [999, 400], "steps": steps(1, 1)}}}
    multi = USFScheduler(decisions=table, **SD)
    assert multi.available_nfes == [2, 3]
    multi.set_timesteps(2)
    assert multi.timesteps.tolist() == [999, 400]


def test_order_above_one_into_sigma_zero_is_rejected():
    sched = USFScheduler(decisions={"steps": steps(1, 2)}, **SD)
    with pytest.raises(ValueError, match="ends at sigma = 0"):
        sched.set_timesteps(2)
    sched = USFScheduler(decisions={"steps": steps(1, 2)}, final_sigmas_type="sigma_min", **SD)
    sched.set_timesteps(2)


def test_config_roundtrip_keeps_the_decisions(tmp_path):
    data = {"timesteps": [999, 600, 250], "steps": steps(1, 2, 1, relaxation={"linear": 0.2})}
    USFScheduler(decisions=data, **SD).save_pretrained(tmp_path)
    again = USFScheduler.from_pretrained(tmp_path)
    again.set_timesteps(3)
    assert again.schedule.steps[1].relaxation.coefficient == 0.2


# ------------------------------------------------------------------ AFS and corrector
class ZeroX0AtStart(torch.nn.Module):
    """Wraps a model so that at the largest timestep it predicts x0 = 0 (what AFS assumes)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        if float(t) == 999:
            alpha, sigma = (float(v) for v in NS.alpha_sigma(999.0))
            out.sample = x / sigma  # eps of x0 = 0
        return out


@pytest.mark.parametrize("kind", ["zero_x0", "eps_is_xT", "mean"])
def test_analytical_first_step_saves_one_call_and_equals_the_assumed_step(kind):
    model = gmm()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    decisions = {"timesteps": [999, 700, 300, 80], "steps": [
        {"order": 1}, {"order": 2, "relaxation": "bh2", "corrector": {"order": 3}}, {"order": 3}, {"order": 1}]}
    afs = {"zero_x0": "zero_x0", "eps_is_xT": "eps_is_xT", "mean": {"mean": 0.3}}[kind]
    sched = USFScheduler(decisions={**decisions, "afs": afs}, **SD)
    ours, calls = run(sched, model, x, 3)
    assert calls == sched.nfe == 3 and sched.timesteps.tolist() == [700, 300, 80]

    a_T, s_T = (float(v) for v in NS.alpha_sigma(999.0))
    assumed = {"zero_x0": lambda z: z / s_T, "eps_is_xT": lambda z: z,
               "mean": lambda z: (z - a_T * 0.3) / s_T}[kind]  # eps at T under each assumption

    class Assumed(torch.nn.Module):
        def forward(self, z, t):
            out = model(z, t)
            if float(t) == 999:
                out.sample = assumed(z)
            return out

    full, full_calls = run(USFScheduler(decisions=decisions, **SD), Assumed(), x, 4)
    assert full_calls == 4
    assert (ours - full).abs().max() < 1e-10


def test_pseudo_corrector_costs_no_call_and_raises_the_order():
    model = gmm(dim=4)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = probability_flow_ode(model.mixture, NS, x, 999, t_end=0, denoise=False)  # the runs end at sigma_min
    slopes, last = {}, {}
    for preset in ("dpm++2m", "unipc-bh2"):  # UniPC-bh2 = DPM-Solver++ 2M + a pseudo corrector per step
        errs = []
        for n in (40, 80):
            sched = USFScheduler(decisions=preset, timestep_spacing="uniform_logsnr", final_sigmas_type="sigma_min", **SD)
            out, calls = run(sched, model, x, n)
            assert calls == sched.nfe == n
            errs.append((out - ref).pow(2).mean().sqrt().item())
        slopes[preset], last[preset] = math.log2(errs[0] / errs[1]), errs[1]
    assert slopes["unipc-bh2"] > slopes["dpm++2m"] + 0.4 and last["unipc-bh2"] < last["dpm++2m"] / 3


def test_generic_presets_have_the_documented_structure():
    s = generic_preset("unipc-bh2", 4)
    assert [st.order for st in s.steps] == [1, 2, 2, 1]
    assert [st.corrector is not None for st in s.steps] == [True, True, True, False]
    assert [st.order for st in generic_preset("dpm++3m", 6).steps] == [1, 2, 3, 3, 2, 1]


@pytest.mark.parametrize("name", sorted(packaged_presets()))
def test_packaged_presets_load(name):
    sched = USFScheduler(decisions=name)
    for nfe in sched.available_nfes:
        sched.set_timesteps(nfe)
        assert len(sched.timesteps) == nfe


SEARCHED_FOR = {"sd": "gmm16-vp-scaled_linear", "sdxl": "gmm16-vp-scaled_linear", "sd3": "gmm16-flow", "flux": "gmm16-flow"}


@pytest.mark.parametrize("pipeline", sorted(SEARCHED_FOR))
def test_searched_preset_runs_inside_tiny_pipelines(pipeline, caplog):
    from difflab.models.tiny import TINY_PIPELINES, count_denoiser_calls, default_call_kwargs

    preset = SEARCHED_FOR[pipeline]
    if preset not in packaged_presets():
        pytest.fail(f"packaged preset {preset} is missing (python bench/usf.py --write-presets)")
    pipe = TINY_PIPELINES[pipeline]()
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, decisions=preset)
    nfe = pipe.scheduler.available_nfes[0]
    kwargs = {**default_call_kwargs(pipeline), "num_inference_steps": nfe}
    with count_denoiser_calls(pipe) as counter:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.as_tensor(out.images)).all()
    assert counter.calls == pipe.scheduler.nfe == nfe
    stored = SolverSchedule.from_dict(json.loads(packaged_presets()[preset].read_text())["schedules"][str(nfe)])
    evaluated = stored.timesteps[1:] if stored.afs else stored.timesteps
    assert pipe.scheduler.timesteps.double().tolist() == pytest.approx(evaluated, abs=1e-3)  # the searched grid, not the pipeline's
