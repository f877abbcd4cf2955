"""Rewards for alignment, and group-normalized advantages (AWM, Xue et al. 2025; GRPO-style).

A reward is any callable ``reward(samples, labels) -> tensor (B,)``: ``samples`` are the decoded
samples (digits: (B, 1, 16, 16), nominally in [-1, 1]; latent pipelines: the VAE's images in [-1, 1];
low-dimensional models: (B, D)), ``labels`` the class labels they were drawn for, the prompts (a list
of strings) for text pipelines, or None. Built-ins:

* :class:`DigitsClassReward` -- probability of a target class under the built-in digits classifier;
* :class:`InkReward` -- the amount of ink (mean brightness in [0, 1]);
* :class:`RegionReward` -- a soft indicator of a disk, for 2-D models;
* :class:`CompositeReward` -- a weighted sum of rewards.

:func:`build_reward` parses the command-line form (``class:3``, ``ink``, ``region:0.8,0,0.3``,
``class:3*1+ink*0.5``). :func:`group_advantages` turns rewards into the advantages both AWM and the
DDPO baseline use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .engine import global_sum

Reward = Callable[[torch.Tensor, "torch.Tensor | list[str] | None"], torch.Tensor]


class DigitsClassReward:
    """Probability the built-in digits classifier gives to ``target_class`` (images clamped to [-1, 1])."""

    def __init__(self, target_class: int):
        if not 0 <= int(target_class) <= 9:
            raise ValueError(f"the digits target class must be in 0..9, got {target_class}.")
        self.target_class = int(target_class)
        self._classifier = None

    def _net(self):
        if self._classifier is None:
            from ..models import load

            self._classifier = load("digits-classifier").eval().requires_grad_(False)
        return self._classifier

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(samples, "DigitsClassReward")
        if tuple(samples.shape[1:]) != (1, 16, 16):
            raise ValueError(f"class:{self.target_class} scores 16x16 digits (B, 1, 16, 16), got images of shape "
                             f"{tuple(samples.shape[1:])}; use another reward (e.g. ink, or your own callable).")
        logits = self._net().to(samples.device)(samples.float().clamp(-1, 1))
        return logits.softmax(-1)[:, self.target_class]

    def __repr__(self) -> str:
        return f"class:{self.target_class}"


class InkReward:
    """Mean brightness in [0, 1] of images in [-1, 1] (ink is bright in the digits data)."""

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(samples, "InkReward")
        return ((samples.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)

    def __repr__(self) -> str:
        return "ink"


class RegionReward:
    """``sigmoid((radius - |x - center|) / softness)``: about 1 inside a disk, 0 outside (2-D models)."""

    def __init__(self, center: Sequence[float], radius: float, softness: float = 0.05):
        if radius <= 0 or softness <= 0:
            raise ValueError(f"the region radius and softness must be > 0, got {radius}, {softness}.")
        self.center = torch.as_tensor(center, dtype=torch.float64)
        self.radius, self.softness = float(radius), float(softness)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if samples.ndim != 2 or samples.shape[1] != len(self.center):
            raise ValueError(f"RegionReward expects samples (B, {len(self.center)}), got {tuple(samples.shape)}.")
        distance = (samples.double() - self.center.to(samples.device)).norm(dim=1)
        return torch.sigmoid((self.radius - distance) / self.softness).float()

    def inside(self, samples: torch.Tensor) -> torch.Tensor:
        """Hard indicator of the disk."""
        return (samples.double() - self.center.to(samples.device)).norm(dim=1) <= self.radius

    def __repr__(self) -> str:
        return f"region:{','.join(f'{c:g}' for c in self.center.tolist())},{self.radius:g}"


class CompositeReward:
    """``sum_k w_k reward_k(samples, labels)``; :meth:`components` gives each term."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        if not terms:
            raise ValueError("a composite reward needs at least one (reward, weight) term.")
        self.terms = list(terms)

    def components(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {repr(reward): reward(samples, labels) for reward, _ in self.terms}

    def __call__(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return sum(weight * reward(samples, labels) for reward, weight in self.terms)

    def __repr__(self) -> str:
        return "+".join(f"{reward!r}*{weight:g}" for reward, weight in self.terms)


def _check_images(samples: torch.Tensor, name: str) -> None:
    if samples.ndim != 4:
        raise ValueError(f"{name} scores images (B, C, H, W); got a tensor of shape {tuple(samples.shape)}.")


def build_reward(spec: str) -> Reward:
    """A reward from its command-line form: ``class:K``, ``ink``, ``region:X,Y,R``, or terms joined by ``+``
    with optional ``*weight`` (``class:3*1+ink*0.5``)."""
    terms = []
    for term in spec.split("+"):
        name, _, weight = term.strip().partition("*")
        terms.append((_single_reward(name.strip(), spec), _weight(weight, spec)))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return CompositeReward(terms)


def _weight(text: str, spec: str) -> float:
    if not text:
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"reward {spec!r}: weight {text!r} is not a number (write e.g. 'class:3*1+ink*0.5').") from None


def _single_reward(name: str, spec: str) -> Reward:
    kind, _, arg = name.partition(":")
    try:
        if kind == "class":
            return DigitsClassReward(int(arg))
        if kind == "ink" and not arg:
            return InkReward()
        if kind == "region":
            values = [float(v) for v in arg.split(",")]
            if len(values) < 2:
                raise ValueError
            return RegionReward(values[:-1], values[-1])
    except ValueError as err:
        if str(err):
            raise
    raise ValueError(f"unknown reward {name!r} in {spec!r}; use class:K (digits class K), ink, region:X,Y,R "
                     "(2-D disk), or a weighted sum such as 'class:3*1+ink*0.5'.")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std: str = "global", clip: float = 5.0,
                     scale: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """GRPO / AWM advantages ``A_i = (r_i - mean_{group(i)} r) / std``, clipped to +-clip, times scale/clip.

    ``groups`` (B,) says which group (prompt) each sample belongs to; the mean is always per group. ``std``:
    ``"global"`` (the AWM default: the std of all rewards, summed over processes under accelerate),
    ``"group"`` (each group's own std) or ``"none"``. A group whose rewards are all equal gets advantage 0.
    The clip and rescale put advantages in [-scale, scale] (AWM: ``adv_clip_max`` 5, ``advantage_max`` 1).
    """
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must both have shape (B,), got {tuple(rewards.shape)} and "
                         f"{tuple(groups.shape)}.")
    if std not in ("global", "group", "none"):
        raise ValueError(f"std must be 'global', 'group' or 'none', got {std!r}.")
    r = rewards.double()
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    group_mean = torch.zeros_like(count).index_add_(0, index, r) / count
    centred = r - group_mean[index]
    if std == "group":
        group_var = torch.zeros_like(count).index_add_(0, index, centred**2) / count
        denominator = group_var.sqrt()[index] + eps
    elif std == "global":
        totals = global_sum(torch.stack([r.sum(), (r**2).sum(), torch.tensor(float(len(r)), dtype=torch.float64)]))
        mean = totals[0] / totals[2]
        denominator = (totals[1] / totals[2] - mean**2).clamp_min(0).sqrt() + eps
    else:
        denominator = torch.ones_like(r)
    advantages = (centred / denominator).clamp(-clip, clip) * (scale / clip)
    return advantages.float()
