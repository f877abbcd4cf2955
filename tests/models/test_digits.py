"""Digits data, the shipped digits models, their loader and the training script (fast, CPU)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.models import BUILTIN_MODELS, DigitsClassifier, DigitsPipeline, load
from difflab.models.digits import NULL_CLASS, make_grid
from difflab.models.hub import WEIGHTS_DIR

pytest.importorskip("sklearn")
from difflab.models import load_digits_dataset  # noqa: E402

DIFFUSION_MODELS = ["digits-ddpm", "digits-flow"]


@pytest.fixture(scope="module")
def pipes() -> dict[str, DigitsPipeline]:
    out = {}
    for name in DIFFUSION_MODELS:
        pipe = load(name)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


# ------------------------------------------------------------------------------------ data


def test_dataset_shapes_range_and_split():
    x_tr, y_tr = load_digits_dataset("train")
    x_ho, y_ho = load_digits_dataset("heldout")
    x_all, _ = load_digits_dataset("all")
    assert x_tr.shape[1:] == (1, 16, 16) and x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert len(x_tr) + len(x_ho) == len(x_all) == 1797
    assert x_all.min() >= -1 and x_all.max() <= 1 and x_all.min() == -1 and x_all.max() == 1
    counts_all = torch.bincount(torch.cat([y_tr, y_ho]), minlength=10).float()
    assert torch.allclose(torch.bincount(y_ho, minlength=10).float(), 0.2 * counts_all, atol=0.5)  # stratified
    train_set = {bytes(im.numpy()) for im in x_tr}
    assert not any(bytes(im.numpy()) in train_set for im in x_ho)  # disjoint (the 1797 digits are distinct)


def test_dataset_split_is_deterministic_and_seeded():
    a, _ = load_digits_dataset("heldout", seed=0)
    b, _ = load_digits_dataset("heldout", seed=0)
    c, _ = load_digits_dataset("heldout", seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset("test")


# ------------------------------------------------------------------------------------ built-in models


@pytest.mark.parametrize("name", DIFFUSION_MODELS)
def test_builtin_pipeline_samples_all_output_types(pipes, name):
    pipe = pipes[name]
    assert pipe.unet.dtype == torch.float32
    kw = dict(class_labels=[3, 7], num_images_per_label=2, guidance_scale=2.0, num_inference_steps=4)
    pt = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (4, 1, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    arr = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)  # same seed, same digits
    pil = pipe(**kw, output_type="pil").images
    assert len(pil) == 4 and pil[0].size == (16, 16) and pil[0].mode == "L"


def test_builtin_classifier_loads_and_classifies_real_digits():
    clf = load("digits-classifier")
    assert isinstance(clf, DigitsClassifier) and not clf.training and clf.dtype == torch.float32
    x, y = load_digits_dataset("heldout")
    with torch.no_grad():
        assert clf.features(x[:8]).shape == (8, 64)
        acc = (clf(x).argmax(-1) == y).float().mean()
    assert acc >= 0.97


def test_cfg_is_one_batched_unet_call_per_step(pipes):
    pipe = pipes["digits-ddpm"]
    rows = []
    forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        rows.append((sample.shape[0], kwargs["class_labels"].tolist()))
        return forward(sample, *args, **kwargs)

    pipe.unet.forward = counting
    try:
        pipe(class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=4, output_type="pt")
        assert rows == [(4, [1, 2, NULL_CLASS, NULL_CLASS])] * 4
        rows.clear()
        pipe(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=4, output_type="pt")
        assert rows == [(2, [1, 2])] * 4
    finally:
        del pipe.unet.forward


def test_works_with_difflab_scheduler(pipes):
    from difflab.samplers import get_scheduler

    pipe = pipes["digits-flow"]
    original = pipe.scheduler
    try:
        pipe.scheduler = get_scheduler("euler-ddim", original.config)
        out = pipe(class_labels=0, num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
        assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()
    finally:
        pipe.scheduler = original


def test_label_out_of_range(pipes):
    with pytest.raises(ValueError, match=r"0\.\.9"):
        pipes["digits-ddpm"](class_labels=[0, 11], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        pipes["digits-ddpm"](class_labels=-1, num_inference_steps=2)


def test_make_grid():
    grid = make_grid(torch.rand(6, 1, 16, 16), nrow=3, labels=["a", "b"])
    assert isinstance(grid, Image.Image) and grid.mode == "L" and grid.height > 2 * 64
    with pytest.raises(ValueError, match="one label per row"):
        make_grid(torch.rand(6, 1, 16, 16), nrow=3, labels=["a"])


# ------------------------------------------------------------------------------------ loader errors


def test_unknown_model_name_lists_builtins():
    with pytest.raises(ValueError, match="digits-ddpm") as info:
        load("digits-gan")
    assert all(name in str(info.value) for name in BUILTIN_MODELS)


def test_directory_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load(tmp_path)


def test_corrupted_weights_file(tmp_path):
    target = tmp_path / "digits-ddpm"
    shutil.copytree(WEIGHTS_DIR / "digits-ddpm", target)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="diffusion_pytorch_model.safetensors.*corrupted"):
        load(target)


def test_models_load_and_sample_without_sklearn():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import torch, difflab.models as m\n"
        "p = m.load('digits-flow'); p.set_progress_bar_config(disable=True)\n"
        "assert p(class_labels=1, num_inference_steps=2, output_type='pt').images.shape == (1, 1, 16, 16)\n"
        "m.load('digits-classifier')\n"
        "try:\n    m.load_digits_dataset()\nexcept ImportError as e:\n    assert 'difflab[train]' in str(e)\n"
        "else:\n    raise SystemExit('expected ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ training


def _train(out: Path, model: str, *extra: str) -> dict:
    from difflab.models.train_digits import main

    return main(["--model", model, "--output_dir", str(out), "--train_batch_size", "4", "--lr_warmup_steps", "1",
                 "--checkpointing_steps", "2", *extra])


@pytest.mark.parametrize("model", ["digits-ddpm", "digits-flow", "digits-classifier"])
def test_training_smoke(tmp_path, model):
    summary = _train(tmp_path, model, "--max_train_steps", "3")
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert (tmp_path / "checkpoint-2").is_dir()
    loaded = load(tmp_path)
    if model == "digits-classifier":
        assert isinstance(loaded, DigitsClassifier) and "heldout_accuracy" in summary
    else:
        loaded.set_progress_bar_config(disable=True)
        assert loaded(class_labels=[0], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 16, 16)


def test_resume_from_latest_matches_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, "digits-ddpm", "--max_train_steps", "4")
    _train(resumed, "digits-ddpm", "--max_train_steps", "4", "--stop_after_steps", "2")  # "killed" after step 2
    assert not (resumed / "model_index.json").exists()
    _train(resumed, "digits-ddpm", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")  # EMA weights
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_two_process_launch_trains_one_model_and_resumes(tmp_path, accelerate_launch):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: one gloo group of two, not two runs."""
    import json

    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]
    flags = ["-m", "difflab.models.train_digits", "--model", "digits-ddpm", "--output_dir", str(tmp_path),
             "--train_batch_size", "4", "--lr_warmup_steps", "1", "--checkpointing_steps", "2"]
    proc = accelerate_launch(launch, [*flags, "--max_train_steps", "2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = accelerate_launch(launch, [*flags, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3 and summary["steps_this_run"] == 1
    assert isinstance(load(tmp_path), DigitsPipeline)
