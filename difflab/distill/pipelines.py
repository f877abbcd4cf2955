"""One-step distillation (and alignment) of diffusers pipelines beyond the digits models.

Two kinds of teacher join the digits models (:mod:`difflab.distill.digits`):

* unconditional ``UNet2DModel`` pipelines (``DDPMPipeline``, ``DDIMPipeline``);
* text-conditioned latent pipelines: Stable Diffusion 1.x / 2.x and XL (``UNet2DConditionModel``), Stable
  Diffusion 3 (``SD3Transformer2DModel``) and Flux (``FluxTransformer2DModel``, at one ``--resolution``).

Both become a :class:`~difflab.distill.digits.UNetDistillProblem`, so the f-distill and DisBack steps run
on them unchanged:

* Real data, which the discriminator needs (f-distill's density ratio comes from it), are read from an
  image folder in the layout of diffusers' training examples: image files, and for text pipelines a
  ``metadata.jsonl`` with a ``file_name`` and a ``text`` per line (``train_text_to_image.py``'s
  ``imagefolder``; another caption key with ``--caption_column``). Images are resized (shorter side) and
  centre-cropped to the pipeline's resolution.
* Latent pipelines encode the real images once with the VAE, into the denoiser's space
  (:class:`~difflab.models.conditioning.ModelSpace`; Flux packs them 2x2 into tokens).
* The captions form a finite prompt set. Each is encoded once by the pipeline's ``encode_prompt``, and a
  prompt-table wrapper (:mod:`difflab.models.conditioning`) calls the denoiser with the embeddings of the
  prompt whose index arrives as ``class_labels``. The engine's class-label plumbing thus carries the prompts.
  The empty prompt is the extra last index, the null label of classifier-free guidance. ``difflab align``
  and ``difflab search`` drive the same wrappers.

The result is the teacher pipeline with the generator's UNet or transformer and a one-step scheduler, written
with ``save_pretrained``. For a text pipeline:
``StableDiffusionPipeline.from_pretrained(DIR)(prompt, num_inference_steps=1, guidance_scale=1.0)`` (the
settings are in the directory's ``difflab_sampling.json``).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.conditioning import (
    ENCODE_BATCH,
    ModelSpace,
    checked_resolution,
    denoiser_component,
    flux_rollout_scheduler_config,
    is_flux_pipeline,
    is_text_conditioned,
    prompt_conditioned,
)
from ..schedule import NoiseSchedule
from .digits import GuidedDenoiser, UNetDistillProblem, digits_distill_problem
from .engine import ScoreModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


def with_components(pipeline: Any, **components: Any) -> Any:
    """A new pipeline of ``pipeline``'s class with some components replaced (no safety-checker warning)."""
    kwargs = {**pipeline.components, **components}
    if "requires_safety_checker" in inspect.signature(type(pipeline).__init__).parameters:
        kwargs["requires_safety_checker"] = False
    return type(pipeline)(**kwargs)


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def _image_files(folder: Path, caption_column: str | None) -> tuple[list[Path], list[str] | None]:
    """The image files of ``folder`` and, with ``caption_column``, their captions from metadata.jsonl."""
    metadata = folder / METADATA_FILE
    example = '{"file_name": "IMAGE", "%s": "CAPTION"}' % (caption_column or "text")
    if metadata.is_file():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        keys = ("file_name",) if caption_column is None else ("file_name", caption_column)
        missing = [i + 1 for i, r in enumerate(rows) if any(k not in r for k in keys)]
        if missing:
            raise ValueError(f"{metadata}: line(s) {missing[:5]} lack {' or '.join(map(repr, keys))}; every line "
                             f"needs {example}.")
        captions = None if caption_column is None else [str(r[caption_column]) for r in rows]
        return [folder / r["file_name"] for r in rows], captions
    if caption_column is not None:
        raise ValueError(f"{folder} has no {METADATA_FILE}: a text-conditioned teacher needs captions. Add one line "
                         f"{example} per image (diffusers' imagefolder layout).")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None


