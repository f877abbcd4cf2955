"""The guider protocol and classifier-free guidance.

A guider combines the conditional and unconditional predictions of one denoiser call into the
prediction the scheduler receives. It is a pure function of

    (cond, uncond, sample, timestep, schedule, prediction_type)

plus explicit per-sample state (momentum buffers, switch flags) that supports ``reset()`` (a new
generation) and ``reindex(indices)`` (particle resampling). Guiders that work in x0 space convert
with :class:`~difflab.schedule.NoiseSchedule` and return the scheduler's prediction type.
"""

from __future__ import annotations

import torch

from ..schedule import NoiseSchedule


class Guider:
    """Base class: subclasses implement :meth:`combine`; stateful ones override reset / reindex."""

    guidance_scale: float = 1.0

    def combine(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        schedule: NoiseSchedule,
        prediction_type: str,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, cond, uncond, sample, timestep, schedule, prediction_type) -> torch.Tensor:
        if cond.shape != uncond.shape:
            raise ValueError(f"cond and uncond predictions differ in shape: {tuple(cond.shape)} vs {tuple(uncond.shape)}.")
        return self.combine(cond, uncond, sample, timestep, schedule, prediction_type)

    def uncond_rows_needed(self, batch_size: int) -> torch.Tensor | None:
        """Bool mask (B,) of samples whose unconditional prediction is needed this step; None = all.

        Adapters evaluate the network only on those rows (AG / LinearAG save real compute).
        """
        return None

    def check_pipeline(self, pipe: object) -> None:
        """Raise if the guider cannot serve this pipeline (called by adapters at each generation start)."""

    def reset(self) -> None:
        """Forget per-generation state (called when a new generation starts)."""

    def reindex(self, indices: torch.Tensor) -> None:
        """Reorder per-sample state along the batch (particle resampling)."""


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over all non-batch dimensions, shaped (B, 1, ...) for broadcasting."""
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2024, eq. 15-16: match the per-sample std of the guided prediction to the conditional one."""
    if guidance_rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


class CFG(Guider):
    """Classifier-free guidance u + w (c - u) (Ho & Salimans 2022), with diffusers' ``guidance_rescale``.

    CFG is affine in the prediction, so it is the same in eps, x0, v or velocity space.
    """

    def __init__(self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0):
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        guided = uncond + self.guidance_scale * (cond - uncond)
        return rescale_guided(guided, cond, self.guidance_rescale)

    def __repr__(self) -> str:
        return f"CFG(guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale})"
