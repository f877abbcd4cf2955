"""NoiseSchedule against diffusers' own schedule arithmetic, conversions and error messages."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from difflab.schedule import PREDICTION_TYPES, NoiseSchedule

VP_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=np.linspace(1e-4, 2e-2, 1000).tolist()),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("cfg", VP_CONFIGS, ids=lambda c: c.get("beta_schedule", "trained") + ("-zsnr" if c.get("rescale_betas_zero_snr") else ""))
def test_vp_alphas_cumprod_match_diffusers(cfg):
    ref = DDPMScheduler(**cfg)
    ns = NoiseSchedule.from_config(ref.config)
    abar_ref = ref.alphas_cumprod.double()
    if cfg.get("rescale_betas_zero_snr"):
        abar_ref[-1] = 2.0**-24  # diffusers' multistep schedulers clamp the zero-SNR end the same way
    assert torch.allclose(ns.alphas_cumprod, abar_ref, atol=1e-6, rtol=0)
    t = torch.arange(1000)
    alpha, sigma = ns.alpha_sigma(t)
    assert torch.allclose(alpha, abar_ref.sqrt(), atol=1e-6)
    assert torch.allclose(sigma, (1 - abar_ref).sqrt(), atol=1e-6)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("cfg", VP_CONFIGS[:3], ids=lambda c: c["beta_schedule"])
def test_vp_spacings_and_sigmas_match_dpm_solver(cfg, spacing):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **cfg)
    ns = NoiseSchedule.from_config(ref.config)
    for n in (5, 10, 25):
        ref.set_timesteps(n)
        t = ns.timesteps(n, spacing, steps_offset=ref.config.steps_offset)
        assert t.tolist() == ref.timesteps.tolist()
        assert torch.allclose(ns.diffusers_sigma(t).float(), ref.sigmas[:-1], rtol=1e-6)


def test_fractional_timesteps_follow_diffusers_log_sigma_interpolation():
    # DPM-Solver's karras schedule: exact karras sigmas, timesteps from _sigma_to_t (log-sigma
    # interpolation), not rounded for the cosine schedule but stored as int64 (truncated).
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ref.set_timesteps(12)
    ns = NoiseSchedule.from_config(ref.config)
    t = ns.timestep_from_sigma(ref.sigmas[:-1].double())
    assert t.floor().long().tolist() == ref.timesteps.tolist()
    assert torch.allclose(ns.diffusers_sigma(t).float(), ref.sigmas[:-1], rtol=1e-5)
    ours = ns.timesteps(12, "karras")  # our own karras spacing gives the same sigmas
    assert torch.allclose(ns.diffusers_sigma(ours).float(), ref.sigmas[:-1], rtol=1e-5)


@pytest.mark.parametrize("shift_cfg,mu", [({}, None), ({"shift": 3.0}, None),
                                          ({"use_dynamic_shifting": True}, 0.8),
                                          ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.2)])
def test_flow_timesteps_and_sigmas_match_flowmatch_euler(shift_cfg, mu):
    ref = FlowMatchEulerDiscreteScheduler(**shift_cfg)
    ns = NoiseSchedule.from_config(ref.config)
    assert ns.kind == "flow"
    for n in (4, 10, 28):
        ref.set_timesteps(n, mu=mu)
        t = ns.timesteps(n, mu=mu)
        assert torch.allclose(t.float(), ref.timesteps, atol=1e-3)  # timesteps are sigma * 1000
        alpha, sigma = ns.alpha_sigma(t)
        assert torch.allclose(sigma.float(), ref.sigmas[:-1], atol=1e-6)
        assert torch.allclose(alpha + sigma, torch.ones_like(alpha))
    # custom sigmas (Flux passes linspace(1, 1/N, N) and mu) are shifted like diffusers does
    sig = np.linspace(1.0, 1 / 7, 7)
    ref.set_timesteps(sigmas=sig, mu=mu)
    assert torch.allclose(ns.flow_timesteps_from_sigmas(sig, mu).float(), ref.timesteps, atol=1e-3)


def test_lambda_inverse_roundtrip_vp_and_flow():
    for ns in (NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), NoiseSchedule.flow()):
        t = torch.tensor([1.0, 17.25, 400.5, 998.0], dtype=torch.float64)
        assert torch.allclose(ns.timestep_from_lambda(ns.lambda_(t)), t, atol=1e-8)
        alpha, sigma = ns.alpha_sigma(t)
        assert torch.allclose(torch.log(alpha / sigma), ns.lambda_(t), atol=1e-10)


def test_euler_sigma_interpolation_is_log_linear():
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ns = NoiseSchedule.from_config(ref.config)
    s0, s1 = ns.diffusers_sigma(torch.tensor([300.0, 301.0]))
    mid = ns.diffusers_sigma(torch.tensor([300.5]))
    assert torch.allclose(mid, (s0 * s1).sqrt(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_conversions_roundtrip(kind):
    ns = NoiseSchedule.vp() if kind == "vp" else NoiseSchedule.flow()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 100.0, 333.3, 500.0, 800.0, 990.0])
    x = ns.add_noise(x0, eps, t)
    alpha, sigma = ns.alpha_sigma(t)
    types = [p for p in PREDICTION_TYPES]
    for src in types:
        out = ns.training_target(x0, eps, t, src)
        rx0, reps = ns.to_x0_eps(out, x, alpha, sigma, src)
        assert torch.allclose(rx0, x0, atol=1e-9) and torch.allclose(reps, eps, atol=1e-9), src
        for dst in types:
            assert torch.allclose(ns.convert(out, x, t, src, dst), ns.training_target(x0, eps, t, dst), atol=1e-9)


def test_flow_velocity_is_time_derivative():
    ns = NoiseSchedule.flow()
    x0, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    t, dt = torch.tensor(400.0, dtype=torch.float64), 1e-3
    deriv = (ns.add_noise(x0, eps, t + dt) - ns.add_noise(x0, eps, t - dt)) / (2 * dt / 1000)
    assert torch.allclose(deriv, ns.training_target(x0, eps, t, "flow_prediction"), atol=1e-6)


def test_errors_list_valid_values():
    with pytest.raises(ValueError, match="epsilon.*sample.*v_prediction"):
        NoiseSchedule.vp().convert(torch.zeros(1, 2), torch.zeros(1, 2), 10, "foo", "epsilon")
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        NoiseSchedule.vp(beta_schedule="cosine")
    with pytest.raises(ValueError, match="uniform_logsnr"):
        NoiseSchedule.vp().timesteps(10, "sometimes")
    with pytest.raises(ValueError, match="missing keys.*beta_schedule"):
        NoiseSchedule.from_config({"num_train_timesteps": 1000, "sigma_data": 0.5})
    with pytest.raises(ValueError, match="mu"):
        NoiseSchedule.flow(use_dynamic_shifting=True).timesteps(10)


def test_model_prediction_type_of_scheduler_configs():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    assert NoiseSchedule.model_prediction_type(DDIMScheduler().config) == "epsilon"
    assert NoiseSchedule.model_prediction_type(DDIMScheduler(prediction_type="v_prediction").config) == "v_prediction"
    assert NoiseSchedule.model_prediction_type(FlowMatchEulerDiscreteScheduler().config) == "flow_prediction"
    assert NoiseSchedule.model_prediction_type(DPMSolverMultistepScheduler(use_flow_sigmas=True,
                                                                           prediction_type="flow_prediction").config) \
        == "flow_prediction"
