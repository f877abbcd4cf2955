"""Particle pipelines: ``FKCPipeline`` (Feynman-Kac correctors) and ``SuperDiffPipeline`` (SuperDiff).

Both are built from an existing pipeline's components with ``from_pipe(pipe)``: a
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (prompts; VAE decoding) or difflab's
``DigitsPipeline`` (class labels).
They compose :mod:`difflab.samplers.fkc` / :mod:`difflab.samplers.superdiff` with a stochastic
difflab scheduler made from the pipeline's scheduler config (``EulerDDIMScheduler``, eta > 0); the
pipeline's own scheduler is left untouched. Every step makes one batched network call on all
terms of all particles.

A *condition* is a prompt (str) or a class label (int); the unconditional one is ``""`` or the
null class. ``FKCPipeline`` groups: one group of ``num_particles`` particles per entry of
``prompt`` / ``class_labels``; particles resample only within their group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.digits import NULL_CLASS, _postprocess
from ..samplers import EulerDDIMScheduler, FKCTarget, ParticleSystem, ResamplingPolicy, fkc_sample, superdiff_sample

Condition = str | int
FKC_TARGETS = ("cfg", "product", "anneal")


@dataclass
class ParticlePipelineOutput(BaseOutput):
    """Images (one per group, or all particles), final log-weights / log-densities, per-step ESS history."""

    images: Any
    log_weights: torch.Tensor | None = None
    history: list = field(default_factory=list)


class _ParticlePipeline(DiffusionPipeline):
    """Shared machinery: component handling, condition encoding, batched predictions, decoding."""

    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet_2"]
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->unet_2->vae"

    def __init__(self, unet: torch.nn.Module, scheduler: Any, vae: Any = None, text_encoder: Any = None,
                 tokenizer: Any = None, text_encoder_2: Any = None, tokenizer_2: Any = None,
                 unet_2: torch.nn.Module | None = None, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet_2=unet_2)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        if vae is not None:
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, second_model: DiffusionPipeline | torch.nn.Module | None = None,
                  **kwargs: Any) -> _ParticlePipeline:
        """Reuse the components of a StableDiffusion(XL)Pipeline or DigitsPipeline (no copies).

        ``second_model`` (a pipeline or a UNet with the same latent space and noise schedule) adds
        a second denoiser, e.g. for SuperDiff OR of two models.
        """
        components = getattr(pipeline, "components", {})
        if "unet" not in components or "scheduler" not in components or "text_encoder_3" in components:
            raise ValueError(f"{cls.__name__}.from_pipe needs a pipeline with a UNet (`unet`) and a `scheduler`: "
                             f"StableDiffusion, SDXL or DigitsPipeline components; got {type(pipeline).__name__}.")
        unet_2 = getattr(second_model, "unet", second_model)
        names = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        parts = {k: components.get(k) for k in names}
        kwargs.setdefault("force_zeros_for_empty_prompt",
                          bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", True)))
        return cls(**parts, unet_2=unet_2, **kwargs)

    # ------------------------------------------------------------------ conditions
    @property
    def uses_text(self) -> bool:
        return self.text_encoder is not None or self.text_encoder_2 is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def null_condition(self) -> Condition:
        return "" if self.uses_text else NULL_CLASS

    def _check_conditions(self, conditions: Sequence[Condition]) -> None:
        kind = str if self.uses_text else int
        bad = [c for c in conditions if not isinstance(c, kind) or isinstance(c, bool)]
        if bad:
            what = "prompts (str)" if self.uses_text else f"class labels (int 0..{NULL_CLASS})"
            raise ValueError(f"this pipeline's conditions are {what}; got {bad!r}.")

    @torch.no_grad()
    def _encode(self, conditions: Sequence[Condition], repeats: int) -> dict[str, torch.Tensor]:
        """Per-row conditioning tensors (each repeated ``repeats`` times): class labels, text embeddings,
        and for SDXL the pooled embedding and the size / crop time ids."""
        self._check_conditions(conditions)
        device = self._execution_device
        if not self.uses_text:
            return {"class_labels": torch.tensor(list(conditions), dtype=torch.long, device=device).repeat_interleave(repeats)}
        if not self.is_sdxl:
            cond = {"encoder_hidden_states": self._text_states(self.tokenizer, self.text_encoder, conditions)[0]}
        else:
            first, _ = self._text_states(self.tokenizer, self.text_encoder, conditions, penultimate=True)
            second, pooled = self._text_states(self.tokenizer_2, self.text_encoder_2, conditions, penultimate=True)
            states = torch.cat([first, second], dim=-1)
            if self.config.force_zeros_for_empty_prompt:  # SDXL's unconditional embedding for an empty prompt
                empty = torch.tensor([c == "" for c in conditions], device=device)
                states = torch.where(empty[:, None, None], torch.zeros_like(states), states)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            height, width = self._pixel_size  # set by _latent_shape
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=device)
            cond = {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids.expand(len(conditions), 6)}
        return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}

    def _text_states(self, tokenizer: Any, encoder: Any, prompts: Sequence[str], penultimate: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states, pooled projection or None) of prompts, as the SD / SDXL pipelines encode them."""
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        out = encoder(tokens.input_ids.to(self._execution_device), output_hidden_states=penultimate)
        if not penultimate:
            return out[0], None
        return out.hidden_states[-2], out[0]

    def _denoise(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "class_labels" in cond:
            return unet(x, t, class_labels=cond["class_labels"]).sample
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None).sample

    def _predictor(self, terms: Sequence[tuple[torch.nn.Module, torch.Tensor]]):
        """``predict(x, t) -> (M, B, ...)``: one batched call per distinct network over all its terms."""

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outputs: list[torch.Tensor | None] = [None] * len(terms)
            for net in {id(n): n for n, _ in terms}.values():
                idx = [i for i, (n, _) in enumerate(terms) if n is net]
                cond = {k: torch.cat([terms[i][1][k] for i in idx]) for k in terms[idx[0]][1]}
                model_in = x.to(net.dtype)
                out = self._denoise(net, torch.cat([model_in] * len(idx)), t, cond).to(x.dtype)
                for i, chunk in zip(idx, out.chunk(len(idx))):
                    outputs[i] = chunk
            return torch.stack(outputs)

        return predict

    # ------------------------------------------------------------------ sampling helpers
    def _latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, ...]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        if self.vae is None:
            return (batch, cfg.in_channels, size, size)
        h = (height or size * self.vae_scale_factor) // self.vae_scale_factor
        w = (width or size * self.vae_scale_factor) // self.vae_scale_factor
        self._pixel_size = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        return (batch, cfg.in_channels, h, w)

    def _stochastic_scheduler(self, steps: int, eta: float, final_sigmas_type: str = "zero") -> EulerDDIMScheduler:
        scheduler = EulerDDIMScheduler.from_config(self.scheduler.config, eta=eta, final_sigmas_type=final_sigmas_type)
        scheduler.set_timesteps(steps, device=self._execution_device)
        return scheduler

    def _start(self, shape: tuple[int, ...], generator: Any, latents: torch.Tensor | None, scale: float) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}.")
        return latents.to(self._execution_device, self.unet.dtype) * scale

    def _decode(self, x: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return x
        if self.vae is None:
            return _postprocess(x, output_type)
        image = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    def _output(self, samples: torch.Tensor, output_type: str, return_dict: bool, log_weights: torch.Tensor,
                history: list | None = None) -> ParticlePipelineOutput | tuple:
        images = self._decode(samples, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ParticlePipelineOutput(images=images, log_weights=log_weights, history=list(history or []))

    @staticmethod
    def _as_list(value: Any) -> list:
        if value is None:
            return []
        if isinstance(value, (str, int)) or torch.is_tensor(value) and value.ndim == 0:
            return [value.item() if torch.is_tensor(value) else value]
        return [v.item() if torch.is_tensor(v) else v for v in value]


class FKCPipeline(_ParticlePipeline):
    """Sample ``prod_i q_i^beta_i`` targets with weighted, resampled particles (FKC).

    ``target``:
      * ``"cfg"``: p(x)^(1-w) p(x | c)^w for each condition c (``guidance_scale`` = w);
      * ``"product"``: p(x | c_1) p(x | c_2) ... of the conditions in each group (a group is a tuple);
      * ``"anneal"``: p(x | c)^beta (``beta``).

    Example::

        fkc = FKCPipeline.from_pipe(load("digits-ddpm"))
        out = fkc(class_labels=[3], target="cfg", guidance_scale=3.0, num_particles=16)
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str | Sequence[str]] | None = None,
        class_labels: int | Sequence[int | Sequence[int]] | torch.Tensor | None = None,
        target: str = "cfg",
        guidance_scale: float = 3.0,
        beta: float = 2.0,
        num_particles: int = 8,
        resample: str | bool | ResamplingPolicy | None = "systematic",
        ess_threshold: float | None = None,
        num_inference_steps: int = 100,
        eta: float = 1.0,
        center_increments: bool = False,
        clamp_increments: float | None = None,
        return_all_particles: bool = False,
        select: str = "sample",
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ParticlePipelineOutput | tuple:
        """Run FKC; returns one image per group (picked by weight) or all particles.

        Sampling ends at the smallest trained noise level: a last jump to the clean point with the
        combined prediction (beta times the score for annealing) would shrink the result.
        ``eta = 1`` (ancestral) is the default: with less noise, copies made by resampling stay
        together and the particle cloud shrinks (docs/benchmarks/composition.md).
        ``center_increments`` / ``clamp_increments`` tame weight degeneracy and bias the target.
        """
        groups = self._groups(prompt, class_labels, target)
        fkc_target = self._target(target, guidance_scale, beta, len(groups[0]))
        K = int(num_particles)
        if K < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}.")
        term_conditions = [[self.null_condition] * len(groups), [g[0] for g in groups]] if target == "cfg" else \
            [[g[i] for g in groups] for i in range(len(groups[0]))]
        shape = self._latent_shape(len(groups) * K, height, width)
        terms = [(self.unet, self._encode(conds, K)) for conds in term_conditions]
        scheduler = self._stochastic_scheduler(num_inference_steps, eta, final_sigmas_type="sigma_min")
        policy = ResamplingPolicy.from_arg(resample, ess_threshold)
        particles = ParticleSystem(len(groups), K, policy, generator=generator)
        x = self._start(shape, generator, latents, fkc_target.init_noise_scale)
        result = fkc_sample(self._predictor(terms), scheduler, x, fkc_target, particles, generator=generator,
                            center_increments=center_increments, clamp_increments=clamp_increments,
                            progress=self.progress_bar)
        samples = result.samples if return_all_particles else particles.select(result.samples, select)
        return self._output(samples, output_type, return_dict, result.log_weights, result.history)

    def _groups(self, prompt: Any, class_labels: Any, target: str) -> list[tuple[Condition, ...]]:
        if target not in FKC_TARGETS:
            raise ValueError(f"target {target!r} is unknown; use one of {FKC_TARGETS}.")
        given = prompt if self.uses_text else class_labels
        if given is None:
            raise ValueError(f"pass {'prompt' if self.uses_text else 'class_labels'}: one condition per group "
                             "(a tuple of conditions per group for target='product').")
        if target == "product" and isinstance(given, (tuple, list)) and given and not isinstance(given[0], (tuple, list)):
            given = [tuple(given)]  # product of the listed conditions: one group
        groups = [tuple(self._as_list(g)) for g in (given if isinstance(given, (list, tuple)) else [given])] \
            if not torch.is_tensor(given) else [(int(v),) for v in given.reshape(-1)]
        sizes = {len(g) for g in groups}
        if target == "product" and (len(sizes) != 1 or min(sizes) < 2):
            raise ValueError("target='product' needs groups of the same number (>= 2) of conditions, e.g. [(3, 8)].")
        if target != "product" and sizes != {1}:
            raise ValueError(f"target={target!r} takes one condition per group, got groups {groups}.")
        for g in groups:
            self._check_conditions(g)
        return groups

    @staticmethod
    def _target(target: str, guidance_scale: float, beta: float, terms: int) -> FKCTarget:
        if target == "cfg":
            return FKCTarget.cfg(guidance_scale)
        if target == "product":
            return FKCTarget.product(terms)
        return FKCTarget.anneal(beta)


class SuperDiffPipeline(_ParticlePipeline):
    """Superpose prompts / class labels (and / or two models) with SuperDiff OR or AND.

    ``conditions``: two or more prompts (text) or class labels (digits) for one superposition;
    ``models="second"`` combines ``unet`` and ``unet_2`` on the same condition instead (OR of two
    models). With ``guidance_scale > 1`` the unconditional prediction guides the combination
    (``eps_u + w (sum kappa_i eps_i - eps_u)``). ``num_images`` samples of the same superposition.
    """

    @torch.no_grad()
    def __call__(
        self,
        conditions: Sequence[Condition] | None = None,
        mode: str = "and",
        num_images: int = 4,
        guidance_scale: float = 1.0,
        combine_models: bool = False,
        temperature: float = 1.0,
        prior_weights: Sequence[float] | None = None,
        lift: float = 0.0,
        estimator: str = "kernel",
        num_inference_steps: int = 200,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ParticlePipelineOutput | tuple:
        """Run SuperDiff with the ancestral sampler ending at the smallest noise level (every step balanced)."""
        conditions = self._as_list(conditions)
        shape = self._latent_shape(num_images, height, width)
        if combine_models:
            if self.unet_2 is None:
                raise ValueError("combine_models=True needs a second model: SuperDiffPipeline.from_pipe(pipe, other_pipe).")
            if len(conditions) != 1:
                raise ValueError("combine_models=True superposes the two models on ONE condition; pass one prompt / label.")
            terms = [(self.unet, self._encode(conditions, num_images)), (self.unet_2, self._encode(conditions, num_images))]
        else:
            if len(conditions) < 2:
                raise ValueError("SuperDiff needs at least two prompts / class labels (or combine_models=True).")
            terms = [(self.unet, self._encode([c], num_images)) for c in conditions]
        n = len(terms)
        if guidance_scale > 1:
            terms.append((self.unet, self._encode([self.null_condition], num_images)))
        scheduler = self._stochastic_scheduler(num_inference_steps, 1.0, final_sigmas_type="sigma_min")
        x = self._start(shape, generator, latents, 1.0)
        result = superdiff_sample(self._predictor(terms), scheduler, x, mode, n, guidance_scale=guidance_scale,
                                  has_uncond=guidance_scale > 1, temperature=temperature, prior_weights=prior_weights,
                                  lift=lift, estimator=estimator, generator=generator, progress=self.progress_bar)
        return self._output(result.samples, output_type, return_dict, result.log_densities)


__all__ = ["FKCPipeline", "ParticlePipelineOutput", "SuperDiffPipeline"]
