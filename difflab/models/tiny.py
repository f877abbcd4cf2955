"""Tiny random-weight diffusers pipelines built purely from configs.

Everything here is constructed in-process: no Hugging Face Hub access, no
downloads, no files on disk.  The model configs mirror the ones diffusers uses
in its own fast tests, so a full ``pipe(prompt=...)`` call takes well under a
second on CPU.  They exist so that tests can check that schedulers actually run
inside real diffusers pipelines (timestep handling, ``scale_model_input``,
classifier-free guidance batching, flow-matching ``sigmas``/``mu`` plumbing).

Conventions
-----------
* Every module is built right after ``torch.manual_seed(0)``, so two calls of
  the same builder give bit-identical weights.
* CLIP tokenizers use a 514-entry byte-level vocab (no merges): ids 0..255 are
  the byte-level characters, 256..511 their ``</w>`` (end-of-word) forms,
  ``<|startoftext|>`` is 512 and ``<|endoftext|>`` (eos and pad) is 513.  The
  CLIP text configs use the same ids, so the pooled output is taken at the real
  eos position.
* T5 tokenizers are a tiny whitespace word-level vocab (< 32 ids) with
  ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, matching ``T5Config`` defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

__all__ = [
    "TINY_PIPELINES",
    "TINY_PIPELINE_KINDS",
    "DenoiserCallCounter",
    "count_denoiser_calls",
    "default_call_kwargs",
    "tiny_clip_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_tokenizer",
]

# ---------------------------------------------------------------------------
# Offline tokenizers
# ---------------------------------------------------------------------------

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_BOS_ID = 512
CLIP_EOS_ID = 513  # also the pad id, as in real CLIP
CLIP_VOCAB_SIZE = 1000  # embedding table size in the tiny text encoders

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2
T5_VOCAB_SIZE = 32

_T5_WORDS = (
    "a an the of and in on with photo picture digit cat dog red blue green small large "
    "zero one two three four five image painting"
).split()


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE maps bytes to.

    Printable Latin-1 bytes map to themselves; every other byte ``b`` is mapped,
    in increasing order, to ``chr(256 + k)`` for ``k = 0, 1, ...``.  Index ``i``
    of the returned list is the character for byte ``i``.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\xa1"), ord("\xac") + 1))
    printable |= set(range(ord("\xae"), ord("\xff") + 1))
    alphabet: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def _clip_vocab() -> dict[str, int]:
    alphabet = _byte_level_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": 256 + i for i, ch in enumerate(alphabet)})
    vocab[CLIP_BOS] = CLIP_BOS_ID
    vocab[CLIP_EOS] = CLIP_EOS_ID
    return vocab


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Offline byte-level CLIP tokenizer (no merges; every character is a token)."""
    # transformers >= 5 takes the vocab/merges objects directly (``vocab_file=``
    # would be silently ignored and leave a 3-token vocab).
    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Offline whitespace word-level T5-like tokenizer; appends ``</s>`` like T5."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": T5_PAD_ID, "</s>": T5_EOS_ID, "<unk>": T5_UNK_ID}
    for word in _T5_WORDS:
        vocab[word] = len(vocab)
    assert len(vocab) <= T5_VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


# ---------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------


def _clip_text_config(**overrides: Any) -> CLIPTextConfig:
    kwargs: dict[str, Any] = dict(
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        vocab_size=CLIP_VOCAB_SIZE,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def _clip_text_config_32() -> CLIPTextConfig:
    """The hidden-size-32 CLIP config used by SDXL / SD3 / Flux fast tests."""
    return _clip_text_config(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        hidden_act="gelu",
        projection_dim=32,
    )


def _tiny_t5_encoder() -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=T5_PAD_ID,
        eos_token_id=T5_EOS_ID,
        decoder_start_token_id=T5_PAD_ID,
    )
    return T5EncoderModel(config).eval()


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def _finish(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------
# Pipeline builders
# ---------------------------------------------------------------------------


def tiny_sd_pipeline(scheduler: Any = None) -> StableDiffusionPipeline:
    """Tiny Stable Diffusion 1.x pipeline (UNet + VAE + CLIP), random weights.

    Note: ``StableDiffusionPipeline.__init__`` rewrites the passed scheduler's
    config in place to ``steps_offset=1`` and ``clip_sample=False``.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    ).eval()
    if scheduler is None:
        # steps_offset=1 is what the pipeline would force anyway (with a warning).
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    ).eval()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        _clip_text_config(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
        )
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(scheduler: Any = None) -> StableDiffusionXLPipeline:
    """Tiny SDXL pipeline (two CLIP encoders, text_time conditioning), random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
        norm_num_groups=1,
    ).eval()
    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
        )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    ).eval()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config_32()).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config_32()).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )
    return _finish(pipe)


