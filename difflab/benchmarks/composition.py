"""FKC and SuperDiff on the Gaussian-mixture test bed, where every target is known exactly.

Models are exact mixture denoisers (``GMMDenoiser``, eps prediction, SD's scaled-linear betas).
Samplers: the ancestral step (``EulerDDIMScheduler``, eta = 1 unless stated) on ``uniform_logsnr``
timesteps ending at the smallest trained noise level (``final_sigmas_type="sigma_min"``).

* **FKC** (8-D and 2-D for the numbers, 2-D for the pictures): product of two mixtures, annealing
  p^beta with beta = 2 and 3, and the CFG-tilted target p_u^(1-w) p_c^w with w = 3. Exact target
  samples: the closed-form product mixture, and rejection sampling for p^beta and the CFG tilt
  (``GaussianMixture.sample_tempered`` / ``sample_cfg_tilted``). Baseline: the same SDE with the
  same combined score and the same network calls, without weights or resampling (summed scores;
  beta times the score; plain CFG), eta = 1. FKC: systematic resampling at every step. All
  particles of the single group form the sample; the exact target is taken at the final noise
  level (built from the noised mixtures). The tempered-noise SDE (eta = 1/sqrt(beta)) is not used:
  with less noise, resampled copies stay together and the particle cloud shrinks (on a 1-D
  Gaussian with beta = 3 the std comes out 0.041 instead of 0.060 at eta = 0.58, 0.059 at eta = 1).
  Metric: energy distance to as many exact samples. Annealed targets are the hard case: the increment
  beta (beta - 1) dlambda ||eps||^2 rewards particles with large scores, so a few particles can
  take over the population and the result varies strongly from seed to seed (per-seed column).
  SMC converges as the number of particles K grows, so the tables use K = 8000 (the network calls
  per particle are the same for FKC and the baseline at any K); the sweep table shows the 8-D
  annealing cases at K = 500, 2000 and 8000 with the same seeds.
* **Ito density estimator**: along ancestral trajectories of a 16-D mixture, the accumulated
  estimate of log q_t against the exact log q_t at every visited noise level (``linspace`` steps).
  Both forms take the predictions at the start of each step and the same pre-drawn noise. The
  theory's left-point form replaces the realized energy of the injected noise by its mean; that is
  accurate only while a step changes the noise variance little compared with the local variance
  of the data, so its error is mostly a negative bias that builds up at the low-noise end, where
  the components' widths (std 0.08 - 0.25) are comparable to the noise. The kernel form (the
  samplers' default) keeps the realized noise energy, because its Gaussian kernels are quadratic in
  the step, and stays within a fraction of a nat until the last few levels.
* **SuperDiff on digits-ddpm**: AND of two digit classes, against kappa fixed at 0.5.
* **SuperDiff** (2-D): OR of two mixtures with disjoint supports and prior weights (0.5, 0.5) and
  (0.8, 0.2): the share of samples that land on the first model; AND of two overlapping mixtures:
  the share of samples where both data densities are within a factor e, against kappa fixed at 0.5.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..eval.energy import energy_distance
from ..models.gmm import GaussianMixture, GMMDenoiser
from ..samplers import EulerDDIMScheduler, FKCTarget, ParticleSystem, ResamplingPolicy, fkc_sample, superdiff_sample
from ..samplers.superdiff import ESTIMATORS
from ..schedule import NoiseSchedule, stochastic_step_coefficients
from .report import bench_main, publish

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
FKC_CASES = ("product", "anneal2", "anneal3", "cfg3")


def stochastic_scheduler(steps: int, eta: float = 1.0, spacing: str = "uniform_logsnr",
                         final: str = "sigma_min") -> EulerDDIMScheduler:
    scheduler = EulerDDIMScheduler(eta=eta, timestep_spacing=spacing, final_sigmas_type=final, **SCHEDULE)
    scheduler.set_timesteps(steps)
    return scheduler


def denoiser(mixture: GaussianMixture) -> GMMDenoiser:
    return GMMDenoiser(mixture, NoiseSchedule.from_config(SCHEDULE))


@dataclass
class FKCCase:
    """A target over M prediction terms, how to predict them, and exact samples of the target."""

    target: FKCTarget
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    exact: Callable[[int, torch.Generator], torch.Tensor]
    dim: int


def final_level() -> tuple[float, float]:
    """(alpha, sigma) where the samplers stop: the smallest trained noise level (``sigma_min``)."""
    alpha, sigma = NoiseSchedule.from_config(SCHEDULE).alpha_sigma(0.0)
    return float(alpha), float(sigma)


def fkc_case(name: str, dim: int) -> FKCCase:
    """The mixtures of one FKC case (seeded, so 2-D and 8-D cases are fixed).

    The exact samples are of the target at the final noise level (the same target built from the
    noised marginals q_t, ``GaussianMixture.noised``), which is what the particles represent there.
    """
    alpha, sigma = final_level()
    if name == "product":
        first, second = GaussianMixture.random(dim, 8, seed=1), GaussianMixture.random(dim, 8, seed=2)
        models = [denoiser(first), denoiser(second)]
        product = first.noised(alpha, sigma).product(second.noised(alpha, sigma))
        return FKCCase(FKCTarget.product(2), lambda x, t: torch.stack([m(x, t).sample for m in models]),
                       lambda n, g: product.sample(n, generator=g), dim)
    if name in ("anneal2", "anneal3"):
        beta = float(name[-1])
        mixture = GaussianMixture.random(dim, 8, seed=1)
        model = denoiser(mixture)
        final = mixture.noised(alpha, sigma)
        return FKCCase(FKCTarget.anneal(beta), lambda x, t: model(x, t).sample[None],
                       lambda n, g: final.sample_tempered(n, beta, g), dim)
    if name == "cfg3":
        mixture = GaussianMixture.random(dim, 8, n_classes=2, seed=3)
        model = denoiser(mixture)
        final = mixture.noised(alpha, sigma)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            both = model(torch.cat([x, x]), t, class_labels=torch.tensor([2, 0]).repeat_interleave(len(x))).sample
            return torch.stack(both.chunk(2))  # [unconditional, conditional]

        return FKCCase(FKCTarget.cfg(3.0), predict, lambda n, g: final.sample_cfg_tilted(n, 0, 3.0, g), dim)
    raise ValueError(f"unknown FKC case {name!r}; use one of {FKC_CASES}.")


def run_fkc_case(case: FKCCase, steps: int, num_particles: int, corrected: bool, seed: int = 0,
                 ess_threshold: float | None = None) -> torch.Tensor:
    """Samples of FKC (``corrected``) or of the same SDE without weights (the baseline).

    ``ess_threshold`` resamples only when ESS / K falls below it, then once more at the end so the
    returned particles are equally weighted; ``None`` resamples at every step.
    """
    scheduler = stochastic_scheduler(steps, eta=1.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_particles, case.dim, generator=generator, dtype=torch.float64) * case.target.init_noise_scale
    policy = ResamplingPolicy(ess_threshold=ess_threshold) if corrected else None
    particles = ParticleSystem(1, num_particles, policy, generator=generator)
    samples = fkc_sample(case.predict, scheduler, x, case.target, particles, generator=generator).samples
    if corrected and ess_threshold is not None:
        samples = samples[particles.resample_indices()]
    return samples


def fkc_energy(name: str, dim: int, steps: int, num_particles: int, seed: int = 0,
               ess_threshold: float | None = None) -> tuple[float, float, float]:
    """(baseline, FKC, exact-vs-exact floor) energy distances to exact samples of the target."""
    case = fkc_case(name, dim)
    exact = case.exact(num_particles, torch.Generator().manual_seed(seed + 100))
    floor = energy_distance(case.exact(num_particles, torch.Generator().manual_seed(seed + 200)), exact)
    base = energy_distance(run_fkc_case(case, steps, num_particles, False, seed), exact)
    fkc = energy_distance(run_fkc_case(case, steps, num_particles, True, seed, ess_threshold), exact)
    return base, fkc, floor


# ------------------------------------------------------------------------------------------------
# Ito density estimator
# ------------------------------------------------------------------------------------------------


def density_tracking_error(estimator: str, dim: int = 16, steps: int = 200, num_samples: int = 500,
                           spacing: str = "linspace", seed: int = 0) -> tuple[float, float]:
    """(mean over steps and samples, mean at the last noisy level) of |estimated - exact log q_t|."""
    mixture = GaussianMixture.random(dim, 8, seed=4)
    model = denoiser(mixture)
    scheduler = stochastic_scheduler(steps, spacing=spacing)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    alpha, sigma = scheduler.noise_levels(0)[:2]
    estimate = mixture.log_prob(x, alpha, sigma)  # the same start as the exact value
    errors = []
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, t).sample
        x_next = scheduler.step(eps, t, x, generator=generator).prev_sample
        levels = scheduler.noise_levels(i)
        coefs = stochastic_step_coefficients(levels[0], levels[1], levels[3], levels[4], 1.0)
        estimate = estimate + ESTIMATORS[estimator](x, x_next, eps[None], levels, coefs)[0]
        errors.append((estimate - mixture.log_prob(x_next, levels[3], levels[4])).abs().mean().item())
        x = x_next
    return sum(errors) / len(errors), errors[-1]


# ------------------------------------------------------------------------------------------------
# SuperDiff
# ------------------------------------------------------------------------------------------------

OR_MODELS = (GaussianMixture([[-0.6, -0.6], [-0.6, 0.6]], 0.12**2), GaussianMixture([[0.6, -0.6], [0.6, 0.6]], 0.12**2))
AND_MODELS = (
    GaussianMixture([[-0.4, 0.0], [0.4, 0.6]], [[0.25**2, 0.25**2], [0.2**2, 0.2**2]]),
    GaussianMixture([[0.3, 0.0], [-0.3, 0.5]], [[0.15**2, 0.3**2], [0.2**2, 0.2**2]], [0.7, 0.3]),
)


def run_superdiff(models: tuple[GaussianMixture, ...], mode: str, steps: int, num_samples: int,
                  prior_weights: tuple[float, ...] | None = None, estimator: str = "kernel", seed: int = 0) -> torch.Tensor:
    denoisers = [denoiser(m) for m in models]
    scheduler = stochastic_scheduler(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, models[0].dim, generator=generator, dtype=torch.float64)
    return superdiff_sample(lambda x, t: torch.stack([d(x, t).sample for d in denoisers]), scheduler, x, mode,
                            len(models), prior_weights=prior_weights, estimator=estimator, generator=generator).samples


def or_share(samples: torch.Tensor, models: tuple[GaussianMixture, ...] = OR_MODELS) -> float:
    """Share of samples where the first model's density is the higher one."""
    return float((models[0].log_prob(samples) > models[1].log_prob(samples)).double().mean())


