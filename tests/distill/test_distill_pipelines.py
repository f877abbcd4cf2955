"""One-step distillation of diffusers UNet pipelines (tiny DDPM and Stable Diffusion teachers built from configs)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

from difflab.cli import main
from difflab.distill.nets import OneStepGenerator
from difflab.distill.pipelines import load_image_folder, pipeline_distill_problem
from difflab.models.conditioning import PromptConditionedUNet, default_resolution, encode_prompts, prompt_conditioned
from difflab.models.tiny import (
    tiny_ddpm_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from difflab.schedule import NoiseSchedule

CAPTIONS = ["a red square", "a blue circle", "a cat"]
FLAGS = ["--max_train_steps", "4", "--train_batch_size", "4", "--critic_updates", "1", "--validation_steps", "2",
         "--checkpointing_steps", "2", "--no_progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Saved tiny teachers and two image folders (non-square images; one with captions)."""
    root = tmp_path_factory.mktemp("pipelines")
    tiny_ddpm_pipeline().save_pretrained(root / "ddpm")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    v_scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    tiny_sd_pipeline(v_scheduler).save_pretrained(root / "sd-v")  # as Stable Diffusion 2.x
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
    tiny_flux_pipeline(dynamic).save_pretrained(root / "flux")
    tiny_flux_pipeline(guidance_embeds=True).save_pretrained(root / "flux-dev")
    rng = np.random.default_rng(0)
    for folder in ("plain", "captioned"):
        (root / folder).mkdir()
        for i in range(9):
            Image.fromarray((rng.random((20, 28, 3)) * 255).astype("uint8")).save(root / folder / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "text": CAPTIONS[i % 3]} for i in range(9)]
    (root / "captioned" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _distill(method: str, model: Path, images: Path, out: Path, *extra: str) -> None:
    main(["distill", method, "--model", str(model), "--train_data_dir", str(images), "--output_dir", str(out),
          *FLAGS, *extra])


def test_image_folder_is_resized_cropped_and_captioned(data):
    images, captions = load_image_folder(data / "captioned", 8, 3, caption_column="text")
    assert images.shape == (9, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert captions == [CAPTIONS[i % 3] for i in range(9)]
    gray, none = load_image_folder(data / "plain", 4, 1)
    assert gray.shape == (9, 1, 4, 4) and none is None
    with pytest.raises(ValueError, match="lack 'file_name' or 'caption'"):
        load_image_folder(data / "captioned", 8, 3, caption_column="caption")


def test_text_problem_holds_latents_and_prompt_indices(data):
    problem = pipeline_distill_problem(tiny_sd_pipeline(), data / "captioned")
    assert problem.images.shape == (9, 4, 32, 32)  # VAE latents of the 64x64 images
    assert problem.prompts == sorted(CAPTIONS) and problem.num_classes == 3
    assert [problem.prompts[i] for i in problem.labels.tolist()] == [CAPTIONS[i % 3] for i in range(9)]
    assert problem.teacher_net.prompt_embeds.shape[0] == 4  # the prompts and the empty prompt (null label)


def test_transformer_features_are_the_middle_blocks_mean_image_token(data):
    """The discriminator head of an SD3 / Flux teacher reads the middle block's image tokens, averaged: its
    width is the transformer's, whatever the resolution (a UNet's mid block stays flattened)."""
    for make, resolution in ((tiny_sd3_pipeline, None), (tiny_flux_pipeline, 32)):
        pipe = make()
        problem = pipeline_distill_problem(pipe, data / "captioned", resolution=resolution)
        config = pipe.transformer.config
        assert problem.feature_dim == config.num_attention_heads * config.attention_head_dim


def test_unconditional_ddpm_student_is_a_one_step_ddpm_pipeline(data, tmp_path):
    _distill("f-distill", data / "ddpm", data / "plain", tmp_path)
    for name in ("samples.png", "validation-2.png", "train_summary.json", "model_index.json"):
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / "samples.png").size == (8 * 64, 64)  # one row of 8x8 images, enlarged 8-fold
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and summary["generator_timestep"] < 999  # linear betas: the auto rule's timestep
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=1, output_type="np")
    z = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    student = OneStepGenerator(pipe.unet, schedule, summary["generator_timestep"], prediction_type="epsilon")
    with torch.no_grad():
        expected = (student(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out.images, expected, atol=1e-5)


@pytest.mark.parametrize("model,prediction_type", [("sd", "epsilon"), ("sd-v", "v_prediction")])
def test_text_student_is_a_one_step_stable_diffusion_pipeline(data, tmp_path, model, prediction_type):
    _distill("f-distill", data / model, data / "captioned", tmp_path, "--guidance_scale", "2")
    assert (tmp_path / "samples.txt").read_text().split("\n")[:3] == sorted(CAPTIONS)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    teacher = StableDiffusionPipeline.from_pretrained(data / model, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == prediction_type
    changed = max((a - b).abs().max().item() for a, b in zip(pipe.unet.parameters(), teacher.unet.parameters()))
    assert changed > 0  # the UNet was trained
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    out = pipe(["a cat", "a cat"], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    student = OneStepGenerator(PromptConditionedUNet(pipe.unet, encode_prompts(pipe, ["a cat"])),
                               NoiseSchedule.from_config(pipe.scheduler.config), 999, prediction_type=prediction_type)
    with torch.no_grad():
        expected = student(z, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if model == "sd":  # DisBack starts from the saved student (--init_generator), at its timestep
        _distill("disback", data / model, data / "captioned", tmp_path / "refined", "--init_generator", str(tmp_path),
                 "--num_nodes", "1", "--node_interval", "1", "--backtrack_interval", "1")
        summary = json.loads((tmp_path / "refined" / "train_summary.json").read_text())
        assert summary["finished"] and summary["generator_timestep"] == 999.0


LATENT_PIPELINES = {"sdxl": (StableDiffusionXLPipeline, "unet", 48),  # (class, denoiser, --resolution)
                    "sd3": (StableDiffusion3Pipeline, "transformer", None),
                    "flux": (FluxPipeline, "transformer", 32),
                    "flux-dev": (FluxPipeline, "transformer", 32)}


@pytest.mark.parametrize("model", list(LATENT_PIPELINES))
def test_sdxl_sd3_and_flux_students_are_one_step_pipelines_of_their_class(data, tmp_path, model):
    """The saved student, called by its own pipeline class with one step, gives the generator's x0 of the same
    latents (SDXL: at --resolution, with its size time ids; Flux: packed tokens at --resolution, under its dynamic
    shift; FLUX.1-dev-like: with the embedded guidance 3.5 it was trained at); difflab sample makes the size it
    learned; DisBack refines it (--init_generator)."""
    cls, component, resolution = LATENT_PIPELINES[model]
    extra = [] if resolution is None else ["--resolution", str(resolution)]
    _distill("f-distill", data / model, data / "captioned", tmp_path, "--guidance_scale", "2", *extra)
    pipe, teacher = cls.from_pretrained(tmp_path), cls.from_pretrained(data / model)
    changed = max((a - b).abs().max().item()
                  for a, b in zip(getattr(pipe, component).parameters(), getattr(teacher, component).parameters()))
    assert changed > 0  # the denoiser was trained
    settings = json.loads((tmp_path / "difflab_sampling.json").read_text())
    settings = {key: value for key, value in settings.items() if key not in ("teacher", "method", "divergence")}
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    assert settings == {"num_inference_steps": 1, "guidance_scale": 3.5 if model == "flux-dev" else 1.0, **size}
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    net = prompt_conditioned(pipe, ["a cat"], resolution)
    shape = (2, len(net.image_ids), 4) if model.startswith("flux") else (2, 4, resolution or 32, resolution or 32)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out = pipe(["a cat", "a cat"], latents=z, output_type="latent", **settings).images
    student = OneStepGenerator(net, NoiseSchedule.from_config(pipe.scheduler.config), summary["generator_timestep"],
                               prediction_type=NoiseSchedule.model_prediction_type(dict(pipe.scheduler.config)))
    with torch.no_grad():
        expected = student(z, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    main(["sample", "--model", str(tmp_path), "--prompt", "a cat", "--num-per-class", "2", "--out",
          str(tmp_path / "grid.png")])
    side = resolution or default_resolution(pipe)  # the student's size, from difflab_sampling.json
    assert Image.open(tmp_path / "grid.png").size == (2 * side, side)
    if model == "sd3":
        _distill("disback", data / model, data / "captioned", tmp_path / "refined", "--init_generator", str(tmp_path),
                 "--num_nodes", "1", "--node_interval", "1", "--backtrack_interval", "1")
        assert json.loads((tmp_path / "refined" / "train_summary.json").read_text())["finished"]


def test_text_disback_resumes_to_the_same_weights(data, tmp_path):
    flags = ["--num_nodes", "2", "--node_interval", "2", "--backtrack_interval", "2", "--max_train_steps", "5"]
    _distill("disback", data / "sd", data / "captioned", tmp_path / "a", *flags)
    _distill("disback", data / "sd", data / "captioned", tmp_path / "b", *flags, "--stop_after_steps", "4")
    _distill("disback", data / "sd", data / "captioned", tmp_path / "b", *flags, "--resume_from_checkpoint", "latest")
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_pipeline_problems_explain_what_is_missing(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "f-distill", "--model", str(data / "sd"), "--output_dir", str(tmp_path), *FLAGS])
    assert "--train_data_dir is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _distill("f-distill", data / "sd", data / "plain", tmp_path)
    assert "metadata.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _distill("f-distill", data / "sd", data / "captioned", tmp_path, "--generator_timestep", "500")
    assert "--generator_timestep max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _distill("f-distill", data / "ddpm", data / "plain", tmp_path, "--guidance_scale", "2")
    assert "unconditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _distill("f-distill", data / "sd3", data / "captioned", tmp_path, "--resolution", "32")
    assert "--resolution applies to SDXL and Flux pipelines" in capsys.readouterr().err
    assert not list(tmp_path.glob("checkpoint-*"))


def test_distill_pipeline_bench_end_to_end(tmp_path):
    """bench distill-pipeline: an exact unconditional digits DDPMPipeline, PNGs, the trainer, the page (tiny run)."""
    from difflab.benchmarks.distill_pipeline import main as bench

    out = tmp_path / "page.md"
    bench(["--steps", "2", "--eval-samples", "12", "--teacher-steps", "2", "--workdir", str(tmp_path / "w"),
           "--out", str(out)])
    page = out.read_text()
    assert "--train_data_dir" in page and "| one-step student (js, 0 generator steps)" in page
    assert len(list((tmp_path / "w" / "train").glob("*.png"))) == 1438
    assert DDPMPipeline.from_pretrained(tmp_path / "w" / "student").unet.config.num_class_embeds is None
    assert (tmp_path / "page-samples.png").is_file()
