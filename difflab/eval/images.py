"""Image inputs for FID: folders, zip files, arrays and generators, decoded and resized as clean-fid does.

Every image becomes an RGB uint8 array (H, W, 3) first: files through PIL's ``convert("RGB")``
(grayscale replicated, alpha dropped), floats in [0, 1] by rounding ``x * 255`` — the values a
saved PNG would hold. The resize of each FID mode then follows clean-fid exactly:

- ``clean``: PIL bicubic in float mode, one channel at a time, to 299x299, clipped to [0, 255];
- ``legacy_tensorflow``: no resize here (the TorchScript network resizes inside);
- ``legacy_pytorch``: ``F.interpolate`` bilinear (align_corners=False) to 299x299, clipped.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy"}  # clean-fid's list
MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_SIZE = (299, 299)


class ImageInputError(ValueError):
    """An image input is empty, too small, or holds files that cannot be read."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown FID mode {mode!r}; choose one of {', '.join(MODES)}.")
    return mode


# ----------------------------------------------------------------------------------------------
# Listing files
# ----------------------------------------------------------------------------------------------


def list_image_files(path: str | os.PathLike) -> list[str]:
    """Sorted image paths in a folder (recursive) or members of a zip file, by clean-fid's extensions."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path} does not exist.")
    if zipfile.is_zipfile(path) and path.is_file():
        with zipfile.ZipFile(path) as archive:
            return sorted(n for n in archive.namelist() if n.rsplit(".", 1)[-1].lower() in EXTENSIONS)
    if not path.is_dir():
        raise ImageInputError(f"{path} is neither a folder nor a zip file of images.")
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix[1:].lower() in EXTENSIONS)


# ----------------------------------------------------------------------------------------------
# Decoding to RGB uint8
# ----------------------------------------------------------------------------------------------


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"))


def array_to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """One image (H, W), (H, W, 1|3|4) as uint8 or floats in [0, 1] -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ImageInputError(f"images must be uint8 or floats in [0, 1], got dtype {image.dtype}.")
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        if not np.isfinite(image).all() or lo < -1e-6 or hi > 1 + 1e-6:
            raise ImageInputError(f"float images must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                                  "for images in [-1, 1] pass (x + 1) / 2.")
        image = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)  # quantize as a saved PNG would
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"an image must be (H, W) or (H, W, 1|3|4), got shape {image.shape}.")
    if image.shape[2] == 3:
        return image
    mode = {1: "L", 4: "RGBA"}[image.shape[2]]
    return _pil_to_rgb_array(Image.fromarray(image[:, :, 0] if mode == "L" else image, mode=mode))


def read_image_file(path: str, archive: zipfile.ZipFile | None = None) -> np.ndarray:
    """Decode one file (or zip member) to RGB uint8 (H, W, 3)."""
    if path.lower().endswith(".npy"):
        data = np.load(io.BytesIO(archive.read(path))) if archive else np.load(path)
        return array_to_rgb_uint8(data)
    if archive is not None:
        with Image.open(io.BytesIO(archive.read(path))) as image:
            return _pil_to_rgb_array(image)
    with Image.open(path) as image:
        return _pil_to_rgb_array(image)


# ----------------------------------------------------------------------------------------------
# Resizing per mode (to a float32 CHW tensor in [0, 255])
# ----------------------------------------------------------------------------------------------


def _resize_clean(image: np.ndarray) -> torch.Tensor:
    channels = []
    for c in range(3):  # PIL float mode works on one channel at a time
        plane = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
        channels.append(np.asarray(plane.resize(INCEPTION_SIZE, resample=Image.BICUBIC)).clip(0, 255))
    return torch.from_numpy(np.stack(channels).astype(np.float32))


def _resize_legacy_pytorch(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None]
    return F.interpolate(x, size=INCEPTION_SIZE, mode="bilinear", align_corners=False)[0].clamp(0, 255)


def _no_resize(image: np.ndarray) -> torch.Tensor:
    # clean-fid passes uint8 through torchvision's ToTensor and multiplies back by 255; x / 255 * 255
    # is not always x in float32, so the same two operations are kept for identical features.
    return torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div(255) * 255


RESIZERS: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
    "clean": _resize_clean,
    "legacy_tensorflow": _no_resize,
    "legacy_pytorch": _resize_legacy_pytorch,
}


# ----------------------------------------------------------------------------------------------
# Datasets: each item is (index, tensor or None, error message or None)
# ----------------------------------------------------------------------------------------------


@dataclass
class Item:
    index: int
    image: torch.Tensor | None
    error: str | None = None


class FileDataset(torch.utils.data.Dataset):
    """Image files (or zip members), decoded and resized in DataLoader workers."""

    def __init__(self, files: Sequence[str], preprocess: Callable[[np.ndarray], torch.Tensor],
                 archive_path: str | None = None) -> None:
        self.files, self.preprocess, self.archive_path = list(files), preprocess, archive_path
        self._archive: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        if self.archive_path is not None and self._archive is None:
            self._archive = zipfile.ZipFile(self.archive_path)  # one handle per worker process
        try:
            rgb = read_image_file(self.files[index], self._archive)
        except Exception as err:  # noqa: BLE001 - any decoder failure makes the file "bad"
            return Item(index, None, f"{type(err).__name__}: {err}")
        return Item(index, self.preprocess(rgb))


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory images (already RGB uint8), resized on access."""

    def __init__(self, images: Sequence[np.ndarray], preprocess: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        return Item(index, self.preprocess(self.images[index]))


def collate_items(items: list[Item]) -> list[Item]:
    return items


def group_by_shape(items: list[Item]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack same-shaped images; images of other sizes (legacy_tensorflow keeps sizes) form their own groups."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        if item.image is not None:
            groups.setdefault(tuple(item.image.shape), []).append(item)
    return [([i.index for i in group], torch.stack([i.image for i in group])) for group in groups.values()]


def images_to_rgb_list(images: torch.Tensor | np.ndarray | Sequence) -> list[np.ndarray]:
    """A batch of images in any common layout -> list of RGB uint8 (H, W, 3) arrays.

    Tensors are (N, C, H, W); numpy arrays are (N, H, W, C) (or (N, C, H, W) when only that reading
    makes sense); lists may hold PIL images or arrays. Floats must lie in [0, 1].
    """
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise ImageInputError(f"an image tensor must be (N, C, H, W), got shape {tuple(images.shape)}.")
        images = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
            images = images.transpose(0, 2, 3, 1)
        if images.ndim not in (3, 4):
            raise ImageInputError(f"an image array must be (N, H, W, C) or (N, H, W), got shape {images.shape}.")
        return [array_to_rgb_uint8(image) for image in images]
    out = []
    for image in images:
        out.append(_pil_to_rgb_array(image) if isinstance(image, Image.Image) else array_to_rgb_uint8(image))
    return out
