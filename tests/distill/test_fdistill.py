"""f-distill pieces: weightings, density ratio, normalizations, pseudo-target gradient, DSM targets."""

import math

import pytest
import torch

from difflab.distill import (
    DIVERGENCES,
    EMA,
    DiscriminatorHead,
    MLPDenoiser,
    OneStepGenerator,
    RatioNormalizer,
    ScoreModel,
    canonical_divergence,
    density_ratio,
    dsm_loss,
    fdistill_weights,
    generator_loss,
    global_mean,
    global_sum,
    normalize_weights,
    pseudo_target_loss,
    score_difference_target,
    weighting,
)
from difflab.distill.engine import dmd_normalizer
from difflab.models.gmm import GaussianMixture, GMMDenoiser
from difflab.schedule import NoiseSchedule

# f(r) of each divergence (paper Table 1), to check h(r) = f''(r) r^2 up to a constant factor
F_OF_R = {
    "rkl": lambda r: -torch.log(r),
    "kl": lambda r: r * torch.log(r),
    "js": lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
    "sh": lambda r: 1 - torch.sqrt(r),
    "srkl": lambda r: (r + 1) * torch.log(0.5 + 0.5 / r),
    "jeffreys": lambda r: (r - 1) * torch.log(r),
    "neyman": lambda r: (1 - r) ** 2 / r,
}


def test_weighting_table_values():
    r1 = torch.ones(3)
    at_one = {"rkl": 1.0, "kl": 1.0, "js": 0.5, "sh": 1.0, "srkl": 0.5, "jeffreys": 2.0, "neyman": 1.0}
    at_three = {"rkl": 1.0, "kl": 3.0, "js": 0.75, "sh": math.sqrt(3), "srkl": 0.25, "jeffreys": 4.0, "neyman": 1 / 3}
    for name in DIVERGENCES:
        assert torch.allclose(weighting(name, r1), torch.full((3,), at_one[name]))
        assert weighting(name, torch.tensor([3.0])).item() == pytest.approx(at_three[name], rel=1e-6)
    r = torch.logspace(-1, math.log10(20), 50)
    assert torch.equal(weighting("rkl", r), torch.ones(50))
    assert weighting("neyman", torch.zeros(1)).isfinite().all()  # 1/r is clamped


@pytest.mark.parametrize("name", list(F_OF_R))
def test_weighting_is_second_derivative_of_f(name):
    r = torch.logspace(-1, math.log10(20), 40, dtype=torch.float64).requires_grad_(True)
    (d1,) = torch.autograd.grad(F_OF_R[name](r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    h_true = d2 * r.detach() ** 2
    ratio = h_true / weighting(name, r.detach()).double()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5), name  # equal up to a constant factor
    assert ratio[0] > 0


def test_divergence_names_and_errors():
    assert canonical_divergence("FKL") == "kl"
    assert canonical_divergence("sf") == "srkl"
    assert canonical_divergence("jf") == "jeffreys"
    with pytest.raises(ValueError, match="rkl.*kl.*js"):
        canonical_divergence("wasserstein")


def test_density_ratio_clamps_and_clips():
    logits = torch.tensor([-100.0, -5.0, 0.0, 2.0, 100.0], requires_grad=True)
    r = density_ratio(logits)
    assert r.dtype == torch.float32 and not r.requires_grad
    assert torch.allclose(r, torch.tensor([0.1, 0.1, 1.0, math.exp(2.0), 20.0]))
    assert density_ratio(torch.tensor([1e4], dtype=torch.float16), ratio_range=(1e-6, 1e6)).item() == pytest.approx(
        math.exp(10.0), rel=1e-4)  # clamped before exp: no overflow
    heads = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])  # several heads are averaged
    assert torch.allclose(density_ratio(heads), torch.tensor([math.e, 1.0]))
    with pytest.raises(ValueError, match="ratio_range"):
        density_ratio(logits, ratio_range=(0.0, 1.0))


