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
* :class:`ModelSpace` is where the denoiser samples: latent pipelines encode the real images once with the VAE
  (``(latent_dist.mean - shift_factor) * scaling_factor``; Flux then packs them 2x2 into tokens).
* The captions form a finite prompt set. Each is encoded once by the pipeline's ``encode_prompt``, and a
  :class:`PromptTable` wrapper calls the denoiser with the embeddings of the prompt whose index arrives as
  ``class_labels`` (with SDXL's size conditioning, Flux's position ids and embedded guidance, as the pipelines
  pass them). The engine's class-label plumbing thus carries the prompts. The empty prompt is the extra last
  index, the null label of classifier-free guidance. ``difflab align`` drives the same wrappers.

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

from ..schedule import NoiseSchedule
from .digits import GuidedDenoiser, UNetDistillProblem, digits_distill_problem
from .engine import ScoreModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
ENCODE_BATCH = 16


class PromptTable(nn.Module):
    """A text-conditioned denoiser called like a class-conditional UNet: ``class_labels`` index fixed tables of
    the prompts' embeddings (rows: the prompts, then the empty prompt, the null label of classifier-free
    guidance). The tables are buffers outside the state dict, so checkpoints, DisBack nodes and saved results
    hold the denoiser's own weights only (``module``)."""

    def __init__(self, module: nn.Module, **tables: torch.Tensor):
        super().__init__()
        self.module = module
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    @property
    def null_label(self) -> int:
        return len(self.prompt_embeds) - 1

    def rows(self, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The table rows of ``class_labels`` (prompt indices), on the tables' device."""
        if class_labels is None:
            raise ValueError(f"a text-conditioned {type(self.module).__name__} needs prompt indices as class_labels.")
        return class_labels.to(self.prompt_embeds.device)


class PromptConditionedUNet(PromptTable):
    """A ``UNet2DConditionModel`` behind a table of prompt embeddings (``encoder_hidden_states``)."""

    def __init__(self, unet: nn.Module, prompt_embeds: torch.Tensor):
        super().__init__(unet, prompt_embeds=prompt_embeds)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any):
        return self.module(sample, timestep, encoder_hidden_states=self.prompt_embeds[self.rows(class_labels)])


class PromptConditionedTransformer(PromptTable):
    """A Stable Diffusion 3 ``SD3Transformer2DModel`` behind tables of the prompts' token embeddings and pooled
    embeddings, which the pipeline would otherwise pass as ``encoder_hidden_states`` and ``pooled_projections``."""

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor):
        super().__init__(transformer, prompt_embeds=prompt_embeds, pooled_embeds=pooled_embeds)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any):
        rows = self.rows(class_labels)
        return self.module(hidden_states=sample, timestep=timestep, encoder_hidden_states=self.prompt_embeds[rows],
                           pooled_projections=self.pooled_embeds[rows])


class PromptConditionedSDXL(PromptTable):
    """A Stable Diffusion XL ``UNet2DConditionModel`` behind tables of the prompts' token embeddings and pooled
    embeddings, with the size / crop conditioning (``time_ids``) of one resolution: what StableDiffusionXLPipeline
    passes as ``encoder_hidden_states`` and ``added_cond_kwargs``."""

    def __init__(self, unet: nn.Module, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor,
                 time_ids: torch.Tensor):
        super().__init__(unet, prompt_embeds=prompt_embeds, pooled_embeds=pooled_embeds, time_ids=time_ids)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any):
        rows = self.rows(class_labels)
        added = {"text_embeds": self.pooled_embeds[rows], "time_ids": self.time_ids.expand(len(rows), -1)}
        return self.module(sample, timestep, encoder_hidden_states=self.prompt_embeds[rows], added_cond_kwargs=added)


