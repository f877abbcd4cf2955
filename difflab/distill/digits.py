"""One-step distillation of the built-in digits models (and any DigitsPipeline directory).

The pieces of :mod:`difflab.distill.lowdim` (f-distill steps, EMA, checkpoints) and of
:mod:`difflab.distill.disback` run unchanged on :class:`UNetDistillProblem`, which supplies what is
image-specific (other diffusers UNet pipelines build the same problem in :mod:`difflab.distill.pipelines`):

* the teacher is the pipeline's class-conditional ``UNet2DModel`` (eps, v or flow velocity), with
  optional classifier-free guidance on its output (:class:`GuidedDenoiser`, Ho & Salimans 2022 eq. 6);
* the generator is a copy of the UNet at the largest timestep on pure noise, conditioned on a class
  drawn uniformly from 0..9 (DMD2 / f-distill initialization);
* the fake score (a second copy) and the teacher see the same class labels as the generator;
* the discriminator head reads the UNet's mid-block activations (the bottleneck, 64 x 4 x 4 for the
  built-in UNet: the "resolution 8 / 4" heads of the f-distill paper's Table 5), through
  :func:`unet_mid_features`; real data are the train-split digits with their labels.

:func:`one_step_pipeline` turns a generator into a :class:`~difflab.models.digits.DigitsPipeline`
whose scheduler makes exactly one step from pure noise to G(z) (DDIM with trailing spacing and
``set_alpha_to_one`` for VP models, FlowMatch Euler for flow models), so ``difflab sample --model DIR``
and :mod:`difflab.eval` use the result like any other digits pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.conditioning import default_resolution
from ..schedule import NoiseSchedule
from .engine import ScoreModel
from .lowdim import FDistillConfig
from .nets import OneStepGenerator, inner_module

SAMPLING_FILE = "difflab_sampling.json"  # recommended call settings of a saved pipeline (read by `difflab sample`)


def feature_block(network: nn.Module) -> nn.Module:
    """The block whose activations feed the discriminator head: a UNet's mid block (its bottleneck), or the middle
    one of a transformer's (Stable Diffusion 3, Flux) ``transformer_blocks``."""
    if getattr(network, "mid_block", None) is not None:
        return network.mid_block
    blocks = getattr(network, "transformer_blocks", None)
    if not blocks:
        raise ValueError(f"{type(network).__name__} has neither a mid_block nor transformer_blocks to take the "
                         "discriminator's features from.")
    return blocks[len(blocks) // 2]


def unet_mid_features(module: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                      **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoiser output, activations of its :func:`feature_block`) of one call: the discriminator head's input.

    A UNet's mid-block activations are flattened. A transformer block returns (text stream, image stream); its
    image tokens are averaged: flattened, SD3's 4096 tokens x 1536 at 1024 px would make a head of 400M weights.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, out):
        captured["h"] = out[-1].mean(dim=1) if isinstance(out, tuple) else out

    handle = feature_block(inner_module(module)).register_forward_hook(keep)
    try:
        out = module(x_t, t, **cond).sample
    finally:
        handle.remove()
    return out, captured["h"].flatten(1)


class GuidedDenoiser(nn.Module):
    """A class-conditional UNet with classifier-free guidance on its raw output (one batched call, the
    null class ``null_label`` as the unconditional label: :func:`difflab.models.digits.guided_unet_output`)."""

    def __init__(self, unet: nn.Module, guidance_scale: float, null_label: int | None = None):
        from ..models.digits import NULL_CLASS

        super().__init__()
        self.module, self.guidance_scale = unet, float(guidance_scale)
        self.null_label = NULL_CLASS if null_label is None else int(null_label)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, **kw: Any):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        from ..models.digits import guided_unet_output

        return UNet2DOutput(sample=guided_unet_output(self.module, sample, timestep, class_labels, self.guidance_scale,
                                                      self.null_label))


