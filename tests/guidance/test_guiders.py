"""CFG and APG: paper formulas on exact tensors, and attach() inside unmodified pipelines."""

import math

import numpy as np
import pytest
import torch

from difflab.guidance import APG, CFG, attach, detach
from difflab.models.tiny import TINY_PIPELINES, default_call_kwargs
from difflab.schedule import NoiseSchedule

NS = NoiseSchedule.vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_apg_matches_the_paper_algorithm_step_by_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0, 500.0, 500.0], dtype=torch.float64)
    alpha, sigma = (v[:, None, None, None] for v in NS.alpha_sigma(t))
    apg = APG(guidance_scale=5.0, momentum=-0.5, norm_threshold=2.0, eta=0.3)
    running = torch.zeros_like(x)
    for _ in range(3):
        eps_c, eps_u = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)
        out = apg(eps_c, eps_u, x, t, NS, "epsilon")
        d_c, d_u = (x - sigma * eps_c) / alpha, (x - sigma * eps_u) / alpha   # denoiser space
        running = (d_c - d_u) + (-0.5) * running
        diff = running * torch.clamp(2.0 / running.flatten(1).norm(dim=1), max=1.0)[:, None, None, None]
        par = (diff * d_c).sum((1, 2, 3), keepdim=True) / (d_c * d_c).sum((1, 2, 3), keepdim=True) * d_c
        d = d_c + 4.0 * (diff - par + 0.3 * par)
        assert torch.allclose(out, (x - alpha * d) / sigma, atol=1e-10)


def test_apg_without_momentum_clip_and_projection_is_cfg():
    x, c, u = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    t = torch.tensor([300.0, 300.0], dtype=torch.float64)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        apg = APG(guidance_scale=6.0, momentum=0.0, norm_threshold=math.inf, eta=1.0)
        assert torch.allclose(apg(c, u, x, t, NS, prediction_type), CFG(6.0)(c, u, x, t, NS, prediction_type), atol=1e-10)


def test_apg_state_resets_and_reindexes():
    apg = APG(momentum=-0.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.full((4,), 400.0, dtype=torch.float64)
    apg(x + 1, x, x, t, NS, "epsilon")
    before = apg.running.clone()
    perm = torch.tensor([2, 0, 3, 1])
    apg.reindex(perm)
    assert torch.equal(apg.running, before[perm])
    apg.reset()
    assert apg.running is None
    with pytest.raises(ValueError, match="reverse momentum"):
        APG(momentum=0.5)


def test_cfg_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    c, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided = u + 7.0 * (c - u)
    ours = CFG(7.0, guidance_rescale=0.7)(c, u, torch.zeros_like(c), torch.tensor([10.0]), NS, "epsilon")
    assert torch.allclose(ours, rescale_noise_cfg(guided, c, guidance_rescale=0.7), atol=1e-6)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_attach_cfg_reproduces_the_pipeline_cfg(name):
    pipe = TINY_PIPELINES[name]()
    kwargs = {**default_call_kwargs(name), "guidance_scale": 4.0}
    expected = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    attach(pipe, CFG(4.0))
    got = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(got - expected).max() < 1e-5
    attach(pipe, CFG(9.0))  # the guider's scale is used, whatever the pipeline's own scale
    other = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(other - expected).max() > 1e-4
    detach(pipe)
    assert np.abs(np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images) - expected).max() < 1e-6


def test_attach_apg_runs_in_a_flow_pipeline():
    pipe = TINY_PIPELINES["sd3"]()
    attach(pipe, APG(guidance_scale=8.0, norm_threshold=1.0))
    images = np.asarray(pipe(**{**default_call_kwargs("sd3"), "guidance_scale": 8.0}, generator=torch.Generator().manual_seed(0)).images)
    assert np.isfinite(images).all()


