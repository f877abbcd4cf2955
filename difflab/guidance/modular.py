"""difflab guiders inside diffusers' modular pipelines, as a ``diffusers.guiders.BaseGuidance``.

Modular pipelines hand guidance to a ``guider`` component: it splits the model inputs into a
conditional and an unconditional batch, the denoise block runs the network on each, and the guider
combines the two noise predictions. :func:`as_modular_guider` wraps any difflab :class:`Guider`
(CFG, APG, AdaptiveGuidance, LinearAG) in that interface::

    pipe.update_components(guider=as_modular_guider(APG(guidance_scale=10), pipe))

Two things a modular guider is not told, and how the adapter gets them: the current latents
(x0-space guiders such as APG need them) are read from the denoiser's input by a forward pre-hook
installed in ``prepare_models`` and removed in ``cleanup_models``; the noise schedule and the
prediction type come from the pipeline's scheduler. When the wrapped guider needs no
unconditional prediction for any sample (Adaptive Guidance after every sample has switched,
LinearAG's conditional-only tail), the adapter asks for one batch only, so the unconditional
network call is really skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..schedule import NoiseSchedule
from .base import Guider


class DifflabModularGuider(BaseGuidance):
    """A diffusers modular guider that delegates the combination to a difflab :class:`Guider`."""

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guider: Guider, pipeline: Any) -> None:
        super().__init__(start=0.0, stop=1.0, enabled=True)
        if not isinstance(guider, Guider):
            raise TypeError(f"as_modular_guider expects a difflab Guider (CFG, APG, ...), got {type(guider).__name__}.")
        self.guider, self.pipeline = guider, pipeline
        # modular pipelines record every component's config; ours names the wrapped guider
        self.register_to_config(difflab_guider=repr(guider), guidance_scale=float(getattr(guider, "guidance_scale", 1.0)))
        self._sample: torch.Tensor | None = None
        self._hook = None
        self._batch_size: int | None = None

    # -- state ------------------------------------------------------------------------------------

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a new generation
            self.guider.reset()
            self.guider.check_pipeline(self.pipeline)
            self._batch_size = None
        self._sample = None

    @property
    def num_conditions(self) -> int:
        if self._batch_size is not None:
            need = self.guider.uncond_rows_needed(self._batch_size)
            if need is not None and not bool(need.any()):
                return 1  # no sample needs the unconditional prediction: skip that network call
        return 2

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # -- inputs and models ------------------------------------------------------------------------

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(indices, self._input_predictions)]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        if self._sample is None and self._hook is None:
            self._hook = denoiser.register_forward_pre_hook(self._capture_sample, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture_sample(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is not None:
            self._sample = sample.detach()

    # -- combination ------------------------------------------------------------------------------

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if self._sample is None:
            raise RuntimeError("the denoiser's input was not seen: the modular denoise block must call "
                               "guider.prepare_models(denoiser) before running the denoiser.")
        self._batch_size = pred_cond.shape[0]
        uncond = pred_cond if pred_uncond is None else pred_uncond  # skipped rows: guided = cond
        scheduler = self.pipeline.scheduler
        schedule = NoiseSchedule.from_config(scheduler.config)
        prediction_type = NoiseSchedule.model_prediction_type(scheduler.config)
        t = torch.as_tensor(self._timestep).reshape(-1).detach().cpu().double().expand(self._batch_size)
        guided = self.guider(pred_cond, uncond, self._sample, t, schedule, prediction_type)
        return GuiderOutput(pred=guided.to(pred_cond.dtype), pred_cond=pred_cond, pred_uncond=pred_uncond)

    def __repr__(self) -> str:
        return f"DifflabModularGuider({self.guider!r})"


def as_modular_guider(guider: Guider, pipeline: Any) -> DifflabModularGuider:
    """Wrap a difflab guider for ``pipeline`` (a diffusers ``ModularPipeline``); set it with ``update_components``."""
    return DifflabModularGuider(guider, pipeline)
