"""LML: the correction's algebra, kappa = 0 identity, DPM-Solver equivalence, composition, scale freedom."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from difflab.models.gmm import GaussianMixture, GMMDenoiser
from difflab.samplers import SCHEDULERS, GHVBScheduler, LMLScheduler, lml_correct
from difflab.schedule import NoiseSchedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
MODEL = GMMDenoiser(GaussianMixture.random(16, 8, seed=1), NoiseSchedule.vp(**SD), "epsilon")


def run(scheduler, x, n):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        x = scheduler.step(MODEL(x, t).sample, t, x).prev_sample
    return x


def test_correction_is_the_damped_rank_one_lm_solve():
    g = torch.Generator().manual_seed(0)
    d, prev = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    lam, kappa = 0.7, 0.3
    out = lml_correct(d, prev, lam, kappa)
    for i in range(3):  # lambda (lambda I + m m^T)^{-1} d, renormalized to ||d||
        m = (kappa * prev[i] + (1 - kappa) * d[i]).reshape(-1)
        u = lam * torch.linalg.solve(lam * torch.eye(32, dtype=torch.float64) + torch.outer(m, m), d[i].reshape(-1))
        assert torch.allclose(out[i].reshape(-1), u * d[i].norm() / u.norm(), atol=1e-10)
    assert torch.allclose(out.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1))


def test_kappa_zero_and_first_step_are_identities():
    d, prev = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(lml_correct(d, prev, 1e-3, 0.0), d)
    assert torch.equal(lml_correct(d, None, 1e-3, 0.5), d)


def test_scale_free_damping_transfers_across_resolutions():
    """Upsampling (repeating pixels) scales ||m||^2; the scale-free correction commutes with it."""
    g = torch.Generator().manual_seed(1)
    d, prev = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    up = lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    scale_free = lml_correct(up(d), up(prev), 2.0, 0.3, scale_free=True)
    assert torch.allclose(scale_free, up(lml_correct(d, prev, 2.0, 0.3, scale_free=True)), atol=1e-5)
    absolute = lml_correct(up(d), up(prev), 2.0, 0.3)
    assert not torch.allclose(absolute, up(lml_correct(d, prev, 2.0, 0.3)), atol=1e-3)


@pytest.mark.parametrize("algorithm_type,final", [("dpmsolver++", "zero"), ("dpmsolver", "sigma_min")])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_without_correction_is_diffusers_dpm_solver(order, algorithm_type, final):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(solver_order=order, algorithm_type=algorithm_type, final_sigmas_type=final, **SD)
    for n in (5, 10):
        expected = run(DPMSolverMultistepScheduler(**kwargs), x, n)
        assert (run(LMLScheduler(lml_kappa=0.0, **kwargs), x, n) - expected).abs().max() < 1e-5


def test_default_is_not_an_identity_and_costs_no_model_calls():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = LMLScheduler(**SD)
    assert sched.config.lml_kappa > 0
    calls = MODEL.calls
    out = run(sched, x, 8)
    assert MODEL.calls - calls == 8 == sched.nfe
    assert (out - run(LMLScheduler(lml_kappa=0.0, **SD), x, 8)).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"lml"}))
def test_every_scheduler_takes_the_lml_keys(name):
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = run(SCHEDULERS[name](**SD), x, 8)
    corrected = run(SCHEDULERS[name](lml_lambda=1.0, lml_kappa=0.3, lml_scale_free=True, **SD), x, 8)
    assert (plain - corrected).abs().max() > 1e-4
    assert torch.equal(run(SCHEDULERS[name](lml_lambda=1.0, lml_kappa=0.0, **SD), x, 8), plain)


def test_ghvb_plus_lml_composes_and_reindexes():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = GHVBScheduler(order=2.5, lml_lambda=3.0, lml_kappa=0.2, lml_scale_free=True, **SD)
    full = run(sched, x, 6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(6)
    y = x.clone()
    for i, t in enumerate(sched.timesteps):
        if i == 3:  # permute particles mid-trajectory: state must follow
            y = y[perm]
            sched.reindex(perm)
        y = sched.step(MODEL(y, t).sample, t, y).prev_sample
    assert torch.allclose(y, full[perm], atol=1e-12)


def test_bad_lml_config():
    with pytest.raises(ValueError, match="lml_kappa"):
        LMLScheduler(lml_kappa=1.5)
    with pytest.raises(ValueError, match="lml_lambda"):
        GHVBScheduler(lml_lambda=-1.0)
