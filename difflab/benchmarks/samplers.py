"""Sampler quality versus NFE on the Gaussian mixture, where scores and ODE solutions are exact.

Every scheduler (difflab's registered ones and diffusers' DDIM, Euler, Heun, DPM-Solver++ 2M/3M,
UniPC, DEIS) is driven exactly as a diffusers pipeline drives it: ``set_timesteps``, latents times
``init_noise_sigma``, ``scale_model_input``, model call, ``step``. All start from the same noise at
the largest training timestep. For each number of model evaluations (NFE) we report

* RMSE of the final sample against a high-accuracy solution of the probability-flow ODE from the
  same starting noise (:func:`difflab.models.gmm.probability_flow_ode`), and
* the mean log-likelihood of the final samples under the true mixture. Closer to the value of the
  exact ODE samples is better: few-step samplers over-concentrate samples at the modes, which
  raises the likelihood above that of true samples.

Run ``python bench/samplers.py`` (or ``difflab bench samplers``); ``--quick`` takes under a minute.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.gmm import GaussianMixture, GMMDenoiser, probability_flow_ode
from ..samplers import SCHEDULERS, USFScheduler
from ..samplers.search import drive as drive_scheduler
from ..samplers.search_objectives import GMM_SETTINGS, gmm_scheduler_config
from ..samplers.usf import packaged_presets
from ..schedule import NoiseSchedule
from .report import bench_main, write_report

SETTINGS = GMM_SETTINGS
DIFFUSERS_VP = {
    "DDIM": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM-Solver++ 2M": ("DPMSolverMultistepScheduler", dict(solver_order=2)),
    "DPM-Solver++ 3M": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "UniPC": ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2")),
    "DEIS": ("DEISMultistepScheduler", dict(solver_order=2)),
}
FLOW_OVERRIDES = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
DIFFUSERS_FLOW = {
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "Heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "DPM-Solver++ 2M": ("DPMSolverMultistepScheduler", dict(solver_order=2, **FLOW_OVERRIDES)),
    "DPM-Solver++ 3M": ("DPMSolverMultistepScheduler", dict(solver_order=3, **FLOW_OVERRIDES)),
    "UniPC": ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2", **FLOW_OVERRIDES)),
    "DEIS": ("DEISMultistepScheduler", dict(solver_order=2, **FLOW_OVERRIDES)),
}
NFES = (4, 5, 6, 8, 10, 15, 20)


@dataclass
class Result:
    setting: str
    dim: int
    scheduler: str
    nfe: int
    rmse: float
    loglik: float


def base_config(setting: str) -> dict:
    """A diffusers config of the setting's noise schedule (VP betas or FlowMatchEuler)."""
    return gmm_scheduler_config(setting)


def scheduler_factories(setting: str) -> dict[str, Callable]:
    """Name -> factory of a fresh scheduler configured for the setting."""
    import diffusers

    cfg = base_config(setting)
    table = DIFFUSERS_FLOW if setting == "flow" else DIFFUSERS_VP
    factories: dict[str, Callable] = {}
    for label, (cls_name, overrides) in table.items():
        cls = getattr(diffusers, cls_name)
        # VP solvers run flow models through flow_prediction + use_flow_sigmas; FlowMatch keys would only warn
        own_cfg = {"num_train_timesteps": cfg["num_train_timesteps"]} if "use_flow_sigmas" in overrides else cfg
        factories[label] = lambda cls=cls, own_cfg=own_cfg, overrides=overrides: cls.from_config(own_cfg, **overrides)
    for name, cls in SCHEDULERS.items():
        factories[f"difflab {name}"] = lambda cls=cls: cls.from_config(cfg)
    return factories


def drive(scheduler, model: GMMDenoiser, noise: torch.Tensor, num_inference_steps: int) -> tuple[torch.Tensor, int]:
    """Run a scheduler exactly as a diffusers pipeline does; returns (sample, number of model calls)."""
    calls_before = model.calls
    x = drive_scheduler(scheduler, lambda sample, t: model(sample, t).sample, noise, num_inference_steps)
    return x, model.calls - calls_before


def steps_for_nfe(scheduler, nfe: int) -> int:
    """Steps whose model calls fit the NFE budget (Heun-type schedulers spend 2 per step but the first)."""
    return (nfe + 1) // 2 if getattr(scheduler, "order", 1) == 2 else nfe


