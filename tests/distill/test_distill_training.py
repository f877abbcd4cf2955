"""The low-dimensional f-distill trainer: it learns, and a resumed run ends where an uninterrupted one does."""

import pytest
import torch

from difflab.distill import FDistillConfig, fit_mlp_teacher, train_fdistill_lowdim
from difflab.distill.lowdim import checkpoint_dirs
from difflab.eval.energy import energy_distance
from difflab.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def teacher_net(mixture):
    return fit_mlp_teacher(mixture, SCHEDULE, "epsilon", steps=400, batch_size=256, hidden=64, depth=2, seed=0,
                           progress=False)


def _samples(generator, n=2000, seed=5):
    with torch.no_grad():
        return generator(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)))


def test_training_reduces_energy_distance(mixture, teacher_net):
    config = FDistillConfig(divergence="js", max_train_steps=600, batch_size=256, critic_updates=2,
                            lr_generator=3e-5, ema_decay=0.9, seed=0)
    reference = mixture.sample(2000, generator=torch.Generator().manual_seed(9)).float()
    before = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, stop_after=0, progress=False)
    run = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, progress=False, log_every=50)
    start, end = energy_distance(_samples(before.generator), reference), energy_distance(_samples(run.generator), reference)
    assert end < 0.5 * start, (start, end)
    assert run.history and {"dsm_loss", "disc_loss", "dm_loss", "r_mean"} <= set(run.history[-1])


def _flat(run):
    state = run.state
    parts = [state.generator, state.fake, state.head, run.ema_generator]
    return torch.cat([p.detach().reshape(-1) for m in parts for p in m.parameters()] + [state.normalizer.bin_means])


def test_resume_matches_uninterrupted_run(mixture, teacher_net, tmp_path):
    config = FDistillConfig(divergence="kl", max_train_steps=6, batch_size=64, critic_updates=1, ratio_ema=0.5,
                            checkpointing_steps=3, seed=3)
    straight = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, progress=False)
    out = tmp_path / "run"
    train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, output_dir=out, stop_after=3, progress=False)
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-3"]
    torch.manual_seed(12345)  # the resumed process starts from an unrelated global RNG state
    resumed = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, output_dir=out, resume_from="latest",
                                    progress=False)
    assert resumed.state.step == 6
    assert (straight.state.normalizer.bin_seen).any()
    assert torch.allclose(_flat(straight), _flat(resumed), atol=1e-6, rtol=0)
    assert not torch.allclose(_flat(straight), _flat(train_fdistill_lowdim(
        config, mixture, SCHEDULE, teacher_net, stop_after=5, progress=False)), atol=1e-6, rtol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        a = straight.state.opt_generator.state_dict()["state"][0][key]
        b = resumed.state.opt_generator.state_dict()["state"][0][key]
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_config_errors(mixture, teacher_net):
    with pytest.raises(ValueError, match="Unknown f-divergence"):
        FDistillConfig(divergence="tv")
    with pytest.raises(ValueError, match="head_features"):
        FDistillConfig(head_features="unet")
    with pytest.raises(ValueError, match="t_range"):
        FDistillConfig(t_range=(0.5, 0.2))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train_fdistill_lowdim(FDistillConfig(max_train_steps=1), mixture, SCHEDULE, teacher_net,
                              resume_from="/nonexistent", progress=False)


def test_teacher_features_option_runs(mixture, teacher_net):
    config = FDistillConfig(divergence="sh", max_train_steps=4, batch_size=32, critic_updates=1,
                            head_features="teacher")
    run = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, progress=False, log_every=2)
    assert run.state.step == 4 and torch.isfinite(_flat(run)).all()


def test_warm_start_from_another_generator(mixture, teacher_net):
    config = FDistillConfig(divergence="kl", max_train_steps=6, batch_size=64, critic_updates=2, seed=0)
    donor = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, progress=False).ema_generator
    fresh = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, stop_after=0, progress=False)
    warm = train_fdistill_lowdim(config, mixture, SCHEDULE, teacher_net, stop_after=0, progress=False,
                                 init_generator=donor)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(warm.generator(z), donor(z)) and torch.equal(warm.ema_generator(z), donor(z))
        assert not torch.allclose(fresh.generator(z), donor(z))
