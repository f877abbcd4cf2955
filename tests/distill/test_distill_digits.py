"""One-step distillation of the built-in digits models: problem, generator, pipeline, trainer."""

import json

import pytest
import torch

from difflab.distill.digits import (
    GuidedDenoiser,
    digits_distill_problem,
    one_step_pipeline,
    unet_mid_features,
)
from difflab.distill.lowdim import FDistillConfig, build_state, train_iteration
from difflab.distill.nets import OneStepGenerator, default_generator_timestep
from difflab.models import load
from difflab.models.digits import NULL_CLASS
from difflab.sampling import recommended_settings
from difflab.schedule import NoiseSchedule


@pytest.fixture(scope="module")
def ddpm():
    return digits_distill_problem("digits-ddpm")


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_generator_timestep_rule(ddpm):
    flow = digits_distill_problem("digits-flow")
    assert default_generator_timestep(ddpm.schedule, "epsilon") == 610.0  # alpha(999) = 0.006 -> alpha >= 0.15
    assert float(ddpm.schedule.alpha_sigma(610.0)[0]) >= 0.15 > float(ddpm.schedule.alpha_sigma(611.0)[0])
    assert default_generator_timestep(ddpm.schedule, "v_prediction") == 999.0
    assert default_generator_timestep(flow.schedule, flow.prediction_type) == 1000.0
    sd = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        num_train_timesteps=1000))
    assert default_generator_timestep(sd, "epsilon") == 999.0  # alpha 0.068: DMD2's choice stays


@pytest.mark.parametrize("model", ["digits-ddpm", "digits-flow"])
def test_one_step_pipeline_reproduces_the_generator(model):
    problem = digits_distill_problem(model)
    t = default_generator_timestep(problem.schedule, problem.prediction_type)
    generator = OneStepGenerator(problem.teacher_net, problem.schedule, t, problem.prediction_type)
    pipe = one_step_pipeline(generator, problem)
    z = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    images = pipe(class_labels=labels, num_inference_steps=1, latents=z, output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [t]
    torch.testing.assert_close(images, generator(z, labels), atol=1e-5, rtol=0)


def test_features_and_guided_teacher(ddpm):
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t, labels = torch.full((3,), 400.0), torch.tensor([1, 4, 7])
    out, feats = unet_mid_features(ddpm.teacher_net, x, t, class_labels=labels)
    assert feats.shape == (3, ddpm.feature_dim) == (3, 64 * 4 * 4)
    torch.testing.assert_close(out, ddpm.teacher_net(x, t, class_labels=labels).sample)
    guided = GuidedDenoiser(ddpm.teacher_net, 3.0)(x, t, class_labels=labels).sample
    cond = ddpm.teacher_net(x, t, class_labels=labels).sample
    uncond = ddpm.teacher_net(x, t, class_labels=torch.full_like(labels, NULL_CLASS)).sample
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_scale"):
        digits_distill_problem("digits-ddpm", guidance_scale=0.5)
    with pytest.raises(ValueError, match="class-conditional digits pipeline"):
        digits_distill_problem("digits-classifier")


def test_fdistill_iterations_train_the_class_conditional_generator(ddpm):
    config = FDistillConfig(batch_size=4, critic_updates=1, max_train_steps=4, lr_fake=1e-4, lr_head=1e-4,
                            generator_timestep=610.0)
    state = build_state(config, ddpm)
    before = _flat(state.generator)
    fake_before = _flat(state.fake)
    stats = [train_iteration(state, ddpm, config) for _ in range(4)]
    assert {"dsm_loss", "disc_loss"} <= set(stats[0]) and {"dm_loss", "gan_gen_loss"} <= set(stats[1])
    assert state.step == 4 and not torch.equal(before, _flat(state.generator))
    assert not torch.equal(fake_before, _flat(state.fake))
    assert state.generator.timestep == 610.0
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    x3, x8 = state.generator(z, torch.tensor([3, 3])), state.generator(z, torch.tensor([8, 8]))
    assert (x3 - x8).abs().mean() > 0.05  # the labels reach the generator


def _train(tmp_path, name, *extra):
    from difflab.distill.train import main

    out = tmp_path / name
    summary = main(["f-distill", "--model", "digits-ddpm", "--output_dir", str(out), "--max_train_steps", "6",
                    "--train_batch_size", "4", "--critic_updates", "1", "--checkpointing_steps", "3",
                    "--validation_steps", "3", "--validation_per_class", "5", "--no_progress", *extra])
    return out, summary


def _unet_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_cli_writes_a_one_step_pipeline_and_resumes_exactly(tmp_path):
    out, summary = _train(tmp_path, "full")
    assert summary["finished"] and summary["generator_timestep"] == 610.0
    assert (out / "validation-3.png").is_file() and (out / "samples.png").is_file()
    assert json.loads((out / "difflab_sampling.json").read_text())["num_inference_steps"] == 1
    assert recommended_settings(str(out), None, None) == (1, 1.0)
    assert recommended_settings(str(out), 4, 2.0) == (4, 2.0)
    history = json.loads((out / "train_summary.json").read_text())["history"]
    assert [h["step"] for h in history if h.get("validation")] == [0, 3, 6]
    pipe = load(out)
    images = pipe(class_labels=[2, 5], num_inference_steps=1, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        pipe(class_labels=[2], num_inference_steps=2)

    part, partial = _train(tmp_path, "part", "--stop_after_steps", "3")
    assert not partial["finished"] and not (part / "model_index.json").exists()
    _, resumed = _train(tmp_path, "part", "--resume_from_checkpoint", "latest")
    assert resumed["finished"]
    full_w, resumed_w = _unet_weights(out), _unet_weights(part)
    assert max((full_w[k] - resumed_w[k]).abs().max().item() for k in full_w) <= 1e-6


def test_init_generator_starts_both_methods_from_a_saved_student(tmp_path, capsys):
    """--init_generator: the generator (f-distill) and DisBack's frozen initial student are the saved one-step
    pipeline, at its timestep; a directory that is not one, or another timestep, is a message."""
    import argparse

    from difflab.distill.disback import initial_student
    from difflab.distill.train import main, set_initial_generator

    student_dir, _ = _train(tmp_path, "student", "--generator_timestep", "500")
    pipe = load(student_dir)
    problem = digits_distill_problem("digits-ddpm")
    args = argparse.Namespace(init_generator=str(student_dir), generator_timestep="auto")
    set_initial_generator(problem, args)
    assert args.generator_timestep == "500.0"
    config = FDistillConfig(generator_timestep=500.0)
    z, labels = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 3, 9])
    saved = pipe(class_labels=labels, num_inference_steps=1, latents=z, output_type="latent").images
    state = build_state(config, problem)
    for generator in (state.generator, state.ema.model, initial_student(problem, config)):
        torch.testing.assert_close(generator(z, labels).detach(), saved, atol=1e-5, rtol=0)

    _, summary = _train(tmp_path, "refined", "--init_generator", str(student_dir))
    assert summary["finished"] and summary["generator_timestep"] == 500.0
    from difflab.models.tiny import tiny_ddpm_pipeline

    other = tmp_path / "other"  # a UNet2DModel of another architecture, dressed as a one-step result
    tiny_ddpm_pipeline().save_pretrained(other)
    (other / "difflab_sampling.json").write_text('{"num_inference_steps": 1}')
    base = ["f-distill", "--model", "digits-ddpm", "--output_dir", str(tmp_path / "x"), "--max_train_steps", "1",
            "--no_progress"]
    for extra, message in ((["--init_generator", str(tmp_path / "nothing")], "not a one-step pipeline"),
                           (["--init_generator", str(student_dir), "--generator_timestep", "max"], "leave"),
                           (["--init_generator", str(student_dir), "--model", "digits-flow"], "flow_prediction"),
                           (["--init_generator", str(other)], "do not match")):
        with pytest.raises(SystemExit) as info:
            main(base + extra)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_bad_flags(tmp_path, capsys):
    from difflab.distill.train import main

    base = ["f-distill", "--output_dir", str(tmp_path / "x"), "--no_progress"]
    for extra, message in ((["--guidance_scale", "2"], "applies to a --model"),
                           (["--model", "digits-ddpm", "--generator_timestep", "soon"], "generator_timestep"),
                           (["--model", "digits-ddpm", "--generator_timestep", "5000"], "beyond")):
        with pytest.raises(SystemExit) as info:
            main(base + extra)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_disback_degrades_toward_the_generator_it_will_train(ddpm):
    """Stage 1's frozen initial student is the stage-2 generator's starting point: same timestep, same output."""
    from difflab.distill.disback import initial_student

    for config in (FDistillConfig(), FDistillConfig(generator_timestep=500.0)):
        student, state = initial_student(ddpm, config), build_state(config, ddpm)
        assert student.timestep == state.generator.timestep == (config.generator_timestep or 610.0)
        z, labels = ddpm.draw_noise(3, torch.Generator().manual_seed(0))
        torch.testing.assert_close(student(z, labels), state.generator(z, labels).detach())


