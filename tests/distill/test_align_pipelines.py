"""AWM / DDPO on diffusers pipelines (tiny DDPM, Stable Diffusion 1.x, XL and 3, and Flux, built from configs)."""

import json

import pytest
import torch
from diffusers import (
    DDPMPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from difflab.cli import main
from difflab.distill.aligner import AlignConfig, align_iteration, build_state, pipeline_problem
from difflab.distill.rewards import InkReward
from difflab.distill.rollout import ode_rollout
from difflab.models.tiny import (
    tiny_ddpm_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

PROMPTS = ["a cat", "a dog", "a red square"]
SMALL = ["--num_groups", "2", "--group_size", "2", "--num_inference_steps", "4", "--train_timesteps", "2",
         "--num_validation_samples", "2", "--no_progress"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_pipelines")
    tiny_ddpm_pipeline().save_pretrained(root / "ddpm")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_flux_pipeline(_dynamic_shift()).save_pretrained(root / "flux")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


class RecordingReward:
    """Ink, remembering what each call was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append((tuple(images.shape), prompts))
        return InkReward()(images)


def test_text_rewards_see_decoded_images_and_the_prompts_in_turn():
    reward = RecordingReward()
    problem = pipeline_problem(tiny_sd_pipeline(), reward, PROMPTS, eval_samples=2)
    config = AlignConfig(num_groups=2, group_size=2, num_inference_steps=4, train_timesteps=2)
    state = build_state(problem, config)
    before = [p.detach().clone() for p in state.policy.parameters()]
    for _ in range(2):
        align_iteration(state, problem, config)
    shapes, prompts = zip(*reward.calls)
    assert set(shapes) == {(4, 3, 64, 64)}  # VAE-decoded RGB images, not 32x32 latents
    assert prompts == (["a cat", "a cat", "a dog", "a dog"], ["a red square", "a red square", "a cat", "a cat"])
    assert any((a - b).abs().max() > 0 for a, b in zip(before, state.policy.parameters()))


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_cli_aligns_a_stable_diffusion_pipeline(saved, tmp_path, method):
    main(["align", method, "--model", str(saved / "sd"), "--prompts", str(saved / "prompts.txt"), "--reward", "ink",
          "--output_dir", str(tmp_path), "--max_train_steps", "2", "--validation_steps", "2", *SMALL[:6],
          *(SMALL[6:8] + ["--scheduler", "ghvb"] if method == "awm" else []), *SMALL[8:],
          "--train_batch_size", "3", "--sample_batch_size", "3"])  # memory flags: micro-batches of 3
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and "eval_reward[a cat]" in summary["final"]
    assert (tmp_path / "validation-2.png").is_file()
    aligned = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    base = tiny_sd_pipeline()
    # AWM rolled out with difflab's GHVB and saved the pipeline with it; DDPO keeps the pipeline's own
    assert type(aligned.scheduler).__name__ == ("GHVBScheduler" if method == "awm" else type(base.scheduler).__name__)
    assert max((a - b).abs().max().item() for a, b in zip(aligned.unet.parameters(), base.unet.parameters())) > 0
    assert aligned(PROMPTS[0], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_cli_aligns_an_unconditional_ddpm_pipeline(saved, tmp_path):
    main(["align", "awm", "--model", str(saved / "ddpm"), "--output_dir", str(tmp_path), "--max_train_steps", "2",
          "--validation_steps", "1", *SMALL])
    assert json.loads((tmp_path / "train_summary.json").read_text())["reward"] == "ink"  # the default reward here
    assert isinstance(DDPMPipeline.from_pretrained(tmp_path), DDPMPipeline)


def test_sd3_rollouts_are_the_pipelines_own_samples():
    """The prompt-table transformer, rolled out with the pipeline's scheduler, gives the latents of
    StableDiffusion3Pipeline itself (no guidance) for the same prompt and noise."""
    pipe = tiny_sd3_pipeline()
    problem = pipeline_problem(pipe, InkReward(), PROMPTS[:2])
    assert problem.prediction_type == "flow_prediction" and problem.component == "transformer"
    shape = (1, *problem.sample_shape)
    ours, _ = ode_rollout(problem.net, problem.make_scheduler(), 4, torch.tensor([1]), shape,
                          torch.Generator().manual_seed(0))
    size = problem.sample_shape[1] * pipe.vae_scale_factor
    theirs = pipe(PROMPTS[1], num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="latent",
                  latents=torch.randn(shape, generator=torch.Generator().manual_seed(0))).images
    assert theirs.abs().max() > 1 and (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_cli_aligns_a_stable_diffusion_3_pipeline(saved, tmp_path, method):
    lora = ["--lora_rank", "4", "--learning_rate", "1e-2"] if method == "awm" else []
    main(["align", method, "--model", str(saved / "sd3"), "--prompts", *PROMPTS[:2], "--output_dir", str(tmp_path),
          "--max_train_steps", "2", "--validation_steps", "2", *SMALL[:6], *(SMALL[6:8] if method == "awm" else []),
          *SMALL[8:], *lora])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and "eval_reward[a dog]" in summary["final"]
    aligned = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    base = tiny_sd3_pipeline()
    assert max((a - b).abs().max().item() for a, b in zip(aligned.transformer.parameters(),
                                                           base.transformer.parameters())) > 0
    assert aligned(PROMPTS[0], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_sdxl_rollouts_are_the_pipelines_own_samples():
    """Pooled embeddings and size / crop time ids as StableDiffusionXLPipeline makes them (and its Euler
    scheduler's noise scaling): our rollout gives the pipeline's own latents without guidance."""
    pipe = tiny_sdxl_pipeline()
    problem = pipeline_problem(pipe, InkReward(), PROMPTS[:2])
    shape = (2, *problem.sample_shape)
    ours, _ = ode_rollout(problem.net, problem.make_scheduler(), 4, torch.tensor([0, 1]), shape,
                          torch.Generator().manual_seed(0))
    size = problem.sample_shape[1] * pipe.vae_scale_factor
    theirs = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="latent",
                  latents=torch.randn(shape, generator=torch.Generator().manual_seed(0))).images
    assert theirs.abs().max() > 1 and (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_sd3_pipeline])
def test_guided_prompt_tables_are_the_pipelines_own_guidance(make):
    """The null label is the pipeline's own unconditional input (SDXL: zeros, as it zeroes an empty negative
    prompt), so classifier-free guidance on the prompt tables (a distillation teacher's) gives its latents."""
    from difflab.distill.digits import GuidedDenoiser

    pipe = make()
    problem = pipeline_problem(pipe, InkReward(), PROMPTS[:2])
    guided = GuidedDenoiser(problem.net, 3.0, problem.net.null_label)
    shape = (2, *problem.sample_shape)
    ours, _ = ode_rollout(guided, problem.make_scheduler(), 4, torch.tensor([0, 1]), shape,
                          torch.Generator().manual_seed(0))
    size = problem.sample_shape[1] * pipe.vae_scale_factor
    theirs = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, height=size, width=size, output_type="latent",
                  latents=torch.randn(shape, generator=torch.Generator().manual_seed(0))).images
    assert theirs.abs().max() > 1 and (ours - theirs).abs().max() < 1e-5


def test_sdxl_rollouts_at_another_resolution_are_the_pipelines_own_samples():
    """--resolution for SDXL: latents of that size and the size time ids the pipeline makes for it."""
    pipe = tiny_sdxl_pipeline()
    problem = pipeline_problem(pipe, InkReward(), PROMPTS[:2], resolution=48)
    assert problem.sample_shape == (4, 48 // pipe.vae_scale_factor, 48 // pipe.vae_scale_factor)
    shape = (2, *problem.sample_shape)
    ours, _ = ode_rollout(problem.net, problem.make_scheduler(), 4, torch.tensor([0, 1]), shape,
                          torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, height=48, width=48, output_type="latent",
                  latents=torch.randn(shape, generator=torch.Generator().manual_seed(0))).images
    assert (ours - theirs).abs().max() < 1e-5
    default = pipeline_problem(pipe, InkReward(), PROMPTS[:2])  # the time ids matter: the default ones differ
    other, _ = ode_rollout(default.net, default.make_scheduler(), 4, torch.tensor([0, 1]), shape,
                           torch.Generator().manual_seed(0))
    assert (other - theirs).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiple of"):
        pipeline_problem(pipe, InkReward(), PROMPTS[:2], resolution=47)


def test_cli_aligns_a_stable_diffusion_xl_pipeline(saved, tmp_path):
    main(["align", "awm", "--model", str(saved / "sdxl"), "--prompts", *PROMPTS[:2], "--output_dir", str(tmp_path),
          "--max_train_steps", "2", "--validation_steps", "2", *SMALL])
    assert json.loads((tmp_path / "train_summary.json").read_text())["finished"]
    aligned = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    base = tiny_sdxl_pipeline()
    assert max((a - b).abs().max().item() for a, b in zip(aligned.unet.parameters(), base.unet.parameters())) > 0
    assert aligned(PROMPTS[0], num_inference_steps=2, output_type="np").images.shape[0] == 1


def _dynamic_shift():
    """FLUX.1's scheduler setting: the shift depends on the image's token count (mu)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_flux_rollouts_are_the_pipelines_own_samples(dynamic):
    """Packed latents, /1000 timesteps, position ids and (dynamic) shift as FluxPipeline has them: our rollout
    gives the pipeline's own latents (no guidance) when the pipeline is given the same unshifted sigmas."""
    pipe = tiny_flux_pipeline(_dynamic_shift() if dynamic else None)
    problem = pipeline_problem(pipe, InkReward(), PROMPTS[:2], resolution=48)
    assert problem.sample_shape == (24 * 24, 4) and problem.component == "transformer"
    scheduler = problem.make_scheduler()
    scheduler.set_timesteps(4)
    shift, sigmas = scheduler.config.shift, scheduler.sigmas[:-1].double()
    assert (shift > 1.0) == dynamic  # the dynamic shift at 48 px, as a static one
    shape = (2, *problem.sample_shape)
    ours, _ = ode_rollout(problem.net, problem.make_scheduler(), 4, torch.tensor([0, 1]), shape,
                          torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, height=48, width=48, output_type="latent",
                  latents=torch.randn(shape, generator=torch.Generator().manual_seed(0)),
                  sigmas=(sigmas / (shift - (shift - 1) * sigmas)).tolist()).images  # unshifted: the pipeline shifts
    assert theirs.abs().max() > 1 and (ours - theirs).abs().max() < 1e-5
    assert problem.decode(ours).shape == (2, 3, 48, 48)


@pytest.mark.parametrize("method", ["awm", "ddpo"])
def test_cli_aligns_a_flux_pipeline(saved, tmp_path, method):
    main(["align", method, "--model", str(saved / "flux"), "--prompts", *PROMPTS[:2], "--resolution", "32",
          "--output_dir", str(tmp_path), "--max_train_steps", "2", "--validation_steps", "2", *SMALL[:6],
          *(SMALL[6:8] if method == "awm" else []), *SMALL[8:]])
    assert json.loads((tmp_path / "train_summary.json").read_text())["finished"]
    aligned = FluxPipeline.from_pretrained(tmp_path)
    assert aligned.scheduler.config.use_dynamic_shifting  # the pipeline keeps its own resolution-dependent shift
    base = tiny_flux_pipeline()
    assert max((a - b).abs().max().item() for a, b in zip(aligned.transformer.parameters(),
                                                           base.transformer.parameters())) > 0
    assert aligned(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


def test_pipeline_alignment_errors_are_messages(saved, tmp_path, capsys):
    cases = [(["--model", str(saved / "sd")], "pass the prompts"),
             (["--model", str(saved / "sd"), "--prompts", "a cat", "--reward", "class:3"], "scores 16x16 digits"),
             (["--model", str(saved / "sd"), "--prompts", "a cat", "--label", "3"], "takes --prompts"),
             (["--model", str(saved / "ddpm"), "--prompts", "a cat"], "takes no prompts"),
             (["--model", str(saved / "sd"), "--prompts", str(tmp_path / "none.txt")], "does not exist"),
             (["--model", "digits-flow", "--prompts", "a cat"], "take --label"),
             (["--model", str(saved / "sd"), "--prompts", "a cat", "--resolution", "64"], "applies to SDXL and Flux"),
             (["--model", str(saved / "flux"), "--prompts", "a cat", "--resolution", "1"], "positive multiple of 2")]
    for flags, message in cases:
        with pytest.raises(SystemExit):
            main(["align", "awm", "--output_dir", str(tmp_path / "x"), "--max_train_steps", "1", *flags, *SMALL])
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "x" / "train_summary.json").exists()


def test_two_processes_align_a_stable_diffusion_pipeline(saved, tmp_path, accelerate_launch):
    """Two gloo processes: every process builds the prompt table; the groups of both take the prompts in turn."""
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no"]
    proc = accelerate_launch(launch, [
        "-m", "difflab.distill.align", "awm", "--model", str(saved / "sd"), "--prompts", *PROMPTS,
        "--output_dir", str(tmp_path), "--max_train_steps", "2", "--validation_steps", "2", *SMALL])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and summary["num_processes"] == 2 and summary["samples"] == 2 * 2 * 4
