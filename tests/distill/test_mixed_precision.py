"""``--mixed_precision bf16|fp16`` in `difflab distill` and `difflab align`: every forward pass of a training
iteration (trained and frozen networks alike) runs under bfloat16 / float16 autocast, while the weights stay
float32; under float16 every backward pass goes through the loss scaler (torch's CPU GradScaler stands in for
the one accelerate makes on a GPU)."""

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from difflab.distill.loop import Runtime, fdistill_iteration

BF16 = Runtime(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


def fp16_runtime() -> Runtime:
    return Runtime(autocast=lambda: torch.autocast("cpu", dtype=torch.float16), scaler=torch.amp.GradScaler("cpu"))


@contextmanager
def conv_output_dtypes(*modules: nn.Module):
    """The dtypes of every Conv2d output of ``modules`` while the block runs."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("runtime, expected", [(Runtime(), torch.float32), (BF16, torch.bfloat16)])
def test_fdistill_iteration_runs_teacher_and_students_in_the_runtimes_precision(runtime, expected):
    from difflab.distill.digits import digits_distill_problem
    from difflab.distill.lowdim import FDistillConfig, build_state

    problem = digits_distill_problem("digits-ddpm")
    config = FDistillConfig(batch_size=4, critic_updates=1, max_train_steps=2, generator_timestep=610.0)
    state = build_state(config, problem)
    for net in (problem.teacher_net, state.generator, state.fake):
        with conv_output_dtypes(net) as seen:
            for _ in range(2):  # a critic and a generator update
                stats = fdistill_iteration(state, problem, config, runtime)
        assert seen == {expected}, net
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    assert {p.dtype for p in state.generator.parameters()} == {torch.float32}


def test_align_iteration_rolls_out_and_trains_in_bfloat16():
    from difflab.distill.aligner import AlignConfig, align_iteration, build_state, digits_problem
    from difflab.distill.rewards import build_reward

    problem = digits_problem("digits-flow", build_reward("class:3"), None, eval_samples=8, target_class=3)
    reward, seen_by_reward = problem.reward, []
    problem.reward = lambda images, labels: seen_by_reward.append(images.dtype) or reward(images, labels)
    for method in ("awm", "ddpo"):
        config = AlignConfig(method=method, num_groups=1, group_size=4, num_inference_steps=4, max_train_steps=1)
        state = build_state(problem, config)
        with conv_output_dtypes(state.policy, state.reference) as seen:
            stats = align_iteration(state, problem, config, BF16)
        assert seen == {torch.bfloat16} and torch.isfinite(torch.tensor(stats["policy_loss"]))
        assert {p.dtype for p in state.policy.parameters()} == {torch.float32}
    assert seen_by_reward == [torch.float32] * 2  # the rollouts' samples, back in float32


def test_disback_degradation_step_in_bfloat16():
    from difflab.distill.digits import digits_distill_problem
    from difflab.distill.disback import DegradationState, DisBackConfig, degradation_step, initial_student
    from difflab.distill.lowdim import FDistillConfig

    problem = digits_distill_problem("digits-ddpm")
    config = DisBackConfig(base=FDistillConfig(batch_size=4, generator_timestep=610.0))
    deg = DegradationState.build(config, problem.teacher_net)
    student = initial_student(problem, config.base)
    with conv_output_dtypes(deg.score, student) as seen:
        loss = degradation_step(deg, student, problem, config, BF16)
    assert seen == {torch.bfloat16} and loss == loss


def _align_cli(tmp_path, precision: str) -> subprocess.CompletedProcess:
    # a process of its own: accelerate fixes one precision per process
    return subprocess.run([sys.executable, "-m", "difflab.distill.align", "awm", "--output_dir", str(tmp_path / precision),
                           "--model", "mixture", "--teacher_steps", "20", "--max_train_steps", "2", "--num_groups", "1",
                           "--group_size", "8", "--num_inference_steps", "4", "--num_validation_samples", "50",
                           "--no_progress", "--mixed_precision", precision], capture_output=True, text=True, timeout=300)


def test_cli_trains_in_bf16_and_keeps_fp16_in_float32_on_the_cpu(tmp_path):
    done = _align_cli(tmp_path, "bf16")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bf16" / "policy.safetensors").is_file()
    cpu_fp16 = _align_cli(tmp_path, "fp16")  # accelerate makes no scaler on the CPU: a warning, then float32
    assert cpu_fp16.returncode == 0 and "'fp16' needs a GPU" in cpu_fp16.stderr
    assert (tmp_path / "fp16" / "policy.safetensors").is_file()


def test_loss_scaling_steps_exactly_as_unscaled_and_skips_an_overflow():
    """Scaling by a power of two is exact in float32: the scaled backward, unscale, clip and step give the very
    weights of the plain step; an infinite gradient skips the step and halves the scale."""
    from difflab.distill.engine import backward, clip_and_step

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-2) for net in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 4)
    for _ in range(3):
        for net, optimizer, scale in zip(nets, optimizers, (None, scaler)):
            backward(net(x).pow(2).mean(), scale)
            norm = clip_and_step([(net, optimizer)], 0.5, scale)[0]
            optimizer.zero_grad(set_to_none=True)
            assert norm > 0.0
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in nets[1].parameters()]
    backward(nets[1](x).pow(2).mean() * float("inf"), scaler)
    norm = clip_and_step([(nets[1], optimizers[1])], 0.5, scaler)[0]
    assert norm != norm or norm == float("inf")  # not finite: the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(before, nets[1].parameters()))
    assert scaler.get_scale() == 2.0**9


def test_fdistill_and_align_iterations_in_float16_with_loss_scaling(tmp_path):
    from difflab.distill.aligner import AlignConfig, align_iteration, build_state, digits_problem
    from difflab.distill.digits import digits_distill_problem
    from difflab.distill.lowdim import FDistillConfig
    from difflab.distill.lowdim import build_state as build_fdistill_state
    from difflab.distill.rewards import build_reward

    runtime = fp16_runtime()
    problem = digits_distill_problem("digits-ddpm")
    config = FDistillConfig(batch_size=4, critic_updates=1, max_train_steps=2, generator_timestep=610.0)
    state = build_fdistill_state(config, problem)
    start = [p.detach().clone() for p in state.generator.parameters()]
    with conv_output_dtypes(problem.teacher_net, state.generator, state.fake) as seen:
        while all(torch.equal(a, b) for a, b in zip(start, state.generator.parameters())):
            assert state.step < 40, "no generator step in 20: the loss scale never came down"
            fdistill_iteration(state, problem, config, runtime)  # the first steps overflow at scale 2^16: skipped
    assert seen == {torch.float16}
    assert {p.dtype for p in state.generator.parameters()} == {torch.float32}
    saved = runtime.with_scaler({"state": 0})
    resumed = fp16_runtime()
    resumed.restore_scaler(saved)
    assert resumed.scaler.get_scale() == runtime.scaler.get_scale() < 2.0**16  # float16 overflowed at first

    align = digits_problem("digits-flow", build_reward("class:3"), None, eval_samples=8, target_class=3)
    align_config = AlignConfig(method="awm", num_groups=1, group_size=4, num_inference_steps=4, max_train_steps=3)
    align_state = build_state(align, align_config)
    for _ in range(3):
        stats = align_iteration(align_state, align, align_config, runtime)
        assert "grad_norm" in stats or stats["skipped_step"] == 1.0
    assert {p.dtype for p in align_state.policy.parameters()} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fdistill_on_cuda_in_bf16_stays_close_to_float32():
    from difflab.distill.digits import digits_distill_problem
    from difflab.distill.lowdim import FDistillConfig, build_state

    cuda_bf16 = Runtime(autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    weights = []
    for runtime in (Runtime(), cuda_bf16):
        problem = digits_distill_problem("digits-ddpm").to("cuda")
        config = FDistillConfig(batch_size=4, critic_updates=1, max_train_steps=4, generator_timestep=610.0)
        state = build_state(config, problem)
        for _ in range(config.max_train_steps):
            fdistill_iteration(state, problem, config, runtime)
        weights.append(torch.cat([p.detach().reshape(-1).float().cpu() for p in state.generator.parameters()]))
    assert torch.isfinite(weights[1]).all()
    torch.testing.assert_close(weights[1], weights[0], atol=1e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_uses_accelerates_loss_scaler():
    from accelerate import Accelerator

    from difflab.distill.digits import digits_distill_problem
    from difflab.distill.lowdim import FDistillConfig, build_state

    runtime = Runtime.from_accelerator(Accelerator(mixed_precision="fp16"))
    assert runtime.scaler is not None
    problem = digits_distill_problem("digits-ddpm").to("cuda")
    config = FDistillConfig(batch_size=4, critic_updates=1, max_train_steps=40, generator_timestep=610.0)
    state = build_state(config, problem)
    for _ in range(config.max_train_steps):
        stats = fdistill_iteration(state, problem, config, runtime)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    assert runtime.scaler.get_scale() < 2.0**16 and "scaler" in runtime.with_scaler({})
