"""The ``difflab`` command. Every subcommand imports its implementation lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "samplers": ("difflab.benchmarks.samplers", "quality versus NFE on the exact Gaussian mixture"),
    "stability": ("difflab.benchmarks.stability", "divergence at high guidance, with and without momentum"),
    "lml": ("difflab.benchmarks.lml", "LML (lambda, kappa) sweep against the base solver"),
    "digits": ("difflab.benchmarks.digits", "class accuracy and FD-digits of the built-in digits models"),
    "guidance": ("difflab.benchmarks.guidance", "CFG, APG (difflab and diffusers), AG, LinearAG on digits-ddpm"),
}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and write its table under docs/benchmarks/")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = which.add_parser(name, help=help_text, description=module.__doc__.split("\n")[0])
        module.add_arguments(parser)
        parser.set_defaults(func=lambda args, module=module: module.run(args, sys.argv[3:]))


def _add_sample(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="sample a built-in model (or a local pipeline directory) into a PNG grid")
    sample.add_argument("--model", default="digits-ddpm",
                        help="digits-ddpm, digits-flow, gmm (2-D mixture scatter plot) or a local DigitsPipeline directory")
    sample.add_argument("--scheduler", default=None,
                        help="difflab or diffusers scheduler name (default: the model's own; see README)")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance-scale", type=float, default=2.0)
    sample.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="digit classes, one grid row each")
    sample.add_argument("--num-per-class", type=int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, default=Path("grid.png"))
    sample.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> None:
    from . import sampling

    if args.model == "gmm":
        path = sampling.sample_gmm_scatter(args.scheduler or "euler-ddim", args.steps, 2000, args.seed, args.out)
    else:
        path = sampling.sample_digits_grid(args.model, args.scheduler, args.steps, args.guidance_scale, args.classes,
                                           args.num_per_class, args.seed, args.out)
    print(f"wrote {path}")


def _own_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Only the subcommand's own options (the trainer logs them as JSON; no dispatch entries)."""
    own = {action.dest for action in parser._actions}
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k in own})


def _add_models(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="train the built-in models")
    which = models.add_subparsers(dest="models", required=True, metavar="ACTION")
    from .models import train_digits

    train = which.add_parser("train-digits", help="train digits-ddpm, digits-flow or digits-classifier (accelerate)",
                             description=(train_digits.__doc__ or "").split("\n")[0])
    train_digits.add_arguments(train)
    train.set_defaults(func=lambda args: train_digits.run(_own_arguments(args, train)))


def _add_guidance(sub: argparse._SubParsersAction) -> None:
    guidance = sub.add_parser("guidance", help="guidance tools")
    which = guidance.add_subparsers(dest="guidance", required=True, metavar="ACTION")
    fit = which.add_parser("fit-linear-ag", help="fit LinearAG coefficients for a digits model, scheduler and step count")
    fit.add_argument("--model", default="digits-ddpm", help="built-in digits model or a local DigitsPipeline directory")
    fit.add_argument("--scheduler", default="dpm++2m", help="difflab or diffusers scheduler name")
    fit.add_argument("--steps", type=int, default=20)
    fit.add_argument("--guidance-scale", type=float, default=3.0)
    fit.add_argument("--per-class", type=int, default=20, help="fitting trajectories per class")
    fit.add_argument("--uncond-steps", type=int, nargs="+", default=None,
                     help="steps with a real unconditional call (default: the first 20%%)")
    fit.add_argument("--cond-only-from", type=int, default=None, help="first conditional-only step (default: half-way)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", type=Path, default=Path("linear_ag.json"))
    fit.set_defaults(func=_fit_linear_ag)


def _fit_linear_ag(args: argparse.Namespace) -> None:
    import torch

    from .guidance import fit_linear_ag
    from .models import load
    from .samplers import get_scheduler

    pipe = load(args.model)
    pipe.scheduler = get_scheduler(args.scheduler, pipe.scheduler.config)
    call = dict(class_labels=list(range(10)), num_images_per_label=args.per_class, output_type="latent",
                generator=torch.Generator().manual_seed(args.seed))
    fit = fit_linear_ag(pipe, call, args.steps, args.guidance_scale, args.uncond_steps, args.cond_only_from)
    fit.save(args.out)
    worst = max(fit.residual.values(), default=0.0)
    print(f"wrote {args.out}: real unconditional calls at steps {fit.uncond_steps}, surrogates at "
          f"{sorted(fit.coefficients)}, conditional only from step {fit.cond_only_from}; "
          f"worst relative residual {worst:.2e}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Recent diffusion-sampling research as drop-in diffusers components: samplers, guidance, "
        "particle samplers, distillation, alignment and FID.",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_sample(sub)
    _add_bench(sub)
    _add_models(sub)
    _add_guidance(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .models.hub import ModelFilesError

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ModelFilesError) as err:  # user errors: a message, not a traceback
        parser.exit(2, f"difflab {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