@dataclass
class UNetDistillProblem:
    """The fixed parts of a distillation run with a UNet teacher (the methods the f-distill / DisBack steps call).

    ``images`` are the real samples in the space the UNet works in (pixels, or VAE latents for latent
    pipelines) and ``labels`` their classes (digits) or prompt indices (text pipelines), or None for an
    unconditional UNet (``num_classes = 0``). ``pipeline`` is the teacher pipeline of a non-digits run
    (:mod:`difflab.distill.pipelines`), whose other components the saved result reuses.
    """

    schedule: NoiseSchedule
    teacher: ScoreModel
    teacher_net: nn.Module
    prediction_type: str
    images: torch.Tensor
    labels: torch.Tensor | None
    scheduler_config: dict
    num_classes: int = 10
    pipeline: Any = None
    prompts: list[str] | None = None
    initial_generator: dict | None = None  # the UNet state dict of a student to start from (--init_generator)
    component: str = "unet"  # the pipeline component the denoiser is ("transformer": Stable Diffusion 3, Flux)
    space: Any = None  # a pipeline's ModelSpace (difflab.models.conditioning): decodes samples to images

    @property
    def is_digits(self) -> bool:
        return self.pipeline is None

    @property
    def device(self) -> torch.device:
        """Where the networks live and every batch goes (the teacher's device; the real data stay on the CPU)."""
        return next(self.teacher_net.parameters()).device

    def to(self, device: torch.device | str) -> UNetDistillProblem:
        """Move the teacher (and a latent pipeline's VAE, which decodes the validation grids) to ``device``;
        the generator, fake score and head are built there. Returns the problem."""
        self.teacher_net.to(device)
        vae = getattr(self.pipeline, "vae", None)
        if vae is not None:
            vae.to(device)
        return self

    def call_settings(self) -> dict[str, Any]:
        """How the saved one-step pipeline is called: one step, for a conditional model without classifier-free
        guidance (a Flux model with embedded guidance, FLUX.1-dev: the value the student was trained at), and at
        the image size the student learned where that is not the pipeline's default (SDXL, Flux)."""
        settings: dict[str, Any] = {"num_inference_steps": 1}
        if self.num_classes:
            net = inner_module(self.teacher_net)
            embedded = getattr(net.config, "guidance_embeds", False)
            settings["guidance_scale"] = float(self.teacher_net.guidance_scale) if embedded else 1.0
        if self.space is not None and self.space.resolution != default_resolution(self.pipeline):
            settings.update(height=self.space.resolution, width=self.space.resolution)
        return settings

    @cached_property
    def feature_dim(self) -> int:
        """Width of the discriminator head's input: the teacher's mid-block activations of one sample."""
        x = torch.zeros(1, *self.sample_shape, device=self.device)
        labels = None if self.num_classes == 0 else torch.zeros(1, dtype=torch.long, device=self.device)
        t = torch.full((1,), float(self.schedule.t_max), device=self.device)
        with torch.no_grad():
            return self.teacher_features(x, t, labels).shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def t_bounds(self, config: FDistillConfig) -> tuple[float, float]:
        return config.t_range[0] * self.schedule.t_max, config.t_range[1] * self.schedule.t_max

    def draw_noise(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator inputs: pure noise and classes drawn uniformly from 0..num_classes-1 (None: unconditional)."""
        z = torch.randn(n, *self.sample_shape, generator=g).to(self.device)
        if self.num_classes == 0:
            return z, None
        return z, torch.randint(0, self.num_classes, (n,), generator=g).to(self.device)

    def draw_real(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of real training samples (with replacement) and their labels."""
        idx = torch.randint(0, len(self.images), (n,), generator=g)
        labels = None if self.labels is None else self.labels[idx].to(self.device)
        return self.images[idx].to(self.device), labels

    def score(self, module: nn.Module) -> ScoreModel:
        return ScoreModel(module, self.prediction_type, feature_fn=unet_mid_features)

    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cond = {} if labels is None else {"class_labels": labels}
        return unet_mid_features(self.teacher_net, x_t, t, **cond)[1]


DigitsDistillProblem = UNetDistillProblem  # the name of the digits-only version


def digits_distill_problem(model: Any = "digits-ddpm", guidance_scale: float = 1.0) -> UNetDistillProblem:
    """The problem of a built-in digits model name, a DigitsPipeline directory or a loaded DigitsPipeline,
    teacher CFG ``guidance_scale``."""
    from ..models import load
    from ..models.digits import load_digits_dataset

    pipe = load(model) if isinstance(model, (str, Path)) else model
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "mid_block") or not getattr(unet.config, "num_class_embeds", None):
        raise ValueError(f"{model!r} is not a class-conditional digits pipeline (a UNet2DModel with class "
                         "embeddings); distil digits-ddpm, digits-flow or a DigitsPipeline directory.")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}.")
    scheduler_config = dict(pipe.scheduler.config)
    schedule = NoiseSchedule.from_config(scheduler_config)
    prediction_type = NoiseSchedule.model_prediction_type(scheduler_config)
    unet = unet.float().eval().requires_grad_(False)
    teacher_module = unet if guidance_scale == 1.0 else GuidedDenoiser(unet, guidance_scale)
    images, labels = load_digits_dataset("train")
    return UNetDistillProblem(schedule, ScoreModel(teacher_module, prediction_type), unet, prediction_type,
                              images, labels, scheduler_config)