def _to_tensor(image: Any, size: int, channels: int) -> torch.Tensor:
    """A PIL image resized (shorter side to ``size``, bicubic), centre-cropped, in [-1, 1], shape (C, size, size)."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def load_image_folder(folder: str | Path, size: int, channels: int, caption_column: str | None = None,
                      encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      progress: bool = False) -> tuple[torch.Tensor, list[str] | None]:
    """(images (N, C, size, size) in [-1, 1], captions or None) of an image folder (see the module docstring);
    the captions are metadata.jsonl's ``caption_column`` (None: no captions).

    With ``encode`` (a VAE encoder), images are encoded batch by batch as they are read, and only the
    encodings are kept: (latents, captions).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--train_data_dir {folder} is not a directory; pass a folder of training images.")
    files, captions = _image_files(folder, caption_column)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training images there.")
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) named in {folder / METADATA_FILE} are missing, e.g. "
                                f"{absent[0]}.")
    kept = []
    desc = "encoding training images" if encode is not None else "reading training images"
    for start in tqdm(range(0, len(files), ENCODE_BATCH), desc=desc, disable=not progress):
        batch = []
        for path in files[start:start + ENCODE_BATCH]:
            with Image.open(path) as image:
                batch.append(_to_tensor(image, size, channels))
        batch = torch.stack(batch)
        kept.append(batch if encode is None else encode(batch))
    return torch.cat(kept), captions


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


def is_digits_pipeline(pipeline: Any) -> bool:
    from ..models.digits import DigitsPipeline

    return isinstance(pipeline, DigitsPipeline)


def distill_problem(model: str, guidance_scale: float = 1.0, train_data_dir: str | None = None,
                    progress: bool = False, caption_column: str = "text",
                    resolution: int | None = None) -> UNetDistillProblem:
    """The distillation problem of ``--model``: a digits model (built-in name or DigitsPipeline directory), or a
    diffusers pipeline directory with real training images in ``train_data_dir``."""
    from ..models import load

    pipeline = load(model)
    if is_digits_pipeline(pipeline):
        if resolution is not None:
            raise ValueError("--resolution applies to SDXL and Flux pipelines; the digits models are 16x16.")
        return digits_distill_problem(pipeline, guidance_scale)
    return pipeline_distill_problem(pipeline, train_data_dir, guidance_scale, name=str(model), progress=progress,
                                    caption_column=caption_column, resolution=resolution)


def _checked_teacher(pipeline: Any, name: str, train_data_dir: str | Path | None, guidance_scale: float) -> bool:
    """Whether the teacher is text-conditioned, or a ValueError saying why it cannot be distilled as asked."""
    text = is_text_conditioned(pipeline, name)
    if train_data_dir is None:
        raise ValueError(f"--train_data_dir is needed to distil {name}: a folder of real training images (the "
                         "discriminator's data)" + (", with a metadata.jsonl of captions." if text else "."))
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}.")
    if not text and guidance_scale != 1.0:
        raise ValueError(f"{name} is unconditional: classifier-free guidance needs a conditional teacher; "
                         "leave --guidance_scale at 1.")
    return text


def pipeline_distill_problem(pipeline: Any, train_data_dir: str | Path | None, guidance_scale: float = 1.0,
                             name: str = "the pipeline", progress: bool = False, caption_column: str = "text",
                             resolution: int | None = None) -> UNetDistillProblem:
    """The problem of a loaded diffusers pipeline (DDPMPipeline; Stable Diffusion 1.x / 2.x / XL / 3; Flux at
    ``resolution`` pixels) and the real images of ``train_data_dir`` (captions: the ``caption_column`` of its
    metadata.jsonl), held in the denoiser's space (:class:`ModelSpace`)."""
    text = _checked_teacher(pipeline, name, train_data_dir, guidance_scale)
    space = ModelSpace(pipeline, checked_resolution(pipeline, resolution, name))
    if space.vae is not None:
        space.vae.float().eval()
    data, captions = load_image_folder(train_data_dir, space.resolution, space.image_channels,
                                       caption_column if text else None,
                                       None if space.vae is None else space.encode, progress)
    scheduler_config = dict(pipeline.scheduler.config)
    if is_flux_pipeline(pipeline):
        scheduler_config = flux_rollout_scheduler_config(pipeline, space.resolution)
    prediction_type = NoiseSchedule.model_prediction_type(scheduler_config)
    component = denoiser_component(pipeline)
    labels, prompts = None, None
    net = getattr(pipeline, component).float()
    if text:
        prompts = sorted(set(captions))
        index = {prompt: i for i, prompt in enumerate(prompts)}
        labels = torch.tensor([index[c] for c in captions])
        net = prompt_conditioned(pipeline, prompts, space.resolution)
    net = net.eval().requires_grad_(False)
    teacher = net if guidance_scale == 1.0 else GuidedDenoiser(net, guidance_scale, net.null_label)
    return UNetDistillProblem(NoiseSchedule.from_config(scheduler_config), ScoreModel(teacher, prediction_type), net,
                              prediction_type, data, labels, scheduler_config,
                              num_classes=0 if prompts is None else len(prompts), pipeline=pipeline, prompts=prompts,
                              component=component, space=space)


