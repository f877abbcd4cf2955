"""Feature networks for FID / KID: the two Inception weights files clean-fid uses, the digits classifier, or yours.

A :class:`FeatureNetwork` takes a float batch (N, 3, H, W) in [0, 255], already resized by the
mode's protocol (see :mod:`difflab.eval.images`), and returns (N, D) features. It carries a name
and the sha256 of its weights, which every reported score repeats.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import check_mode
from .inception import FIDInceptionV3
from .weights import KNOWN_WEIGHTS, WeightsError, is_official, resolve_weights

FEATURES = ("inception", "digits")


@dataclass
class FeatureNetwork:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    weights_sha256: str | None = None
    official: bool = True
    device: torch.device = torch.device("cpu")
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None  # replaces the mode's resize when set

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        features = self.forward(images.to(self.device, torch.float32))
        return features.reshape(len(images), -1).float().cpu().numpy()

    def describe(self) -> str:
        if self.weights_sha256 is None:
            return self.name
        flag = "" if self.official else ", NOT the official weights"
        return f"{self.name} (sha256 {self.weights_sha256[:12]}{flag})"


def _frozen(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``torch.jit.freeze`` (constants folded): faster, same arithmetic up to float32 rounding order.
    The module itself if it cannot be frozen."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            return torch.jit.freeze(module.eval())
    except (RuntimeError, AttributeError):
        return module


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # NHWC lets oneDNN / cuDNN pick their fast convolution kernels (about 1.5x on a CPU); features
    # change by ~1e-6 relative, far below the 1e-4 at which FID values are compared.
    return x.contiguous(memory_format=torch.channels_last)


def _torchscript_inception(mode: str, weights: str | os.PathLike | None, device: torch.device,
                           fast: bool) -> FeatureNetwork:
    path, sha = resolve_weights("torchscript_inception", weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            base = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, OSError, ValueError) as err:
        raise WeightsError(f"cannot load the TorchScript Inception {path} ({err}). The file is damaged or not "
                           "a TorchScript archive: delete it (or pass the right file with --inception-weights).") from err
    # fast: channels-last weights make every convolution run NHWC (even after the network's internal
    # resize), and freezing folds constants: about 1.4-1.6x on a CPU.
    if mode == "legacy_tensorflow":
        network = _frozen(base.to(memory_format=torch.channels_last)) if fast else base

        def forward(x: torch.Tensor) -> torch.Tensor:
            return network(x, return_features=True)  # the network's own TF-style resize to 299
    else:
        layers = _frozen(base.layers.to(memory_format=torch.channels_last)) if fast else base.layers
        prepare = _channels_last if fast else (lambda x: x)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return layers(prepare((x - 128) / 128))
    return FeatureNetwork(f"{os.path.basename(path)}", forward, sha,
                          is_official(sha, KNOWN_WEIGHTS["torchscript_inception"]), device)


def _pytorch_inception(weights: str | os.PathLike | None, device: torch.device, fast: bool) -> FeatureNetwork:
    path, sha = resolve_weights("pytorch_inception", weights)
    try:
        model = FIDInceptionV3.from_state_dict_file(str(path)).to(device)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise WeightsError(f"cannot load pytorch-fid's Inception state dict from {path} ({err}). Delete the file "
                           "(or pass the right one with --inception-weights).") from err
    if fast:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            network = _frozen(torch.jit.script(model.to(memory_format=torch.channels_last)))

        def forward(x: torch.Tensor) -> torch.Tensor:
            return network(_channels_last(x))
    else:
        forward = model
    return FeatureNetwork(os.path.basename(path), forward, sha,
                          is_official(sha, KNOWN_WEIGHTS["pytorch_inception"]), device)


def _digits_preprocess(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 -> (1, 16, 16) in [-1, 1]: luminance, box-filtered to the classifier's 16x16 input."""
    from PIL import Image

    gray = Image.fromarray(image).convert("L").resize((16, 16), resample=Image.BOX)
    return torch.from_numpy(np.asarray(gray, np.float32))[None] / 127.5 - 1


