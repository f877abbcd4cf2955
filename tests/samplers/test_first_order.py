"""The first-order scheduler reproduces diffusers' DDIM (eta = 0) and FlowMatchEuler exactly."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from difflab.models.gmm import GaussianMixture, GMMDenoiser
from difflab.samplers import EulerDDIMScheduler
from difflab.schedule import NoiseSchedule


def sample_loop(scheduler, model, x, **set_kwargs):
    """Drive a scheduler exactly as a diffusers pipeline does."""
    scheduler.set_timesteps(**set_kwargs)
    if x.dtype == torch.float64:  # run diffusers' own tables in float64 too: compare algorithms, not roundings
        if isinstance(scheduler, DDIMScheduler):
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_in, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_matches_diffusers_ddim(prediction_type, beta_schedule, dtype, tol):
    ddim = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085 if beta_schedule == "scaled_linear" else 1e-4,
                         beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02,
                         prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True)
    ours = EulerDDIMScheduler.from_config(ddim.config)
    model = GMMDenoiser(GaussianMixture.random(16, 8, seed=1), NoiseSchedule.from_config(ddim.config), prediction_type)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = sample_loop(ddim, model, x, num_inference_steps=10)
    got = sample_loop(ours, model, x, timesteps=ddim.timesteps.tolist())
    assert got.dtype == dtype
    assert (got - expected).abs().max() < tol


# FlowMatchEuler always steps in float32, so the comparison is float32 against float32.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5)])
@pytest.mark.parametrize("cfg,mu", [({}, None), ({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.7)])
def test_matches_diffusers_flow_match_euler(cfg, mu, dtype, tol):
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ours = EulerDDIMScheduler.from_config(ref.config)
    assert ours.config.prediction_type == "flow_prediction"
    model = GMMDenoiser(GaussianMixture.random(16, 8, seed=1), NoiseSchedule.from_config(ref.config), "flow_prediction")
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = sample_loop(ref, model, x, num_inference_steps=10, mu=mu)
    got = sample_loop(ours, model, x, num_inference_steps=10, mu=mu)
    assert torch.allclose(ours.timesteps, ref.timesteps, atol=1e-3)
    assert (got - expected).abs().max() < tol


def test_converges_to_exact_ode_solution_at_first_order():
    """Error halves when the number of steps doubles (order 1) against a fine-step reference."""
    ns = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = GMMDenoiser(GaussianMixture.random(4, 4, seed=2), ns, "epsilon")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = EulerDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="uniform_logsnr")
    ref = sample_loop(sched, model, x, num_inference_steps=2000)
    errs = [(sample_loop(sched, model, x, num_inference_steps=n) - ref).pow(2).mean().sqrt().item() for n in (100, 200, 400)]
    slopes = [torch.log2(torch.tensor(errs[i] / errs[i + 1])).item() for i in range(2)]
    assert all(0.8 < s < 1.2 for s in slopes), (errs, slopes)
