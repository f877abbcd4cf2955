"""Make unmodified diffusers pipelines use a difflab guider.

``attach(pipe, guider)`` wraps the forward of ``pipe.unet`` / ``pipe.transformer`` (no subclassing,
no pipeline code copied). While the pipeline's own CFG branch is on (``guidance_scale > 1``) the
denoiser is called on the batch [uncond; cond] (SD, SDXL, SD3) or [cond; uncond] (DigitsPipeline);
the wrapper splits the prediction, applies the guider with the noise schedule of ``pipe.scheduler``
(the denoiser's input is x_t in the model's own scaling) and returns the guided prediction in both
halves, so the pipeline's ``u + w (c - u)`` is the guided prediction whatever its ``w``. The
pipeline's ``guidance_rescale`` must stay 0 (use the guider's). ``detach(pipe)`` restores it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import NoiseSchedule
from .base import Guider

COND_FIRST_PIPELINES = {"DigitsPipeline"}  # pipelines that batch [cond; uncond]


def _denoiser(pipe: Any) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has neither `unet` nor `transformer`; difflab guiders need one of them.")


def _prediction_type(pipe: Any, schedule: NoiseSchedule) -> str:
    if schedule.kind == "flow":
        return "flow_prediction"
    return pipe.scheduler.config.get("prediction_type", "epsilon")


def _cfg_is_on(pipe: Any, batch: int) -> bool:
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    return bool(flag) and batch % 2 == 0


def _take_rows(value: Any, rows: torch.Tensor, full: int) -> Any:
    """Select batch rows of every tensor of batch size ``full`` inside args / kwargs (dicts, tuples)."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim > 0 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _take_rows(v, rows, full) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, rows, full) for v in value)
    return value


def _predictions(original, args: tuple, kwargs: dict, n: int, cond_first: bool, need: torch.Tensor | None):
    """(cond, uncond, raw output) with the network evaluated only on the rows that are needed."""
    cond_rows = torch.arange(n) if cond_first else torch.arange(n, 2 * n)
    uncond_rows = torch.arange(n, 2 * n) if cond_first else torch.arange(n)
    if need is None or bool(need.all()):
        out = original(*args, **kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        return pred[cond_rows], pred[uncond_rows], out
    rows = torch.cat([cond_rows, uncond_rows[need.cpu()]])
    out = original(*_take_rows(args, rows, 2 * n), **_take_rows(kwargs, rows, 2 * n))
    pred = out[0] if isinstance(out, tuple) else out.sample
    cond = pred[:n]
    uncond = cond.clone()  # rows that skip the unconditional call get guided = cond
    uncond[need.to(pred.device)] = pred[n:]
    return cond, uncond, out


def attach(pipe: Any, guider: Guider) -> Any:
    """Route the pipeline's classifier-free guidance through ``guider``; returns the pipeline."""
    if not isinstance(guider, Guider):
        raise TypeError(f"attach expects a difflab Guider (CFG, APG, ...), got {type(guider).__name__}.")
    detach(pipe)
    denoiser = _denoiser(pipe)
    original = denoiser.forward
    cond_first = type(pipe).__name__ in COND_FIRST_PIPELINES
    guider.reset()
    state = {"last_t": None}

    def guided_forward(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if sample is None or not _cfg_is_on(pipe, sample.shape[0]):
            return original(*args, **kwargs)
        n = sample.shape[0] // 2
        t = torch.as_tensor(timestep).reshape(-1)[:n].detach().cpu().double()
        if state["last_t"] is None or float(t[0]) > state["last_t"]:  # a new generation starts
            guider.reset()
            guider.check_pipeline(pipe)
        state["last_t"] = float(t[0])
        cond, uncond, out = _predictions(original, args, kwargs, n, cond_first, guider.uncond_rows_needed(n))
        pred = out[0] if isinstance(out, tuple) else out.sample
        schedule = NoiseSchedule.from_config(pipe.scheduler.config)
        guided = guider(cond, uncond, sample[:n], t, schedule, _prediction_type(pipe, schedule))
        both = torch.cat([guided, guided]).to(pred.dtype)
        if isinstance(out, tuple):
            return (both, *out[1:])
        out.sample = both
        return out

    denoiser.forward = guided_forward
    pipe._difflab_guidance = (guider, original)
    return pipe


def detach(pipe: Any) -> Any:
    """Undo :func:`attach`; a no-op on a pipeline without a difflab guider."""
    attached = getattr(pipe, "_difflab_guidance", None)
    if attached is not None:
        denoiser = _denoiser(pipe)
        if "forward" in vars(denoiser):
            del denoiser.forward  # back to the class's forward
        pipe._difflab_guidance = None
    return pipe