def _digits_network(device: torch.device) -> FeatureNetwork:
    from .digits import _classifier

    classifier = _classifier().to(device)
    return FeatureNetwork("digits-classifier", classifier.features, None, True, device, _digits_preprocess)


def build_feature_network(mode: str = "clean", features: str | Callable = "inception",
                          inception_weights: str | os.PathLike | None = None,
                          device: str | torch.device = "cpu", fast: bool = True) -> FeatureNetwork:
    """The feature network of a mode: ``features="inception"`` (clean-fid's), ``"digits"``, or a callable.

    A callable receives the mode-resized float batch (N, 3, 299, 299) in [0, 255] and returns (N, D).
    ``fast=True`` runs the Inception channels-last (and frozen, for TorchScript): same weights, same
    arithmetic up to float32 rounding order.
    """
    check_mode(mode)
    device = torch.device(device)
    if callable(features):
        return FeatureNetwork(getattr(features, "__name__", type(features).__name__), features, None, True, device)
    if features == "digits":
        return _digits_network(device)
    if features != "inception":
        raise ValueError(f"unknown features {features!r}; choose one of {', '.join(FEATURES)}, or pass a callable.")
    if mode == "legacy_pytorch":
        return _pytorch_inception(inception_weights, device, fast)
    return _torchscript_inception(mode, inception_weights, device, fast)


# ----------------------------------------------------------------------------------------------
# Stand-in networks: same interface as the official files, random weights. For tests and for
# benchmarks on machines that cannot download the official weights.
# ----------------------------------------------------------------------------------------------


class _TinyLayers(torch.nn.Module):
    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.head = torch.nn.Linear(16 * 4, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return torch.relu(self.head(h))


class _InceptionLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inception = FIDInceptionV3()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception.features(x)


class _TorchScriptInterface(torch.nn.Module):
    """The interface of NVIDIA's file: ``forward(img, return_features)`` resizes to 299 inside; ``layers`` does not."""

    def __init__(self, layers: torch.nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.layers = layers
        self.feature_dim = feature_dim

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        batch, channels, height, width = img.shape
        x = img.to(torch.float32)
        if height != 299 or width != 299:  # bilinear resample on pixel centres, border padding
            theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
            theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
            grid = F.affine_grid(theta.unsqueeze(0).repeat(batch, 1, 1), [batch, channels, 299, 299],
                                 align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(batch, self.feature_dim)
        return features if return_features else features[:, :1008]


@torch.no_grad()
def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Scale-preserving random weights (He init, random batch-norm statistics) so features do not collapse."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 0.2 - 0.1)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.running_mean.uniform_(-0.1, 0.1, generator=generator)
            m.weight.uniform_(0.8, 1.2, generator=generator)
            m.bias.uniform_(-0.1, 0.1, generator=generator)


def make_standin_weights(directory: str | os.PathLike, size: str = "tiny", seed: int = 0,
                         feature_dim: int = 2048) -> dict[str, str]:
    """Write stand-in weights with the official files' names and interfaces; returns {kind: path}.

    ``size="tiny"``: a small TorchScript network of ``feature_dim`` features (tests use 64, which
    keeps every Frechet distance instant; clean-fid itself requires 2048). ``size="inception"``:
    the real Inception-v3 layout and cost with random weights (timing benchmarks). The
    ``legacy_pytorch`` file is always the full Inception-v3 layout. Scores computed with stand-ins
    are not FIDs.
    """
    if size not in ("tiny", "inception"):
        raise ValueError(f"size must be 'tiny' or 'inception', got {size!r}.")
    os.makedirs(directory, exist_ok=True)
    generator = torch.manual_seed(seed)
    if size == "inception":
        feature_dim = 2048
    layers = _TinyLayers(feature_dim) if size == "tiny" else _InceptionLayers()
    inception = FIDInceptionV3()
    for module in (layers, inception):
        _randomize(module, generator)
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; the official file is TorchScript
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        scripted = torch.jit.script(_TorchScriptInterface(layers.eval(), feature_dim).eval())
    paths = {kind: os.path.join(directory, w.filename) for kind, w in KNOWN_WEIGHTS.items()}
    scripted.save(paths["torchscript_inception"])
    state = dict(inception.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, paths["pytorch_inception"])
    return paths
