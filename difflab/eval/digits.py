"""FD-digits and class accuracy of digit samples, judged by the built-in digits classifier.

FD-digits is the Frechet distance between the classifier's penultimate features of generated
digits and of the held-out real digits (the split no model trained on). Because a Frechet distance
of finite samples is biased upward, every number comes with the real-versus-real noise floor at
the same sample size: random train-split real digits of the same count against the same held-out
set (mean over several subsets). The held-out split has 359 images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .frechet import frechet_distance_of_features


@dataclass
class DigitsScore:
    """Accuracy (None without labels), FD-digits, and the noise floor at the same sample size."""

    n_samples: int
    accuracy: float | None
    fd_digits: float
    noise_floor: float

    @property
    def fd_ratio(self) -> float:
        return self.fd_digits / self.noise_floor

    def as_dict(self) -> dict:
        return {**asdict(self), "fd_ratio": self.fd_ratio}


_CACHE: dict[str, object] = {}


def _classifier():
    if "classifier" not in _CACHE:
        from ..models import load

        _CACHE["classifier"] = load("digits-classifier").eval()
    return _CACHE["classifier"]


@torch.no_grad()
def classifier_outputs(images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64) float64, predicted classes (N,)) of images (N, 1, 16, 16) in [-1, 1], on any device
    (the classifier runs on the CPU)."""
    if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"digits images must have shape (N, 1, 16, 16) in [-1, 1], got {tuple(images.shape)}.")
    clf = _classifier()
    feats, preds = [], []
    for chunk in images.detach().float().cpu().clamp(-1, 1).split(batch_size):
        feats.append(clf.features(chunk).double())
        preds.append(clf(chunk).argmax(-1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def _real_features() -> tuple[np.ndarray, np.ndarray]:
    if "real" not in _CACHE:
        from ..models.digits import load_digits_dataset

        held, _ = load_digits_dataset("heldout")
        train, _ = load_digits_dataset("train")
        _CACHE["real"] = (classifier_outputs(held)[0], classifier_outputs(train)[0])
    return _CACHE["real"]


def noise_floor(n: int, repeats: int = 10, seed: int = 0) -> float:
    """Mean FD-digits of n random real train-split digits against the held-out digits."""
    held, train = _real_features()
    if n > len(train):
        raise ValueError(f"the noise floor needs n <= {len(train)} real train digits, got {n}.")
    rng = np.random.default_rng(seed)
    return float(np.mean([frechet_distance_of_features(train[rng.choice(len(train), n, replace=False)], held)
                          for _ in range(repeats)]))


def evaluate_digits(images: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None) -> DigitsScore:
    """Score generated digits (N, 1, 16, 16) in [-1, 1]: accuracy against ``labels`` and FD-digits."""
    feats, preds = classifier_outputs(images)
    held, _ = _real_features()
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu()
    accuracy = None if labels is None else float((preds == np.asarray(labels)).mean())
    return DigitsScore(len(images), accuracy, frechet_distance_of_features(feats, held), noise_floor(len(images)))


def _class_features(target_class: int) -> np.ndarray:
    key = f"class-{target_class}"
    if key not in _CACHE:
        from ..models.digits import load_digits_dataset

        images, labels = load_digits_dataset("all")
        _CACHE[key] = classifier_outputs(images[labels == target_class])[0]
    return _CACHE[key]


def fd_to_class(images: torch.Tensor, target_class: int) -> float:
    """FD-digits of generated digits against ALL real digits (both splits, about 180) of one class.

    The reference of alignment runs whose reward asks for one class: compare the number with the same
    measure of the base model's class-conditional samples of the same size, not with other FD-digits.
    """
    if not 0 <= int(target_class) <= 9:
        raise ValueError(f"target_class must be in 0..9, got {target_class}.")
    feats, _ = classifier_outputs(images)
    return frechet_distance_of_features(feats, _class_features(int(target_class)))