def test_ratio_bin_normalization_and_ema_state():
    norm = RatioNormalizer((0.0, 1000.0), num_bins=10)
    t = torch.tensor([5.0, 50.0, 95.0, 450.0, 460.0, 999.0, 1000.0])
    assert norm.bins(t).tolist() == [0, 0, 0, 4, 4, 9, 9]
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 4.0, 8.0])
    out = norm(r, t)
    for b in (0, 4, 9):
        assert out[norm.bins(t) == b].mean().item() == pytest.approx(1.0)
    assert norm.bin_means[[0, 4, 9]].tolist() == pytest.approx([2.0, 20.0, 6.0])
    assert norm.bin_means[1].item() == 1.0 and not norm.bin_seen[1]
    # EMA: a seen bin blends, a new bin takes the batch mean; the state is a saved buffer
    ema = RatioNormalizer((0.0, 1000.0), num_bins=10, ema_rate=0.5)
    ema(torch.tensor([2.0]), torch.tensor([10.0]))
    ema(torch.tensor([4.0, 7.0]), torch.tensor([20.0, 700.0]))
    assert ema.bin_means[0].item() == pytest.approx(3.0) and ema.bin_means[7].item() == pytest.approx(7.0)
    fresh = RatioNormalizer((0.0, 1000.0), num_bins=10, ema_rate=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.bin_means, ema.bin_means)
    assert torch.allclose(ema(torch.tensor([6.0]), torch.tensor([15.0]), update=False), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="ema_rate"):
        RatioNormalizer((0.0, 1.0), ema_rate=1.0)


def test_h_normalization_has_mean_one_and_weights_compose():
    h = torch.tensor([0.5, 1.0, 4.0, 2.5])
    assert normalize_weights(h).mean().item() == pytest.approx(1.0, rel=1e-5)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 2
    t = torch.linspace(0, 999, 64)
    for name in DIVERGENCES:
        h_norm, r = fdistill_weights(logits, t, name, RatioNormalizer((0.0, 999.0)))
        assert h_norm.mean().item() == pytest.approx(1.0, rel=1e-5)
        assert r.min() >= 0.1 and r.max() <= 20.0
    h_rkl, _ = fdistill_weights(logits, t, "rkl")
    assert torch.allclose(h_rkl, torch.ones(64))


def test_single_process_reductions_are_identities():
    x = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(global_sum(x), x)
    assert global_mean(x).item() == pytest.approx(3.0)


def test_pseudo_target_gradient_is_g():
    g_ = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 2, generator=g_, requires_grad=True)
    x0_teacher, x0_fake = torch.randn(16, 2, generator=g_), torch.randn(16, 2, generator=g_)
    h = torch.rand(16, generator=g_) + 0.5
    g = score_difference_target(x0, x0_teacher, x0_fake, h)
    w = 1.0 / ((x0.detach() - x0_teacher).abs().mean(1) + 1e-6)
    assert torch.allclose(g, (w * h)[:, None] * (x0_fake - x0_teacher))
    assert torch.allclose(dmd_normalizer(x0, x0_teacher), w)
    (grad,) = torch.autograd.grad(pseudo_target_loss(x0, g), x0)
    assert torch.allclose(grad * x0.numel(), g, atol=1e-6)
    # the full generator loss: the same gradient plus the GAN term's
    logits = (x0 * torch.tensor([1.0, -2.0])).sum(1)
    loss, stats = generator_loss(x0, x0_teacher, x0_fake, logits, h, gan_weight=0.1)
    (grad,) = torch.autograd.grad(loss, x0)
    gan_grad = 0.1 * (-torch.sigmoid(-logits))[:, None] * torch.tensor([1.0, -2.0]) / 16
    assert torch.allclose(grad, g / x0.numel() + gan_grad, atol=1e-6)
    assert set(stats) == {"dm_loss", "gan_gen_loss"}
    with pytest.raises(ValueError, match="GAN"):
        generator_loss(x0, x0_teacher, x0_fake, logits, h, gan_weight=0.0)


