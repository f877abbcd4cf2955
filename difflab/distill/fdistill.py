"""f-distill: one-step diffusion distillation by f-divergence distribution matching.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching", arXiv 2502.15681.

The gradient of D_f(p_t || q_t) with respect to the generator parameters theta is (paper, Thm. 1)

    E_{z, eps, t}[ h(r_t(x_t)) (grad log q_t(x_t) - grad log p_t(x_t)) d x_t / d theta ],
    h(r) = f''(r) r^2,   r_t = p_t / q_t (teacher / data over student),

i.e. the DMD / VSD score difference weighted per sample by h(r) (Table 1). The density ratio comes
from the GAN discriminator: with real data labelled positive its logit estimates log r_t. Two
normalizations keep the weights tame (paper, "variance reduction"; FastGen defaults):

1. r is divided by its mean within each of 10 equal bins of t (batch means, or an EMA);
2. h is divided by its global batch mean, so the average weight is 1 as in reverse-KL (DMD2).

The generator loss is the DMD pseudo-target form plus the (mandatory) GAN term:
``L_G = 0.5 MSE(x0, sg(x0 - w h (x0_fake - x0_teacher))) + lambda_gan mean softplus(-D(x_t))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .engine import gan_generator_loss, global_mean, global_sum, pseudo_target_loss, score_difference_target

# h(r) = f''(r) r^2 up to a constant factor (it cancels in the batch normalization); Table 1.
WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rkl": lambda r: torch.ones_like(r),           # reverse KL, f = -log r (DMD / DMD2)
    "kl": lambda r: r,                             # forward KL, f = r log r
    "js": lambda r: r / (r + 1),                   # Jensen-Shannon
    "sh": lambda r: r.sqrt(),                      # squared Hellinger, f = 1 - sqrt(r): h = sqrt(r) / 4
    "srkl": lambda r: 1 / (r + 1),                 # softened reverse KL
    "jeffreys": lambda r: 1 + r,                   # Jeffreys, f = (r - 1) log r
    "neyman": lambda r: 1 / r.clamp(min=1e-8),     # Neyman chi^2 (FastGen option)
}
DIVERGENCES = tuple(WEIGHTINGS)
_ALIASES = {"reverse_kl": "rkl", "dmd": "rkl", "fkl": "kl", "forward_kl": "kl", "jensen_shannon": "js",
            "hellinger": "sh", "squared_hellinger": "sh", "sf": "srkl", "softened_rkl": "srkl", "jf": "jeffreys",
            "neyman_chi2": "neyman"}
MODE_SEEKING = {"rkl": "yes", "srkl": "yes", "js": "medium", "sh": "medium", "kl": "no", "jeffreys": "no", "neyman": "-"}


def canonical_divergence(name: str) -> str:
    """Canonical short name of a divergence, or a ValueError that lists the valid ones."""
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in WEIGHTINGS:
        raise ValueError(f"Unknown f-divergence {name!r}; use one of {list(DIVERGENCES)} "
                         f"(aliases: {sorted(_ALIASES)}).")
    return key


def weighting(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """h(r) of the named divergence (Table 1), in float32."""
    return WEIGHTINGS[canonical_divergence(divergence)](r.float())


@torch.no_grad()
def density_ratio(logits: torch.Tensor, logit_clamp: float = 10.0,
                  ratio_range: tuple[float, float] = (0.1, 20.0)) -> torch.Tensor:
    """r = exp(clamp(logit)) clipped to ``ratio_range``, detached, float32.

    ``logits`` is (B,) or (B, heads); several heads are averaged first. Clamping before exp keeps
    half precision from overflowing (paper pitfall); the clip bounds the weights' variance.
    """
    logits = logits.detach().float()
    if logits.ndim > 1:
        logits = logits.reshape(len(logits), -1).mean(1)
    lo, hi = ratio_range
    if not 0 < lo <= hi:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}.")
    return logits.clamp(-logit_clamp, logit_clamp).exp().clamp(lo, hi)


class RatioNormalizer(nn.Module):
    """Per-time-bin normalization of r: r / mean(r in its bin of t) (stage 1 of the normalization).

    The t range is cut into ``num_bins`` equal bins. With ``ema_rate`` 0 (paper default) each bin's
    mean is the current batch's (summed over processes); otherwise ``mean <- rate * mean + (1 - rate)
    * batch mean`` for bins seen in the batch. The running means live in a persistent buffer, so they
    are saved and restored with the module's state dict.
    """

    def __init__(self, t_range: tuple[float, float], num_bins: int = 10, ema_rate: float = 0.0):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1), got {ema_rate}.")
        lo, hi = (float(v) for v in t_range)
        if not hi > lo:
            raise ValueError(f"t_range must be increasing, got {t_range}.")
        self.t_lo, self.t_hi, self.num_bins, self.ema_rate = lo, hi, int(num_bins), float(ema_rate)
        self.register_buffer("bin_means", torch.ones(num_bins))
        self.register_buffer("bin_seen", torch.zeros(num_bins, dtype=torch.bool))

    def bins(self, t: torch.Tensor) -> torch.Tensor:
        """Bin index of each timestep (clamped into 0..num_bins-1)."""
        frac = (t.float() - self.t_lo) / (self.t_hi - self.t_lo)
        return (frac * self.num_bins).floor().long().clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def forward(self, r: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """r / (mean of r in each sample's t bin); updates the running means when ``update``."""
        idx = self.bins(t.to(r.device))
        if update:
            sums = torch.zeros(self.num_bins, device=r.device).index_add_(0, idx, r.float())
            counts = torch.zeros(self.num_bins, device=r.device).index_add_(0, idx, torch.ones_like(r, dtype=torch.float))
            stats = global_sum(torch.stack([sums, counts]))
            seen = stats[1] > 0
            batch_mean = stats[0] / stats[1].clamp(min=1.0)
            keep = self.ema_rate * self.bin_seen.float()  # a bin seen for the first time takes the batch mean
            blended = keep * self.bin_means + (1 - keep) * batch_mean
            self.bin_means.copy_(torch.where(seen, blended, self.bin_means))
            self.bin_seen |= seen
        return r.float() / self.bin_means[idx].clamp(min=1e-12)

    def extra_repr(self) -> str:
        return f"t_range=({self.t_lo}, {self.t_hi}), num_bins={self.num_bins}, ema_rate={self.ema_rate}"


@torch.no_grad()
def normalize_weights(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h / (global mean of h + eps), the mean taken over all processes (stage 2): average weight 1."""
    return h.float() / (global_mean(h) + eps)


@torch.no_grad()
def fdistill_weights(logits: torch.Tensor, t: torch.Tensor, divergence: str,
                     normalizer: RatioNormalizer | None = None, logit_clamp: float = 10.0,
                     ratio_range: tuple[float, float] = (0.1, 20.0),
                     normalize_h: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights of the generator update: (h_normalized, r), both (B,) and detached.

    r = exp(clamped logit) clipped; r / bin mean (if a normalizer is given); h = h(r) (Table 1);
    h / mean h (if ``normalize_h``).
    """
    r = density_ratio(logits, logit_clamp, ratio_range)
    r_norm = r if normalizer is None else normalizer(r, t)
    h = weighting(divergence, r_norm)
    return (normalize_weights(h) if normalize_h else h), r


def generator_loss(x0: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor, logits_fake: torch.Tensor,
                   h: torch.Tensor, gan_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """f-distill generator loss: weighted DMD pseudo target plus the non-saturating GAN term.

    ``x0 = G(z)`` carries gradients; ``x0_teacher`` / ``x0_fake`` are the teacher and fake-score data
    predictions at the noised x_t; ``logits_fake`` = D(x_t), differentiable in x0; ``h`` the
    normalized weights. The gradient of the first term in x0 is g / numel with
    g = h / mean|x0 - x0_teacher| * (x0_fake - x0_teacher) (Thm. 1 with DMD's normalizer).
    """
    if gan_weight <= 0:
        raise ValueError("f-distill needs the GAN term (gan_weight > 0): the density ratio r comes from the "
                         f"discriminator, which the generator must also be trained against; got {gan_weight}.")
    g = score_difference_target(x0, x0_teacher, x0_fake, h)
    dm = pseudo_target_loss(x0, g)
    gan = gan_generator_loss(logits_fake)
    return dm + gan_weight * gan, {"dm_loss": dm.item(), "gan_gen_loss": gan.item()}
