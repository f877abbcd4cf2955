"""AWM and the DDPO baseline: rewards, advantages, rollouts, losses (exact checks on small networks)."""

import math

import pytest
import torch

from difflab.distill.aligner import AlignConfig, AlignProblem, align_iteration, build_state, evaluation_weights
from difflab.distill.awm import awm_loss, weighting
from difflab.distill.ddpo import ddpo_loss, trainable_steps
from difflab.distill.nets import MLPDenoiser
from difflab.distill.rewards import (
    CompositeReward,
    DigitsClassReward,
    InkReward,
    RegionReward,
    build_reward,
    group_advantages,
)
from difflab.distill.rollout import sde_rollout, step_log_prob, training_timestep_indices
from difflab.schedule import NoiseSchedule, stochastic_noise_std, stochastic_step_coefficients

VP = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = NoiseSchedule.flow()


def _net(prediction_type="epsilon", seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(2, 32, 2, prediction_type)


def _grads(net):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in net.parameters()])


# ------------------------------------------------------------------ rewards and advantages


def test_builtin_rewards():
    images = torch.full((3, 1, 16, 16), -1.0)
    images[1] = 1.0
    images[2, :, :8] = 1.0
    assert torch.allclose(InkReward()(images), torch.tensor([0.0, 1.0, 0.5]))
    region = RegionReward([1.0, 0.0], 0.5)
    r = region(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert r[0] > 0.99 and r[1] < 1e-6
    p = DigitsClassReward(3)(torch.zeros(2, 1, 16, 16))
    assert p.shape == (2,) and ((0 <= p) & (p <= 1)).all()
    composite = build_reward("ink*2+class:3*0.5")
    assert isinstance(composite, CompositeReward)
    assert torch.allclose(composite(images), 2 * InkReward()(images) + 0.5 * DigitsClassReward(3)(images))
    assert isinstance(build_reward("class:7"), DigitsClassReward) and build_reward("class:7").target_class == 7


@pytest.mark.parametrize("spec", ["clas:3", "class:12", "ink*x", "region:1"])
def test_bad_reward_specs_say_what_to_write(spec):
    with pytest.raises(ValueError, match="class|weight|region"):
        build_reward(spec)


def test_advantages_are_computed_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 11.0, 12.0, 13.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, std="group", clip=1e9, scale=1e9)
    # each group is centred on its own mean: the +10 offset of group 1 does not leak into the advantages
    assert torch.allclose(adv[:3], adv[3:]) and abs(float(adv[:3].sum())) < 1e-6
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4)
    assert torch.allclose(adv[:3], expected, atol=1e-5)
    glob = group_advantages(rewards, groups, std="global", clip=1e9, scale=1e9)
    assert torch.allclose(glob[:3], torch.tensor([-1.0, 0.0, 1.0]) / (rewards.double().std(unbiased=False) + 1e-4).float())
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4), std="none", clip=5.0, scale=1.0)
    assert clipped.max() == 1.0 and clipped.min() == -1.0


def test_a_group_with_equal_rewards_gets_zero_advantage():
    adv = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.1, 0.9]), torch.tensor([0, 0, 0, 1, 1]))
    assert (adv[:3] == 0).all() and (adv[3:] != 0).all()


# ------------------------------------------------------------------ rollouts


def test_training_timesteps_skip_the_first_step_and_the_last_tenth():
    for seed in range(20):
        idx = training_timestep_indices(10, 6, torch.Generator().manual_seed(seed))
        assert len(idx) == 6 and idx.min() >= 1 and idx.max() <= 8 and (idx.diff() > 0).all()
    assert len(training_timestep_indices(20, 50, torch.Generator())) == 17
    assert training_timestep_indices(10, 9, torch.Generator(), skip_last_fraction=0.0).tolist() == list(range(1, 10))
    with pytest.raises(ValueError, match="more sampling steps"):
        training_timestep_indices(1, 2, torch.Generator())


def test_noise_std_matches_the_coefficients_and_holds_at_pure_noise():
    assert stochastic_noise_std(0.8, 0.6, 0.9, 0.4359, 1.0) == stochastic_step_coefficients(0.8, 0.6, 0.9, 0.4359)[2]
    assert stochastic_noise_std(0.0, 1.0, 0.1, 0.9, 1.0) == pytest.approx(0.9)  # flow, first step from pure noise
    assert stochastic_noise_std(0.5, 0.5, 1.0, 0.0) == 0.0


def test_step_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    mean, x = torch.randn(4, 3), torch.randn(4, 3)
    expected = torch.distributions.Normal(mean.double(), 0.3).log_prob(x.double()).mean(1)
    assert torch.allclose(step_log_prob(x, mean, 0.3), expected)


