"""Guidance on ``digits-ddpm``: CFG, diffusers' AdaptiveProjectedGuidance, difflab APG, AG, LinearAG.

50 samples per class by default (DPM-Solver++ 2M, 20 steps, the same starting noise for every
method) at each guidance scale. Columns: class accuracy, FD-digits against the held-out digits, the
saturation measure (share of pixels beyond [-1, 1] before clipping, and mean absolute pixel value)
and the number of denoiser rows the network really evaluated (counted by a hook on its first
layer). Methods: CFG; diffusers' ``AdaptiveProjectedGuidance`` with its defaults (raw eps, its own
formula); difflab ``APG`` (paper-exact, x0 space, momentum -0.5, eta 0, radius 15 scaled to the
image size: ``resolution_independent_radius``); ``AdaptiveGuidance`` (x0 cosine, threshold 0.97);
``LinearAG`` fitted for each scale on separate trajectories (real unconditional calls in the first 20%
of steps, surrogates to half-way, then conditional only); CFG switched off at half the steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..guidance import APG, CFG, AdaptiveGuidance, Guider, LinearAG, attach, detach, fit_linear_ag
from .report import bench_main, write_report


class DiffusersGuider(Guider):
    """Run a diffusers ``BaseGuidance`` (e.g. AdaptiveProjectedGuidance) on the raw predictions."""

    def __init__(self, guider, num_inference_steps: int):
        self.inner, self.num_inference_steps, self.guidance_scale = guider, num_inference_steps, guider.guidance_scale
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        self.inner.set_state(step=self.step, num_inference_steps=self.num_inference_steps, timestep=timestep)
        self.step += 1
        return self.inner.forward(pred_cond=cond, pred_uncond=uncond).pred


class HalfwayCFG(Guider):
    """CFG for the first half of the steps, then the conditional prediction alone (a fixed cut-off)."""

    def __init__(self, guidance_scale: float, num_inference_steps: int):
        self.guidance_scale, self.cut = guidance_scale, num_inference_steps // 2
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def uncond_rows_needed(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.step < self.cut, dtype=torch.bool)

    def combine(self, cond, uncond, sample, timestep, schedule, prediction_type):
        self.step += 1
        return uncond + self.guidance_scale * (cond - uncond) if self.step <= self.cut else cond


def methods(pipe, w: float, steps: int, fit_seed: int) -> dict[str, Guider]:
    from diffusers import AdaptiveProjectedGuidance

    fit = fit_linear_ag(pipe, dict(class_labels=list(range(10)), num_images_per_label=20, output_type="latent",
                                   generator=torch.Generator().manual_seed(fit_seed)), steps, w)
    return {
        "CFG": CFG(w),
        "diffusers APG (defaults)": DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=w), steps),
        "difflab APG": APG(w, momentum=-0.5, norm_threshold=15.0, eta=0.0, resolution_independent_radius=True),
        "AG (x0, 0.97)": AdaptiveGuidance(w, threshold=0.97),
        "LinearAG": LinearAG(fit),
        "CFG cut-off at half": HalfwayCFG(w, steps),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 3, 5, 8, 10, 15])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/guidance.md"))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    from ..eval.digits import evaluate_digits, noise_floor
    from ..models import load
    from ..models.digits import make_grid
    from ..samplers import get_scheduler

    start = time.time()
    pipe = load("digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = get_scheduler("dpm++2m", pipe.scheduler.config)
    first = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    rows = {"n": 0}
    first.register_forward_hook(lambda mod, inp, out: rows.__setitem__("n", rows["n"] + inp[0].shape[0]))
    labels = torch.arange(10).repeat_interleave(args.per_class)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    lines = ["| scale | method | accuracy | FD-digits | beyond [-1, 1] | mean abs pixel | denoiser rows |", "|---|---|---|---|---|---|---|"]
    grid_rows, grid_labels = [], []
    with tqdm(total=6 * len(args.scales), desc="guidance", unit="run") as progress:
        for w in args.scales:
            for name, guider in methods(pipe, w, args.steps, fit_seed=1).items():
                attach(pipe, guider)
                rows["n"] = 0
                x = pipe(class_labels=labels, guidance_scale=w, num_inference_steps=args.steps, latents=noise.clone(),
                         output_type="latent").images
                detach(pipe)
                score = evaluate_digits(x.clamp(-1, 1), labels)
                lines.append(f"| {w:g} | {name} | {score.accuracy:.3f} | {score.fd_digits:.2f} | "
                             f"{(x.abs() > 1).float().mean():.4f} | {x.abs().mean():.3f} | {rows['n']} |")
                grid_rows.append(x[:: args.per_class][:10])
                grid_labels.append(f"{name[:10]} {w:g}")
                progress.update(1)
    table = "\n".join(lines)
    png = args.out.with_suffix(".png")
    picks = torch.cat(grid_rows)
    make_grid((picks.clamp(-1, 1) + 1) / 2, nrow=10, labels=[lbl.split()[0][:4] for lbl in grid_labels]).save(png)
    body = (f"FD-digits real-vs-real noise floor at {len(labels)} samples: {noise_floor(len(labels)):.2f}.\n\n" + table
            + "\n\nPicture: one row per (scale, method) in the table's order, one digit of each class per row.\n")
    write_report(args.out, "Guidance on digits-ddpm", "guidance", argv, time.time() - start, __doc__.split("\n\n", 1)[1],
                 body, png.name)
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
