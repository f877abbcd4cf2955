"""USF with S^3-searched solver schedules against diffusers' best built-in solver, per NFE.

Gaussian mixture (8 components; VP scaled_linear / linear and flow; several dimensions): for each
NFE, S^3 (predictor mode) searches a decision list on 512 starting noises, scoring RMSE against
the exact probability-flow ODE solution; the table reports RMSE on 1000 *held-out* starting noises
for the searched schedule and for diffusers' DPM-Solver++ 2M / 3M, UniPC-bh2 and DEIS (default
configs, same noise). One setting is also searched with the plain evolutionary mode, to compare
the two search modes at equal evaluations. ``digits-ddpm`` (class-conditional, no guidance): the
search scores RMSE against a 250-step DPM-Solver++ 3M solution from the same noise (256 noises);
the result is judged by FD-digits of held-out samples (several noise seeds) against DPM-Solver++ 2M.

Searched schedules are written to ``difflab/samplers/usf_presets/`` with ``--write-presets``
(the presets ``USFScheduler(decisions="gmm16-vp-scaled_linear")``, ``"digits-ddpm"``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..samplers import get_scheduler
from ..samplers.search import SearchResult, SearchSpace, drive, s3_search
from ..samplers.search_objectives import GMM_SETTINGS, build_objective, gmm_scheduler_config
from ..samplers.usf import USFScheduler
from .report import bench_main, write_report

BASELINES = {"DPM-Solver++ 2M": "dpm++2m", "DPM-Solver++ 3M": "dpm++3m", "UniPC-bh2": "unipc", "DEIS": "deis"}
PRESET_DIR = Path(__file__).resolve().parents[1] / "samplers" / "usf_presets"


def baseline(name: str, config: dict):
    """A diffusers built-in solver for a scheduler config (flow configs through flow sigmas)."""
    return get_scheduler(BASELINES[name], config)


def baseline_scores(objective, config: dict, nfe: int, split: str = "heldout") -> dict[str, float]:
    return {name: objective.score_samples(objective.sample(baseline(name, config), split, nfe), split) for name in BASELINES}


def search_one(objective, space, args, mode: str, log: Path | None) -> SearchResult:
    return s3_search(objective, space, mode=mode, max_evaluations=args.max_evaluations, max_minutes=args.max_minutes,
                     seed=args.seed, log_path=log, progress=True)


def run_mixture(args: argparse.Namespace, log_dir: Path | None) -> tuple[list[dict], dict, dict]:
    rows, presets, curves = [], {}, {}
    for case in args.cases:
        setting, dim = case.split(":")[0], int(case.split(":")[1])
        config = gmm_scheduler_config(setting)
        for nfe in args.nfe:
            objective, space = build_objective("gmm", "rmse", nfe, setting=setting, dim=dim, seed=args.seed)
            log = log_dir / f"gmm{dim}-{setting}-nfe{nfe}.jsonl" if log_dir else None
            result = search_one(objective, space, args, "predictor", log)
            base = baseline_scores(objective, config, nfe)
            best = min(base, key=base.get)
            rows.append(dict(setting=setting, dim=dim, nfe=nfe, searched=result.heldout_score, search=result.search_score,
                             best=best, best_rmse=base[best], baselines=base, evaluations=result.evaluations,
                             seconds=result.seconds))
            result.best["metadata"].update(model=f"gmm{dim}", setting=setting, heldout_rmse=result.heldout_score,
                                           best_diffusers=best, best_diffusers_rmse=base[best])
            presets.setdefault(f"gmm{dim}-{setting}", {})[str(nfe)] = result.best
            if (setting, dim, nfe) == tuple(args.compare_modes_at):
                curves["predictor"] = result.history
                evo_log = log_dir / f"gmm{dim}-{setting}-nfe{nfe}-evolution.jsonl" if log_dir else None
                evo = search_one(objective, space, args, "evolution", evo_log)
                curves["evolution"] = evo.history
                curves["evolution_heldout"], curves["predictor_heldout"] = evo.heldout_score, result.heldout_score
                curves["baseline"] = base[best]
    return rows, presets, curves


def mixture_tables(rows: list[dict]) -> str:
    out = []
    for key in dict.fromkeys((r["setting"], r["dim"]) for r in rows):
        out += [f"\n### {key[0]}, dim {key[1]}: held-out RMSE vs the exact ODE solution\n",
                "| NFE | " + " | ".join(BASELINES) + " | USF searched | searched / best built-in | search time |",
                "|---|" + "---|" * (len(BASELINES) + 3)]
        for r in (r for r in rows if (r["setting"], r["dim"]) == key):
            cells = [f"**{v:.4f}**" if name == r["best"] else f"{v:.4f}" for name, v in r["baselines"].items()]
            out.append(f"| {r['nfe']} | " + " | ".join(cells) + f" | {r['searched']:.4f} | "
                       f"**{r['searched'] / r['best_rmse']:.2f}x** | {r['seconds']:.0f} s ({r['evaluations']} evals) |")
    return "\n".join(out)


def run_digits(args: argparse.Namespace, log_dir: Path | None) -> tuple[str, dict, list]:
    """Search on digits-ddpm by RMSE to an accurate solution; judge by FD-digits over several noise seeds."""
    from ..eval.digits import evaluate_digits
    from ..models import load
    from ..samplers.search_objectives import unet_denoiser

    pipe = load("digits-ddpm")
    config = dict(pipe.scheduler.config)
    labels = torch.arange(10).repeat_interleave(args.fd_per_class)
    denoise = unet_denoiser(pipe.unet.eval(), labels, 1.0, pipe.unet.config.num_class_embeds - 1)
    lines = ["| NFE | sampler | FD-digits per noise seed | mean FD-digits | / DPM-Solver++ 2M | accuracy | search |",
             "|---|---|---|---|---|---|---|"]
    presets, pictures, cache = {}, [], {}
    objective, first_space = build_objective("digits-ddpm", args.digits_metric, args.digits_nfe[0], seed=args.seed)
    for nfe in args.digits_nfe:  # one objective: the accurate reference solutions are computed once
        space = SearchSpace(first_space.schedule, nfe)
        log = log_dir / f"digits-ddpm-nfe{nfe}.jsonl" if log_dir else None
        result = s3_search(objective, space, max_evaluations=args.digits_evaluations, max_minutes=args.max_minutes,
                           seed=args.seed, log_path=log)
        result.best["metadata"].update(model="digits-ddpm", metric=args.digits_metric, heldout_score=result.heldout_score)
        presets[str(nfe)] = result.best
        samplers = {"DPM-Solver++ 2M": (lambda: baseline("DPM-Solver++ 2M", config), nfe),
                    "UniPC-bh2": (lambda: baseline("UniPC-bh2", config), nfe),
                    "USF searched": (lambda best=result.best: USFScheduler.from_config(config, decisions=best), nfe),
                    "DPM-Solver++ 2M, 50 steps (converged)": (lambda: baseline("DPM-Solver++ 2M", config), 50)}
        scores = {}
        for name, (make, steps) in samplers.items():
            fds, accs = [], []
            for s in range(args.fd_seeds):
                key = (name, steps, s)
                if key not in cache:  # the converged row is the same for every NFE
                    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(1000 + s))
                    x = drive(make(), denoise, noise, steps).clamp(-1, 1)
                    cache[key] = (x, evaluate_digits(x, labels))
                x, score = cache[key]
                fds.append(score.fd_digits)
                accs.append(score.accuracy)
                if s == 0 and steps == nfe:
                    pictures.append((f"{name}, NFE {nfe}", x[:: args.fd_per_class // 4 or 1][:40]))
            scores[name] = (fds, sum(fds) / len(fds), sum(accs) / len(accs))
        ref = scores["DPM-Solver++ 2M"][1]
        for name, (fds, mean, acc) in scores.items():
            note = f"{result.seconds:.0f} s, {result.evaluations} evals, {args.digits_metric} {result.heldout_score:.4g} held out" if name == "USF searched" else ""
            lines.append(f"| {nfe} | {name} | {' / '.join(f'{v:.1f}' for v in fds)} | {mean:.2f} | {mean / ref:.2f}x | {acc:.3f} | {note} |")
    return "\n".join(lines), presets, pictures


def plot(rows: list[dict], curves: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install difflab[train]); skipping the plot.", file=sys.stderr)
        return False
    keys = list(dict.fromkeys((r["setting"], r["dim"]) for r in rows))
    panels = len(keys) + (1 if curves else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sel = [r for r in rows if (r["setting"], r["dim"]) == key]
        for name in BASELINES:
            ax.plot([r["nfe"] for r in sel], [r["baselines"][name] for r in sel], marker="o", ms=3, label=name)
        ax.plot([r["nfe"] for r in sel], [r["searched"] for r in sel], marker="s", color="k", lw=2, label="USF searched")
        ax.set(yscale="log", xlabel="NFE", ylabel="held-out RMSE", title=f"{key[0]}, dim {key[1]}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    if curves:
        ax = axes[0][-1]
        for mode in ("predictor", "evolution"):
            ax.plot(range(1, len(curves[mode]) + 1), curves[mode], label=f"{mode} (held out {curves[mode + '_heldout']:.4f})")
        ax.axhline(curves["baseline"], color="gray", ls="--", label="best built-in (held out)")
        ax.set(yscale="log", xlabel="evaluations", ylabel="best search RMSE", title="search modes")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_presets(presets: dict[str, dict]) -> list[Path]:
    PRESET_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, table in presets.items():
        path = PRESET_DIR / f"{name}.json"
        old = json.loads(path.read_text())["schedules"] if path.is_file() else {}
        path.write_text(json.dumps({"schedules": {**old, **table}}, indent=1) + "\n")
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="dim 16, VP scaled_linear, NFE 5 and 8, 120 evaluations, no digits")
    parser.add_argument("--cases", nargs="*", default=["vp-scaled_linear:16", "vp-scaled_linear:64", "vp-linear:16", "flow:16"],
                        help=f"mixture SETTING:DIM pairs; settings: {', '.join(GMM_SETTINGS)}")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--max-evaluations", type=int, default=600)
    parser.add_argument("--max-minutes", type=float, default=9.0, help="wall-time cap per search")
    parser.add_argument("--compare-modes-at", nargs=3, default=["vp-scaled_linear", "16", "6"], metavar=("SETTING", "DIM", "NFE"),
                        help="also run the plain evolutionary search here")
    parser.add_argument("--digits-nfe", type=int, nargs="*", default=[5, 8])
    parser.add_argument("--digits-metric", choices=["rmse", "fd"], default="rmse")
    parser.add_argument("--digits-evaluations", type=int, default=150)
    parser.add_argument("--fd-per-class", type=int, default=100)
    parser.add_argument("--fd-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-presets", action="store_true", help="store the searched schedules as packaged presets")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the search logs here (resumable)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks/usf.md; --quick: none)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    if args.quick:
        args.cases, args.nfe, args.max_evaluations, args.digits_nfe = ["vp-scaled_linear:16"], [5, 8], 120, []
    for case in args.cases:
        if case.count(":") != 1 or case.split(":")[0] not in GMM_SETTINGS or not case.split(":")[1].isdigit():
            raise ValueError(f"--cases entries are SETTING:DIM with SETTING in {list(GMM_SETTINGS)}, got {case!r}.")
    args.compare_modes_at = [args.compare_modes_at[0], int(args.compare_modes_at[1]), int(args.compare_modes_at[2])]
    start = time.time()
    rows, presets, curves = run_mixture(args, args.log_dir)
    body = mixture_tables(rows)
    pictures = []
    if args.digits_nfe:
        table, digits_presets, pictures = run_digits(args, args.log_dir)
        presets["digits-ddpm"] = digits_presets
        body += "\n\n### digits-ddpm: FD-digits of held-out samples (lower is better)\n\n" + table
    if curves:
        body += (f"\n\n### Search modes ({args.compare_modes_at[0]}, dim {args.compare_modes_at[1]}, NFE "
                 f"{args.compare_modes_at[2]}, {args.max_evaluations} evaluations each)\n\n"
                 f"| mode | best search RMSE | held-out RMSE |\n|---|---|---|\n"
                 f"| predictor (S^3) | {curves['predictor'][-1]:.4f} | {curves['predictor_heldout']:.4f} |\n"
                 f"| evolution | {curves['evolution'][-1]:.4f} | {curves['evolution_heldout']:.4f} |\n")
    elapsed = time.time() - start
    print(body)
    if args.write_presets:
        for path in write_presets(presets):
            print(f"wrote {path}")
    out = args.out if args.out is not None else (None if args.quick else Path("docs/benchmarks/usf.md"))
    if out is not None:
        png = out.with_suffix(".png")
        if pictures:
            _grid(pictures, out.parent / "usf-digits.png")
            body += "\n\nFirst noise seed, 4 samples per class (rows of 10 = one sampler at one NFE):\n\n![digits](usf-digits.png)\n"
        body += "\n\nSearched decision lists (held-out score in `metadata`): `difflab/samplers/usf_presets/`.\n"
        write_report(out, "USF and S^3: searched solver schedules versus diffusers' built-ins", "usf", argv, elapsed,
                     __doc__.split("\n\n", 1)[1], body, png.name if plot(rows, curves, png) else None)
    return body


def _grid(pictures: list, path: Path) -> None:
    from ..models.digits import make_grid

    images = torch.cat([x for _, x in pictures])
    make_grid((images + 1) / 2, nrow=len(pictures[0][1]), labels=[name for name, _ in pictures]).save(path)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()