@pytest.mark.parametrize("schedule,prediction_type", [(VP, "epsilon"), (FLOW, "flow_prediction")])
def test_sde_rollout_likelihoods_are_those_the_loss_recomputes(schedule, prediction_type):
    net = _net(prediction_type)
    grid = torch.linspace(schedule.t_max, schedule.t_max / 8, 6)
    traj = sde_rollout(net, schedule, prediction_type, grid, None, (16, 2), torch.Generator().manual_seed(0))
    assert traj.states.shape == (7, 16, 2) and traj.log_probs.shape == (6, 16)
    steps = trainable_steps(traj)
    assert steps.tolist() == [0, 1, 2, 3, 4]  # the last step goes to the clean end with no noise
    terms = ddpo_loss(net, schedule, prediction_type, traj, None, torch.randn(16), steps)
    assert terms.ratio == pytest.approx(1.0, abs=1e-5) and terms.clip_fraction == 0.0


# ------------------------------------------------------------------ losses


def test_awm_loss_with_unit_advantages_is_the_pretraining_loss():
    net, g = _net(), torch.Generator().manual_seed(3)
    x0, t = torch.randn(8, 2), torch.tensor([300.0, 700.0])
    terms = awm_loss(net, VP, "epsilon", x0, None, torch.ones(8), t, torch.Generator().manual_seed(3), "uniform")
    eps = torch.randn((16, 2), generator=g)
    tt = t.double().repeat_interleave(8)
    x_t = VP.add_noise(x0.repeat(2, 1).double(), eps.double(), tt).float()
    expected = ((net(x_t, tt.float()).sample - eps) ** 2).mean()
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ghuber_weighting_is_a_damped_power_of_the_error():
    mse, sigma = torch.tensor([0.0, 0.01, 1.0], dtype=torch.float64), torch.tensor([0.5, 0.5, 1.0])
    w = weighting(mse, sigma, "ghuber")
    assert w[0] == 0.0 and w[1] == pytest.approx(0.5 * ((0.01 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25)
    assert w[2] == pytest.approx((1 - 1e-10**0.25) / 0.25, rel=1e-9)  # about 4: l^p / p, damped near 0


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_a_group_with_equal_rewards_produces_zero_gradient(method):
    net, reference = _net(), _net()
    reference.load_state_dict(net.state_dict())
    adv = group_advantages(torch.full((8,), 0.3), torch.zeros(8, dtype=torch.long))
    if method == "awm":
        terms = awm_loss(net, VP, "epsilon", torch.randn(8, 2), None, adv, torch.tensor([200.0, 600.0]),
                         torch.Generator().manual_seed(0), "ghuber", reference, 0.003, reference, 1.0)
    else:
        traj = sde_rollout(net, VP, "epsilon", torch.linspace(999, 100, 5), None, (8, 2), torch.Generator())
        terms = ddpo_loss(net, VP, "epsilon", traj, None, adv, trainable_steps(traj), reference=reference, beta=0.04)
    terms.loss.backward()
    assert _grads(net).abs().max() == 0.0


def test_awm_lowers_the_loss_of_positive_advantage_samples_and_raises_the_others():
    net = _net()
    x0 = torch.tensor([[0.6, 0.0], [-0.6, 0.0]]).repeat(8, 1)
    adv = torch.tensor([1.0, -1.0]).repeat(8)
    t = torch.tensor([250.0, 500.0, 750.0])

    def per_sample_mse():
        return [awm_loss(net, VP, "epsilon", x0[i::2], None, torch.ones(8), t, torch.Generator().manual_seed(9),
                         "uniform").mse for i in (0, 1)]

    before = per_sample_mse()
    opt = torch.optim.SGD(net.parameters(), lr=2e-3)  # small steps: raising an MSE is unbounded
    for k in range(5):
        opt.zero_grad()
        awm_loss(net, VP, "epsilon", x0, None, adv, t, torch.Generator().manual_seed(k), "uniform").loss.backward()
        opt.step()
    after = per_sample_mse()
    assert after[0] < before[0] and after[1] > before[1]


# ------------------------------------------------------------------ the harness on a 2-D problem


def _region_problem(prediction_type="epsilon"):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    schedule = VP if prediction_type == "epsilon" else FLOW
    make = (lambda: DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)) \
        if prediction_type == "epsilon" else FlowMatchEulerDiscreteScheduler
    return AlignProblem(net=_net(prediction_type), schedule=schedule, prediction_type=prediction_type,
                        make_scheduler=make, sample_shape=(2,), reward=RegionReward([0.5, 0.0], 1.0, softness=0.5),
                        group_labels=None)


@pytest.mark.parametrize("method", ["awm", "ddpo"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_micro_batches_give_the_same_update(method, prediction_type):
    """--train_batch_size / --sample_batch_size only split the work: the same rollouts, the same gradient.

    (Compared before the optimizer step: Adam's first steps are sign-like where a gradient is near zero, so
    weights after it would magnify float rounding.)
    """
    config = AlignConfig(method=method, num_groups=2, group_size=8, num_inference_steps=5, max_train_steps=1)
    results = []
    for train_batch, sample_batch in [(None, None), (7, 3)]:
        problem = _region_problem(prediction_type)
        problem.sample_batch_size = sample_batch
        config.train_batch_size = train_batch
        state = build_state(problem, config)
        state.optimizer.step = lambda *args, **kwargs: None  # keep the gradient of round 1 for the comparison
        stats = align_iteration(state, problem, config)
        results.append((torch.cat([p.grad.flatten() for p in state.policy.parameters()]), stats))
    (full, full_stats), (split, split_stats) = results
    assert full.abs().max() > 0 and (full - split).abs().max() <= 1e-4 * full.abs().max()
    assert full_stats.keys() == split_stats.keys()
    assert all(math.isclose(full_stats[k], split_stats[k], rel_tol=1e-4, abs_tol=1e-6) for k in full_stats)


def test_evaluation_ema_follows_diffusers_decay_and_is_what_gets_evaluated():
    config = AlignConfig(num_groups=2, group_size=8, num_inference_steps=5, use_ema=True, ema_decay=0.25)
    problem = _region_problem()
    state = build_state(problem, config)
    expected = [p.detach().clone() for p in state.policy.parameters()]
    for earlier in range(4):  # k earlier updates: decay min(0.25, (1 + k) / (10 + k)); the first update copies
        align_iteration(state, problem, config)
        decay = min(0.25, (1 + earlier) / (10 + earlier)) if earlier else 0.0
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, state.policy.parameters())]
    training = [p.detach().clone() for p in state.policy.parameters()]
    with evaluation_weights(state) as net:
        inside = [p.detach().clone() for p in net.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(inside, expected))
    assert not all(torch.allclose(a, b) for a, b in zip(inside, training))
    assert all(torch.equal(a, b) for a, b in zip(state.policy.parameters(), training))  # put back afterwards


def test_sde_rollouts_do_not_depend_on_the_sample_batch_size():
    grid = torch.tensor([999.0, 700.0, 400.0, 100.0])
    runs = [sde_rollout(_net(), VP, "epsilon", grid, None, (10, 2), torch.Generator().manual_seed(3), 1.0, batch)
            for batch in (None, 4)]
    assert torch.allclose(runs[0].states, runs[1].states, atol=1e-6)
    assert torch.allclose(runs[0].log_probs, runs[1].log_probs, atol=1e-6)


@pytest.mark.parametrize("method", ["awm", "ddpo"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_iterations_are_seeded_and_count_samples(method, prediction_type):
    config = AlignConfig(method=method, num_groups=2, group_size=8, num_inference_steps=5, max_train_steps=3)
    weights = []
    for _ in range(2):
        problem = _region_problem(prediction_type)
        state = build_state(problem, config)
        for _ in range(3):
            stats = align_iteration(state, problem, config)
        assert state.samples == 48 and state.step == 3 and math.isfinite(stats["reward"])
        weights.append(torch.cat([p.detach().flatten() for p in state.policy.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], torch.cat([p.flatten() for p in _net(prediction_type).parameters()]))


def test_bad_config_is_reported():
    with pytest.raises(ValueError, match="num_inference_steps must be >= 3"):
        AlignConfig(num_inference_steps=2).validate()
    with pytest.raises(ValueError, match="unknown alignment method"):
        AlignConfig(method="grpo").validate()
    with pytest.raises(ValueError, match="skip_last_fraction"):
        AlignConfig(skip_last_fraction=1.0).validate()
    with pytest.raises(ValueError, match="eta must be > 0"):
        AlignConfig(method="ddpo", eta=0.0).validate()
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        AlignConfig(lr_warmup_steps=-1).validate()


def test_learning_rate_warms_up_linearly_then_stays():
    config = AlignConfig(learning_rate=3e-4, lr_warmup_steps=3, num_groups=2, group_size=4, num_inference_steps=5)
    assert [config.learning_rate_at(s) for s in range(5)] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4, 3e-4])
    assert AlignConfig(learning_rate=3e-4).learning_rate_at(0) == 3e-4
    problem = _region_problem()
    state = build_state(problem, config)
    used = []
    for _ in range(2):
        align_iteration(state, problem, config)
        used.append(state.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([1e-4, 2e-4])
