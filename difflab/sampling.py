"""Sampling helpers behind ``difflab sample``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from .models.gmm import GaussianMixture, GMMDenoiser
from .samplers import get_scheduler
from .schedule import NoiseSchedule

GMM_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def sample_gmm_scatter(scheduler_name: str, steps: int, num_samples: int, seed: int, out: Path) -> Path:
    """Sample the 2-D built-in Gaussian mixture with a scheduler and save a scatter plot next to exact samples."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("writing the scatter plot needs matplotlib: pip install 'difflab[train]'") from err
    from diffusers import DDPMScheduler

    scheduler = get_scheduler(scheduler_name, DDPMScheduler(**GMM_CONFIG).config)
    mixture = GaussianMixture.random(2, 8, seed=0, std_range=(0.05, 0.15))
    model = GMMDenoiser(mixture, NoiseSchedule.from_config(scheduler.config), scheduler.config.get("prediction_type", "epsilon"))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 2, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_in, t).sample, t, x).prev_sample
    exact = mixture.sample(num_samples, generator=generator)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(exact[:, 0], exact[:, 1], s=2, alpha=0.3, label="exact samples")
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label=f"{scheduler_name}, {steps} steps")
    ax.set_title(f"2-D Gaussian mixture, {type(scheduler).__name__}")
    ax.legend(markerscale=4)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def recommended_settings(model: str, steps: int | None, guidance_scale: float | None,
                         default_guidance: float | None = 2.0) -> tuple[int, float | None]:
    """(steps, guidance): the values given, else a pipeline directory's ``difflab_sampling.json`` (written
    for one-step distilled pipelines), else 20 steps and ``default_guidance``."""
    saved: dict = {}
    settings = Path(model) / "difflab_sampling.json"
    if settings.is_file():
        saved = json.loads(settings.read_text())
    return (steps if steps is not None else int(saved.get("num_inference_steps", 20)),
            guidance_scale if guidance_scale is not None else saved.get("guidance_scale", default_guidance))


def saved_image_size(model: str) -> dict[str, int]:
    """The ``height`` / ``width`` a pipeline directory's ``difflab_sampling.json`` asks for (a Flux student made at
    another size than the pipeline's default), else none."""
    settings = Path(model) / "difflab_sampling.json"
    saved = json.loads(settings.read_text()) if settings.is_file() else {}
    return {key: int(saved[key]) for key in ("height", "width") if key in saved}


def sample_digits_grid(
    model: str,
    scheduler_name: str | None,
    steps: int,
    guidance_scale: float,
    classes: list[int],
    num_per_class: int,
    seed: int,
    out: Path,
) -> Path:
    """Sample a digits pipeline (built-in name, local directory or a loaded one) and save a labelled grid, one row
    per class."""
    from .models import load
    from .models.digits import make_grid

    pipe = load(model) if isinstance(model, (str, Path)) else model
    if scheduler_name is not None:
        pipe.scheduler = get_scheduler(scheduler_name, pipe.scheduler.config)
    labels = torch.tensor(classes).repeat_interleave(num_per_class)
    images = pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=num_per_class, labels=[str(c) for c in classes]).save(out)
    return out


def sample_pipeline_grid(
    pipe: Any,
    scheduler_name: str | None,
    steps: int,
    guidance_scale: float | None,
    prompts: list[str] | None,
    num_per_row: int,
    seed: int,
    out: Path,
    image_size: dict[str, int] | None = None,
) -> Path:
    """Sample another diffusers pipeline into a grid: one row per prompt for text pipelines (Stable Diffusion,
    SD3, Flux, ...), one row for unconditional ones (DDPMPipeline). ``guidance_scale`` None: the pipeline's;
    ``image_size``: ``height`` / ``width`` for the call (None: the pipeline's)."""
    from diffusers.utils import make_image_grid

    parameters = inspect.signature(pipe.__call__).parameters
    text = "prompt" in parameters
    if text and not prompts:
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass --prompt TEXT (one grid row per prompt).")
    if not text and (prompts or guidance_scale is not None):
        raise ValueError(f"{type(pipe).__name__} is unconditional: it takes no --prompt or --guidance-scale.")
    if scheduler_name is not None:
        pipe.scheduler = get_scheduler(scheduler_name, pipe.scheduler.config)
    call = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "pil",
            **(image_size or {})}
    if text:
        rows = list(prompts)
        call["prompt"] = [p for p in rows for _ in range(num_per_row)]
        if guidance_scale is not None:
            call["guidance_scale"] = guidance_scale
    else:
        rows = [None]
        call["batch_size"] = num_per_row
    images = pipe(**call).images
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(rows), cols=num_per_row).save(out)
    return out
