"""Exactness of the Gaussian-mixture test bed: scores, posterior means, products, grid targets, ODE."""

import math

import pytest
import torch

from difflab.models.gmm import GaussianMixture, GMMDenoiser, GridTarget, probability_flow_ode
from difflab.schedule import NoiseSchedule


def test_score_is_gradient_of_log_density_and_tweedie_holds():
    gmm = GaussianMixture.random(5, 6, n_classes=3, seed=0)
    x = torch.randn(32, 5, dtype=torch.float64, requires_grad=True)
    alpha, sigma = torch.full((32,), 0.7, dtype=torch.float64), torch.linspace(0.1, 0.9, 32, dtype=torch.float64)
    labels = torch.arange(32) % 4  # 3 is the null class
    logp = gmm.log_prob(x, alpha, sigma, class_labels=labels)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    score = gmm.score(x.detach(), alpha, sigma, class_labels=labels)
    assert torch.allclose(grad, score, atol=1e-10)
    x0 = gmm.posterior_mean(x.detach(), alpha, sigma, class_labels=labels)
    tweedie = (x.detach() + sigma[:, None] ** 2 * score) / alpha[:, None]  # E[x0|x] = (x + s^2 grad log q)/a
    assert torch.allclose(x0, tweedie, atol=1e-10)


def test_noised_marginal_matches_monte_carlo():
    gmm = GaussianMixture.random(2, 4, seed=1)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(200_000, generator=g)
    xt = 0.6 * x0 + 0.8 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    mean_exact = (0.6 * gmm.means * gmm.weights[:, None]).sum(0)
    assert torch.allclose(xt.mean(0), mean_exact, atol=1e-2)
    # log-density integrates to one (2-D grid quadrature)
    grid = GridTarget.from_log_density(lambda p: gmm.log_prob(p, 0.6, 0.8), 2, (-5, 5), 200)
    assert math.isclose(float(torch.logsumexp(grid.log_density.reshape(-1), 0)) + 2 * math.log(10 / 200), 0.0, abs_tol=1e-9)
    raw = gmm.log_prob(torch.stack(torch.meshgrid(*grid.axes, indexing="ij"), -1).reshape(-1, 2), 0.6, 0.8)
    assert math.isclose(float(torch.logsumexp(raw, 0)) + 2 * math.log(10 / 200), 0.0, abs_tol=1e-4)


def test_classes_restrict_components():
    gmm = GaussianMixture.random(3, 6, n_classes=3, seed=2)
    x = torch.randn(10, 3, dtype=torch.float64)
    for c in range(3):
        assert torch.allclose(gmm.log_prob(x, class_labels=c), gmm.restrict(c).log_prob(x), atol=1e-12)
    assert torch.allclose(gmm.log_prob(x, class_labels=3), gmm.log_prob(x))
    with pytest.raises(ValueError, match="0..3"):
        gmm.log_prob(x, class_labels=7)


def test_product_is_exact():
    a, b = GaussianMixture.random(1, 3, seed=3), GaussianMixture.random(1, 2, seed=4)
    prod = a.product(b)
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64)[:, None]
    unnorm = a.log_prob(x) + b.log_prob(x)
    log_z = torch.logsumexp(unnorm, 0) + math.log(8 / 4000)
    assert torch.allclose(prod.log_prob(x), unnorm - log_z, atol=1e-6)


def test_grid_targets_sample_the_tilted_density():
    gmm = GaussianMixture.random(1, 4, n_classes=2, seed=5)
    target = gmm.cfg_tilted_on_grid(class_label=0, guidance_scale=3.0, resolution=2000)
    xs = target.axes[0][:, None]
    density = target.log_density.exp()
    mean_exact = float((xs[:, 0] * density).sum() * target.cell_width)
    samples = target.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert abs(samples.mean().item() - mean_exact) < 0.01
    tempered = gmm.tempered_on_grid(beta=2.0)
    expected = 2 * gmm.log_prob(tempered.axes[0][:, None])
    diff = tempered.log_density - expected
    assert torch.allclose(diff, diff.mean().expand_as(diff), atol=1e-9)  # same density up to a constant


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoiser_answers_like_a_unet(prediction_type):
    ns = NoiseSchedule.vp()
    gmm = GaussianMixture.random(12, 4, n_classes=2, seed=6)
    model = GMMDenoiser(gmm, ns, prediction_type)
    x0 = gmm.sample(4, generator=torch.Generator().manual_seed(0)).float().reshape(4, 3, 2, 2)
    t = torch.tensor([10, 200, 500, 900])
    noise = torch.randn_like(x0)
    xt = ns.add_noise(x0, noise, t)
    labels = torch.tensor([2, 1, 2, 0])  # 2 is the null class
    out = model(xt, t, class_labels=labels).sample
    assert out.shape == xt.shape and out.dtype == torch.float32
    assert model.calls == 1 and model.rows == 4
    alpha, sigma = ns.alpha_sigma(t)
    x0_hat, _ = ns.to_x0_eps(out.double(), xt.double(), alpha, sigma, prediction_type)
    exact = gmm.posterior_mean(xt.double().reshape(4, -1), alpha, sigma, labels).reshape(xt.shape)
    assert torch.allclose(x0_hat, exact, atol=1e-4)
    assert x0_hat[0].sub(x0[0]).abs().max() < 0.15  # at t=10 the denoiser nearly recovers the data


def test_reference_ode_is_converged_and_transports_to_the_data():
    gmm = GaussianMixture.random(2, 3, seed=7, std_range=(0.2, 0.3))
    for ns in (NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), NoiseSchedule.flow()):
        noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        a = probability_flow_ode(gmm, ns, noise, ns.t_max)
        b = probability_flow_ode(gmm, ns, noise, ns.t_max, rtol=1e-11, atol=1e-11)
        assert (a - b).abs().max() < 1e-6
        # the ODE maps noise to data: sample mean and covariance match the mixture's
        mean = (gmm.means * gmm.weights[:, None]).sum(0)
        assert torch.allclose(a.mean(0), mean, atol=0.05)