def run_setting(setting: str, dim: int, nfes: tuple[int, ...], n_samples: int, seed: int,
                progress: tqdm | None = None) -> list[Result]:
    ns = NoiseSchedule.from_config(base_config(setting))
    mixture = GaussianMixture.random(dim, n_components=8, seed=seed)
    model = GMMDenoiser(mixture, ns, "flow_prediction" if ns.kind == "flow" else "epsilon")
    noise = torch.randn(n_samples, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    reference = probability_flow_ode(mixture, ns, noise, ns.t_max)
    results = [Result(setting, dim, "exact ODE", 0, 0.0, mixture.log_prob(reference).mean().item())]
    for label, make in scheduler_factories(setting).items():
        for nfe in nfes:
            sched = make()
            x, calls = drive(sched, model, noise, steps_for_nfe(sched, nfe))
            rmse = (x - reference).pow(2).mean().sqrt().item()
            results.append(Result(setting, dim, label, calls, rmse, mixture.log_prob(x).mean().item()))
            if progress is not None:
                progress.update(1)
    results += searched_rows(setting, dim, nfes, model, noise, reference, mixture)
    return results


def searched_rows(setting: str, dim: int, nfes: tuple[int, ...], model: GMMDenoiser, noise: torch.Tensor,
                  reference: torch.Tensor, mixture: GaussianMixture) -> list[Result]:
    """Rows of the packaged S^3-searched USF schedules for this setting and dimension (docs/benchmarks/usf.md)."""
    name = f"gmm{dim}-{setting}"
    if name not in packaged_presets():
        return []
    rows = []
    for nfe in nfes:
        sched = USFScheduler.from_config(base_config(setting), decisions=name)
        if nfe not in sched.available_nfes:
            continue
        x, calls = drive(sched, model, noise, nfe)
        rmse = (x - reference).pow(2).mean().sqrt().item()
        rows.append(Result(setting, dim, "difflab usf searched", calls, rmse, mixture.log_prob(x).mean().item()))
    return rows


def format_tables(results: list[Result], nfes: tuple[int, ...]) -> str:
    """Markdown: one RMSE table and one log-likelihood table per (setting, dim)."""
    out = []
    for key in dict.fromkeys((r.setting, r.dim) for r in results):
        rows = [r for r in results if (r.setting, r.dim) == key]
        exact = next(r for r in rows if r.scheduler == "exact ODE")
        names = list(dict.fromkeys(r.scheduler for r in rows if r.scheduler != "exact ODE"))
        for metric, fmt, note in (("rmse", "{:.4f}", "RMSE vs exact ODE solution (lower is better)"),
                                  ("loglik", "{:.2f}", f"mean log-likelihood; closer to the exact ODE samples' {exact.loglik:.2f} is better")):
            out.append(f"\n### {key[0]}, dim {key[1]}: {note}\n")
            out.append("| scheduler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            out.append("|---|" + "---|" * len(nfes))
            for name in names:
                cells = []
                for budget in nfes:
                    hit = [r for r in rows if r.scheduler == name and r.nfe <= budget and r.nfe > budget - 2]
                    r = min(hit, key=lambda r: abs(r.nfe - budget)) if hit else None
                    cells.append("" if r is None else fmt.format(getattr(r, metric)) + ("" if r.nfe == budget else f" ({r.nfe})"))
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(results: list[Result], path: Path) -> bool:
    """RMSE versus NFE, one panel per (setting, dim). Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install difflab[train]); skipping the plot.", file=sys.stderr)
        return False
    keys = list(dict.fromkeys((r.setting, r.dim) for r in results))
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(5 * cols, 3.8 * math.ceil(len(keys) / cols)), squeeze=False)
    names = list(dict.fromkeys(r.scheduler for r in results if r.scheduler != "exact ODE"))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one color per scheduler
    for ax, key in zip(axes.flat, keys):
        rows = [r for r in results if (r.setting, r.dim) == key and r.scheduler != "exact ODE"]
        for name in dict.fromkeys(r.scheduler for r in rows):
            pts = sorted((r.nfe, r.rmse) for r in rows if r.scheduler == name)
            ax.plot(*zip(*pts), marker="o", ms=3, label=name, color=colors[name],
                    ls="--" if name.startswith("difflab") else "-")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMSE vs exact ODE", title=f"{key[0]}, dim {key[1]}")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[n], marker="o", ms=3, ls="--" if n.startswith("difflab") else "-")
               for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="dim 16, VP scaled_linear and flow, NFE 4-10, 256 samples (< 1 min)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default docs/benchmarks/samplers.md; with --quick, nothing)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    if args.quick:
        args.dims, args.settings, args.nfe, args.num_samples = [16], ["vp-scaled_linear", "flow"], [4, 5, 6, 8, 10], 256
    nfes = tuple(sorted(args.nfe))
    start = time.time()
    total = sum(len(scheduler_factories(s)) for s in args.settings) * len(args.dims) * len(nfes)
    results: list[Result] = []
    with tqdm(total=total, desc="samplers", unit="run") as progress:
        for setting in args.settings:
            for dim in args.dims:
                results += run_setting(setting, dim, nfes, args.num_samples, args.seed, progress)
    tables = format_tables(results, nfes)
    elapsed = time.time() - start
    print(tables)
    print(f"\n{len(results)} runs in {elapsed:.1f} s")
    out = args.out if args.out is not None else (None if args.quick else Path("docs/benchmarks/samplers.md"))
    if out is not None:
        png = out.with_suffix(".png")
        intro = (
            f"Mixture: 8 components, diagonal covariances, seed {args.seed}; {args.num_samples} samples from the same "
            "starting noise at the largest training timestep. Each scheduler is driven as a diffusers pipeline drives it "
            "(its default `linspace` spacing, `init_noise_sigma`, `scale_model_input`). The reference is the probability-"
            "flow ODE solved with DOP853 (rtol 1e-9) down to timestep 0 and finished with the exact posterior mean. "
            "A cell `x (n)` used n model calls where the budget could not be met exactly (Heun: 2 per step but the last). "
            "difflab's momentum schedulers run with their defaults (beta 0.8, GHVB r = 3.8): momentum trades a little "
            "accuracy for stability (see stability.md). `difflab usf` is the USF scheduler with its default decision "
            "list (DPM-Solver++ 2M); `difflab usf searched` the packaged S^3-searched schedule for the setting and "
            "dimension (searched on other starting noise; see usf.md), where one exists.\n"
        )
        write_report(out, "Samplers on the Gaussian mixture: quality versus NFE", "samplers", argv, elapsed, intro,
                     tables, png.name if plot(results, png) else None)
    return tables


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