class _Oracle(torch.nn.Module):
    """Returns a fixed output (the exact target) whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return type("Out", (), {"sample": self.out})()


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0", "flow"])
def test_dsm_targets_in_each_prediction_type(prediction_type):
    schedule = NoiseSchedule.flow() if prediction_type == "flow" else NoiseSchedule.vp(beta_schedule="scaled_linear",
                                                                                      beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    t = torch.linspace(10, 990, 32)
    alpha, sigma = (c.float()[:, None] for c in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    expected = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction_type]
    oracle = ScoreModel(_Oracle(expected), prediction_type)
    loss, feats = dsm_loss(oracle, schedule, x0, x_t, eps, t)
    assert loss.item() < 1e-10 and feats is None
    x0_hat, _ = oracle.x0(schedule, x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    wrong = ScoreModel(_Oracle(expected + 0.1), prediction_type)
    assert dsm_loss(wrong, schedule, x0, x_t, eps, t)[0].item() == pytest.approx(0.01, rel=1e-4)


def test_score_models_features_and_generator_init():
    schedule = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    mix = GaussianMixture([[0.5, 0.0], [-0.5, 0.0]], 0.01)
    exact = ScoreModel(GMMDenoiser(mix, schedule), "epsilon")
    x, t = torch.randn(8, 2), torch.full((8,), 500.0)
    x0, _ = exact.x0(schedule, x, t)
    assert torch.allclose(x0, mix.posterior_mean(x, *schedule.alpha_sigma(t)).float(), atol=1e-5)
    with pytest.raises(ValueError, match="feature_fn"):
        exact(x, t, with_features=True)
    torch.manual_seed(0)
    net = MLPDenoiser(2, hidden=16, depth=2, prediction_type="eps")
    out, feats = ScoreModel(net, "epsilon")(x, t, with_features=True)
    assert out.shape == (8, 2) and feats.shape == (8, 16)
    assert DiscriminatorHead(16)(feats).shape == (8,)
    gen = OneStepGenerator(net, schedule)
    z = torch.randn(8, 2)
    x0_teacher, _ = ScoreModel(net, "epsilon").x0(schedule, z, torch.full((8,), 999.0))
    assert torch.allclose(gen(z), x0_teacher, atol=1e-6)


def test_ema_update_and_state():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, before + 0.5)
    other = EMA(torch.nn.Linear(2, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1 and torch.equal(other.model.weight, ema.model.weight)
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)



TWO_PROCESS_WORKER = """
import sys

import torch
from accelerate import Accelerator
from difflab.distill import RatioNormalizer, normalize_weights

acc = Accelerator(cpu=not torch.cuda.is_available())
assert acc.num_processes == 2
r_all = torch.tensor([1.0, 3.0, 2.0, 6.0, 10.0, 30.0, 4.0, 8.0])
t_all = torch.tensor([10.0, 20.0, 30.0, 40.0, 510.0, 520.0, 530.0, 540.0])
mine = torch.arange(8) % 2 == acc.process_index
norm = RatioNormalizer((0.0, 1000.0), num_bins=2)
out = norm(r_all[mine], t_all[mine])
assert torch.allclose(norm.bin_means, torch.tensor([3.0, 13.0])), norm.bin_means
assert torch.allclose(out, r_all[mine] / torch.where(t_all[mine] < 500, 3.0, 13.0))
assert torch.allclose(normalize_weights(r_all[mine]), r_all[mine] / (r_all.mean() + 1e-6))
open(sys.argv[1] + f"/ok{acc.process_index}", "w").close()
acc.end_training()  # closes the gloo group; one left open can abort the process at exit
"""


def test_reductions_across_two_accelerate_processes(tmp_path, accelerate_launch):
    """Each of 2 processes holds half a batch: bin means and the mean of h must be the whole batch's."""
    script = tmp_path / "worker.py"
    script.write_text(TWO_PROCESS_WORKER)
    proc = accelerate_launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"],
                             [str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
