"""DisBack on a small mixture: degradation nodes, backtracking targets, strict loads, resume."""

import pytest
import torch

from difflab.distill import FDistillConfig, fit_mlp_teacher
from difflab.distill.disback import (
    Backtracker,
    DisBackConfig,
    initial_student,
    load_node,
    node_dsm_losses,
    node_path,
    save_node,
    start_backtracking,
    strict_load,
    train_disback_lowdim,
)
from difflab.distill.lowdim import LowDimProblem, checkpoint_dirs, exact_teacher
from difflab.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def teacher_net(mixture):
    return fit_mlp_teacher(mixture, SCHEDULE, "epsilon", steps=300, batch_size=256, hidden=48, depth=2, seed=0,
                           progress=False)


def _config(**kw):
    base = dict(divergence="rkl", max_train_steps=12, batch_size=64, critic_updates=1, checkpointing_steps=4, seed=1)
    disback = dict(num_nodes=3, node_interval=10, backtrack_interval=3, degradation_batch_size=128)
    base.update(kw.pop("base", {}))
    disback.update(kw)
    return DisBackConfig(base=FDistillConfig(**base), **disback)


@pytest.fixture(scope="module")
def finished(mixture, teacher_net, tmp_path_factory):
    out = tmp_path_factory.mktemp("disback")
    return train_disback_lowdim(_config(), mixture, SCHEDULE, teacher_net, out, progress=False), out


def _problem(mixture, teacher_net):
    return LowDimProblem(mixture, SCHEDULE, exact_teacher(mixture, SCHEDULE), teacher_net)


def _flat(*modules):
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


def test_stage1_writes_nodes_from_teacher_toward_student(finished, teacher_net, mixture):
    run, out = finished
    assert sorted(p.name for p in (out / "nodes").iterdir()) == [f"node-00{k}.pt" for k in range(4)]
    node0 = torch.load(node_path(out / "nodes", 0), weights_only=True)
    assert all(torch.equal(node0[k], v) for k, v in teacher_net.state_dict().items())
    student = initial_student(_problem(mixture, teacher_net))
    losses = node_dsm_losses(out / "nodes", 3, teacher_net, student, SCHEDULE, (20.0, 980.0), n=2048)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(b <= a * 1.02 for a, b in zip(losses, losses[1:])), losses  # falls along the path
    assert run.degradation.step == 30 and len(run.degradation.losses) == 30


def test_stage2_starts_at_node_n_and_ends_at_the_teacher(finished, mixture, teacher_net):
    run, out = finished
    config = _config()
    problem = _problem(mixture, teacher_net)
    state, tracker = start_backtracking(config, problem, out / "nodes")
    node_n = load_node(type(teacher_net)(2, 48, 2), out / "nodes", 3)
    assert torch.equal(_flat(state.fake), _flat(node_n))  # fake score = node N
    assert tracker.index == 1 and tracker.node == 2 and not tracker.at_teacher
    assert torch.equal(_flat(tracker.target.module), _flat(load_node(type(teacher_net)(2, 48, 2), out / "nodes", 2)))
    assert run.backtracker.at_teacher and run.backtracker.target is run.backtracker.teacher
    # targets: node 2 (j = 1), node 1, then T_3 = node 0 = the teacher itself (not reloaded from disk)
    assert [s["node"] for s in run.backtracker.switches] == [1, None]
    assert [s["iteration"] for s in run.backtracker.switches] == [3, 6]
    assert run.state.step == 12 and torch.isfinite(_flat(run.state.generator)).all()
    assert not torch.equal(_flat(run.state.generator), _flat(initial_student(_problem(mixture, teacher_net))))


def test_strict_load_rejects_mismatched_keys(teacher_net, tmp_path):
    net = type(teacher_net)(2, 48, 2)
    good = teacher_net.state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        strict_load(net, {f"fake_unet.{k}": v for k, v in good.items()})  # DisBack's prefixed dicts
    with pytest.raises(ValueError, match="missing keys"):
        strict_load(net, {k: v for k, v in good.items() if not k.startswith("output")})
    with pytest.raises(ValueError, match="shape mismatches"):
        strict_load(type(teacher_net)(2, 32, 2), good)
    strict_load(net, good)
    assert torch.equal(_flat(net), _flat(teacher_net))
    save_node(type(teacher_net)(2, 16, 1), tmp_path, 1)
    with pytest.raises(ValueError, match="does not match"):
        load_node(net, tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="node 2 is missing"):
        load_node(net, tmp_path, 2)


def test_plateau_switch_rule(finished, teacher_net, mixture):
    _, out = finished
    config = _config(switch="plateau", plateau_window=3, plateau_tol=0.05, min_node_steps=4, backtrack_interval=100)
    tracker = Backtracker(out / "nodes", 3, _problem(mixture, teacher_net), config)
    falling = [{"dsm_loss": 1.0 - 0.1 * i} for i in range(8)]
    assert not any(tracker.update(s, i) for i, s in enumerate(falling))  # still improving: stay
    flat = [{"dsm_loss": 0.3}, {}, {"dsm_loss": 0.3}, {"dsm_loss": 0.3}, {"dsm_loss": 0.3}, {"dsm_loss": 0.3}]
    moved = [tracker.update(s, 8 + i) for i, s in enumerate(flat)]
    assert moved.index(True) == 5 and tracker.index == 2  # plateau over the last two windows of 3 losses
    assert tracker.steps_at_target == 0 and tracker.losses == []
    with pytest.raises(ValueError, match="switch"):
        _config(switch="adaptive")


def test_resume_matches_uninterrupted_run(mixture, teacher_net, tmp_path):
    config = _config(switch="plateau", plateau_window=1, min_node_steps=1, backtrack_interval=4,
                     base=dict(divergence="js", ratio_ema=0.5))
    straight = train_disback_lowdim(config, mixture, SCHEDULE, teacher_net, tmp_path / "a", progress=False)
    out = tmp_path / "b"
    first = train_disback_lowdim(config, mixture, SCHEDULE, teacher_net, out, stop_after=14, progress=False)
    assert first.state is None and first.degradation.step == 14  # killed in stage 1
    torch.manual_seed(999)
    second = train_disback_lowdim(config, mixture, SCHEDULE, teacher_net, out, resume_from="latest", stop_after=37,
                                  progress=False)
    assert second.state.step == 7  # killed in stage 2 (global step 37 = 30 + 7); newest checkpoint: 36
    assert checkpoint_dirs(out)[-1].name == "checkpoint-36"
    resumed = train_disback_lowdim(config, mixture, SCHEDULE, teacher_net, out, resume_from="latest", progress=False)
    a = _flat(straight.state.generator, straight.state.fake, straight.state.head, straight.ema_generator)
    b = _flat(resumed.state.generator, resumed.state.fake, resumed.state.head, resumed.ema_generator)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert straight.backtracker.switches == resumed.backtracker.switches and straight.backtracker.at_teacher
    assert torch.equal(straight.state.normalizer.bin_means, resumed.state.normalizer.bin_means)