def and_share(samples: torch.Tensor, models: tuple[GaussianMixture, ...] = AND_MODELS) -> float:
    """Share of samples where the two data densities are within a factor e of each other."""
    gap = (models[0].log_prob(samples) - models[1].log_prob(samples)).abs()
    return float((gap <= 1.0).double().mean())


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--particles", type=int, default=8000, help="FKC particles (= samples) per run")
    parser.add_argument("--particle-sweep", type=int, nargs="*", default=[500, 2000, 8000],
                        help="particle counts of the 8-D annealing table (none: skip it)")
    parser.add_argument("--samples", type=int, default=2000, help="SuperDiff samples per run and points per scatter")
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 2], help="dimensions of the FKC mixtures")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ess-threshold", type=float, default=None,
                        help="FKC resamples only below this ESS/K (default: every step)")
    parser.add_argument("--fkc-only", action="store_true", help="only the FKC tables")
    parser.add_argument("--digit-steps", type=int, default=100)
    parser.add_argument("--digit-images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/composition.md"))


def scatter_figure(steps: int, num_particles: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    for ax, name in zip(axes[0], FKC_CASES):
        case = fkc_case(name, 2)
        panels = [("exact", case.exact(num_particles, torch.Generator().manual_seed(7)), "k"),
                  ("baseline", run_fkc_case(case, steps, num_particles, False), "tab:orange"),
                  ("FKC", run_fkc_case(case, steps, num_particles, True), "tab:blue")]
        for label, pts, color in panels:
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.35, color=color, label=label)
        ax.set_title(f"FKC {case.target.name}")
        ax.legend(markerscale=6, loc="lower right", fontsize=8)
    sd_panels = [("OR (0.5, 0.5)", OR_MODELS, "or", (0.5, 0.5)), ("OR (0.8, 0.2)", OR_MODELS, "or", (0.8, 0.2)),
                 ("AND", AND_MODELS, "and", None), ("average kappa 0.5", AND_MODELS, "average", None)]
    for ax, (title, models, mode, prior) in zip(axes[1], sd_panels):
        pts = run_superdiff(models, mode, steps, num_particles, prior)
        for m, color in zip(models, ("tab:green", "tab:purple")):
            ref = m.sample(num_particles, generator=torch.Generator().manual_seed(8))
            ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.12, color=color)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="k")
        ax.set_title(f"SuperDiff {title} (black; models in colour)")
    for ax in axes.flat:
        ax.set_aspect("equal")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


