"""Load the built-in models that ship inside the package, or a local diffusers pipeline directory.

``load("digits-ddpm")`` returns a ready :class:`~difflab.models.digits.DigitsPipeline` with no
network access: the weights live in ``difflab/models/weights/<name>/`` in diffusers
``save_pretrained`` layout (float16 safetensors, cast to ``dtype`` on load). Every file is checked
before loading, so a truncated or corrupted install gives an error naming the file instead of a
safetensors traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class ModelFilesError(RuntimeError):
    """A model directory whose config or weights files cannot be read (corrupted or truncated)."""

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

BUILTIN_MODELS: dict[str, str] = {
    "digits-ddpm": "16x16 class-conditional digits DDPM (eps prediction, linear betas, null class 10 for CFG); "
                   "DigitsPipeline with DPMSolverMultistepScheduler.",
    "digits-flow": "16x16 class-conditional digits flow-matching model (velocity prediction, null class 10 for CFG); "
                   "DigitsPipeline with FlowMatchEulerDiscreteScheduler.",
    "digits-classifier": "Small CNN digits classifier (>= 97% held-out accuracy); its 64-d penultimate features "
                         "define FD-digits.",
}


def _reinstall_hint(builtin: bool) -> str:
    if builtin:
        return "The installed difflab package is damaged; reinstall it: pip install --force-reinstall difflab."
    return "Save the model again with save_pretrained, or copy the directory again."


def _check_files(path: Path, builtin: bool) -> None:
    """Read every JSON config and safetensors file of ``path``; raise a clear error on a bad one."""
    from safetensors.torch import load_file

    for file in sorted(path.rglob("*.json")):
        if "checkpoint-" in str(file.relative_to(path)):
            continue
        try:
            json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise ModelFilesError(f"Cannot read the config file {file}: {err}. {_reinstall_hint(builtin)}") from err
    for file in sorted(path.rglob("*.safetensors")):
        if "checkpoint-" in str(file.relative_to(path)):
            continue
        try:
            load_file(str(file))
        except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
            raise ModelFilesError(
                f"Cannot read the weights file {file}: it is corrupted or truncated ({type(err).__name__}: {err}). "
                f"{_reinstall_hint(builtin)}"
            ) from err


def _resolve(name_or_path: str | Path) -> tuple[Path, bool]:
    """(directory, is_builtin) of a built-in model name or a local directory."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        path = WEIGHTS_DIR / name
        if not path.is_dir():
            raise FileNotFoundError(f"The weights of built-in model {name!r} are missing from {path}. "
                                    f"{_reinstall_hint(True)}")
        return path, True
    path = Path(name).expanduser()
    if path.is_dir():
        return path, False
    if path.exists():
        raise ValueError(f"{path} is a file; pass a diffusers pipeline directory (with model_index.json) "
                         f"or one of the built-in models {list(BUILTIN_MODELS)}.")
    raise ValueError(f"Unknown model {name!r}: it is neither a built-in model nor an existing directory. "
                     f"Built-in models: {list(BUILTIN_MODELS)}.")


def _class_name(config_file: Path) -> str | None:
    return json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None


def _load_directory(path: Path, dtype: torch.dtype) -> Any:
    """A DigitsPipeline, another diffusers pipeline, or a DigitsClassifier saved in ``path``."""
    from .digits import DigitsClassifier, DigitsPipeline

    index = path / "model_index.json"
    if index.is_file():
        if _class_name(index) == "DigitsPipeline":
            return DigitsPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    if _class_name(path / "config.json") == "DigitsClassifier":
        return DigitsClassifier.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    raise FileNotFoundError(
        f"{path} is not a diffusers pipeline directory: model_index.json is missing. Pass a directory written "
        f"by pipe.save_pretrained(...) (or by `python -m difflab.models.train_digits`), or one of the built-in "
        f"models {list(BUILTIN_MODELS)}."
    )


def load(name: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Load a built-in model by name (see ``BUILTIN_MODELS``) or a local pipeline directory.

    ``"digits-ddpm"`` / ``"digits-flow"`` return a :class:`DigitsPipeline`; ``"digits-classifier"``
    returns a :class:`DigitsClassifier` in eval mode. Weights are cast to ``dtype`` and moved to
    ``device`` (default: CPU). No network access is ever made.
    """
    path, builtin = _resolve(name)
    _check_files(path, builtin)
    model = _load_directory(path, dtype)
    return model.to(device) if device is not None else model


def unet_conditioning(pipeline: Any, name: str = "the pipeline") -> str:
    """How ``pipeline.unet`` is conditioned: ``"none"`` (unconditional ``UNet2DModel``), ``"class"`` (class
    embeddings: the digits models) or ``"text"`` (a ``UNet2DConditionModel`` with the pipeline's own
    ``encode_prompt``: Stable Diffusion 1.x / 2.x). SDXL, SD3 and Flux are recognised before this is asked
    (:func:`difflab.models.conditioning.is_text_conditioned`); ValueError for the pipelines difflab's trainers and
    search cannot drive (no UNet; other added conditioning)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    supported = ("use the digits models, DDPMPipeline / DDIMPipeline, or a Stable Diffusion 1.x / 2.x / XL / 3 or "
                 "Flux pipeline.")
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise ValueError(f"{name} ({type(pipeline).__name__}) is not a diffusion pipeline difflab can drive (no "
                         "UNet2DModel / UNet2DConditionModel as pipe.unet, nor an SD3 / Flux transformer); " + supported)
    if isinstance(unet, UNet2DModel):
        return "class" if unet.config.num_class_embeds else "none"
    if getattr(unet.config, "addition_embed_type", None):
        raise ValueError(f"{name}: UNets with added conditioning ({unet.config.addition_embed_type}) other than "
                         "SDXL's are not supported; " + supported)
    if not callable(getattr(pipeline, "encode_prompt", None)):
        raise ValueError(f"{name} ({type(pipeline).__name__}) has no encode_prompt; use a Stable Diffusion pipeline.")
    return "text"
