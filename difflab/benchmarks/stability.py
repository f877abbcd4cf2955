"""Divergence artifacts at high classifier-free guidance: multistep solvers with and without momentum.

Wizadwongsa et al. (ICLR 2024) trace the saturated blobs of few-step, high-guidance sampling to the
small stability regions of high-order multistep solvers. We measure that directly:

* class-conditional Gaussian mixture (exact guided scores): the share of samples farther than 4
  standard deviations (in some coordinate) from every mode of their class, and class accuracy
  (argmax of the exact class-conditional densities);
* ``digits-ddpm``: the share of pixels beyond [-1.05, 1.05] before clipping (the analogue of the
  paper's magnitude score), class accuracy and FD-digits by the built-in classifier.

Solvers: PLMS-4, PLMS-4 + HB (beta 0.8), GHVB(3.8), UniPC, UniPC + HB (0.8), DPM-Solver++ 2M and
DPM-Solver++ 2M + HB (0.8), all difflab schedulers with one model call per step.

Reference: the same measure on DPM-Solver++ 2M with 100 steps from the same noise, i.e. (close to)
the exact guided ODE solution. On digits at high CFG that solution itself pushes pixels beyond
[-1.05, 1.05] (guidance saturates strokes), so only the excess over the reference is divergence
of the solver; no accurate solver can go much below the reference.

Timestep grid: by default every solver runs on its model's scheduler config (linspace: N timesteps
from t = 999 down to 999 / N, then a step to clean data). The paper's Stable Diffusion code assumes
the DDIM grid of SD's schedulers, t = 1 + k c for k = N - 1, ..., 0 with c = floor(1000 / N)
(``leading`` spacing, ``steps_offset`` 1, each step going back by c); ``--grid ddim-uniform`` runs every
solver and the reference on it. PLMS-4 here, like the paper's, takes one model call per step
(Adams-Bashforth of order 1, 2, 3, then 4); diffusers' PNDM instead spends an extra call on a
second-order first step. digits-ddpm has linear betas, so sigma / alpha is 157 at t = 999 against 49
at the DDIM grid's first point of 8 steps, and there the grid decides whether plain PLMS-4 works at all
without guidance (compare the CFG 1 rows of stability.md and stability-ddim-grid.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.gmm import GaussianMixture, GMMDenoiser
from ..samplers import DPMSolverHBScheduler, GHVBScheduler, PLMSHBScheduler, UniPCHBScheduler
from ..schedule import NoiseSchedule
from .report import bench_main, write_report

SOLVERS: dict[str, Callable[[dict], object]] = {
    "PLMS-4": lambda cfg: PLMSHBScheduler.from_config(cfg, solver_order=4, momentum=1.0),
    "PLMS-4 + HB 0.8": lambda cfg: PLMSHBScheduler.from_config(cfg, solver_order=4, momentum=0.8),
    "GHVB 3.8": lambda cfg: GHVBScheduler.from_config(cfg, order=3.8),
    "UniPC": lambda cfg: UniPCHBScheduler.from_config(cfg, momentum=1.0),
    "UniPC + HB 0.8": lambda cfg: UniPCHBScheduler.from_config(cfg, momentum=0.8),
    "DPM-Solver++ 2M": lambda cfg: DPMSolverHBScheduler.from_config(cfg, momentum=1.0),
    "DPM-Solver++ 2M + HB 0.8": lambda cfg: DPMSolverHBScheduler.from_config(cfg, momentum=0.8),
}
REFERENCE = "reference (DPM-Solver++ 2M, 100 steps)"
REFERENCE_STEPS = 100
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


GRIDS = ("config", "ddim-uniform")


def grid_kwargs(grid: str, steps: int, num_train_timesteps: int = 1000) -> dict:
    """``set_timesteps`` / pipeline arguments for ``steps`` steps on ``grid`` (see the module docstring)."""
    if grid == "config":
        return {"num_inference_steps": steps}
    c = num_train_timesteps // steps
    return {"timesteps": [1 + k * c for k in reversed(range(steps))]}


def guided_sample(scheduler, model: Callable, noise: torch.Tensor, labels: torch.Tensor, null_label: int,
                  guidance_scale: float, steps: int, grid: str = "config") -> torch.Tensor:
    """CFG sampling with one batched [cond; null] model call per step; returns the raw final sample."""
    scheduler.set_timesteps(**grid_kwargs(grid, steps))
    x = noise
    null = torch.full_like(labels, null_label)
    for t in scheduler.timesteps:
        cond, uncond = model(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return x


def mixture_metrics(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share off the support of the guided class, class accuracy) on the mixture."""
    z = (x[:, None, :] - mixture.means[None]).abs() / mixture.variances[None].sqrt()
    near = (z.amax(-1) <= 4.0) & (mixture.component_classes[None] == labels[:, None])
    class_logp = torch.stack([mixture.log_prob(x, class_labels=c) for c in range(mixture.n_classes)], dim=1)
    accuracy = (class_logp.argmax(1) == labels).double().mean().item()
    return 1.0 - near.any(1).double().mean().item(), accuracy


