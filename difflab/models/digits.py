"""Digits: the 8x8 handwritten digits of scikit-learn, upsampled to 16x16, and models for them.

The data set ships inside the scikit-learn wheel (``sklearn.datasets.load_digits``: 1,797 images,
10 classes), so every model here can be trained and evaluated with no network. This module holds

* :func:`load_digits_dataset`: the images in [-1, 1] at 16x16 and a fixed, seeded stratified split;
* :func:`digits_unet_config`: the ~1M-parameter class-conditional ``UNet2DModel`` of the built-in
  diffusion models (class ``NULL_CLASS`` = 10 is the "no label" class of classifier-free guidance);
* :class:`DigitsClassifier`: a small CNN whose 64-d penultimate features give the "FD-digits"
  Frechet distance and whose logits give the class accuracy of generated digits;
* :class:`DigitsPipeline`: a class-conditional diffusers pipeline with classifier-free guidance
  (Ho & Salimans 2022, eq. 6 applied to the raw model output) that runs any scheduler;
* :func:`make_grid`: a labelled PNG grid of digits.

Only :func:`load_digits_dataset` needs scikit-learn; the models load and sample without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw, ImageFont

NUM_CLASSES = 10
NULL_CLASS = 10
IMAGE_SIZE = 16
SPLITS = ("train", "heldout", "all")

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) in 0..16, labels (N,)) from scikit-learn, with a helpful ImportError."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits data set comes from scikit-learn, which is not installed. Install the "
            "`train` extra: pip install 'difflab[train]' (or pip install scikit-learn)."
        ) from err
    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def _stratified_heldout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out set with ``round(fraction * n_c)`` random images of each class."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_held = int(round(fraction * len(idx)))
        mask[rng.permutation(idx)[:n_held]] = True
    return mask


def upsample_digits(images: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, 16, 16) float32 in [-1, 1] (bilinear, align_corners=False)."""
    x = images.to(torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits_dataset(
    split: str = "train", heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits at 16x16: ``(images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) long)``.

    ``split`` is ``"train"``, ``"heldout"`` (a seeded stratified ``heldout_fraction`` of each class)
    or ``"all"``. The same ``(heldout_fraction, seed)`` always gives the same, disjoint split.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not supported; use one of {list(SPLITS)}.")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    images, labels = _sklearn_digits()
    if split != "all":
        held = _stratified_heldout_mask(labels, heldout_fraction, seed)
        keep = held if split == "heldout" else ~held
        images, labels = images[keep], labels[keep]
    return upsample_digits(torch.from_numpy(images)), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def digits_unet_config() -> dict[str, Any]:
    """Config of the built-in digits ``UNet2DModel``: 16x16x1, 1.1M parameters, 10 classes + null.

    Resolutions 16 -> 8 -> 4 with widths (32, 64, 64), one ResNet layer per block and
    self-attention at 4x4 (in the last down block and the first up block).
    ``num_class_embeds=11``: labels 0..9 and ``NULL_CLASS`` (10) for classifier-free guidance.
    """
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
        "num_class_embeds": NUM_CLASSES + 1,
    }


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Small CNN for the 16x16 digits in [-1, 1]: ``features(x) -> (B, feature_dim)``, ``forward -> logits``.

    Two conv blocks (16 -> 8 -> 4) then a linear layer to ``feature_dim`` (64) penultimate features,
    which define the "FD-digits" Frechet distance; the head maps them to 10 class logits.
    """

    @register_to_config
    def __init__(self, channels: Sequence[int] = (32, 64), feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2 = channels
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c1, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(c2, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.proj = torch.nn.Linear(c2 * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.dropout = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"DigitsClassifier expects images of shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
                f"got {tuple(x.shape)}. Pipeline 'pt' outputs are in [0, 1]: pass `images * 2 - 1`."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, 1, 16, 16) in [-1, 1]."""
        self._check_input(x)
        h = self.conv(x.to(self.dtype))
        return F.relu(self.proj(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def _labels_tensor(class_labels: int | Sequence[int] | torch.Tensor | None, per_label: int) -> torch.Tensor:
    """Validated (B,) long labels: each label repeated ``per_label`` times; None -> the null class."""
    if per_label < 1:
        raise ValueError(f"num_images_per_label must be >= 1, got {per_label}.")
    if class_labels is None:
        labels = torch.tensor([NULL_CLASS])
    else:
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}.")
        if labels.numel() == 0:
            raise ValueError("class_labels is empty; pass at least one label in 0..9 (or None).")
    labels = labels.to(torch.long)
    bad = labels[(labels < 0) | (labels > NULL_CLASS)]
    if bad.numel():
        raise ValueError(
            f"class_labels {bad.tolist()} are out of range: use digits 0..{NUM_CLASSES - 1}, or "
            f"{NULL_CLASS} (NULL_CLASS) / None for unconditional samples."
        )
    return labels.repeat_interleave(per_label)


def _postprocess(x: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[Image.Image]:
    """Model-space images in [-1, 1] -> 'pt' (B,1,H,W) / 'np' (B,H,W,1) in [0, 1] / 'pil' grayscale."""
    images = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), mode="L") for a in arr]