DIGIT_PAIRS = ((1, 7), (3, 8), (4, 9), (0, 6))


def digits_and(steps: int, num_images: int, png: Path) -> list[str]:
    """SuperDiff AND of two digit classes on digits-ddpm vs kappa fixed at 0.5; grid and table rows."""
    from ..eval.digits import _classifier
    from ..models import load
    from ..models.digits import make_grid
    from ..pipelines import SuperDiffPipeline

    pipe = SuperDiffPipeline.from_pipe(load("digits-ddpm"))
    pipe.set_progress_bar_config(disable=True)
    rows, labels, lines = [], [], []
    for pair in DIGIT_PAIRS:
        for mode in ("and", "average"):
            x = pipe(conditions=list(pair), mode=mode, num_images=num_images, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(0), output_type="latent").images
            probs = _classifier()(x.float().clamp(-1, 1)).softmax(-1)[:, list(pair)]
            both = probs.min(1).values.mean().item()
            lines.append(f"| {pair[0]} AND {pair[1]} | {'SuperDiff AND' if mode == 'and' else 'kappa fixed at 0.5'} | "
                         f"{probs[:, 0].mean():.2f} / {probs[:, 1].mean():.2f} | {both:.3f} |")
            rows.append(x)
            labels.append(f"{pair[0]}&{pair[1]} {'AND' if mode == 'and' else 'avg'}")
    make_grid((torch.cat(rows).clamp(-1, 1) + 1) / 2, nrow=num_images, labels=labels).save(png)
    return lines