def is_sdxl_pipeline(pipeline: Any) -> bool:
    """Whether ``pipeline`` is a Stable Diffusion XL pipeline (a UNet with text and time added conditioning)."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipeline, "unet", None)
    return isinstance(unet, UNet2DConditionModel) and unet.config.addition_embed_type == "text_time"


@torch.no_grad()
def prompt_conditioned_sdxl(pipeline: Any, prompts: list[str]) -> PromptConditionedSDXL:
    """The SDXL pipeline's UNet behind tables of the prompts' embeddings (its own ``encode_prompt``; the empty
    prompt as the extra last row) and the time ids of its default resolution (no crop), as the pipeline makes
    them."""
    embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts) + [""], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    encoder_2 = getattr(pipeline, "text_encoder_2", None)
    projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    time_ids = pipeline._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                          text_encoder_projection_dim=projection)
    return PromptConditionedSDXL(pipeline.unet.float(), embeds.float(), pooled.float(), time_ids)


def is_sd3_pipeline(pipeline: Any) -> bool:
    """Whether ``pipeline`` is a Stable Diffusion 3 pipeline (an ``SD3Transformer2DModel`` as ``transformer``)."""
    from diffusers import SD3Transformer2DModel

    return isinstance(getattr(pipeline, "transformer", None), SD3Transformer2DModel)


@torch.no_grad()
def prompt_conditioned_transformer(pipeline: Any, prompts: list[str]) -> PromptConditionedTransformer:
    """The SD3 pipeline's transformer behind tables of the prompts' embeddings by its own ``encode_prompt``
    (the empty prompt as the extra last row)."""
    embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts) + [""], None, None, device="cpu",
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
    return PromptConditionedTransformer(pipeline.transformer.float(), embeds.float(), pooled.float())


class PromptConditionedFlux(PromptTable):
    """A ``FluxTransformer2DModel`` on packed latents (tokens x channels) behind tables of the prompts' T5 and
    pooled CLIP embeddings. It passes what FluxPipeline passes: ``timestep / 1000``, the text and image
    position ids of one resolution, and the guidance value when the model embeds one (FLUX.1-dev)."""

    def __init__(self, transformer: nn.Module, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor,
                 text_ids: torch.Tensor, image_ids: torch.Tensor, guidance_scale: float = 3.5):
        super().__init__(transformer, prompt_embeds=prompt_embeds, pooled_embeds=pooled_embeds, text_ids=text_ids,
                         image_ids=image_ids)
        self.guidance_scale = guidance_scale

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                **kwargs: Any):
        rows = self.rows(class_labels)
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full((sample.shape[0],), self.guidance_scale, device=sample.device)
        return self.module(hidden_states=sample, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=self.pooled_embeds[rows], encoder_hidden_states=self.prompt_embeds[rows],
                           txt_ids=self.text_ids, img_ids=self.image_ids)


def is_flux_pipeline(pipeline: Any) -> bool:
    """Whether ``pipeline`` is a Flux pipeline (a ``FluxTransformer2DModel`` as ``transformer``)."""
    from diffusers import FluxTransformer2DModel

    return isinstance(getattr(pipeline, "transformer", None), FluxTransformer2DModel)


def flux_latent_size(pipeline: Any, resolution: int) -> int:
    """The (unpacked) latent side of ``resolution`` pixels, as FluxPipeline computes it (even, for 2x2 packing)."""
    size = 2 * (int(resolution) // (pipeline.vae_scale_factor * 2))
    if size < 2:
        raise ValueError(f"--resolution {resolution} is too small for this Flux pipeline (its VAE downsamples "
                         f"{pipeline.vae_scale_factor}x and latents are packed 2x2); use at least "
                         f"{pipeline.vae_scale_factor * 2}.")
    return size


@torch.no_grad()
def prompt_conditioned_flux(pipeline: Any, prompts: list[str], resolution: int) -> PromptConditionedFlux:
    """The Flux pipeline's transformer behind tables of the prompts' embeddings (its own ``encode_prompt``; the
    empty prompt as the extra last row), with the position ids of ``resolution`` x ``resolution`` images."""
    embeds, pooled, text_ids = pipeline.encode_prompt(list(prompts) + [""], None, device="cpu",
                                                      num_images_per_prompt=1)
    side = flux_latent_size(pipeline, resolution) // 2
    image_ids = pipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    return PromptConditionedFlux(pipeline.transformer.float(), embeds.float(), pooled.float(), text_ids.float(),
                                 image_ids)


def flux_rollout_scheduler_config(pipeline: Any, resolution: int) -> dict[str, Any]:
    """The pipeline's scheduler config with its resolution-dependent shift fixed for ``resolution``.

    FluxPipeline shifts sigmas by mu of the image's token count (``use_dynamic_shifting``); at one resolution
    that is a static shift (:meth:`~difflab.schedule.FlowShift.static_shift`), which a plain
    ``set_timesteps(num_inference_steps)`` can use.
    """
    config = dict(pipeline.scheduler.config)
    flow_shift = NoiseSchedule.from_config(config).flow_shift
    if not flow_shift.use_dynamic_shifting:
        return config
    tokens = (flux_latent_size(pipeline, resolution) // 2) ** 2
    return {**config, "use_dynamic_shifting": False, "shift": flow_shift.static_shift(flow_shift.mu_for_seq_len(tokens))}


def is_text_conditioned(pipeline: Any, name: str = "the pipeline") -> bool:
    """Whether a non-digits pipeline is text-conditioned (Stable Diffusion 1.x / 2.x / XL / 3, Flux) rather than
    unconditional (DDPMPipeline); ValueError for the ones distill and align cannot drive."""
    if is_sd3_pipeline(pipeline) or is_flux_pipeline(pipeline) or is_sdxl_pipeline(pipeline):
        return True
    return is_text_pipeline(pipeline, name)


def denoiser_component(pipeline: Any) -> str:
    """The pipeline component that is the denoiser: ``"transformer"`` (Stable Diffusion 3, Flux) or ``"unet"``."""
    return "transformer" if is_sd3_pipeline(pipeline) or is_flux_pipeline(pipeline) else "unet"


def prompt_conditioned(pipeline: Any, prompts: list[str], resolution: int | None = None) -> PromptTable:
    """The text pipeline's denoiser behind tables of the prompts' embeddings by its own ``encode_prompt`` (the
    empty prompt as the extra last row, the null label): Stable Diffusion 1.x / 2.x / XL / 3, or Flux at
    ``resolution`` pixels (default: its own)."""
    if is_flux_pipeline(pipeline):
        return prompt_conditioned_flux(pipeline, prompts, resolution or default_resolution(pipeline))
    if is_sd3_pipeline(pipeline):
        return prompt_conditioned_transformer(pipeline, prompts)
    if is_sdxl_pipeline(pipeline):
        return prompt_conditioned_sdxl(pipeline, prompts)
    return prompt_conditioned_unet(pipeline, pipeline.unet.float(), prompts)


def default_resolution(pipeline: Any) -> int:
    """The image side in pixels that the pipeline samples at by default."""
    if is_flux_pipeline(pipeline):
        return pipeline.default_sample_size * pipeline.vae_scale_factor
    vae = getattr(pipeline, "vae", None)
    scale = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    return getattr(pipeline, denoiser_component(pipeline)).config.sample_size * scale


def checked_resolution(pipeline: Any, resolution: int | None, name: str = "the pipeline") -> int:
    """``resolution`` (default: the pipeline's own), or a ValueError for a pipeline that samples at one size only."""
    if resolution is not None and not is_flux_pipeline(pipeline):
        raise ValueError(f"--resolution applies to Flux pipelines; {name} samples at its denoiser's sample_size.")
    return resolution or default_resolution(pipeline)


class ModelSpace:
    """Where a pipeline's denoiser samples at one resolution: VAE latents (for Flux packed 2x2 into tokens of
    ``in_channels``) or pixels. ``encode`` maps images in [-1, 1] there and ``decode`` maps samples back."""

    def __init__(self, pipeline: Any, resolution: int):
        self.pipeline, self.resolution = pipeline, int(resolution)
        self.vae = getattr(pipeline, "vae", None)
        self.packed = is_flux_pipeline(pipeline)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        denoiser = getattr(self.pipeline, denoiser_component(self.pipeline))
        if self.packed:
            return ((flux_latent_size(self.pipeline, self.resolution) // 2) ** 2, denoiser.config.in_channels)
        size = denoiser.config.sample_size
        return (denoiser.config.in_channels, size, size)

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.sample_shape[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        latents = encode_images(self.vae, images)
        if self.packed:
            latents = self.pipeline._pack_latents(latents, *latents.shape)
        return latents

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            x = self.pipeline._unpack_latents(x, self.resolution, self.resolution, self.pipeline.vae_scale_factor)
        return decode_latents(self.vae, x)


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


@torch.no_grad()
def encode_images(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(latent_dist.mean - shift_factor) * scaling_factor`` of images in [-1, 1] (batches of 16)."""
    latents = [vae.encode(batch).latent_dist.mean for batch in images.split(ENCODE_BATCH)]
    return (torch.cat(latents) - _shift_factor(vae)) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of samples in the UNet's space (the samples themselves without a VAE), on ``x``'s device;
    the VAE decodes on its own device."""
    if vae is None:
        return x
    batches = (b.to(vae.device) / vae.config.scaling_factor + _shift_factor(vae) for b in x.split(ENCODE_BATCH))
    return torch.cat([vae.decode(b).sample.to(x.device) for b in batches])


def _shift_factor(vae: nn.Module) -> float:
    """The latent shift of the VAE (SD3 / Flux: latents = (mean - shift) * scale; 0 for Stable Diffusion 1.x / 2.x)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def encode_prompts(pipeline: Any, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (P, L, D) of the prompts by the pipeline's own ``encode_prompt``."""
    embeds, _ = pipeline.encode_prompt(prompts, "cpu", 1, False)
    return embeds.float()


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
            raise ValueError("--resolution applies to Flux pipelines; the digits models are 16x16.")
        return digits_distill_problem(pipeline, guidance_scale)
    return pipeline_distill_problem(pipeline, train_data_dir, guidance_scale, name=str(model), progress=progress,
                                    caption_column=caption_column, resolution=resolution)


def is_text_pipeline(pipeline: Any, name: str = "the pipeline") -> bool:
    """Whether a non-digits UNet pipeline is text-conditioned (Stable Diffusion) rather than unconditional
    (DDPMPipeline); ValueError for the ones distill and align cannot drive (``models.hub.unet_conditioning``)."""
    from ..models.hub import unet_conditioning

    conditioning = unet_conditioning(pipeline, name)
    if conditioning == "class":
        raise ValueError(f"{name}: class-conditional UNet2DModel pipelines other than DigitsPipeline are not "
                         "supported (their class labels have no dataset convention); use an unconditional one.")
    return conditioning == "text"


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


def prompt_conditioned_unet(pipeline: Any, unet: nn.Module, prompts: list[str]) -> PromptConditionedUNet:
    """``unet`` behind a table of the prompts' embeddings (the pipeline's ``encode_prompt``), the empty prompt
    as the extra last row (the null label)."""
    return PromptConditionedUNet(unet, encode_prompts(pipeline, list(prompts) + [""]))


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
