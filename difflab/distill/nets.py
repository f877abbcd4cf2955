"""Small networks for low-dimensional distillation: a time-conditioned MLP denoiser, a
discriminator head, and the one-step generator built from a teacher denoiser.

:class:`MLPDenoiser` answers like a diffusers UNet (``model(x_t, t).sample``) in any of the four
prediction types and can also return its last hidden activations (``.features``), on which the
f-distill discriminator head sits (the DMD2 / f-distill design of a classifier branch on the
diffusion network's features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from torch import nn

from ..schedule import NoiseSchedule, canonical_prediction_type


@dataclass
class MLPOutput(BaseOutput):
    """Output of :class:`MLPDenoiser`: the prediction, and the hidden features when asked for."""

    sample: torch.Tensor
    features: torch.Tensor | None = None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) diffusers timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPDenoiser(nn.Module):
    """A time-conditioned MLP denoiser for data of shape (B, dim).

    Args:
        dim: data dimension.
        hidden: width of the hidden layers (also the feature dimension).
        depth: number of hidden layers.
        prediction_type: what the output means: ``epsilon``, ``sample`` (x0), ``v_prediction`` or
            ``flow_prediction`` (aliases eps / x0 / v / flow accepted).
        time_embedding_dim: size of the sinusoidal timestep embedding.
    """

    supports_features = True

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, prediction_type: str = "epsilon",
                 time_embedding_dim: int = 32):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}.")
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.time_embedding_dim = time_embedding_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embedding_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    @property
    def feature_dim(self) -> int:
        return self.hidden

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, return_features: bool = False,
                return_dict: bool = True, **unused: object) -> MLPOutput | tuple[torch.Tensor]:
        """Prediction at ``x_t = sample`` and diffusers timestep(s) ``timestep`` (scalar or (B,))."""
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
        t = t.expand(n) if t.numel() == 1 else t
        h = self.input(sample.reshape(n, -1)) + self.time_mlp(timestep_embedding(t, self.time_embedding_dim))
        for block in self.blocks:
            h = h + block(h)
        out = self.output(h).reshape(sample.shape)
        if not return_dict:
            return (out,)
        return MLPOutput(sample=out, features=h if return_features else None)


class DiscriminatorHead(nn.Module):
    """Logit of "real" from denoiser features: a two-layer MLP (DMD2's classifier branch, shrunk to 2-D)."""

    def __init__(self, feature_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) -> (B,) logits; at the optimum logit = log p_data,t(x) / q_t(x)."""
        return self.net(features).squeeze(-1)


def inner_module(module: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / guidance / prompt-table wrappers (``.module``), or itself."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def state_dict_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """The missing, unexpected and mis-shaped keys of ``given`` against ``own`` ('' when keys and shapes agree)."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if own[k].shape != given[k].shape)
    if not (missing or unexpected or shapes):
        return ""
    return (f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}")


def strict_load(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state_dict`` into ``module`` only if keys and shapes match exactly (else a ValueError that
    lists the missing, unexpected and mis-shaped keys)."""
    mismatch = state_dict_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise ValueError(f"{source} does not match {type(module).__name__}: {mismatch}; it must be the state dict "
                         "of the same network (same configuration, no key prefixes).")
    result = module.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # checked above; strict=True raises anyway


class OneStepGenerator(nn.Module):
    """One-step generator initialized from a teacher: G(z) = x0-prediction of the denoiser at (z, t_gen).

    The denoiser (a copy of the teacher network) sees pure noise ``z`` at the conditioning timestep
    ``t_gen`` (default: the largest training timestep) and its output is converted to a data
    prediction with :meth:`NoiseSchedule.to_x0_eps`, as DMD / DMD2 / f-distill initialize their students.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, timestep: float | None = None,
                 prediction_type: str | None = None):
        super().__init__()
        prediction_type = prediction_type or getattr(denoiser, "prediction_type", None)
        if prediction_type is None:
            raise ValueError(f"{type(denoiser).__name__} has no prediction_type attribute; pass prediction_type "
                             "(the teacher scheduler's config['prediction_type']).")
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.denoiser = denoiser
        self.schedule = schedule
        self.timestep = float(schedule.t_max if timestep is None else timestep)
        alpha, sigma = schedule.alpha_sigma(self.timestep)
        self.alpha, self.sigma = float(alpha), float(sigma)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x0 = G(z) (of the given classes, for a class-conditional denoiser), shaped like z."""
        t = torch.full((z.shape[0],), self.timestep, device=z.device)
        cond = {} if class_labels is None else {"class_labels": class_labels}
        out = self.denoiser(z, t, **cond).sample
        x0, _ = self.schedule.to_x0_eps(out, z, self.alpha, self.sigma, self.prediction_type)
        return x0


def default_generator_timestep(schedule: NoiseSchedule, prediction_type: str) -> float:
    """The conditioning timestep of a one-step generator made from a denoiser: the largest timestep,
    except for eps models whose alpha there is below 0.05, where x0 = (z - sigma eps) / alpha would
    amplify every change of eps more than twentyfold (DDPM's linear betas: alpha = 0.006 at t = 999;
    SD's scaled-linear betas, alpha = 0.068, where DMD2 conditions at 999, stay there): then the
    largest timestep with alpha >= 0.15 (digits-ddpm: 610)."""
    t_max = float(schedule.t_max)
    if canonical_prediction_type(prediction_type) != "epsilon" or float(schedule.alpha_sigma(t_max)[0]) >= 0.05:
        return t_max
    grid = torch.arange(int(t_max), -1, -1, dtype=torch.float64)
    alphas = schedule.alpha_sigma(grid)[0]
    return float(grid[alphas >= 0.15][0])