def run_mixture(dim: int, scales: list[float], steps: list[int], n: int, progress: tqdm, grid: str) -> list[dict]:
    mixture = GaussianMixture.random(dim, 8, n_classes=4, seed=0, std_range=(0.05, 0.15) if dim == 2 else (0.1, 0.3))
    model = GMMDenoiser(mixture, NoiseSchedule.vp(**{k: v for k, v in SD_BETAS.items() if k != "num_train_timesteps"}), "epsilon")
    labels = torch.arange(n) % 4
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []

    def measure(name: str, w: float, k: int) -> dict:
        x = guided_sample(SOLVERS[name](SD_BETAS), model, noise, labels, 4, w, k, grid)
        off, acc = mixture_metrics(mixture, x, labels)
        return dict(setting=f"mixture dim {dim}", solver=name, cfg=w, steps=k, diverged=off, accuracy=acc)

    for w in scales:
        rows.append(measure("DPM-Solver++ 2M", w, REFERENCE_STEPS) | dict(solver=REFERENCE))
        for k in steps:
            for name in SOLVERS:
                rows.append(measure(name, w, k))
                progress.update(1)
    return rows


def run_digits(scales: list[float], steps: list[int], per_class: int, progress: tqdm, grid: str) -> list[dict]:
    from ..eval.digits import evaluate_digits
    from ..models import load

    pipe = load("digits-ddpm")
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(pipe.scheduler.config)
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = []

    def measure(name: str, w: float, k: int) -> dict:
        pipe.scheduler = SOLVERS[name](cfg)
        x = pipe(class_labels=labels, guidance_scale=w, latents=noise.clone(), output_type="latent",
                 **grid_kwargs(grid, k)).images
        score = evaluate_digits(x.clamp(-1, 1), labels)
        return dict(setting="digits-ddpm", solver=name, cfg=w, steps=k, diverged=(x.abs() > 1.05).float().mean().item(),
                    accuracy=score.accuracy, fd=score.fd_digits, fd_floor=score.noise_floor, n=len(labels))

    for w in scales:
        rows.append(measure("DPM-Solver++ 2M", w, REFERENCE_STEPS) | dict(solver=REFERENCE))
        for k in steps:
            for name in SOLVERS:
                rows.append(measure(name, w, k))
                progress.update(1)
    return rows


def grid_text(grid: str) -> str:
    """The page's one-line description of the timestep grid the solvers ran on."""
    if grid == "config":
        return "config (each scheduler config's own: linspace from t = 999)"
    return "ddim-uniform (t = 1 + k floor(1000 / N), k = N - 1, ..., 0) for every solver and the reference"


