"""Guidance rules that plug into unmodified diffusers pipelines: CFG, paper-exact APG, Adaptive
Guidance and LinearAG.

``attach(pipe, guider)`` / ``detach(pipe)`` switch a pipeline's classifier-free guidance to a difflab
guider; ``as_modular_guider(guider, pipe)`` makes it a guider component of a diffusers modular pipeline. Guiders work in x0 space through :class:`~difflab.schedule.NoiseSchedule` where the method
needs it and return the prediction type the scheduler expects.
"""

from .adapters import attach, detach
from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import CFG, Guider, rescale_guided
from .linear_ag import LinearAG, LinearAGFit, fit_linear_ag
from .modular import DifflabModularGuider, as_modular_guider

__all__ = ["APG", "AdaptiveGuidance", "CFG", "DifflabModularGuider", "Guider", "LinearAG", "LinearAGFit",
           "as_modular_guider", "attach", "detach", "fit_linear_ag", "rescale_guided"]
