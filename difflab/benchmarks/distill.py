"""f-distill on an exact 2-D Gaussian mixture of 8 unequal modes: mode coverage per f-divergence.

Data: 8 Gaussian modes (std 0.08) evenly spaced on a circle of radius 0.8, with weights spread by a
factor of 6 between the heaviest and the lightest mode (heavy and light modes alternate). Teacher:
the exact mixture denoiser (``GMMDenoiser``, eps prediction, SD's scaled-linear betas). The
discriminator's real data are exact mixture samples. Student: an MLP one-step generator initialized
from an MLP teacher network (regressed onto the exact denoiser), evaluated at t = 999 on pure noise;
fake score: a copy of that network trained by DSM; discriminator head on the fake score's features
(paper default). Every divergence runs with the same seed, the same iterations, learning rates and GAN
weight; only h(r) changes (f-distill, Xu, Nie, Vahdat 2025; rkl = DMD2).

Metrics on samples of the EMA generator: a sample belongs to its nearest mode if it lies within 3
std (0.24) of that mode's mean, else it is *off-mode*. A mode is *covered* if the share of all
student samples that belong to it is at least 20% of its true weight. *Mode-weight TV* is the total
variation 0.5 sum_k |s_k - w_k| between the student's mode weights s_k (shares among on-mode samples)
and the true weights w_k; *min share / weight* is min_k s_k / w_k. Energy distance against as many
exact samples (the exact-vs-exact floor is given). With the exact mixture itself, 1.1% of samples lie
beyond 3 std (a 2-D Gaussian puts exp(-4.5) of its mass there).

*Mode recovery* (second table): reverse KL does not penalize a student for missing a mode, forward
KL does, so the sharpest test of mode-seeking is a student that starts without a mode. A generator
is first distilled (rkl, same settings) from the mixture with ``--recovery-drop`` modes removed;
every divergence then continues from that generator against the full mixture, and the dropped
modes' share is followed (share / true weight, every third of the run).

*Low noise levels only* (``--low-noise``, rows marked t 1-50): h(r) reweights samples by the ratio of
the teacher's and the student's NOISED densities. In 2-D, noise soon hides the difference between the
two densities (neighbouring modes of this ring, 0.61 apart, merge into one bump from sigma of about 0.3,
t of about 100 of 999), the ratio flattens toward 1 and every h(r) weights the samples alike. Two images
differ by far more than the noise of most levels, and their differences add up over many dimensions,
so in image space the ratio stays informative over most of DMD2's t range (t 20-979, sigma 0.14 to
1.0). The low-noise rows repeat the reverse-KL, JS and forward-KL runs of both tables with t drawn only
from t 1-50 (sigma 0.04 to 0.22). ``--ring-scale K`` makes the ring K times wider under the same
schedule, so that every noise level is K times smaller relative to it (docs/benchmarks/distill-wide.md,
K = 5). Over DMD2's range the divergences still behave alike there, though neighbouring modes stay apart
up to about t 500: the low noise levels, not only separated modes, are what makes them differ.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..distill import FDistillConfig, fit_mlp_teacher, train_fdistill_lowdim
from ..eval.energy import energy_distance
from ..models.gmm import GaussianMixture
from ..models.gmm import unequal_ring as gmm_unequal_ring
from ..schedule import NoiseSchedule
from .report import bench_main, publish

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
RING_RADIUS = 0.8
MODE_STD = 0.08
COVERED_FRACTION = 0.2
LOW_NOISE = (0.001, 0.05)  # t = 1 .. 50 of 1000: sigma 0.04 .. 0.22, against modes 0.61 apart with std 0.08
OFF_MODE_STDS = 3.0


def unequal_ring(radius: float = RING_RADIUS, std: float = MODE_STD, spread: float = 6.0) -> GaussianMixture:
    """The benchmark's mixture (:func:`difflab.models.gmm.unequal_ring`)."""
    return gmm_unequal_ring(radius, std, spread)


