"""difflab guiders in a tiny modular SDXL pipeline (diffusers' BaseGuidance interface)."""

from __future__ import annotations

import pytest
import torch

from difflab.guidance import APG, CFG, AdaptiveGuidance, as_modular_guider, attach, detach
from difflab.models.tiny import count_denoiser_calls, tiny_sdxl_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipes():
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    classic = tiny_sdxl_pipeline()
    classic.set_progress_bar_config(disable=True)
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in classic.components.items() if v is not None})
    modular.set_progress_bar_config(disable=True)
    return classic, modular


def run_modular(modular, guider) -> torch.Tensor:
    modular.update_components(guider=as_modular_guider(guider, modular))
    return modular(prompt="a cat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                   output="latents")


def run_classic(classic, guider=None, scale: float = 5.0) -> torch.Tensor:
    if guider is not None:
        attach(classic, guider)
    try:
        return classic(prompt="a cat", num_inference_steps=STEPS, guidance_scale=scale,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    finally:
        detach(classic)


def test_modular_cfg_equals_the_classic_pipeline(pipes):
    classic, modular = pipes
    ours, reference = run_modular(modular, CFG(5.0)), run_classic(classic)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_modular_apg_equals_apg_attached_to_the_classic_pipeline(pipes):
    classic, modular = pipes
    ours = run_modular(modular, APG(guidance_scale=5.0))
    reference = run_classic(classic, APG(guidance_scale=5.0))
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (ours - run_classic(classic)).abs().max() > 1e-3  # and APG is not CFG


def test_modular_adaptive_guidance_skips_the_unconditional_call(pipes):
    classic, modular = pipes
    with count_denoiser_calls(modular) as cfg_calls:
        run_modular(modular, CFG(5.0))
    guider = AdaptiveGuidance(guidance_scale=5.0, threshold=-1.0)  # every sample switches after step 0
    with count_denoiser_calls(modular) as ag_calls:
        ours = run_modular(modular, guider)
    assert cfg_calls.calls == 2 * STEPS and ag_calls.calls < cfg_calls.calls
    reference = run_classic(classic, AdaptiveGuidance(guidance_scale=5.0, threshold=-1.0))
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_modular_adapter_refuses_non_difflab_guiders(pipes):
    with pytest.raises(TypeError, match="difflab Guider"):
        as_modular_guider("cfg", pipes[1])
