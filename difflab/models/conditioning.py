"""Text-conditioned diffusers denoisers called like class-conditional ones, and the space they sample in.

difflab's trainers and the S^3 search drive a denoiser as ``net(sample, timestep, class_labels=...)``, the
digits models' convention. For a text pipeline the prompts are encoded once by the pipeline's own
``encode_prompt`` into tables, and :class:`PromptTable` wrappers pick the rows of the prompt indices that arrive
as ``class_labels`` (the empty prompt is the extra last row, the null label of classifier-free guidance;
SDXL's unconditional row is zeros when the pipeline zeroes an empty negative prompt). Each wrapper passes what
its pipeline passes: Stable Diffusion 1.x / 2.x (``encoder_hidden_states``), SDXL (pooled embeddings and size
time ids of its default resolution), Stable Diffusion 3 (pooled projections) and Flux (packed latents, position
ids of one resolution, ``timestep / 1000`` and the embedded guidance of FLUX.1-dev).

:class:`ModelSpace` is where a pipeline's denoiser samples at one resolution: VAE latents
(``(latent_dist.mean - shift_factor) * scaling_factor``; for Flux packed 2x2 into tokens) or pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..schedule import NoiseSchedule

ENCODE_BATCH = 16  # images per VAE call


class PromptTable(nn.Module):
    """A text-conditioned denoiser called like a class-conditional UNet: ``class_labels`` index fixed tables of
    the prompts' embeddings (rows: the prompts, then the pipeline's unconditional input, the null label of
    classifier-free guidance). The tables are buffers outside the state dict, so checkpoints, DisBack nodes and saved results
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
def prompt_conditioned_sdxl(pipeline: Any, prompts: list[str], resolution: int | None = None) -> PromptConditionedSDXL:
    """The SDXL pipeline's UNet behind tables of the prompts' embeddings (its own ``encode_prompt``; the null row
    last: zeros where the pipeline zeroes an empty negative prompt, else the empty prompt's) and the time ids of
    ``resolution`` x ``resolution`` images (default: its own size; no crop), as the pipeline makes them."""
    embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts) + [""], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    if getattr(pipeline.config, "force_zeros_for_empty_prompt", False):
        embeds[-1], pooled[-1] = 0.0, 0.0  # the pipeline's unconditional input for an empty negative prompt
    size = resolution or default_resolution(pipeline)
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
    unconditional input as the extra last row, the null label): Stable Diffusion 1.x / 2.x / 3, or XL and Flux
    at ``resolution`` pixels (default: their own)."""
    if is_flux_pipeline(pipeline):
        return prompt_conditioned_flux(pipeline, prompts, resolution or default_resolution(pipeline))
    if is_sd3_pipeline(pipeline):
        return prompt_conditioned_transformer(pipeline, prompts)
    if is_sdxl_pipeline(pipeline):
        return prompt_conditioned_sdxl(pipeline, prompts, resolution)
    return prompt_conditioned_unet(pipeline, pipeline.unet.float(), prompts)


def default_resolution(pipeline: Any) -> int:
    """The image side in pixels that the pipeline samples at by default."""
    if is_flux_pipeline(pipeline):
        return pipeline.default_sample_size * pipeline.vae_scale_factor
    return getattr(pipeline, denoiser_component(pipeline)).config.sample_size * latent_scale(pipeline)


def latent_scale(pipeline: Any) -> int:
    """Pixels per latent of the pipeline's VAE (1 for a pixel-space pipeline)."""
    vae = getattr(pipeline, "vae", None)
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def checked_resolution(pipeline: Any, resolution: int | None, name: str = "the pipeline") -> int:
    """``resolution`` (default: the pipeline's own), or a ValueError for a pipeline that difflab drives at its
    own size only (all but SDXL and Flux, whose size conditioning difflab passes) or a size its VAE cannot make."""
    if resolution is None:
        return default_resolution(pipeline)
    if not (is_flux_pipeline(pipeline) or is_sdxl_pipeline(pipeline)):
        raise ValueError(f"--resolution applies to SDXL and Flux pipelines; {name} samples at its denoiser's "
                         "sample_size.")
    multiple = pipeline.vae_scale_factor * (2 if is_flux_pipeline(pipeline) else 1)  # Flux packs latents 2x2
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of {multiple} for {name} (its VAE "
                         f"downsamples {pipeline.vae_scale_factor}x" + (" and latents are packed 2x2)." if
                                                                         is_flux_pipeline(pipeline) else ")."))
    return int(resolution)


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
        size = self.resolution // latent_scale(self.pipeline)
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


def is_text_pipeline(pipeline: Any, name: str = "the pipeline") -> bool:
    """Whether a non-digits UNet pipeline is text-conditioned (Stable Diffusion) rather than unconditional
    (DDPMPipeline); ValueError for the ones distill and align cannot drive (``models.hub.unet_conditioning``)."""
    from .hub import unet_conditioning

    conditioning = unet_conditioning(pipeline, name)
    if conditioning == "class":
        raise ValueError(f"{name}: class-conditional UNet2DModel pipelines other than DigitsPipeline are not "
                         "supported (their class labels have no dataset convention); use an unconditional one.")
    return conditioning == "text"


def prompt_conditioned_unet(pipeline: Any, unet: nn.Module, prompts: list[str]) -> PromptConditionedUNet:
    """``unet`` behind a table of the prompts' embeddings (the pipeline's ``encode_prompt``), the empty prompt
    as the extra last row (the null label)."""
    return PromptConditionedUNet(unet, encode_prompts(pipeline, list(prompts) + [""]))