def test_bench_comparison_rules_on_a_flat_noisy_curve():
    """One lucky dip decides "first reaching"; the running mean does not let it."""
    from difflab.benchmarks.distill_digits import first_reaching, own_first, running_mean

    curve = [(0, 100.0, 1.0), (50, 60.0, 1.0), (100, 50.0, 1.0), (150, 56.0, 1.0), (200, 54.0, 1.0), (250, 52.0, 1.0)]
    assert first_reaching(curve, 52.0) == 100
    assert own_first(curve, 52.0, 250) == ", a level it had first reached at 100 steps"  # the page says so
    assert own_first(curve, 49.0, 250) == own_first(curve, 52.0, 100) == ""
    smooth = running_mean(curve)
    assert [steps for steps, _, _ in smooth] == [100, 150, 200, 250]
    assert [fd for _, fd, _ in smooth] == pytest.approx([70.0, 166 / 3, 160 / 3, 54.0])
    assert first_reaching(smooth, 52.0) is None
    assert first_reaching(smooth, 54.0) == 200


def test_bench_starts_every_run_from_the_given_student():
    import argparse

    from difflab.benchmarks.distill_digits import add_arguments, start_note, trainer_command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--init-generator", "runs/student", "--runs", "js", "disback-js"])
    for name in args.runs:
        cmd = trainer_command(args, name)
        assert cmd[cmd.index("--init_generator") + 1] == "runs/student"
    assert "FD-digits 80.7 at generator step 0" in start_note(args, {"js": [(0, 80.7, 0.99), (50, 70.0, 0.99)]})[0]
    assert start_note(parser.parse_args([]), {}) == [] and "--init_generator" not in trainer_command(
        parser.parse_args([]), "js")