def format_tables(rows: list[dict]) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        measure = "share of pixels beyond [-1.05, 1.05]" if setting.startswith("digits") else "share of samples off the class support"
        out.append(f"\n### {setting}: {measure} / class accuracy" + (" / FD-digits" if "fd" in sub[0] else "") + "\n")
        solvers = list(dict.fromkeys(r["solver"] for r in sub if r["solver"] != REFERENCE))
        out.append("| CFG | steps | " + " | ".join(solvers) + " |")
        out.append("|---|---|" + "---|" * len(solvers))
        for w, k in dict.fromkeys((r["cfg"], r["steps"]) for r in sub if r["solver"] != REFERENCE):
            cells = []
            for s in solvers:
                r = next(r for r in sub if (r["cfg"], r["steps"], r["solver"]) == (w, k, s))
                cell = f"{r['diverged']:.3f} / {r['accuracy']:.3f}"
                cells.append(cell + (f" / {r['fd']:.2f}" if "fd" in r else ""))
            out.append(f"| {w:g} | {k} | " + " | ".join(cells) + " |")
        reference = [r for r in sub if r["solver"] == REFERENCE]
        if reference:
            cells = "; ".join(f"CFG {r['cfg']:g}: {r['diverged']:.3f} / {r['accuracy']:.3f}" + (f" / {r['fd']:.2f}" if "fd" in r else "")
                              for r in reference)
            out.append(f"\nReference, {REFERENCE} from the same noise: {cells}")
        if "fd_floor" in sub[0]:
            out.append(f"\nFD-digits real-vs-real noise floor at {sub[0]['n']} samples: {sub[0]['fd_floor']:.2f}")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install difflab[train]); skipping the plot.", file=sys.stderr)
        return False
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    scales = sorted({r["cfg"] for r in rows if r["cfg"] > 1})
    fig, axes = plt.subplots(len(settings), len(scales), figsize=(4 * len(scales), 3.3 * len(settings)), squeeze=False)
    solvers = list(SOLVERS)
    colors = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(solvers)}
    for i, setting in enumerate(settings):
        for j, w in enumerate(scales):
            ax = axes[i, j]
            for s in solvers:
                pts = sorted((r["steps"], r["diverged"]) for r in rows if (r["setting"], r["cfg"], r["solver"]) == (setting, w, s))
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=colors[s], ls="--" if "HB" in s or "GHVB" in s else "-", label=s)
            for r in rows:
                if (r["setting"], r["cfg"], r["solver"]) == (setting, w, REFERENCE):
                    ax.axhline(r["diverged"], color="k", lw=0.8, ls=":")
            ax.set(title=f"{setting}, CFG {w:g}", xlabel="steps", ylabel="diverged share")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[s], marker="o", ms=3, ls="--" if "HB" in s or "GHVB" in s else "-") for s in solvers]
    handles.append(plt.Line2D([], [], color="k", lw=0.8, ls=":"))
    fig.legend(handles, solvers + [REFERENCE], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 8, 10, 12, 15])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--mixture-dims", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--num-samples", type=int, default=1000, help="mixture samples per setting")
    parser.add_argument("--digits-per-class", type=int, default=50, help="0 skips digits-ddpm")
    parser.add_argument("--grid", choices=GRIDS, default="config",
                        help="timesteps of every solver: each scheduler config's own (linspace from t = 999), or "
                             "ddim-uniform, the grid of SD's DDIM scheduler that the paper's code assumes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/stability.md"))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    total = len(args.scales) * len(args.steps) * len(SOLVERS) * (len(args.mixture_dims) + (args.digits_per_class > 0))
    rows: list[dict] = []
    with tqdm(total=total, desc="stability", unit="run") as progress:
        for dim in args.mixture_dims:
            rows += run_mixture(dim, args.scales, args.steps, args.num_samples, progress, args.grid)
        if args.digits_per_class > 0:
            rows += run_digits(args.scales, args.steps, args.digits_per_class, progress, args.grid)
    tables = format_tables(rows)
    print(tables)
    png = args.out.with_suffix(".png")
    intro = __doc__.split("\n\n", 1)[1] + ("\nCells: divergence measure / class accuracy (/ FD-digits for digits); "
                                           "the same starting noise for every solver.\n"
                                           f"\nThis page's grid: {grid_text(args.grid)}.\n")
    write_report(args.out, "Stability at high guidance: multistep solvers with and without momentum", "stability", argv,
                 time.time() - start, intro, tables, png.name if plot(rows, png) else None)
    return tables


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
