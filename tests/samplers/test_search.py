"""S^3 search: valid candidates, a search that improves on its seeds, resume from the log, the CLI."""

import json
import random

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.samplers import USFScheduler
from difflab.samplers.search import Candidate, PerformancePredictor, SearchSpace, StepGene, s3_search
from difflab.samplers.search_objectives import (
    _noise_splits,
    build_objective,
    gmm_objective,
    gmm_scheduler_config,
    unet_objective,
)
from difflab.samplers.usf import SolverSchedule
from difflab.schedule import NoiseSchedule


@pytest.mark.parametrize("setting", ["vp-scaled_linear", "flow"])
def test_random_and_mutated_candidates_are_valid_and_run(setting):
    config = gmm_scheduler_config(setting)
    space = SearchSpace(NoiseSchedule.from_config(config), nfe=5)
    rng = random.Random(0)
    x = torch.randn(3, 2, dtype=torch.float64)
    for _ in range(60):
        cand = space.mutate(space.random_candidate(rng), rng)
        decisions = cand.decisions(space)
        schedule = SolverSchedule.from_dict(decisions)
        assert schedule.nfe == 5
        sched = USFScheduler.from_config(config, decisions=decisions)
        sched.set_timesteps(5)
        y = x * sched.init_noise_sigma
        for t in sched.timesteps:
            y = sched.step(0.1 * y, t, y).prev_sample
        assert torch.isfinite(y).all() and sched.nfe == 5
        assert space.encode(cand).shape == (space.feature_size,)


def test_predictor_learns_a_simple_score():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = np.exp(x[:, 0] - 0.5 * x[:, 1])
    predictor = PerformancePredictor(steps=300)
    predictor.fit(x[:150], y[:150])
    pred = predictor.predict(x[150:])
    assert np.corrcoef(pred, np.log(y[150:]))[0, 1] > 0.9


