"""Our own checks of the diffusers scheduler contract, run for every registered difflab scheduler.

A scheduler added to ``difflab.samplers.SCHEDULERS`` is checked here without new test code:
config round trips, ``from_config`` swaps from diffusers configs, step shapes and dtypes,
``add_noise`` / ``scale_noise``, custom timesteps and sigmas, state reset, error messages, and
runs inside tiny offline StableDiffusion, SDXL, SD3, Flux and DDPM pipelines.
"""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from difflab.models.gmm import GaussianMixture, GMMDenoiser
from difflab.models.tiny import TINY_PIPELINE_KINDS, TINY_PIPELINES, count_denoiser_calls, default_call_kwargs
from difflab.samplers import SCHEDULERS
from difflab.schedule import NoiseSchedule

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DIFFUSERS_SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(clip_sample=False, **SD_BETAS),
    "euler": lambda: EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **SD_BETAS),
    "dpm++": lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction"),
    "unipc": lambda: UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2"),
    "flow-match": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}
ALL = sorted(SCHEDULERS)


def make(name, **cfg):
    return SCHEDULERS[name](**cfg)


def flow(name, **cfg):
    return SCHEDULERS[name].from_config(FlowMatchEulerDiscreteScheduler(**cfg).config)


def gmm_model(scheduler, dim=8, std_range=(0.08, 0.25)):
    ns = NoiseSchedule.from_config(scheduler.config)
    mixture = GaussianMixture.random(dim, 4, seed=3, std_range=std_range)
    return GMMDenoiser(mixture, ns, scheduler.config.prediction_type)


def run_loop(scheduler, model, x, steps=8, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def both_kinds(name):
    return [make(name), flow(name)]


@pytest.mark.parametrize("name", ALL)
def test_public_api(name):
    for s in both_kinds(name):
        assert s.init_noise_sigma == 1.0 and isinstance(s.order, int) and len(s) == 1000
        s.set_timesteps(10)
        x = torch.randn(2, 8)
        assert s.scale_model_input(x, s.timesteps[0]) is x
        assert s.step_index is None and s.begin_index is None
        s.set_begin_index(0)
        assert s.begin_index == 0
        assert len(s.sigmas) == 11 and s.sigmas[-1] == 0 and s.sigmas.device.type == "cpu"


@pytest.mark.parametrize("name", ALL)
def test_save_load_roundtrip(name, tmp_path):
    for i, s in enumerate(both_kinds(name)):
        s.save_pretrained(tmp_path / str(i))
        loaded = type(s).from_pretrained(tmp_path / str(i))
        assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == \
            {k: v for k, v in s.config.items() if k != "_use_default_values"}
        model, x = gmm_model(s), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(run_loop(s, model, x), run_loop(loaded, model, x))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("source", sorted(DIFFUSERS_SCHEDULERS))
def test_from_config_keeps_noise_schedule_and_converts_back(name, source):
    reference = DIFFUSERS_SCHEDULERS[source]()
    cfg = reference.config
    ours = SCHEDULERS[name].from_config(cfg)
    ns_ref, ns = NoiseSchedule.from_config(cfg), ours.noise_schedule
    assert ns.kind == ns_ref.kind
    t = torch.linspace(1, 999, 17, dtype=torch.float64)
    for a, b in zip(ns.alpha_sigma(t), ns_ref.alpha_sigma(t)):
        assert torch.allclose(a, b)
    if ns.kind == "vp":
        assert ours.config.prediction_type == cfg.get("prediction_type", "epsilon")
    else:
        assert ours.config.prediction_type == "flow_prediction"
    back = type(reference).from_config(ours.config)  # and back to the diffusers class
    back.set_timesteps(5)
    assert torch.allclose(NoiseSchedule.from_config(back.config).alpha_sigma(t)[1], ns.alpha_sigma(t)[1])
    model, x = gmm_model(ours), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_loop(ours, model, x)).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_shapes_dtypes_and_tuple_output(name, dtype):
    for s in both_kinds(name):
        s.set_timesteps(6)
        x = torch.randn(3, 4, 5, 5).to(dtype)
        for t in s.timesteps[:3]:
            out = s.step(torch.randn(3, 4, 5, 5).to(dtype), t, x)
            assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
            assert out.pred_original_sample.shape == x.shape and out.pred_original_sample.dtype == dtype
            x = out.prev_sample
        s.set_timesteps(6)
        s2 = type(s).from_config(s.config)
        s2.set_timesteps(6)
        m, x = torch.randn(3, 4, 5, 5).to(dtype), torch.randn(3, 4, 5, 5).to(dtype)
        t = s.timesteps[0]
        as_dict, as_tuple = s.step(m, t, x), s2.step(m, t, x, return_dict=False)
        assert torch.equal(as_dict.prev_sample, as_tuple[0]) and torch.equal(as_dict.pred_original_sample, as_tuple[1])