# --------------------------------------------------------------------------------------------
# Samples of the student
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def pipeline_student_images(generator: nn.Module, problem: UNetDistillProblem, per_prompt: int = 8,
                            max_prompts: int = 8, seed: int = 1234) -> tuple[torch.Tensor, list[str] | None]:
    """(decoded images in [-1, 1], row labels): ``per_prompt`` one-step samples of each of the first
    ``max_prompts`` prompts (text pipelines) or one row of ``per_prompt`` samples, fixed noise; images on the CPU."""
    device = next(generator.parameters()).device
    rows = 1 if problem.num_classes == 0 else min(problem.num_classes, max_prompts)
    labels = None if problem.num_classes == 0 else torch.arange(rows, device=device).repeat_interleave(per_prompt)
    z = torch.randn(rows * per_prompt, *problem.sample_shape, generator=torch.Generator().manual_seed(seed))
    was_training = generator.training
    generator.eval()
    x0 = generator(z.to(device), labels)
    generator.train(was_training)
    names = None if problem.prompts is None else problem.prompts[:rows]
    return problem.space.decode(x0).cpu(), names


def save_image_grid(images: torch.Tensor, path: str | Path, cols: int, min_size: int = 64) -> Path:
    """A PNG grid of images in [-1, 1] (B, C, H, W), ``cols`` per row; images smaller than ``min_size`` pixels
    are enlarged (nearest neighbour) by a whole factor."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scale = max(1, min_size // max(pixels.shape[1:3]))
    tiles = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    make_image_grid(tiles, rows=len(tiles) // cols, cols=cols).save(path)
    return Path(path)


def save_pipeline_student_grid(generator: nn.Module, problem: UNetDistillProblem, path: str | Path,
                               seed: int = 1234, write_prompts: bool = False) -> Path:
    """A PNG grid of one-step samples, one row per prompt (text pipelines), fixed noise; with
    ``write_prompts`` the rows' prompts go to a .txt file next to it."""
    per_prompt = 8
    images, names = pipeline_student_images(generator, problem, per_prompt, seed=seed)
    save_image_grid(images, path, per_prompt)
    if write_prompts and names is not None:
        Path(path).with_suffix(".txt").write_text("\n".join(names) + "\n")
    return Path(path)


def check_one_step_timestep(problem: UNetDistillProblem, timestep: float) -> None:
    """ValueError before training when the saved pipeline could not make its one step at ``timestep``
    (a pipeline class that rewrites the scheduler's ``steps_offset``, with the generator below t_max)."""
    from .digits import one_step_scheduler

    with warnings.catch_warnings():  # the pipeline's own deprecation warning when it rewrites steps_offset
        warnings.simplefilter("ignore", FutureWarning)
        scheduler = with_components(problem.pipeline, scheduler=one_step_scheduler(problem, timestep)).scheduler
    scheduler.set_timesteps(1)
    if problem.schedule.kind != "flow" and float(scheduler.timesteps[0]) != float(timestep):
        raise ValueError(f"{type(problem.pipeline).__name__} would run its one step at timestep "
                         f"{float(scheduler.timesteps[0]):g}, not at the generator's {timestep:g} (it rewrites the "
                         "scheduler's steps_offset); pass --generator_timestep max.")
