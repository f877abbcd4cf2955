"""One-step distillation by distribution matching: the shared engine and f-distill.

* :mod:`~difflab.distill.engine`: the pieces every distribution-matching method shares (teacher and
  fake-score denoisers as :class:`ScoreModel`, DSM, the DMD pseudo-target loss, GAN losses, global
  reductions under accelerate, EMA).
* :mod:`~difflab.distill.fdistill`: f-distill (Xu, Nie, Vahdat 2025): h(r) weightings, density ratio
  from the discriminator, time-binned and batch normalization, the generator loss.
* :mod:`~difflab.distill.nets`: small MLP denoisers, the discriminator head, the one-step generator.
* :mod:`~difflab.distill.lowdim`: the low-dimensional problem, the f-distill steps, the trainer
  (checkpoints, resume).
* :mod:`~difflab.distill.digits`: the same steps on a UNet teacher (:class:`UNetDistillProblem`; the
  digits models), and the one-step pipeline a generator becomes.
* :mod:`~difflab.distill.pipelines`: diffusers UNet teachers beyond the digits models (DDPMPipeline,
  Stable Diffusion), with real images from an image folder.
* :mod:`~difflab.distill.disback`: DisBack (Zhang et al., ICLR 2025): degradation recording, then
  backtracking along the saved nodes to the teacher, around the f-distill / DMD2 steps.
* :mod:`~difflab.distill.loop`: process-aware iteration (DDP-wrapped trained modules) for accelerate.
* :mod:`~difflab.distill.train`: ``difflab distill {f-distill,disback}`` / ``accelerate launch -m
  difflab.distill.train`` (imported lazily, not re-exported here).

Alignment to a reward:

* :mod:`~difflab.distill.rewards`: the reward protocol, built-in rewards, group advantages.
* :mod:`~difflab.distill.rollout`: rollouts with any scheduler, or stochastic ones with log-likelihoods.
* :mod:`~difflab.distill.awm`: Advantage Weighted Matching (Xue et al. 2025).
* :mod:`~difflab.distill.ddpo`: the DDPO / Flow-GRPO-style policy-gradient baseline.
* :mod:`~difflab.distill.aligner`: the shared harness (problems, state, one round, evaluation).
* :mod:`~difflab.distill.align`: ``difflab align {awm,ddpo}`` / ``accelerate launch -m difflab.distill.align``.
"""

from ..models.conditioning import PromptConditionedUNet
from .aligner import (
    AlignConfig,
    AlignProblem,
    AlignState,
    align_iteration,
    build_state,
    digits_problem,
    mixture_problem,
)
from .awm import awm_loss
from .ddpo import ddpo_loss
from .digits import (
    DigitsDistillProblem,
    UNetDistillProblem,
    digits_distill_problem,
    evaluate_student,
    one_step_pipeline,
    save_one_step_pipeline,
)
from .disback import Backtracker, DisBackConfig, DisBackRun, train_disback, train_disback_lowdim
from .engine import (
    EMA,
    ScoreModel,
    dmd_normalizer,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    global_mean,
    global_sum,
    pseudo_target_loss,
    score_difference_target,
    step_generator,
)
from .fdistill import (
    DIVERGENCES,
    WEIGHTINGS,
    RatioNormalizer,
    canonical_divergence,
    density_ratio,
    fdistill_weights,
    generator_loss,
    normalize_weights,
    weighting,
)
from .loop import Runtime, fdistill_iteration
from .lowdim import FDistillConfig, FDistillRun, exact_teacher, fit_mlp_teacher, train_fdistill_lowdim
from .nets import DiscriminatorHead, MLPDenoiser, OneStepGenerator, default_generator_timestep, strict_load
from .pipelines import distill_problem, pipeline_distill_problem
from .rewards import CompositeReward, DigitsClassReward, InkReward, RegionReward, build_reward, group_advantages
from .rollout import ode_rollout, sde_rollout

__all__ = [
    "AlignConfig", "AlignProblem", "AlignState", "CompositeReward", "DigitsClassReward", "InkReward", "RegionReward",
    "align_iteration", "awm_loss", "build_reward", "build_state", "ddpo_loss", "digits_problem", "group_advantages",
    "mixture_problem", "ode_rollout", "sde_rollout",
    "Backtracker", "DisBackConfig", "DisBackRun", "Runtime", "fdistill_iteration", "strict_load",
    "train_disback", "train_disback_lowdim",
    "DigitsDistillProblem", "PromptConditionedUNet", "UNetDistillProblem", "default_generator_timestep",
    "digits_distill_problem", "distill_problem", "evaluate_student", "one_step_pipeline", "pipeline_distill_problem",
    "save_one_step_pipeline",
    "DIVERGENCES", "EMA", "WEIGHTINGS", "DiscriminatorHead", "FDistillConfig", "FDistillRun", "MLPDenoiser",
    "OneStepGenerator", "RatioNormalizer", "ScoreModel", "canonical_divergence", "density_ratio", "dmd_normalizer",
    "dsm_loss", "exact_teacher", "fdistill_weights", "fit_mlp_teacher", "gan_discriminator_loss",
    "gan_generator_loss", "generator_loss", "global_mean", "global_sum", "normalize_weights", "pseudo_target_loss",
    "score_difference_target", "step_generator", "train_fdistill_lowdim", "weighting",
]