# --------------------------------------------------------------------------------------------
# The one-step pipeline
# --------------------------------------------------------------------------------------------


def one_step_scheduler(problem: UNetDistillProblem, timestep: float):
    """A diffusers scheduler whose single step calls the UNet at ``timestep`` on pure noise and returns
    its x0 prediction: G(z) of a generator conditioned at ``timestep``.

    VP models: DDIM with ``timestep_spacing='leading'`` and ``steps_offset=timestep`` (one step runs at
    exactly that timestep), ``set_alpha_to_one`` (the step lands on alpha = 1, i.e. x0) and no clipping.
    Flow models (generator at t_max): FlowMatch Euler, whose one step from sigma 1 to 0 is z - v = x0.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    cfg = problem.scheduler_config
    if problem.schedule.kind == "flow":
        if timestep != float(problem.schedule.t_max):
            raise ValueError(f"a one-step flow pipeline needs the generator at the largest timestep "
                             f"{problem.schedule.t_max}, got {timestep}.")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=1.0)
    if float(timestep) != int(timestep):
        raise ValueError(f"a one-step VP pipeline needs an integer generator timestep, got {timestep}.")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    kwargs = {k: cfg[k] for k in keys if k in cfg}
    if int(timestep) == int(problem.schedule.t_max):
        # 'trailing' puts the one step at t_max whatever steps_offset a pipeline enforces (Stable Diffusion
        # pipelines reset it to 1)
        return DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                             steps_offset=1)
    return DDIMScheduler(**kwargs, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing="leading", steps_offset=int(timestep))


def one_step_pipeline(generator: OneStepGenerator, problem: UNetDistillProblem):
    """The teacher's pipeline with the generator's UNet and :func:`one_step_scheduler`: it reproduces
    ``generator(z, labels)`` with ``num_inference_steps=1, guidance_scale=1`` (a DigitsPipeline for digits)."""
    from ..models.digits import DigitsPipeline

    unet, scheduler = inner_module(generator.denoiser), one_step_scheduler(problem, generator.timestep)
    if problem.is_digits:
        return DigitsPipeline(unet=unet, scheduler=scheduler)
    from .pipelines import with_components

    return with_components(problem.pipeline, **{problem.component: unet}, scheduler=scheduler)


def save_one_step_pipeline(generator: OneStepGenerator, problem: UNetDistillProblem, output_dir: str | Path,
                           extra: dict | None = None) -> Path:
    """Save the one-step pipeline and its call settings (:meth:`UNetDistillProblem.call_settings`) to
    ``output_dir``."""
    output_dir = Path(output_dir)
    one_step_pipeline(generator, problem).save_pretrained(output_dir)
    settings = {**problem.call_settings(), **(extra or {})}
    (output_dir / SAMPLING_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return output_dir


@torch.no_grad()
def student_samples(generator: OneStepGenerator, problem: UNetDistillProblem, per_class: int = 50,
                    seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in model space, labels), on the CPU: ``per_class`` one-step samples of every class, fixed noise."""
    labels = torch.arange(problem.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), *problem.sample_shape, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    images = torch.cat([generator(zc.to(device), lc.to(device)).cpu() for zc, lc in zip(z.split(250), labels.split(250))])
    generator.train(was_training)
    return images, labels


def save_student_grid(generator: OneStepGenerator, problem: UNetDistillProblem, path: str | Path,
                      per_class: int = 8, seed: int = 1234) -> Path:
    """A labelled PNG grid of one-step samples, one row per class (fixed noise)."""
    from ..models.digits import make_grid

    images, _ = student_samples(generator, problem, per_class, seed)
    labels = [str(c) for c in range(problem.num_classes)]
    make_grid((images.clamp(-1, 1) + 1) / 2, nrow=per_class, labels=labels).save(path)
    return Path(path)


def evaluate_student(generator: OneStepGenerator, problem: UNetDistillProblem, per_class: int = 50,
                     seed: int = 1234) -> dict:
    """FD-digits (against the held-out digits), class accuracy and the noise floor of one-step samples."""
    from ..eval.digits import evaluate_digits

    images, labels = student_samples(generator, problem, per_class, seed)
    return evaluate_digits(images, labels).as_dict()
