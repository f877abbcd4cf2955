"""Device placement of the distillation and alignment trainers: every batch goes where the networks are.

Random draws come from seeded CPU generators and are moved to the problem's device, so a run on the GPU
repeats the CPU run up to floating-point differences. The CPU tests check the plumbing; the CUDA tests
(skipped on machines without a GPU) run the trainers there and compare with the CPU.
"""

import json

import pytest
import torch

from difflab.distill.digits import digits_distill_problem, student_samples
from difflab.distill.lowdim import FDistillConfig, build_state, train_iteration
from difflab.distill.nets import OneStepGenerator

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = dict(batch_size=4, critic_updates=1, max_train_steps=4, lr_fake=1e-4, lr_head=1e-4, generator_timestep=610.0)


def _flat(module):
    return torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])


def _devices(*tensors):
    return {t.device for t in tensors if t is not None}


def _trained_generator(device):
    problem = digits_distill_problem("digits-ddpm").to(device)
    config = FDistillConfig(**CONFIG)
    state = build_state(config, problem)
    for _ in range(config.max_train_steps):
        train_iteration(state, problem, config)
    return state, problem


def test_batches_and_new_networks_are_on_the_problems_device():
    problem = digits_distill_problem("digits-ddpm").to("cpu")
    g = torch.Generator().manual_seed(0)
    assert _devices(*problem.draw_noise(3, g), *problem.draw_real(3, g)) == {problem.device}
    state = build_state(FDistillConfig(**CONFIG), problem)
    params = [p for m in (state.generator, state.fake, state.head, state.ema.model) for p in m.parameters()]
    assert _devices(*params, *state.normalizer.buffers()) == {problem.device}
    images, labels = student_samples(state.generator, problem, per_class=1)
    assert _devices(images, labels) == {torch.device("cpu")}  # evaluation and grids read CPU tensors


@CUDA
def test_fdistill_digits_on_cuda_repeats_the_cpu_run():
    cpu_state, _ = _trained_generator("cpu")
    cuda_state, cuda_problem = _trained_generator("cuda")
    assert next(cuda_state.generator.parameters()).is_cuda and cuda_problem.device.type == "cuda"
    torch.testing.assert_close(_flat(cuda_state.generator), _flat(cpu_state.generator), atol=1e-3, rtol=0)
    images, _ = student_samples(cuda_state.ema.model, cuda_problem, per_class=2)
    assert images.device.type == "cpu" and torch.isfinite(images).all()


@CUDA
def test_generator_on_cuda_takes_its_labels_there():
    problem = digits_distill_problem("digits-ddpm").to("cuda")
    generator = OneStepGenerator(problem.teacher_net, problem.schedule, 610.0, problem.prediction_type)
    z, labels = problem.draw_noise(4, torch.Generator().manual_seed(1))
    assert generator(z, labels).is_cuda


@CUDA
@pytest.mark.parametrize("method", ["f-distill", "disback"])
def test_distill_cli_trains_on_the_gpu(tmp_path, method):
    from difflab.distill.train import main

    extra = ["--num_nodes", "1", "--node_interval", "2", "--backtrack_interval", "2"] if method == "disback" else []
    summary = main([method, "--model", "digits-ddpm", "--output_dir", str(tmp_path / method), "--max_train_steps",
                    "4", "--train_batch_size", "4", "--critic_updates", "1", "--checkpointing_steps", "2",
                    "--validation_steps", "2", "--validation_per_class", "2", "--no_progress", *extra])
    assert summary["finished"] and (tmp_path / method / "unet").is_dir()


@CUDA
@pytest.mark.parametrize("method", ["awm", "ddpo"])
@pytest.mark.parametrize("model", ["digits-ddpm", "digits-flow"])
def test_align_cli_trains_on_the_gpu(tmp_path, method, model):
    from difflab.cli import main

    main(["align", method, "--model", model, "--reward", "class:3+ink*0.1", "--output_dir", str(tmp_path),
          "--max_train_steps", "2", "--num_groups", "1", "--group_size", "4", "--num_inference_steps", "4",
          "--validation_steps", "1", "--num_validation_samples", "16", "--checkpointing_steps", "1", "--no_progress"])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and "fd_to_class" in summary["final"]


@CUDA
def test_align_resumes_on_the_gpu_with_ema_and_micro_batches(tmp_path):
    """The EMA of a checkpoint loads on the CPU and must follow the policy back to the GPU."""
    from difflab.cli import main

    flags = ["align", "awm", "--model", "digits-flow", "--output_dir", str(tmp_path), "--max_train_steps", "2",
             "--num_groups", "1", "--group_size", "4", "--num_inference_steps", "4", "--validation_steps", "1",
             "--num_validation_samples", "16", "--checkpointing_steps", "1", "--no_progress", "--use_ema",
             "--train_batch_size", "5", "--sample_batch_size", "3"]
    main([*flags, "--stop_after_steps", "1"])
    main([*flags, "--resume_from_checkpoint", "latest"])
    assert json.loads((tmp_path / "train_summary.json").read_text())["finished"]
