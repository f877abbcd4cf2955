"""``--mixed_precision bf16`` in `difflab distill` and `difflab align`: every forward pass of a training
iteration (trained and frozen networks alike) runs under bfloat16 autocast, while the weights stay
float32; fp16 is refused with a message (no loss scaling)."""

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from difflab.distill.loop import Runtime, fdistill_iteration

BF16 = Runtime(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


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


def test_cli_trains_in_bf16_and_refuses_fp16(tmp_path):
    done = _align_cli(tmp_path, "bf16")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bf16" / "policy.safetensors").is_file()
    refused = _align_cli(tmp_path, "fp16")
    assert refused.returncode == 2 and "use 'bf16'" in refused.stderr


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
