"""SMC machinery, FKC weights and SuperDiff densities against exact Gaussian-mixture targets."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from difflab.benchmarks.composition import (
    AND_MODELS,
    OR_MODELS,
    and_share,
    density_tracking_error,
    fkc_energy,
    or_share,
    run_superdiff,
)
from difflab.models.gmm import GaussianMixture
from difflab.samplers import EulerDDIMScheduler, FKCTarget, ParticleSystem, ResamplingPolicy
from difflab.samplers.smc import effective_sample_size, multinomial_resample, residual_resample, systematic_resample
from difflab.schedule import stochastic_step_coefficients


# ---------------------------------------------------------------------------------------------- SMC
def test_ess_of_uniform_and_degenerate_weights():
    assert effective_sample_size(torch.zeros(8)).item() == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([0.0, -1e4, -1e4, -1e4])).item() == pytest.approx(1.0)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert effective_sample_size(w.log()).item() == pytest.approx(1 / (w**2).sum().item())


@pytest.mark.parametrize("resample", [systematic_resample, multinomial_resample, residual_resample])
def test_resamplers_follow_the_weights(resample):
    weights = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 4)
    for _ in range(400):
        idx = resample(weights.log(), g)
        assert idx.shape == (2, 4)
        counts += torch.nn.functional.one_hot(idx, 4).sum(1)
    assert torch.allclose(counts / counts.sum(-1, keepdim=True), weights.float(), atol=0.03)


def test_systematic_resampling_copies_exact_counts():
    idx = systematic_resample(torch.tensor([[0.5, 0.25, 0.25, 0.0]]).log(), torch.Generator().manual_seed(3))
    assert sorted(idx[0].tolist()) == [0, 0, 1, 2]


def test_grouped_resampling_stays_in_its_group_and_resets_weights():
    system = ParticleSystem(3, 4, ResamplingPolicy(), generator=torch.Generator().manual_seed(0))
    system.add_log_weights(torch.randn(12, generator=torch.Generator().manual_seed(1)) * 3)
    x = torch.arange(12.0)[:, None]
    out = system.step(0, 10, x)
    assert ((out[:, 0] // 4) == torch.arange(12) // 4).all()
    assert (system.log_weights == 0).all()


def test_ess_threshold_only_resamples_degenerate_groups():
    system = ParticleSystem(2, 4, ResamplingPolicy(ess_threshold=0.5), generator=torch.Generator().manual_seed(0))
    system.add_log_weights(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -50.0, -50.0, -50.0]))
    out = system.step(0, 10, torch.arange(8.0))
    assert out[:4].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out[4:].tolist() == [4.0, 4.0, 4.0, 4.0]
    assert system.history[-1][2] == 1


def test_policy_windows_and_bad_settings():
    policy = ResamplingPolicy(start_step=2, every=2)
    assert [policy.allowed(i, 8) for i in range(8)] == [False, False, True, False, True, False, True, False]
    with pytest.raises(ValueError, match="ess_threshold"):
        ResamplingPolicy(ess_threshold=2.0)
    with pytest.raises(ValueError, match="unknown"):
        ResamplingPolicy(method="stratified-ish")
    with pytest.raises(TypeError, match="reindex"):
        ParticleSystem(1, 2).register(object())


# --------------------------------------------------------------------------------- stochastic step
def test_eta_one_is_the_ddpm_posterior_step():
    config = dict(beta_schedule="linear", num_train_timesteps=1000)
    ddpm = DDPMScheduler(**config, clip_sample=False)
    ddpm.set_timesteps(50)
    ours = EulerDDIMScheduler(eta=1.0, **config)
    ours.set_timesteps(timesteps=ddpm.timesteps.tolist())
    x, eps = torch.randn(4, 3), torch.randn(4, 3)
    for i in (0, 10, 48, 49):
        t = ddpm.timesteps[i]
        expected = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
        ours._step_index = i
        got = ours.step(eps, t, x, variance_noise=noise).prev_sample
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_stochastic_coefficients_reduce_to_ddim_and_clean_end():
    a, b, c = stochastic_step_coefficients(0.6, 0.8, 0.8, 0.6, eta=0.0)
    assert c == 0.0 and b == pytest.approx(0.6 - 0.8 * 0.8 / 0.6)
    assert stochastic_step_coefficients(0.6, 0.8, 1.0, 0.0, eta=1.0) == (1 / 0.6, -0.8 / 0.6, 0.0)
    with pytest.raises(ValueError, match="eta"):
        EulerDDIMScheduler(eta=-1.0)


# --------------------------------------------------------------------------------------------- FKC
def test_fkc_increments_match_the_special_cases():
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    dlam = 0.07
    w = 3.0
    cfg = FKCTarget.cfg(w).log_weight_increment(torch.stack([e1, e2]), dlam)
    torch.testing.assert_close(cfg, w * (w - 1) * dlam * (e2 - e1).pow(2).sum(1))
    prod = FKCTarget.product(2).log_weight_increment(torch.stack([e1, e2]), dlam)
    torch.testing.assert_close(prod, 2 * dlam * (e1 * e2).sum(1))
    anneal = FKCTarget.anneal(2.5).log_weight_increment(e1[None], dlam)
    torch.testing.assert_close(anneal, 2.5 * 1.5 * dlam * e1.pow(2).sum(1))
    assert FKCTarget.anneal(4.0).init_noise_scale == 0.5 and FKCTarget.cfg(7.0).init_noise_scale == 1.0


def test_exact_tempered_and_tilted_samplers_match_the_grid():
    mixture = GaussianMixture.random(2, 6, n_classes=2, seed=0, std_range=(0.05, 0.15))
    g = torch.Generator().manual_seed(0)
    for exact, grid in ((mixture.sample_tempered(40000, 3.0, g), mixture.tempered_on_grid(3.0, resolution=300)),
                        (mixture.sample_cfg_tilted(40000, 1, 3.0, g), mixture.cfg_tilted_on_grid(1, 3.0, resolution=300))):
        reference = grid.sample(40000, g)
        torch.testing.assert_close(exact.mean(0), reference.mean(0), atol=0.02, rtol=0)
        torch.testing.assert_close(exact.std(0), reference.std(0), atol=0.02, rtol=0)


def test_fkc_annealing_hits_the_tempered_gaussian():
    """p^3 of N(0.5, 0.1^2) at the final noise level is N(0.5, (0.01 + sigma^2) / 3); beta * score alone is too narrow."""
    from difflab.benchmarks.composition import denoiser, final_level, stochastic_scheduler
    from difflab.samplers import fkc_sample

    model = denoiser(GaussianMixture([[0.5]], [[0.1**2]]))
    target = FKCTarget.anneal(3.0)
    alpha, sigma = final_level()
    exact_std = math.sqrt((alpha**2 * 0.01 + sigma**2) / 3)
    stds = []
    for policy in (None, ResamplingPolicy()):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4000, 1, generator=g, dtype=torch.float64) * target.init_noise_scale
        out = fkc_sample(lambda x, t: model(x, t).sample[None], stochastic_scheduler(200), x, target,
                         ParticleSystem(1, 4000, policy, generator=g), generator=g)
        stds.append(out.samples.std().item())
    baseline, fkc = stds
    assert abs(fkc / exact_std - 1) < 0.08, (fkc, exact_std)  # finite-particle SMC: a few % low
    assert baseline / exact_std < 0.85


@pytest.mark.parametrize("case", ["product", "cfg3"])
def test_fkc_beats_the_uncorrected_sampler_on_exact_targets(case):
    base, fkc, floor = fkc_energy(case, dim=8, steps=100, num_particles=600)
    assert fkc < 0.5 * base, (case, base, fkc)
    assert fkc < base - 5 * floor


# ------------------------------------------------------------------------------------------ SuperDiff
def test_kernel_density_estimate_tracks_exact_log_density():
    mean_error, _ = density_tracking_error("kernel", dim=16, steps=200, num_samples=100)
    assert mean_error < 1.0


def test_ito_density_estimate_converges_with_steps():
    coarse, _ = density_tracking_error("ito", dim=16, steps=100, num_samples=100)
    fine, _ = density_tracking_error("ito", dim=16, steps=400, num_samples=100)
    assert fine < 0.6 * coarse and fine < 1.0


def test_superdiff_or_reproduces_prior_weights():
    share = or_share(run_superdiff(OR_MODELS, "or", 100, 1500, (0.8, 0.2)))
    assert abs(share - 0.8) < 0.03


def test_superdiff_and_balances_densities_where_averaging_does_not():
    assert and_share(run_superdiff(AND_MODELS, "and", 100, 600)) >= 0.9
    assert and_share(run_superdiff(AND_MODELS, "average", 100, 600)) < 0.6


def test_superdiff_rejects_deterministic_schedulers_and_bad_modes():
    from difflab.samplers import superdiff_sample

    ode = EulerDDIMScheduler(eta=0.0)
    ode.set_timesteps(4)
    with pytest.raises(ValueError, match="stochastic"):
        superdiff_sample(lambda x, t: torch.stack([x, x]), ode, torch.zeros(2, 2), "and", 2)
    sde = EulerDDIMScheduler(eta=1.0)
    sde.set_timesteps(4)
    with pytest.raises(ValueError, match="mode"):
        superdiff_sample(lambda x, t: torch.stack([x, x]), sde, torch.zeros(2, 2), "xor", 2)
    assert math.isfinite(float(superdiff_sample(lambda x, t: torch.stack([x, x]), sde, torch.zeros(2, 2), "and", 2)
                               .samples.sum()))


# ------------------------------------------------------------------------------------- re-indexing
def _guided_run(permute_at: int | None, permutation: torch.Tensor, reindex_state: bool) -> torch.Tensor:
    """DPM-Solver-HB (multistep history, momentum) + APG (momentum buffer) on a class mixture."""
    from difflab.guidance import APG
    from difflab.models.gmm import GMMDenoiser
    from difflab.samplers import DPMSolverHBScheduler
    from difflab.schedule import NoiseSchedule

    mixture = GaussianMixture.random(4, 6, n_classes=2, seed=5)
    scheduler = DPMSolverHBScheduler(momentum=0.8, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(10)
    model = GMMDenoiser(mixture, NoiseSchedule.from_config(scheduler.config))
    guider = APG(guidance_scale=4.0, momentum=-0.5, norm_threshold=0.5)
    system = ParticleSystem(1, 8)
    system.register(scheduler, guider)
    labels = torch.tensor([0, 1] * 4)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        if i == permute_at:
            x, labels = x[permutation], labels[permutation]
            if reindex_state:
                system.reindex(permutation)
        cond = model(x, t, class_labels=labels).sample
        uncond = model(x, t, class_labels=torch.full_like(labels, 2)).sample
        out = guider(cond, uncond, x, t, scheduler.noise_schedule, scheduler.prediction_type)
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_resampling_reindexes_scheduler_history_and_guider_buffers():
    permutation = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    reference = _guided_run(None, permutation, True)
    permuted = _guided_run(4, permutation, True)
    torch.testing.assert_close(permuted, reference[permutation], atol=1e-6, rtol=1e-6)
    # the same permutation of the latents alone desynchronizes history and buffers
    desynchronized = _guided_run(4, permutation, False)
    assert (desynchronized - reference[permutation]).abs().max() > 1e-3