def tiny_sd3_pipeline(scheduler: Any = None) -> StableDiffusion3Pipeline:
    """Tiny SD3 pipeline (MMDiT, two CLIP + T5 encoders), random weights, flow matching."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config_32()).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config_32()).eval()
    text_encoder_3 = _tiny_t5_encoder()
    vae = _flow_vae(latent_channels=4)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def tiny_flux_pipeline(scheduler: Any = None, guidance_embeds: bool = False) -> FluxPipeline:
    """Tiny Flux pipeline (CLIP + T5, packed 2x2 latents), random weights, flow matching; ``guidance_embeds``: a
    transformer that takes the guidance value as an input, as FLUX.1-dev's does.

    Note: ``FluxPipeline`` always calls ``scheduler.set_timesteps(sigmas=..., mu=...)``
    (unless the scheduler config has ``use_flow_sigmas=True``), so a replacement
    scheduler must accept both keyword arguments.
    """
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config_32()).eval()
    text_encoder_2 = _tiny_t5_encoder()
    vae = _flow_vae(latent_channels=1)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def tiny_ddpm_pipeline(scheduler: Any = None) -> DDPMPipeline:
    """Tiny unconditional DDPM pipeline (8x8 RGB UNet2DModel), random weights."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    if scheduler is None:
        scheduler = DDPMScheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    return _finish(pipe)


TINY_PIPELINES: dict[str, Callable[..., Any]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "ddpm": tiny_ddpm_pipeline,
}

#: "vp" = discrete-time noise-prediction (beta schedule) models; "flow" = flow matching.
TINY_PIPELINE_KINDS: dict[str, str] = {
    "sd": "vp",
    "sdxl": "vp",
    "sd3": "flow",
    "flux": "flow",
    "ddpm": "vp",
}


def default_call_kwargs(name: str) -> dict[str, Any]:
    """Minimal, fast ``pipe(**kwargs)`` arguments for the tiny pipeline ``name``.

    Text pipelines run from a prompt string at 32x32 with ``output_type="np"``;
    SD/SDXL/SD3 use ``guidance_scale`` > 1 so (batched) CFG is exercised.  Flux
    has no guidance embedding here and no negative prompt, so it runs without CFG
    (``true_cfg_scale`` CFG would be two separate transformer calls per step).
    A fresh ``generator`` is not included; pass one for determinism.
    """
    if name == "sd":
        return dict(prompt="a digit", num_inference_steps=2, guidance_scale=6.0, height=32, width=32, output_type="np")
    if name == "sdxl":
        return dict(prompt="a digit", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")
    if name == "sd3":
        return dict(
            prompt="a digit",
            num_inference_steps=2,
            guidance_scale=5.0,
            height=32,
            width=32,
            output_type="np",
            max_sequence_length=16,
        )
    if name == "flux":
        return dict(
            prompt="a digit",
            num_inference_steps=2,
            guidance_scale=5.0,
            height=32,
            width=32,
            output_type="np",
            max_sequence_length=16,
        )
    if name == "ddpm":
        return dict(batch_size=1, num_inference_steps=2, output_type="np")
    raise KeyError(f"unknown tiny pipeline {name!r}; expected one of {sorted(TINY_PIPELINES)}")


# ---------------------------------------------------------------------------
# Denoiser call counting
# ---------------------------------------------------------------------------


@dataclass
class DenoiserCallCounter:
    """Tally of denoiser forward calls: ``calls`` and total batch ``rows``."""

    calls: int = 0
    rows: int = 0


def _denoiser(pipe: Any) -> torch.nn.Module:
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise AttributeError(f"{type(pipe).__name__} has no `unet` or `transformer` module")


def _batch_rows(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else None
    if x is None:
        x = kwargs.get("sample", kwargs.get("hidden_states"))
    if isinstance(x, torch.Tensor) and x.ndim > 0:
        return int(x.shape[0])
    return 0


@contextlib.contextmanager
def count_denoiser_calls(pipe: Any) -> Iterator[DenoiserCallCounter]:
    """Count forward calls (and batch rows) of ``pipe.unet`` / ``pipe.transformer``."""
    counter = DenoiserCallCounter()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        counter.calls += 1
        counter.rows += _batch_rows(args, kwargs)

    handle = _denoiser(pipe).register_forward_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()