def mode_assignment(samples: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    """Index of the nearest mode of each sample, or -1 if it is farther than OFF_MODE_STDS std from it."""
    dist = torch.cdist(samples.double(), mixture.means)
    nearest = dist.argmin(1)
    mode_std = mixture.variances[:, 0].sqrt()  # isotropic modes
    on_mode = dist.min(1).values <= OFF_MODE_STDS * mode_std[nearest]
    return torch.where(on_mode, nearest, torch.full_like(nearest, -1))


def coverage_metrics(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor) -> dict:
    """Modes covered, mode-weight TV, min share / weight, off-mode share, energy distance to exact samples."""
    k = mode_assignment(samples, mixture)
    counts = torch.bincount(k[k >= 0], minlength=mixture.n_components).double()
    shares = counts / counts.sum().clamp(min=1.0)
    return {
        "covered": int((counts / len(samples) >= COVERED_FRACTION * mixture.weights).sum()),
        "tv": float(0.5 * (shares - mixture.weights).abs().sum()),
        "off_mode": float((k < 0).double().mean()),
        "energy": energy_distance(samples, reference),
        "min_ratio": float((shares / mixture.weights).min()),
        "shares": shares,
    }


@torch.no_grad()
def generate(generator: torch.nn.Module, n: int, dim: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return generator(z).double()


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


class FractionRange(argparse.Action):
    """``LOW HIGH`` fractions of the largest timestep, checked when parsed: 0 <= LOW < HIGH <= 1."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        low, high = values
        try:
            FDistillConfig(t_range=(low, high))  # the trainer's own rule for a t range
        except ValueError:
            parser.error(f"{option_string} needs fractions 0 <= LOW < HIGH <= 1 of the largest timestep, "
                         f"got {low:g} {high:g}.")
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--divergences", nargs="+", default=["rkl", "srkl", "js", "sh", "kl", "jeffreys"])
    parser.add_argument("--steps", type=int, default=6000, help="iterations (critic + generator updates)")
    parser.add_argument("--critic-updates", type=int, default=4, help="critic updates per generator update")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr-generator", type=float, default=3e-5)
    parser.add_argument("--lr-critic", type=float, default=1e-3, help="learning rate of the fake score and the head")
    parser.add_argument("--gan-weight", type=float, default=1e-3)
    parser.add_argument("--head-features", choices=("fake", "teacher"), default="fake")
    parser.add_argument("--teacher-steps", type=int, default=3000, help="steps of the MLP teacher fit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=4000, help="samples per evaluation")
    parser.add_argument("--recovery-drop", type=int, nargs="*", default=[2],
                        help="modes missing from the warm-start generator of the recovery table (none: skip it)")
    parser.add_argument("--recovery-divergences", nargs="+", default=["rkl", "js", "kl"])
    parser.add_argument("--recovery-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--low-noise", type=float, nargs=2, default=list(LOW_NOISE), metavar=("LOW", "HIGH"),
                        action=FractionRange,
                        help="t range (fractions of the largest timestep) of the low-noise runs, which repeat the "
                             "--recovery-divergences in both tables with t drawn only there")
    parser.add_argument("--no-low-noise", action="store_true", help="skip the low-noise runs")
    parser.add_argument("--ring-scale", type=positive_float, default=1.0, metavar="K",
                        help="scale the ring by K: radius 0.8 K, mode std 0.08 K, the same noise schedule")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/distill.md"))


def _config(args: argparse.Namespace, divergence: str, seed: int,
            t_range: tuple[float, float] = FDistillConfig.t_range) -> FDistillConfig:
    return FDistillConfig(divergence=divergence, max_train_steps=args.steps, batch_size=args.batch_size,
                          critic_updates=args.critic_updates, lr_generator=args.lr_generator,
                          lr_fake=args.lr_critic, lr_head=args.lr_critic, gan_weight=args.gan_weight,
                          head_features=args.head_features, seed=seed, t_range=t_range)


def t_ranges(args: argparse.Namespace) -> list[tuple[str, tuple[float, float]]]:
    """(label, t range) of the runs: the DMD2 range for every divergence, then the low-noise range."""
    default = FDistillConfig.t_range
    ranges = [(_range_label(default), default)]
    if not args.no_low_noise:
        ranges.append((_range_label(tuple(args.low_noise)), tuple(args.low_noise)))
    return ranges


def _range_label(t_range: tuple[float, float]) -> str:
    lo, hi = (round(f * (SCHEDULE["num_train_timesteps"] - 1)) for f in t_range)
    return f"t {lo}-{hi}"


def scatter_figure(panels: list[tuple[str, torch.Tensor]], reference: torch.Tensor, png: Path,
                   extent: float = 1.3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax, (title, pts) in zip(axes.flat, panels):
        ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.25, color="tab:gray", label="exact")
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.35, color="tab:blue", label="student")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(markerscale=6, loc="lower right", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def wide_ring_text(scale: float) -> str:
    """What changes on the page when the ring is scaled (``--ring-scale``)."""
    radius, std = RING_RADIUS * scale, MODE_STD * scale
    spacing = 2 * radius * math.sin(math.pi / 8)
    return (f"**Ring scaled by {scale:g}** (``--ring-scale``): radius {radius:g}, mode std {std:g}, neighbouring "
            f"modes {spacing:.2f} apart; the noise schedule is unchanged, so every noise level is {scale:g} times "
            f"smaller relative to the ring. Off-mode means farther than {OFF_MODE_STDS:g} std "
            f"({OFF_MODE_STDS * std:g}) from the nearest mode; energy distances scale with the ring.\n")


def _row(label: str, m: dict, seconds: float | None) -> str:
    shares = " ".join(f"{s:.3f}" for s in m["shares"].tolist())
    secs = "-" if seconds is None else f"{seconds:.0f}"
    return (f"| {label} | {m['covered']}/8 | {m['tv']:.3f} | {m['min_ratio']:.2f} | {m['off_mode']:.3f} | "
            f"{m['energy']:.4f} | {shares} | {secs} |")


def recovery_table(args: argparse.Namespace, mixture: GaussianMixture, schedule: NoiseSchedule,
                   teacher_net: torch.nn.Module, reference: torch.Tensor) -> list[str]:
    """Every divergence continues from a generator distilled without the ``--recovery-drop`` modes."""
    drop = sorted(set(args.recovery_drop))
    keep = [k for k in range(mixture.n_components) if k not in drop]
    partial = GaussianMixture(mixture.means[keep], mixture.variances[keep], mixture.weights[keep])
    partial_net = fit_mlp_teacher(partial, schedule, "epsilon", steps=args.teacher_steps, seed=0, progress=False)
    checkpoints = [args.steps // 3, 2 * args.steps // 3, args.steps]

    def dropped(generator: torch.nn.Module) -> str:
        m = coverage_metrics(generate(generator, args.samples, 2, 1000), mixture, reference)
        return ", ".join(f"{m['shares'][k] / mixture.weights[k]:.2f}" for k in drop) + f" (TV {m['tv']:.3f})"

    names = " and ".join(str(k) for k in drop)
    lines = [f"### Mode recovery: every divergence starts from a generator distilled without mode {names}\n",
             "Cells: share / true weight of the dropped mode(s) among on-mode samples (1 = right weight), and the "
             "mode-weight TV of all 8 modes. The seed is that of the starting generator's run and of every run "
             "after it; the starting generator (distilled with rkl over the DMD2 t range) is the same for both t "
             "ranges.\n",
             "| seed | t range | divergence | start | " + " | ".join(f"after {c} iterations" for c in checkpoints) + " |",
             "|---|---|---|---|" + "---|" * len(checkpoints)]
    for seed in args.recovery_seeds:
        start = train_fdistill_lowdim(_config(args, "rkl", seed), partial, schedule, partial_net).ema_generator
        runs = [(label, t_range, d) for label, t_range in t_ranges(args) for d in args.recovery_divergences]
        for label, t_range, divergence in tqdm(runs, desc=f"recovery runs, seed {seed}", unit="run"):
            cells = [dropped(start)]
            config = _config(args, divergence, seed, t_range)
            config.checkpointing_steps = checkpoints[0]
            with tempfile.TemporaryDirectory() as tmp:
                for c in checkpoints:  # one run, continued from its own checkpoint at each third
                    config.max_train_steps = c
                    result = train_fdistill_lowdim(config, mixture, schedule, teacher_net, output_dir=tmp,
                                                   resume_from="latest", init_generator=start, progress=False)
                    cells.append(dropped(result.ema_generator))
            lines.append(f"| {seed} | {label} | {divergence} | " + " | ".join(cells) + " |")
    return lines


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    torch.set_num_threads(1)
    start = time.time()
    mixture = unequal_ring(RING_RADIUS * args.ring_scale, MODE_STD * args.ring_scale)
    schedule = NoiseSchedule.from_config(SCHEDULE)
    reference = mixture.sample(args.samples, generator=torch.Generator().manual_seed(123)).float()
    exact = mixture.sample(args.samples, generator=torch.Generator().manual_seed(321))
    floor = energy_distance(exact, reference)
    t0 = time.time()
    teacher_net = fit_mlp_teacher(mixture, schedule, "epsilon", steps=args.teacher_steps, seed=0)
    teacher_seconds = time.time() - t0
    header = ["| student | modes covered | mode-weight TV | min share / weight | off-mode share | energy distance | "
              "mode weights among on-mode samples (modes 0..7) | train s |", "|---|---|---|---|---|---|---|---|"]
    weights = " ".join(f"{w:.3f}" for w in mixture.weights.tolist())
    lines = [_row("exact mixture samples (metric floor)", coverage_metrics(exact, mixture, reference), None)]
    init = generate(train_fdistill_lowdim(_config(args, "rkl", 0), mixture, schedule, teacher_net,
                                          stop_after=0, progress=False).generator, args.samples, 2, 999)
    lines.append(_row("initial generator (teacher copy at t = 999)", coverage_metrics(init, mixture, reference), None))
    panels = [("initial generator", init)]
    (_, default), *low = t_ranges(args)
    jobs = [(d, s, default, "") for s in args.seeds for d in args.divergences]
    jobs += [(d, s, t_range, f", {label}") for label, t_range in low for s in args.seeds
             for d in args.recovery_divergences]
    for divergence, seed, t_range, where in tqdm(jobs, desc="f-distill runs", unit="run"):
        result = train_fdistill_lowdim(_config(args, divergence, seed, t_range), mixture, schedule, teacher_net)
        samples = generate(result.ema_generator, args.samples, 2, 1000 + seed)
        m = coverage_metrics(samples, mixture, reference)
        label = f"{divergence}{where}" + (f" (seed {seed})" if len(args.seeds) > 1 else "")
        lines.append(_row(label, m, result.seconds))
        panels.append((f"{label}: {m['covered']}/8 covered, TV {m['tv']:.3f}, ED {m['energy']:.4f}", samples))
        print(lines[-1])
    if args.recovery_drop:
        recovery = recovery_table(args, mixture, schedule, teacher_net, reference)
    png = args.out.with_suffix(".png")
    scatter_figure(panels, reference, png, extent=1.3 * args.ring_scale)
    body = [f"True mode weights (modes 0..7, counter-clockwise from +x): {weights}. "
            f"Exact-vs-exact energy distance floor ({args.samples} samples): {floor:.4f}. "
            f"MLP teacher fit: {args.teacher_steps} steps, {teacher_seconds:.0f} s.\n",
            f"Settings: {args.steps} iterations ({args.critic_updates} critic updates per generator update), batch "
            f"{args.batch_size}, AdamW lr {args.lr_generator:g} (generator) / {args.lr_critic:g} (fake score, head), "
            f"GAN weight {args.gan_weight:g}, head on {args.head_features} features, EMA 0.99, seeds {args.seeds}; "
            f"t drawn from {_range_label(FDistillConfig.t_range)} (DMD2's range)"
            + ("" if args.no_low_noise else
               f", and for the rows marked {_range_label(tuple(args.low_noise))} from that low-noise range only")
            + ".\n",
            *header, *lines]
    if args.ring_scale != 1.0:
        body.insert(0, wide_ring_text(args.ring_scale))
    if args.recovery_drop:
        body += ["", *recovery]
    return publish(args.out, "f-distill on a 2-D mixture of 8 unequal modes", "distill", argv, time.time() - start,
                   __doc__, "\n".join(body), picture=png.name)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
