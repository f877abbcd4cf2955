"""The ``difflab`` command. Every subcommand imports its implementation lazily."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and write its table under docs/benchmarks/")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    samplers = which.add_parser("samplers", help="quality versus NFE on the exact Gaussian mixture")
    from .benchmarks import samplers as samplers_bench

    samplers_bench.add_arguments(samplers)
    samplers.set_defaults(func=lambda args: samplers_bench.run(args, sys.argv[3:]))


def _add_sample(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="sample a built-in model and write a picture")
    sample.add_argument("--model", default="gmm", help="built-in model name (gmm)")
    sample.add_argument("--scheduler", default="euler-ddim", help="difflab or diffusers scheduler name")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--num-samples", type=int, default=2000)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, default=Path("samples.png"))
    sample.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> None:
    from .sampling import sample_gmm_scatter

    path = sample_gmm_scatter(args.scheduler, args.steps, args.num_samples, args.seed, args.out)
    print(f"wrote {path}")


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
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:  # user errors: a message, not a traceback
        parser.exit(2, f"difflab {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