def resampling_rule(args: argparse.Namespace) -> str:
    return "every step" if args.ess_threshold is None else f"when ESS/K < {args.ess_threshold:g}"


def seed_runs(name: str, dim: int, num_particles: int, args: argparse.Namespace, progress: tqdm) -> str:
    """Table cells of one FKC case over ``args.seeds`` seeds: mean baseline, mean FKC, reduction, the
    per-seed FKC / baseline ratios and the exact-vs-exact floor."""
    runs = []
    for seed in range(args.seeds):
        runs.append(fkc_energy(name, dim, args.steps, num_particles, seed, args.ess_threshold))
        progress.update(1)
    base, fkc, floor = (sum(r[j] for r in runs) / len(runs) for j in range(3))
    per_seed = ", ".join(f"{r[1] / r[0]:.2f}" for r in runs)
    return f"{base:.4f} | {fkc:.4f} | {1 - fkc / base:.0%} | {per_seed} | {floor:.4f}"


def fkc_table(dim: int, args: argparse.Namespace, progress: tqdm) -> list[str]:
    """Rows of the FKC table for one dimension (mean over seeds, and the per-seed ratios)."""
    lines = [f"### FKC, {dim}-D mixtures, {args.steps} steps, {args.particles} particles, resampling "
             f"{resampling_rule(args)}, {args.seeds} seeds (mean)\n",
             "| target | baseline energy distance | FKC energy distance | reduction | FKC / baseline per seed | "
             "exact-vs-exact floor |",
             "|---|---|---|---|---|---|"]
    for name in FKC_CASES:
        lines.append(f"| {fkc_case(name, 2).target.name} | {seed_runs(name, dim, args.particles, args, progress)} |")
    return lines + [""]