class RowCounter:
    """Counts the batch rows the network really computes (a hook on its first layer)."""

    def __init__(self, module):
        self.rows = 0
        first = next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        self.handle = first.register_forward_hook(lambda mod, inp, out: setattr(self, "rows", self.rows + inp[0].shape[0]))


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_adaptive_guidance_skips_network_rows(name):
    from difflab.guidance import AdaptiveGuidance

    pipe = TINY_PIPELINES[name]()
    kwargs = {**default_call_kwargs(name), "guidance_scale": 4.0, "num_inference_steps": 4}
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    counter = RowCounter(denoiser)
    expected = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    cfg_rows, counter.rows = counter.rows, 0
    never = AdaptiveGuidance(4.0, threshold=1.0)
    never.threshold = math.inf  # never switches (a float32 cosine can round to exactly 1.0): plain CFG, same rows
    attach(pipe, never)
    same = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(same - expected).max() < 1e-5 and counter.rows == cfg_rows
    counter.rows = 0
    attach(pipe, AdaptiveGuidance(4.0, threshold=-1.0))  # switches after the first step
    np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    assert counter.rows == cfg_rows // 2 + cfg_rows // 8  # 2 rows at step 1, then 1 row per step


def test_adaptive_guidance_switch_is_per_sample_and_one_way():
    from difflab.guidance import AdaptiveGuidance

    ag = AdaptiveGuidance(3.0, threshold=0.9)
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    u = torch.tensor([[1.0, 0.05], [0.0, 1.0]])  # sample 0 aligned, sample 1 orthogonal
    x, t = torch.zeros(2, 2), torch.tensor([500.0, 500.0])
    out = ag(c, u, x, t, NS, "epsilon")
    assert torch.allclose(out, u + 3.0 * (c - u))  # both guided at the step where the decision is made
    assert ag.uncond_rows_needed(2).tolist() == [False, True]
    out = ag(c, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), x, t, NS, "epsilon")  # no longer aligned: stays switched
    assert torch.equal(out[0], c[0]) and ag.uncond_rows_needed(2).tolist() == [False, True]


def test_attach_on_digits_pipeline():
    from difflab.guidance import AdaptiveGuidance
    from difflab.models import load

    pipe = load("digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 7], num_images_per_label=2, guidance_scale=3.0, num_inference_steps=4, output_type="latent")
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    attach(pipe, CFG(3.0))
    assert (pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images - expected).abs().max() < 1e-5
    counter = RowCounter(pipe.unet)
    attach(pipe, AdaptiveGuidance(3.0, threshold=-1.0))
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert counter.rows == 4 * 2 + 4 * 3  # 8 rows at step 1 (cond + uncond), then 4 conditional rows per step
    detach(pipe)


def test_linear_ag_fits_saves_skips_rows_and_refuses_other_combinations(tmp_path):
    from difflab.guidance import LinearAG, LinearAGFit, fit_linear_ag
    from difflab.models import load
    from difflab.samplers import get_scheduler

    pipe = load("digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = get_scheduler("dpm++2m", pipe.scheduler.config)
    fit = fit_linear_ag(pipe, dict(class_labels=list(range(10)), num_images_per_label=2, output_type="latent",
                                   generator=torch.Generator().manual_seed(1)), num_inference_steps=10, guidance_scale=3.0)
    assert fit.uncond_steps == [0, 1] and fit.cond_only_from == 5 and sorted(fit.coefficients) == [2, 3, 4]
    assert max(fit.residual.values()) < 0.05  # the surrogate explains the unconditional prediction well
    path = fit.save(tmp_path / "linear_ag.json")
    guider = LinearAG(path)
    assert LinearAGFit.load(path) == fit
    counter = RowCounter(pipe.unet)
    attach(pipe, guider)
    kwargs = dict(class_labels=[3, 8], num_images_per_label=2, guidance_scale=3.0, output_type="latent")
    out = pipe(**kwargs, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    assert counter.rows == 4 * 10 + 4 * 2  # conditional rows every step, unconditional only at steps 0 and 1
    with pytest.raises(ValueError, match="another combination.*steps"):
        pipe(**kwargs, num_inference_steps=12)
    pipe.scheduler = get_scheduler("unipc", pipe.scheduler.config)
    with pytest.raises(ValueError, match="another combination.*scheduler"):
        pipe(**kwargs, num_inference_steps=10)
    detach(pipe)
