"""Built-in models: the exact Gaussian-mixture denoiser and the shipped digits models.

``load("digits-ddpm")`` / ``load("digits-flow")`` / ``load("digits-classifier")`` work offline from
weights inside the package (see ``BUILTIN_MODELS``). The digits and hub modules import diffusers
pipelines, so they are imported lazily on first use. ``difflab.models.tiny`` (random tiny SD /
Flux components, needs transformers) is never imported from here.
"""

from __future__ import annotations

import importlib
from typing import Any

from .gmm import GaussianMixture, GMMDenoiser, GridTarget

_LAZY = {
    "load": ".hub",
    "BUILTIN_MODELS": ".hub",
    "DigitsPipeline": ".digits",
    "DigitsClassifier": ".digits",
    "load_digits_dataset": ".digits",
    "make_grid": ".digits",
    "digits_unet_config": ".digits",
    "NUM_CLASSES": ".digits",
    "NULL_CLASS": ".digits",
}


_SUBMODULES = ("digits", "hub", "train_digits")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["BUILTIN_MODELS", "GMMDenoiser", "GaussianMixture", "GridTarget", "DigitsClassifier", "DigitsPipeline",
           "NULL_CLASS", "NUM_CLASSES", "digits_unet_config", "load", "load_digits_dataset", "make_grid"]
