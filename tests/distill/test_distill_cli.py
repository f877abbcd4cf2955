"""The distillation trainers: `difflab distill ...`, resume from 'latest', errors, accelerate launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.distill.train import build_config, build_parser, load_generator

TINY = ["--train_batch_size", "32", "--teacher_steps", "10", "--teacher_hidden", "16", "--teacher_depth", "1",
        "--num_samples", "200", "--no_progress", "--checkpointing_steps", "3"]
METHOD_FLAGS = {"f-distill": ["--divergence", "kl", "--critic_updates", "1", "--max_train_steps", "6"],
                "disback": ["--num_nodes", "2", "--node_interval", "2", "--backtrack_interval", "2",
                            "--max_train_steps", "5", "--switch", "plateau", "--plateau_window", "1",
                            "--min_node_steps", "1", "--critic_updates", "1"]}


def _cli(method: str, out: Path, *extra: str) -> None:
    main(["distill", method, "--output_dir", str(out), *TINY, *METHOD_FLAGS[method], *extra])


@pytest.mark.parametrize("method", ["f-distill", "disback"])
def test_cli_runs_and_resumes_from_latest(tmp_path, method):
    _cli(method, tmp_path / "a")
    for name in ("generator.safetensors", "generator_config.json", "samples.png", "train_summary.json"):
        assert (tmp_path / "a" / name).is_file(), name
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["finished"] and summary["method"] == method
    generator = load_generator(tmp_path / "a")
    with torch.no_grad():
        assert generator(torch.randn(5, 2)).shape == (5, 2)
    if method == "disback":
        assert (tmp_path / "a" / "nodes" / "node-002.pt").is_file() and summary["degradation_steps"] == 4
    _cli(method, tmp_path / "b", "--stop_after_steps", "4")  # "killed" (disback: in stage 1, after checkpoint-3)
    assert not (tmp_path / "b" / "generator.safetensors").exists()
    _cli(method, tmp_path / "b", "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "a" / "generator.safetensors"), load_file(tmp_path / "b" / "generator.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resuming_with_other_settings_is_warned(tmp_path, capsys):
    out = tmp_path / "c"
    _cli("f-distill", out, "--stop_after_steps", "3")
    assert json.loads((out / "run_settings.json").read_text())["divergence"] == "kl"
    _cli("f-distill", out, "--resume_from_checkpoint", "latest", "--stop_after_steps", "4", "--max_train_steps", "8")
    assert "Warning" not in capsys.readouterr().out  # a longer run is the same run
    _cli("f-distill", out, "--resume_from_checkpoint", "latest", "--divergence", "js")
    printed = capsys.readouterr().out
    assert "Warning" in printed and "divergence: 'kl' -> 'js'" in printed
    assert json.loads((out / "run_settings.json").read_text())["divergence"] == "kl"  # the record of the start


def test_cli_errors_are_messages(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _cli("f-distill", tmp_path / "x", "--divergence", "tv")
    assert info.value.code == 2 and "Unknown f-divergence 'tv'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("disback", tmp_path / "x", "--resume_from_checkpoint", str(tmp_path / "missing"))
    assert "is not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("disback", tmp_path / "x", "--gan_weight", "0")
    assert "--gan_weight must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("f-distill", tmp_path / "x", "--mixture", "ring8", "--dim", "3")
    assert "--mixture random" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("f-distill", tmp_path / "x", "--t_range", "0.5", "0.1")
    assert "--t_range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("f-distill", tmp_path / "x", "--model", "digits-classifier")  # not a teacher: nothing is written
    assert "digits-classifier" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_mixture_run_without_matplotlib_stops_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit):
        _cli("f-distill", tmp_path, "--max_train_steps", "5")
    assert "pip install 'difflab[train]'" in capsys.readouterr().err
    assert not list(tmp_path.glob("checkpoint-*"))


def test_t_range_flag_reaches_the_config():
    args = build_parser().parse_args(["f-distill", "--output_dir", "unused", "--t_range", "0.001", "0.05"])
    assert build_config(args).t_range == (0.001, 0.05)
    assert build_config(build_parser().parse_args(["disback", "--output_dir", "unused"])).base.t_range == (0.02, 0.98)


def test_random_mixture_in_more_dimensions(tmp_path):
    _cli("f-distill", tmp_path, "--mixture", "random", "--dim", "3", "--num_modes", "3")
    with torch.no_grad():
        assert load_generator(tmp_path)(torch.randn(4, 3)).shape == (4, 3)


LAUNCHES = {"cpu": ["--num_processes", "2", "--cpu"],
            "multi": ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]}


@pytest.mark.parametrize("launch", ["cpu", "multi"])
@pytest.mark.parametrize("method", ["f-distill", "disback"])
def test_accelerate_launch(tmp_path, method, launch, accelerate_launch):
    proc = accelerate_launch(LAUNCHES[launch], ["-m", "difflab.distill.train", method, "--output_dir", str(tmp_path),
                                                *TINY, *METHOD_FLAGS[method]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and summary["num_processes"] == (2 if launch == "multi" else 1)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL right after its first checkpoint resumes to the uninterrupted weights."""
    import signal
    import time

    flags = [*TINY, *METHOD_FLAGS["f-distill"], "--max_train_steps", "600", "--checkpointing_steps", "20"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "difflab.distill.train", "f-distill", "--output_dir", str(killed), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a bound on waiting, not a timing assertion
    while not list(killed.glob("checkpoint-*/state.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "generator.safetensors").exists()
    main(["distill", "f-distill", "--output_dir", str(killed), *flags, "--resume_from_checkpoint", "latest"])
    main(["distill", "f-distill", "--output_dir", str(tmp_path / "whole"), *flags])
    a, b = load_file(tmp_path / "whole" / "generator.safetensors"), load_file(killed / "generator.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_accelerate_launch_two_processes_on_a_digits_teacher(tmp_path, accelerate_launch):
    """Two gloo processes distil digits-ddpm (DDP-wrapped UNet generator and fake score) and save the pipeline."""
    proc = accelerate_launch(LAUNCHES["multi"], [
        "-m", "difflab.distill.train", "f-distill", "--model", "digits-ddpm", "--output_dir", str(tmp_path),
        "--max_train_steps", "4", "--train_batch_size", "2", "--critic_updates", "1", "--checkpointing_steps", "2",
        "--validation_steps", "4", "--validation_per_class", "3", "--no_progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and summary["num_processes"] == 2
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "checkpoint-4" / "state.pt").is_file()