def guided_unet_output(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor,
                       guidance_scale: float, null_label: int = NULL_CLASS) -> torch.Tensor:
    """Raw output of a class-conditional UNet, with classifier-free guidance when ``guidance_scale > 1``:
    ONE call on the rows ``[cond; null]`` and ``uncond + w * (cond - uncond)`` (Ho & Salimans 2022, eq. 6)."""
    if guidance_scale <= 1.0:
        return unet(x, t, class_labels=labels).sample
    t = torch.as_tensor(t, device=x.device)
    t = torch.cat([t, t]) if t.ndim > 0 and t.numel() > 1 else t
    null = torch.full_like(labels, null_label)
    cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 16x16 digits sampler with classifier-free guidance; any scheduler works.

    ``pipe(class_labels=[0, 1, 2], num_images_per_label=4, guidance_scale=2.0)`` draws 12 digits.
    With ``guidance_scale > 1`` each step makes ONE UNet call on the rows ``[cond; null]`` and uses
    ``uncond + w * (cond - uncond)`` on the raw model output (Ho & Salimans 2022, eq. 6), so eps,
    v and flow-velocity models are all guided the same way. Flow models get the scheduler's
    float timesteps (sigma * 1000) as given.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: torch.nn.Module, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True while a call with ``guidance_scale > 1`` runs (read by difflab.guidance.attach)."""
        return getattr(self, "_guidance_scale", 1.0) > 1.0

    def _set_timesteps(
        self, num_inference_steps: int, timesteps: Sequence[float] | None, sigmas: Sequence[float] | None, device
    ) -> None:
        """``scheduler.set_timesteps`` with a step count, custom timesteps, or custom sigmas."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
        params = inspect.signature(self.scheduler.set_timesteps).parameters
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None:
                if name not in params:
                    raise ValueError(
                        f"{type(self.scheduler).__name__}.set_timesteps does not accept custom {name}; "
                        "use a scheduler that does (e.g. DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler) "
                        "or pass num_inference_steps."
                    )
                self.scheduler.set_timesteps(**{name: value}, device=device)
                return
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._check_timesteps(num_inference_steps)

    def _check_timesteps(self, num_inference_steps: int) -> None:
        """A clear error when the scheduler's grid leaves the training range (a one-step distilled pipeline,
        whose DDIM scheduler is offset to its generator timestep, called with several steps)."""
        limit = self.scheduler.config.get("num_train_timesteps", 1000)
        largest = float(self.scheduler.timesteps.max())
        if largest > limit:
            offset = self.scheduler.config.get("steps_offset", 0)
            raise ValueError(f"num_inference_steps={num_inference_steps} puts timestep {largest:g} beyond the "
                             f"scheduler's {limit} training timesteps (steps_offset={offset}); a one-step distilled "
                             "pipeline runs with num_inference_steps=1 (see its difflab_sampling.json), or set "
                             "another scheduler.")

    def _model_output(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Raw (optionally guided) UNet output at sample ``x`` and timestep ``t``."""
        model_in = x
        if hasattr(self.scheduler, "scale_model_input"):
            model_in = self.scheduler.scale_model_input(x, t)
        return guided_unet_output(self.unet, model_in, t, labels, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        num_images_per_label: int = 1,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample digits of ``class_labels`` (int, list or tensor; None = unconditional).

        Returns ``ImagePipelineOutput(images)``: a list of grayscale PIL images ("pil"), an array
        (B, 16, 16, 1) in [0, 1] ("np"), a tensor (B, 1, 16, 16) in [0, 1] ("pt"), or the raw
        model-space samples (B, 1, 16, 16), nominally in [-1, 1] but not clipped ("latent").
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type {output_type!r} is not supported; use 'pil', 'np', 'pt' or 'latent'.")
        device = self._execution_device
        self._guidance_scale = guidance_scale
        labels = _labels_tensor(class_labels, num_images_per_label).to(device)
        null = torch.full_like(labels, NULL_CLASS)
        shape = (len(labels), self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for these labels.")
        self._set_timesteps(num_inference_steps, timesteps, sigmas, device)
        x = latents.to(device=device, dtype=self.unet.dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            out = self._model_output(x, t, labels, null, guidance_scale)
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"The model output contains NaN/inf at step {i} (timestep {float(t)}).")
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        self.maybe_free_model_hooks()
        images = x if output_type == "latent" else _postprocess(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# --------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------


def _to_uint8_images(images: Any) -> list[np.ndarray]:
    """PIL list / (B,1,H,W) tensor in [0,1] / (B,H,W,1) array in [0,1] -> list of (H, W) uint8."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return [np.asarray(im.convert("L")) for im in images]
    arr = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"make_grid expects (B,1,H,W), (B,H,W,1) images in [0, 1] or PIL images, got shape {arr.shape}.")
    return [(np.clip(a, 0, 1) * 255).round().astype(np.uint8) for a in arr]


def make_grid(images: Any, nrow: int, labels: Sequence[str] | None = None, scale: int = 4, pad: int = 2) -> Image.Image:
    """A grayscale PNG-ready grid with ``nrow`` images per row, upscaled ``scale``x (nearest).

    ``labels`` (optional) holds one short text per row, drawn left of the row with PIL's default font.
    """
    tiles = _to_uint8_images(images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}.")
    rows = (len(tiles) + nrow - 1) // nrow
    if labels is not None and len(labels) != rows:
        raise ValueError(f"labels has {len(labels)} entries but the grid has {rows} rows; pass one label per row.")
    h, w = tiles[0].shape[0] * scale, tiles[0].shape[1] * scale
    left = 28 if labels is not None else 0
    grid = Image.new("L", (left + nrow * (w + pad) + pad, rows * (h + pad) + pad), color=40)
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        im = Image.fromarray(tile, mode="L").resize((w, h), Image.NEAREST)
        grid.paste(im, (left + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(labels or []):
        draw.text((2, pad + r * (h + pad) + h // 2 - 5), str(text), fill=255, font=font)
    return grid
