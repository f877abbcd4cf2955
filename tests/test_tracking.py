"""``--report_to tensorboard`` in the trainers: their statistics reach real tensorboard event files."""

import importlib.util
from pathlib import Path

import pytest

from difflab.cli import main

pytest.importorskip("tensorboard")


def _scalars(logging_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for run in sorted(p for p in logging_dir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


def test_align_logs_rewards_and_validation(tmp_path):
    main(["align", "awm", "--output_dir", str(tmp_path), "--model", "mixture", "--teacher_steps", "20",
          "--max_train_steps", "3", "--num_groups", "1", "--group_size", "8", "--num_inference_steps", "4",
          "--validation_steps", "2", "--num_validation_samples", "50", "--no_progress", "--report_to", "tensorboard"])
    logged = _scalars(tmp_path / "logs")
    assert [step for step, _ in logged["reward"]] == [1, 2, 3]
    assert [step for step, _ in logged["eval_reward"]] == [2, 3]  # round 2, and the final validation
    assert "step" not in logged


def test_distill_logs_losses_under_the_chosen_logging_dir(tmp_path):
    main(["distill", "f-distill", "--output_dir", str(tmp_path), "--teacher_steps", "20", "--max_train_steps", "4",
          "--critic_updates", "1", "--no_progress", "--report_to", "tensorboard", "--logging_dir", "tb"])
    logged = _scalars(tmp_path / "tb")
    assert [step for step, _ in logged["dsm_loss"]] == [1, 3]  # critic updates alternate with generator updates
    assert [step for step, _ in logged["dm_loss"]] == [2, 4]


def test_train_digits_logs_loss_and_learning_rate(tmp_path):
    main(["models", "train-digits", "--model", "digits-classifier", "--output_dir", str(tmp_path),
          "--max_train_steps", "2", "--train_batch_size", "8", "--report_to", "tensorboard"])
    logged = _scalars(tmp_path / "logs")
    assert [step for step, _ in logged["loss"]] == [1, 2] and len(logged["lr"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["align", "awm", "--output_dir", str(tmp_path), "--model", "mixture", "--report_to", "wandb"])
    assert info.value.code == 2 and "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