def particle_sweep_table(args: argparse.Namespace, progress: tqdm) -> list[str]:
    """FKC on the 8-D annealed targets against the number of particles (same seeds, same steps).

    SMC is consistent as the number of particles grows; with few particles a handful of heavily
    weighted particles decide the mode weights, which is where the per-seed spread comes from.
    """
    lines = [f"### FKC annealing in 8-D against the number of particles ({args.steps} steps, resampling "
             f"{resampling_rule(args)}, {args.seeds} seeds)\n",
             "| target | particles | baseline energy distance | FKC energy distance | reduction | "
             "FKC / baseline per seed | exact-vs-exact floor |",
             "|---|---|---|---|---|---|---|"]
    for name in ("anneal2", "anneal3"):
        for count in args.particle_sweep:
            lines.append(f"| {fkc_case(name, 2).target.name} | {count} | {seed_runs(name, 8, count, args, progress)} |")
    return lines + [""]


def density_and_superdiff_tables(args: argparse.Namespace, progress: tqdm) -> list[str]:
    """The Ito-estimator table, the SuperDiff tables, the scatter figure and the digits AND grid."""
    seeds = range(args.seeds)
    lines = ["", "### Ito density estimator, 16-D mixture, 500 ancestral trajectories\n",
             "| estimator | steps | mean abs error over all steps (nats) | at the last noisy level (nats) |", "|---|---|---|---|"]
    for estimator in ("ito", "kernel"):
        for steps in (200, 800):
            mean_err, last_err = density_tracking_error(estimator, steps=steps)
            lines.append(f"| {estimator} | {steps} | {mean_err:.3f} | {last_err:.3f} |")
            progress.update(1)
    lines += ["", f"### SuperDiff, 2-D, {args.steps} steps, {args.samples} samples, {args.seeds} seeds (mean)\n",
              "| combination | estimator | measure | value |", "|---|---|---|---|"]
    for estimator in ("ito", "kernel"):
        for prior in ((0.5, 0.5), (0.8, 0.2)):
            share = sum(or_share(run_superdiff(OR_MODELS, "or", args.steps, args.samples, prior, estimator, s))
                        for s in seeds) / args.seeds
            lines.append(f"| OR, prior weights {prior} | {estimator} | share of samples on model 1 | {share:.3f} |")
        progress.update(1)
        for mode in ("and", "average"):
            share = sum(and_share(run_superdiff(AND_MODELS, mode, args.steps, args.samples, None, estimator, s))
                        for s in seeds) / args.seeds
            label = "AND" if mode == "and" else "baseline: kappa fixed at 0.5"
            lines.append(f"| {label} | {estimator} | share with densities within a factor e | {share:.3f} |")
            progress.update(1)
    scatter_figure(args.steps, args.samples, args.out.with_suffix(".png"))
    progress.update(1)
    digits_png = args.out.with_name(args.out.stem + "-digits-and.png")
    lines += ["", f"### SuperDiff AND of two digit classes on digits-ddpm ({args.digit_steps} steps, "
              f"{args.digit_images} images per row)\n",
              f"![AND of two digit classes]({digits_png.name})\n",
              "Rows of the picture in the table's order. Classifier probabilities of the two classes (mean), and "
              "the mean of the smaller of the two (high only when an image reads as both digits).\n",
              "| classes | method | p(first) / p(second) | mean min(p) |", "|---|---|---|---|"]
    lines += digits_and(args.digit_steps, args.digit_images, digits_png)
    progress.update(1)
    return lines


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    lines = []
    extra = 0 if args.fkc_only else 10
    sweep = 2 * len(args.particle_sweep) * args.seeds
    total = len(FKC_CASES) * args.seeds * len(args.dims) + sweep + extra
    with tqdm(total=total, desc="composition", unit="run") as progress:
        for dim in args.dims:
            lines += fkc_table(dim, args, progress)
        if args.particle_sweep:
            lines += particle_sweep_table(args, progress)
        if not args.fkc_only:
            lines += density_and_superdiff_tables(args, progress)
    table = "\n".join(lines)
    picture = None if args.fkc_only else args.out.with_suffix(".png").name
    return publish(args.out, "Composition: FKC and SuperDiff on exact Gaussian-mixture targets", "composition", argv,
                   time.time() - start, __doc__, table, picture=picture)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