def test_search_beats_its_seed_population_and_resumes_from_its_log(tmp_path):
    objective, schedule = gmm_objective("vp-scaled_linear", dim=4, num_samples=64, heldout_samples=64)
    space = SearchSpace(schedule, nfe=5)
    log = tmp_path / "log.jsonl"
    calls = []

    def counted(decisions, split="search"):
        calls.append(split)
        return objective(decisions, split)

    first = s3_search(counted, space, max_evaluations=40, population=16, seed=0, log_path=log, progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 40 and first.evaluations == 40
    seeds_best = min(r["score"] for r in rows[:12])  # the classic solvers on classic spacings
    assert first.search_score < seeds_best
    assert first.heldout_score is not None and calls.count("heldout") == 1
    calls.clear()
    resumed = s3_search(counted, space, max_evaluations=50, population=16, seed=0, log_path=log, progress=False)
    assert calls.count("search") == 10 and resumed.evaluations == 50  # the 40 logged ones are not re-run
    assert resumed.search_score <= first.search_score
    sched = USFScheduler.from_config(objective.config, decisions=resumed.best)
    assert sched.available_nfes == [5]


def test_evolution_mode_and_bad_mode():
    objective, schedule = gmm_objective("vp-scaled_linear", dim=4, num_samples=32, heldout_samples=32)
    space = SearchSpace(schedule, nfe=4)
    result = s3_search(objective, space, mode="evolution", max_evaluations=20, population=14, progress=False)
    assert result.evaluations == 20 and len(result.history) == 20
    with pytest.raises(ValueError, match="mode must be"):
        s3_search(objective, space, mode="random", max_evaluations=5, progress=False)


def test_gene_repair_enforces_the_rules():
    space = SearchSpace(NoiseSchedule.vp(), nfe=3)
    bad = Candidate([0.9, 0.2, 0.5, 0.7], [StepGene(order=4, corrector=True, corrector_order=4) for _ in range(2)])
    fixed = space.repair(bad)
    assert len(fixed.u) == 2 and fixed.u == sorted(fixed.u)
    assert [g.order for g in fixed.steps] == [1, 2, 1] and not fixed.steps[-1].corrector
    SolverSchedule.from_dict(fixed.decisions(space))


def test_build_objective_errors():
    with pytest.raises(ValueError, match="metric 'rmse' only"):
        build_objective("gmm", "fd", 5)
    with pytest.raises(ValueError, match="unknown mixture setting"):
        build_objective("gmm", "rmse", 5, setting="vp-cosine")


def test_cli_search_writes_a_loadable_schedule(tmp_path, capsys):
    out = tmp_path / "sched.json"
    main(["search", "--model", "gmm", "--dim", "4", "--nfe", "4", "5", "--max-evaluations", "14",
          "--num-samples", "32", "--heldout-samples", "32", "--out", str(out)])
    text = capsys.readouterr().out
    assert "NFE 4:" in text and "NFE 5:" in text and str(out) in text
    sched = USFScheduler(decisions=str(out), beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert sched.available_nfes == [4, 5]
    assert (tmp_path / "sched.nfe4.jsonl").is_file()


def test_cli_search_bad_metric_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--model", "gmm", "--nfe", "4", "--metric", "fd"])
    assert "metric 'rmse' only" in capsys.readouterr().err


def test_text_pipeline_objective_samples_as_the_pipeline_does(tmp_path, capsys):
    """Stable Diffusion: the objective's guided samples equal the pipeline's own latents for the same noise, prompts
    (taken in turn) and scheduler; `difflab search --prompts` writes a schedule the pipeline runs."""
    from diffusers import StableDiffusionPipeline

    from difflab.models.tiny import tiny_sd_pipeline
    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    prompts = ["a cat", "a dog"]
    objective, _ = unet_objective(str(tmp_path / "sd"), num_samples=2, heldout_samples=3, guidance_scale=3.0,
                                  prompts=prompts)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
    ours = objective.sample(USFScheduler.from_config(pipe.scheduler.config, decisions="dpm++2m"), "heldout", 5)
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, decisions="dpm++2m")
    noise = _noise_splits((4, 32, 32), 2, 3, 0, torch.float32)["heldout"]
    theirs = pipe(["a cat", "a dog", "a cat"], num_inference_steps=5, guidance_scale=3.0, latents=noise,
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    out = tmp_path / "sched.json"
    main(["search", "--model", str(tmp_path / "sd"), "--prompts", *prompts, "--nfe", "4", "--max-evaluations", "3",
          "--num-samples", "2", "--heldout-samples", "2", "--out", str(out)])
    assert "NFE 4:" in capsys.readouterr().out
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, decisions=str(out))
    assert pipe("a cat", num_inference_steps=4, output_type="latent").images.shape == (1, 4, 32, 32)
    with pytest.raises(SystemExit):
        main(["search", "--model", str(tmp_path / "sd"), "--nfe", "4", "--out", str(out)])
    assert "pass the prompts" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["sdxl", "sd3", "flux"])
def test_sdxl_sd3_and_flux_objectives_sample_as_their_pipelines_do(tmp_path, model):
    """The prompt tables of difflab.models.conditioning drive the search too: the objective's samples (guided
    for SDXL and SD3; SDXL and Flux at --resolution) equal the pipeline's own latents from the same noise."""
    from difflab.models import load, tiny

    make = {"sdxl": tiny.tiny_sdxl_pipeline, "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}[model]
    make().save_pretrained(tmp_path / model)
    resolution = {"sdxl": 48, "flux": 32}.get(model)
    guidance = 1.0 if model == "flux" else 3.0  # FluxPipeline's guidance_scale is the embedded one
    objective, _ = unet_objective(str(tmp_path / model), num_samples=2, heldout_samples=3, guidance_scale=guidance,
                                  prompts=["a cat", "a dog"], resolution=resolution)
    pipe = load(str(tmp_path / model))
    scheduler = type(pipe.scheduler).from_config(objective.config)
    ours = objective.sample(scheduler, "heldout", 4)
    noise = _noise_splits(tuple(ours.shape[1:]), 2, 3, 0, torch.float32)["heldout"]
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    if model == "flux":  # FluxPipeline passes its own sigmas: give it the objective's (shift 1)
        size["sigmas"] = scheduler.sigmas[:-1].tolist()
    theirs = pipe(["a cat", "a dog", "a cat"], num_inference_steps=4, guidance_scale=guidance, latents=noise,
                  output_type="latent", **size).images
    assert theirs.abs().max() > 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
