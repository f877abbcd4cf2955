"""`difflab align awm|ddpo`: results, resume from 'latest', LoRA, errors, accelerate launch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.distill.align import load_mixture_policy

MIXTURE = ["--model", "mixture", "--teacher_steps", "20", "--max_train_steps", "4", "--num_groups", "2",
           "--group_size", "8", "--num_inference_steps", "5", "--validation_steps", "2",
           "--num_validation_samples", "100", "--checkpointing_steps", "2", "--no_progress"]
DIGITS = ["--model", "digits-flow", "--max_train_steps", "2", "--num_groups", "1", "--group_size", "4",
          "--num_inference_steps", "4", "--validation_steps", "1", "--num_validation_samples", "16",
          "--checkpointing_steps", "1", "--no_progress"]


def _cli(method: str, out: Path, *extra: str) -> None:
    main(["align", method, "--output_dir", str(out), *extra])


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_mixture_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    _cli(method, tmp_path / "a", *MIXTURE)
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["finished"] and summary["samples"] == 64 and len(summary["history"]) == 4
    assert {"reward", "inside_share", "energy_to_target"} <= set(summary["history"][1])
    with torch.no_grad():
        assert load_mixture_policy(tmp_path / "a")(torch.randn(3, 2), torch.tensor([10.0] * 3)).sample.shape == (3, 2)
    _cli(method, tmp_path / "b", *MIXTURE, "--stop_after_steps", "3")  # "killed" after checkpoint-2
    assert not (tmp_path / "b" / "policy.safetensors").exists()
    _cli(method, tmp_path / "b", *MIXTURE, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-4"]
    a, b = load_file(tmp_path / "a" / "policy.safetensors"), load_file(tmp_path / "b" / "policy.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_use_ema_saves_and_resumes_the_ema_weights(tmp_path, capsys):
    _cli("awm", tmp_path / "a", *MIXTURE, "--use_ema", "--ema_decay", "0.5")
    a = load_file(tmp_path / "a" / "policy.safetensors")
    state = torch.load(tmp_path / "a" / "checkpoint-4" / "state.pt", weights_only=False)["state"]
    shadow = state["ema"]["shadow_params"]
    assert len(shadow) == len(a) and all(torch.equal(s, a[k]) for s, k in zip(shadow, state["policy"]))
    assert any(not torch.equal(a[k], v) for k, v in state["policy"].items())  # the EMA, not the last weights
    _cli("awm", tmp_path / "b", *MIXTURE, "--use_ema", "--ema_decay", "0.5", "--stop_after_steps", "3")
    _cli("awm", tmp_path / "b", *MIXTURE, "--use_ema", "--ema_decay", "0.5", "--resume_from_checkpoint", "latest")
    b = load_file(tmp_path / "b" / "policy.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(SystemExit):
        _cli("awm", tmp_path / "b", *MIXTURE, "--resume_from_checkpoint", "latest", "--max_train_steps", "6")
    assert "saved with --use_ema" in capsys.readouterr().err


def test_resuming_with_other_settings_is_warned(tmp_path, capsys):
    out = tmp_path / "w"
    _cli("awm", out, *MIXTURE, "--stop_after_steps", "2")
    assert json.loads((out / "run_settings.json").read_text())["kl_beta"] == 0.003
    _cli("awm", out, *MIXTURE, "--resume_from_checkpoint", "latest", "--stop_after_steps", "3",
         "--reward", "region:0.8,0,0.3")  # the default reward, spelled out
    assert "Warning" not in capsys.readouterr().out
    _cli("awm", out, *MIXTURE, "--resume_from_checkpoint", "latest", "--kl_beta", "0.5", "--reward", "region:0,0,1")
    printed = capsys.readouterr().out
    assert "Warning" in printed and "kl_beta: 0.003 -> 0.5" in printed
    assert "reward: 'region:0.8,0,0.3' -> 'region:0,0,1'" in printed


@pytest.mark.parametrize("lora", [False, True])
def test_digits_run_writes_a_pipeline_directory(tmp_path, lora):
    from difflab.models import load

    extra = ["--lora_rank", "4", "--learning_rate", "1e-2", "--use_ema"] if lora else []  # (EMA of the adapters)
    _cli("awm", tmp_path, *DIGITS, "--reward", "class:3+ink*0.1", *extra)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and "fd_to_class" in summary["final"]
    assert (tmp_path / "validation-2.png").is_file()
    pipe = load(tmp_path)
    assert type(pipe).__name__ == "DigitsPipeline" and type(pipe.unet).__name__ == "UNet2DModel"
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 16, 16)
    base = load("digits-flow").unet.state_dict()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k])]
    assert changed  # the aligned weights, LoRA merged into the plain UNet
    if lora:
        assert all(k.endswith(".weight") and "conv" not in k for k in changed)


def test_awm_rolls_out_with_the_chosen_scheduler(tmp_path):
    from difflab.distill.align import build_parser, build_problem
    from difflab.distill.rollout import ode_rollout
    from difflab.models import load

    args = build_parser().parse_args(["awm", "--output_dir", str(tmp_path), "--model", "digits-ddpm",
                                      "--scheduler", "unipc"])
    problem = build_problem(args)
    scheduler = problem.make_scheduler()
    assert type(scheduler).__name__ == "UniPCMultistepScheduler"
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.beta_end == 0.02  # the model's schedule
    default = build_problem(build_parser().parse_args(["awm", "--output_dir", str(tmp_path), "--model", "digits-ddpm"]))
    rollouts = [ode_rollout(p.net, p.make_scheduler(), 4, torch.full((2,), 10), (2, 1, 16, 16),
                            torch.Generator().manual_seed(0))[0] for p in (problem, default)]
    assert (rollouts[0] - rollouts[1]).abs().max() > 1e-3  # the rollouts really use it
    _cli("awm", tmp_path / "run", *DIGITS, "--scheduler", "dpm++2m")
    assert json.loads((tmp_path / "run" / "run_settings.json").read_text())["scheduler"] == "dpm++2m"
    pipe = load(tmp_path / "run")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas


def test_ddpo_on_digits_ddpm(tmp_path):
    _cli("ddpo", tmp_path, *DIGITS, "--model", "digits-ddpm", "--reward", "ink", "--label", "7")
    assert json.loads((tmp_path / "train_summary.json").read_text())["finished"]


def test_errors_are_messages(tmp_path, capsys):
    for extra, message in [(["--reward", "clas:3"], "unknown reward"), (["--label", "x"], "--label must be a digit"),
                           (["--num_inference_steps", "2"], "num_inference_steps must be >= 3"),
                           (["--model", "digits-classifier"], "is not a diffusion pipeline"),
                           (["--resume_from_checkpoint", str(tmp_path / "none")], "is not a checkpoint directory"),
                           (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
                           (["--scheduler", "dpm++"], "Unknown scheduler 'dpm++'"),
                           (["--train_batch_size", "0"], "train_batch_size must be >= 1"),
                           (["--sample_batch_size", "0"], "--sample_batch_size must be >= 1"),
                           (["--scheduler", "ddim"], "has no flow-matching mode"),
                           (["--resolution", "32"], "--resolution applies to SDXL and Flux pipelines")]:
        with pytest.raises(SystemExit) as info:
            _cli("awm", tmp_path / "x", *DIGITS, *extra)
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # nothing written before the error
    with pytest.raises(SystemExit):
        _cli("ddpo", tmp_path / "x", *DIGITS, "--scheduler", "unipc")
    assert "--scheduler applies to awm" in capsys.readouterr().err
    _cli("ddpo", tmp_path / "m", *MIXTURE, "--stop_after_steps", "2")
    with pytest.raises(SystemExit):
        _cli("awm", tmp_path / "m", *MIXTURE, "--resume_from_checkpoint", "latest")
    assert "is a ddpo checkpoint" in capsys.readouterr().err


LAUNCHES = {"cpu": ["--num_processes", "2", "--cpu"],
            "multi": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]}
MICRO_BATCHES = ["--train_batch_size", "7", "--sample_batch_size", "5"]  # two processes: no_sync until the last


@pytest.mark.parametrize("launch", ["cpu", "multi"])
def test_accelerate_launch(tmp_path, launch, accelerate_launch):
    proc = accelerate_launch(LAUNCHES[launch], ["-m", "difflab.distill.align", "awm", "--output_dir", str(tmp_path),
                                                *MIXTURE, *(MICRO_BATCHES if launch == "multi" else [])],
                            timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    processes = 2 if launch == "multi" else 1
    assert summary["finished"] and summary["num_processes"] == processes and summary["samples"] == 64 * processes
