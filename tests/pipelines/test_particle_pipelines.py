"""FKCPipeline and SuperDiffPipeline on the built-in digits model and tiny Stable Diffusion."""

import pytest
import torch

from difflab.models import load
from difflab.models.tiny import count_denoiser_calls, tiny_sd_pipeline
from difflab.pipelines import FKCPipeline, SuperDiffPipeline


@pytest.fixture(scope="module")
def digits():
    pipe = load("digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fkc_cfg_on_digits_one_image_per_group_and_batched_calls(digits):
    fkc = _quiet(FKCPipeline.from_pipe(digits))
    with count_denoiser_calls(fkc) as counter:
        out = fkc(class_labels=[3, 7], target="cfg", guidance_scale=3.0, num_particles=4, num_inference_steps=8,
                  generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 1, 16, 16)
    assert counter.calls == 8 and counter.rows == 8 * 2 * 2 * 4  # one call per step: 2 terms x 2 groups x 4 particles
    assert out.log_weights.shape == (8,) and len(out.history) == 8
    assert digits.scheduler.config.get("eta", None) is None  # the pipeline's own scheduler is untouched


def test_fkc_product_and_anneal_on_digits(digits):
    fkc = _quiet(FKCPipeline.from_pipe(digits))
    both = fkc(class_labels=[(3, 8)], target="product", num_particles=3, num_inference_steps=5,
               return_all_particles=True, generator=torch.Generator().manual_seed(0), output_type="np")
    assert both.images.shape == (3, 16, 16, 1)
    sharp = fkc(class_labels=[1], target="anneal", beta=2.0, num_particles=2, num_inference_steps=5, output_type="pil")
    assert len(sharp.images) == 1
    with pytest.raises(ValueError, match="product"):
        fkc(class_labels=[3], target="product", num_inference_steps=2)
    with pytest.raises(ValueError, match="class labels"):
        fkc(class_labels=["three"], num_inference_steps=2)


def test_superdiff_and_of_two_digit_classes(digits):
    sd = _quiet(SuperDiffPipeline.from_pipe(digits))
    out = sd(conditions=[3, 8], mode="and", num_images=3, num_inference_steps=10,
             generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (3, 1, 16, 16) and torch.isfinite(out.log_weights).all()
    with pytest.raises(ValueError, match="at least two"):
        sd(conditions=[3], num_inference_steps=2)


def test_fkc_and_superdiff_on_tiny_stable_diffusion():
    pipe = _quiet(tiny_sd_pipeline())
    fkc = _quiet(FKCPipeline.from_pipe(pipe))
    out = fkc(prompt=["a cat", "a dog"], guidance_scale=2.0, num_particles=2, num_inference_steps=4,
              generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 64, 64, 3)
    sd = _quiet(SuperDiffPipeline.from_pipe(pipe, tiny_sd_pipeline()))
    anded = sd(conditions=["a cat", "a hat"], mode="and", guidance_scale=3.0, num_images=2, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="pil")
    assert len(anded.images) == 2
    ored = sd(conditions=["a cat"], combine_models=True, mode="or", num_images=2, num_inference_steps=4,
              output_type="pt")
    assert ored.images.shape == (2, 3, 64, 64)


def test_fkc_and_superdiff_on_tiny_sdxl_pass_pooled_embeddings_and_time_ids():
    from difflab.models.tiny import tiny_sdxl_pipeline

    pipe = _quiet(tiny_sdxl_pipeline())
    fkc = _quiet(FKCPipeline.from_pipe(pipe))
    with count_denoiser_calls(fkc) as counter:
        out = fkc(prompt="a cat", guidance_scale=2.0, num_particles=2, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and counter.calls == 3
    sd = _quiet(SuperDiffPipeline.from_pipe(pipe))
    assert len(sd(conditions=["a cat", "a hat"], num_images=1, num_inference_steps=3, output_type="pil").images) == 1


def test_from_pipe_refuses_what_it_cannot_serve():
    from difflab.models.tiny import tiny_sd3_pipeline

    with pytest.raises(ValueError, match="UNet"):
        FKCPipeline.from_pipe(tiny_sd3_pipeline())
    sd = _quiet(SuperDiffPipeline.from_pipe(tiny_sd_pipeline()))
    with pytest.raises(ValueError, match="second model"):
        sd(conditions=["a"], combine_models=True, num_inference_steps=2)