@pytest.mark.parametrize("name", ALL)
def test_add_noise_and_scale_noise(name):
    vp = make(name, **SD_BETAS)
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    ref = DDIMScheduler(**SD_BETAS).add_noise(x0, noise, t)
    assert torch.allclose(vp.add_noise(x0, noise, t), ref, atol=1e-6)
    fl = flow(name, shift=3.0)
    fm = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(10)
    fl.set_timesteps(10)
    t = fm.timesteps[3:4]
    assert torch.allclose(fl.scale_noise(x0, t, noise), fm.scale_noise(x0, t, noise), atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_custom_timesteps_and_sigmas(name):
    s = make(name, **SD_BETAS)
    s.set_timesteps(timesteps=[999, 700, 400, 100, 10])
    assert s.timesteps.tolist() == [999, 700, 400, 100, 10] and s.num_inference_steps == 5
    euler_sigmas = s.sigmas[:-1].clone()
    s.set_timesteps(sigmas=euler_sigmas.tolist())
    assert s.timesteps.tolist() == [999, 700, 400, 100, 10]
    f = flow(name)
    f.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=None)  # what FluxPipeline passes
    assert torch.allclose(f.timesteps, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="only one"):
        s.set_timesteps(timesteps=[10], sigmas=[1.0])


@pytest.mark.parametrize("name", ALL)
def test_repeated_set_timesteps_resets_state(name):
    for s in both_kinds(name):
        model, x = gmm_model(s), torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        first = run_loop(s, model, x)
        s.set_timesteps(3)
        s.step(torch.randn(16, 8), s.timesteps[0], x)  # leave history behind
        assert torch.equal(run_loop(s, model, x), first)


@pytest.mark.parametrize("name", ALL)
def test_trained_betas_roundtrip(name, tmp_path):
    s = make(name, trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())
    s.save_pretrained(tmp_path)
    loaded = type(s).from_pretrained(tmp_path)
    assert torch.allclose(loaded.betas, s.betas)


@pytest.mark.parametrize("name", ALL)
def test_errors_are_clear(name):
    s = make(name)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    s.set_timesteps(5)
    bad = torch.zeros(1, 2)
    bad[0, 1] = math.nan
    with pytest.raises(FloatingPointError, match="step index 0"):
        s.step(bad, s.timesteps[0], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="epsilon"):
        make(name, prediction_type="noise")
    with pytest.raises(ValueError, match="linspace"):
        make(name, timestep_spacing="sometimes")
    with pytest.raises(ValueError, match="mu"):
        flow(name, use_dynamic_shifting=True).set_timesteps(5)


@pytest.mark.parametrize("name", ALL)
def test_converges_on_gaussian_mixture(name):
    """Every scheduler, given many steps, lands on the exact probability-flow ODE solution."""
    for s in both_kinds(name):
        model = gmm_model(s, dim=4, std_range=(0.3, 0.5))
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        ref = run_loop(s, model, x, steps=800)
        errors = [(run_loop(s, model, x, steps=n) - ref).pow(2).mean().sqrt() for n in (25, 200)]
        assert errors[1] < 5e-3 and errors[1] < errors[0] / 4, errors


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pipeline", sorted(TINY_PIPELINES))
def test_runs_inside_tiny_pipeline(name, pipeline):
    pipe = TINY_PIPELINES[pipeline]()
    original = pipe.scheduler
    pipe.scheduler = SCHEDULERS[name].from_config(original.config)
    assert pipe.scheduler.noise_schedule.kind == TINY_PIPELINE_KINDS[pipeline]
    kwargs = default_call_kwargs(pipeline)
    kwargs["num_inference_steps"] = 3
    with count_denoiser_calls(pipe) as counter:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    images = np.asarray(out.images)
    assert np.isfinite(images).all()
    assert counter.calls == pipe.scheduler.nfe == 3 * pipe.scheduler.order
    assert pipe.scheduler.step_index == 3


RELOAD_SAVED_PIPELINES = textwrap.dedent("""
    import sys
    import difflab  # the only difflab import before loading: it must make the saved schedulers loadable
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    root = sys.argv[1]
    for name in sys.argv[2:]:
        for loader in (DiffusionPipeline, StableDiffusionPipeline):
            pipe = loader.from_pretrained(f"{root}/{name}", safety_checker=None, requires_safety_checker=False)
            print(name, type(pipe.scheduler).__name__, pipe.scheduler.config.prediction_type)
""")


def test_pipelines_saved_with_a_difflab_scheduler_load_back(tmp_path):
    """diffusers' loader finds a difflab scheduler named in model_index.json once `import difflab` ran."""
    pipe = TINY_PIPELINES["sd"]()
    for name in ALL:
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config, prediction_type="v_prediction")
        pipe.save_pretrained(tmp_path / name)
    proc = subprocess.run([sys.executable, "-c", RELOAD_SAVED_PIPELINES, str(tmp_path), *ALL], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [f"{name} {SCHEDULERS[name].__name__} v_prediction" for name in ALL for _ in range(2)]
    assert proc.stdout.splitlines() == expected
