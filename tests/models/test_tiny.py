"""Tests for difflab.models.tiny: tiny offline diffusers pipelines."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from difflab.models.tiny import (
    TINY_PIPELINE_KINDS,
    TINY_PIPELINES,
    count_denoiser_calls,
    default_call_kwargs,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

NAMES = ["sd", "sdxl", "sd3", "flux", "ddpm"]
# Pipelines whose default kwargs run classifier-free guidance batched in one call.
CFG_BATCHED = {"sd", "sdxl", "sd3"}
EXPECTED_SHAPE = {
    "sd": (1, 32, 32, 3),
    "sdxl": (1, 32, 32, 3),
    "sd3": (1, 32, 32, 3),
    "flux": (1, 32, 32, 3),
    "ddpm": (1, 8, 8, 3),
}
# A different diffusers scheduler for each pipeline, built with from_config.
SWAPS = {
    "sd": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg),
    "sdxl": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg),
    "sd3": lambda cfg: FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=3.0),
    "flux": lambda cfg: FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=3.0),
    "ddpm": lambda cfg: DDIMScheduler.from_config(cfg),
}


def _run(pipe, name: str, seed: int = 0, **overrides) -> np.ndarray:
    kwargs = default_call_kwargs(name)
    kwargs.update(overrides)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images)


def test_registry_consistent():
    assert set(TINY_PIPELINES) == set(NAMES)
    assert set(TINY_PIPELINE_KINDS) == set(NAMES)
    assert {n for n, k in TINY_PIPELINE_KINDS.items() if k == "flow"} == {"sd3", "flux"}
    assert set(TINY_PIPELINE_KINDS.values()) == {"vp", "flow"}
    with pytest.raises(KeyError):
        default_call_kwargs("nope")


def test_tokenizers_offline_ids():
    tok = tiny_clip_tokenizer()
    ids = tok("a digit").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id
    assert len(set(ids[1:-1])) > 1 and max(ids) < 1000
    assert tok.unk_token_id not in ids[1:-1]
    t5 = tiny_t5_tokenizer()
    t5_ids = t5("a digit", padding="max_length", max_length=6).input_ids
    assert t5_ids[2:] == [t5.eos_token_id] + [t5.pad_token_id] * 3
    assert t5.unk_token_id not in t5_ids and max(t5_ids) < 32


@pytest.mark.parametrize("name", NAMES)
def test_text_encoder_token_ids_match_tokenizers(name):
    pipe = TINY_PIPELINES[name]()
    for suffix in ("", "_2", "_3"):
        tok = getattr(pipe, "tokenizer" + suffix, None)
        enc = getattr(pipe, "text_encoder" + suffix, None)
        if tok is None:
            continue
        cfg = enc.config
        assert len(tok) <= cfg.vocab_size
        assert tok.eos_token_id == cfg.eos_token_id
        assert tok.pad_token_id == cfg.pad_token_id


@pytest.mark.parametrize("name", NAMES)
def test_runs_finite_shape_and_counts_calls(name):
    pipe = TINY_PIPELINES[name]()
    steps = default_call_kwargs(name)["num_inference_steps"]
    with count_denoiser_calls(pipe) as counter:
        images = _run(pipe, name)
    assert images.shape == EXPECTED_SHAPE[name]
    assert np.isfinite(images).all()
    assert counter.calls == steps
    assert counter.rows == steps * (2 if name in CFG_BATCHED else 1)
    # The hook is removed on exit.
    _run(pipe, name)
    assert counter.calls == steps


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    a = _run(TINY_PIPELINES[name](), name, seed=0)
    b = _run(TINY_PIPELINES[name](), name, seed=0)  # fresh build: weights are seeded too
    np.testing.assert_array_equal(a, b)
    c = _run(TINY_PIPELINES[name](), name, seed=1)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_swapped_scheduler_runs(name):
    default = TINY_PIPELINES[name]()
    scheduler = SWAPS[name](default.scheduler.config)
    pipe = TINY_PIPELINES[name](scheduler=scheduler)
    assert pipe.scheduler is scheduler
    steps = default_call_kwargs(name)["num_inference_steps"]
    with count_denoiser_calls(pipe) as counter:
        images = _run(pipe, name)
    assert images.shape == EXPECTED_SHAPE[name]
    assert np.isfinite(images).all()
    assert counter.calls == steps
    assert not np.array_equal(images, _run(default, name))


def test_flux_true_cfg_is_two_unbatched_calls():
    pipe = TINY_PIPELINES["flux"]()
    steps = default_call_kwargs("flux")["num_inference_steps"]
    with count_denoiser_calls(pipe) as counter:
        images = _run(pipe, "flux", negative_prompt="", true_cfg_scale=2.0)
    assert np.isfinite(images).all()
    assert counter.calls == 2 * steps
    assert counter.rows == 2 * steps


def test_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in NAMES:
        pipe = TINY_PIPELINES[name]()
        images = _run(pipe, name)
        assert np.isfinite(images).all()
