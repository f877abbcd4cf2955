"""The ``difflab`` command. Every subcommand imports its implementation lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .distributed import leave_process_group

BENCHMARKS = {
    "samplers": ("difflab.benchmarks.samplers", "quality versus NFE on the exact Gaussian mixture"),
    "stability": ("difflab.benchmarks.stability", "divergence at high guidance, with and without momentum"),
    "lml": ("difflab.benchmarks.lml", "LML (lambda, kappa) sweep against the base solver"),
    "digits": ("difflab.benchmarks.digits", "class accuracy and FD-digits of the built-in digits models"),
    "guidance": ("difflab.benchmarks.guidance", "CFG, APG (difflab and diffusers), AG, LinearAG on digits-ddpm"),
    "fid": ("difflab.benchmarks.fid", "FID / KID against clean-fid: values and time (needs the eval extra)"),
    "composition": ("difflab.benchmarks.composition", "FKC and SuperDiff on exact Gaussian-mixture targets; AND of digits"),
    "usf": ("difflab.benchmarks.usf", "S^3-searched USF schedules against diffusers' solvers per NFE"),
    "distill": ("difflab.benchmarks.distill", "f-distill on a 2-D mixture of 8 unequal modes: mode coverage per divergence"),
    "distill-digits": ("difflab.benchmarks.distill_digits", "one-step digits-ddpm students: FD-digits vs generator steps"),
    "distill-pipeline": ("difflab.benchmarks.distill_pipeline",
                         "one-step student of a trained DDPMPipeline via --model DIR --train_data_dir"),
    "align": ("difflab.benchmarks.align", "AWM against a DDPO-style baseline: reward versus generated samples"),
}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .benchmarks.report import run_benchmark

    bench = sub.add_parser("bench", help="run a benchmark and write its table under docs/benchmarks/")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = which.add_parser(name, help=help_text, description=module.__doc__.split("\n")[0])
        module.add_arguments(parser)
        parser.set_defaults(func=lambda args, module=module: run_benchmark(module.run, args, sys.argv[3:]))


def _add_sample(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="sample a built-in model (or a local pipeline directory) into a PNG grid")
    sample.add_argument("--model", default="digits-ddpm",
                        help="digits-ddpm, digits-flow, gmm (2-D mixture scatter plot), a local DigitsPipeline "
                             "directory, or another diffusers pipeline directory (DDPMPipeline, Stable Diffusion, ...)")
    sample.add_argument("--prompt", nargs="+", default=None,
                        help="text pipelines: the prompts, one grid row each (digits models take --classes)")
    sample.add_argument("--scheduler", default=None,
                        help="difflab or diffusers scheduler name (default: the model's own; see README)")
    sample.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default 20, or the directory's difflab_sampling.json: 1 for a one-step "
                             "distilled pipeline)")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default 2.0, or the directory's difflab_sampling.json)")
    sample.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="digit classes, one grid row each (digits models)")
    sample.add_argument("--num-per-class", type=int, default=8, help="images per grid row")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, default=Path("grid.png"))
    sample.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> None:
    from . import sampling

    if args.model == "gmm":
        path = sampling.sample_gmm_scatter(args.scheduler or "euler-ddim", args.steps or 20, 2000, args.seed, args.out)
    else:
        from .models import load
        from .models.digits import DigitsPipeline

        pipe = load(args.model)
        if isinstance(pipe, DigitsPipeline):
            if args.prompt:
                raise ValueError("--prompt is for text pipelines; the digits models take --classes.")
            steps, guidance = sampling.recommended_settings(args.model, args.steps, args.guidance_scale)
            path = sampling.sample_digits_grid(pipe, args.scheduler, steps, guidance, args.classes,
                                               args.num_per_class, args.seed, args.out)
        else:
            steps, guidance = sampling.recommended_settings(args.model, args.steps, args.guidance_scale, None)
            path = sampling.sample_pipeline_grid(pipe, args.scheduler, steps, guidance, args.prompt,
                                                 args.num_per_class, args.seed, args.out,
                                                 sampling.saved_image_size(args.model))
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


def _add_distill(sub: argparse._SubParsersAction) -> None:
    from .distill import train as distill_train

    _add_trainer(sub, "distill", "train one-step generators (f-distill, DisBack) with accelerate", distill_train,
                 "of a digits model (--model) or a built-in Gaussian mixture (accelerate)")


def _add_align(sub: argparse._SubParsersAction) -> None:
    from .distill import align as align_train

    _add_trainer(sub, "align", "align a model to a reward (AWM, DDPO baseline) with accelerate", align_train,
                 "on a built-in digits model or the 2-D mixture")


def _add_trainer(sub: argparse._SubParsersAction, name: str, help_text: str, module, method_help: str) -> None:
    """``difflab NAME METHOD ...`` for a trainer module with METHODS, add_arguments(parser, method) and run(args)."""
    command = sub.add_parser(name, help=help_text)
    which = command.add_subparsers(dest=name, required=True, metavar="METHOD")
    for method in module.METHODS:
        parser = which.add_parser(method, help=f"{method} {method_help}",
                                  description=(module.__doc__ or "").split("\n")[0])
        module.add_arguments(parser, method)
        parser.set_defaults(func=lambda args, parser=parser, method=method: module.run(
            argparse.Namespace(**vars(_own_arguments(args, parser)), method=method)))


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
    from .models.digits import DigitsPipeline
    from .samplers import get_scheduler

    pipe = load(args.model)
    if not isinstance(pipe, DigitsPipeline):
        raise ValueError(f"fit-linear-ag fits the digits models; {args.model} is a {type(pipe).__name__}. For another "
                         "pipeline call difflab.guidance.fit_linear_ag(pipe, call_kwargs, ...) from Python with its "
                         "prompts in call_kwargs.")
    pipe.scheduler = get_scheduler(args.scheduler, pipe.scheduler.config)
    call = dict(class_labels=list(range(10)), num_images_per_label=args.per_class, output_type="latent",
                generator=torch.Generator().manual_seed(args.seed))
    fit = fit_linear_ag(pipe, call, args.steps, args.guidance_scale, args.uncond_steps, args.cond_only_from)
    fit.save(args.out)
    worst = max(fit.residual.values(), default=0.0)
    print(f"wrote {args.out}: real unconditional calls at steps {fit.uncond_steps}, surrogates at "
          f"{sorted(fit.coefficients)}, conditional only from step {fit.cond_only_from}; "
          f"worst relative residual {worst:.2e}")


def _add_fid_options(parser: argparse.ArgumentParser, stats_only: bool = False) -> None:
    parser.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow", "legacy_pytorch"],
                        help="clean-fid protocol (resize and network); default clean")
    parser.add_argument("--features", default="inception", choices=["inception", "digits"],
                        help="feature network: clean-fid's Inception, or the built-in digits classifier")
    parser.add_argument("--inception-weights", metavar="FILE", default=None,
                        help="Inception weights file to use instead of the cache / download (offline machines)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and resizing images")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable image files (and count them)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if not stats_only:
        parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_fid(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (("fid", "FID between two image folders / zips / .npz statistics"),
                            ("kid", "KID (seeded subsets) between two image folders / zips / .npz with features")):
        parser = sub.add_parser(name, help=help_text, description=help_text + ", in clean-fid's protocols.")
        parser.add_argument("a", help="folder, zip file or .npz statistics")
        parser.add_argument("b", nargs="?", help="folder, zip file or .npz statistics")
        parser.add_argument("--ref", metavar="NAME_OR_NPZ", help="reference statistics instead of B "
                            "(an .npz, or a clean-fid name such as cifar10_clean_train_32)")
        _add_fid_options(parser)
        if name == "fid":
            parser.add_argument("--cross-check", action="store_true",
                                help="also compute the distance with scipy's sqrtm and fail if they differ (> 1e-6)")
        else:
            parser.add_argument("--subsets", type=int, default=100)
            parser.add_argument("--subset-size", type=int, default=1000)
            parser.add_argument("--kid-seed", type=int, default=0)
        parser.set_defaults(func=_fid)
    stats = sub.add_parser("fid-stats", help="reference statistics (.npz) of an image folder or zip",
                           description="Write FID reference statistics (mu, sigma, and the network's hash) of a folder.")
    stats.add_argument("source", help="folder or zip file of images")
    stats.add_argument("-o", "--out", required=True, help="output .npz")
    stats.add_argument("--keep-features", action="store_true", help="store the features too (needed for KID)")
    _add_fid_options(stats, stats_only=True)
    stats.set_defaults(func=_fid_stats)


def _fid_kwargs(args: argparse.Namespace) -> dict:
    return dict(mode=args.mode, features=args.features, inception_weights=args.inception_weights,
                batch_size=args.batch_size, num_workers=args.workers, device=args.device, skip_bad=args.skip_bad,
                use_cache=not args.no_cache, verbose=not args.quiet)


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _fid(args: argparse.Namespace) -> None:
    import json

    from .eval.fid import compute_fid, compute_kid

    if (args.b is None) == (args.ref is None):
        raise ValueError("give exactly one of B and --ref (the second image set or reference statistics).")
    b = args.b if args.b is not None else args.ref
    if args.command == "fid":
        score = compute_fid(args.a, b, cross_check=args.cross_check, **_fid_kwargs(args))
    else:
        score = compute_kid(args.a, b, num_subsets=args.subsets, max_subset_size=args.subset_size,
                            kid_seed=args.kid_seed, **_fid_kwargs(args))
    if _is_main_process():
        print(json.dumps(score.as_dict()) if args.json else str(score))


def _fid_stats(args: argparse.Namespace) -> None:
    from .eval.fid import make_stats

    stats = make_stats(args.source, args.out, keep_features=args.keep_features, **_fid_kwargs(args))
    if _is_main_process():
        print(f"wrote {args.out}: {stats.n} images of {stats.description}, mode {args.mode}, "
              f"network {stats.metadata['network']} (sha256 {stats.metadata['weights_sha256'][:12] or 'n/a'}), "
              f"{len(stats.mu)}-d features" + (", features kept for KID" if args.keep_features else ""))


def _add_search(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser("search", help="S^3: search a USF solver schedule for a model and NFE budget",
                            description="Search a USF decision list (difflab.samplers.search); writes it as JSON for "
                            "USFScheduler(decisions=PATH). Resumable: run again with the same --log.")
    search.add_argument("--model", default="gmm",
                        help="gmm (the Gaussian mixture), digits-ddpm, digits-flow, or a pipeline directory: DDPM, Stable "
                             "Diffusion 1.x / 2.x / XL / 3, Flux")
    search.add_argument("--nfe", type=int, nargs="+", required=True, help="model calls per sample (one search per value)")
    search.add_argument("--metric", choices=["rmse", "fd"], default="rmse",
                        help="rmse: distance to an accurate solution from the same noise; fd: FD-digits (digits models)")
    search.add_argument("--mode", choices=["predictor", "evolution"], default="predictor",
                        help="predictor: S^3's predictor-based multi-stage search; evolution: the plain baseline")
    search.add_argument("--max-evaluations", type=int, default=400)
    search.add_argument("--max-minutes", type=float, default=None, help="wall-time budget per NFE")
    search.add_argument("--setting", default="vp-scaled_linear", help="gmm: vp-scaled_linear, vp-linear or flow")
    search.add_argument("--dim", type=int, default=16, help="gmm: dimension")
    search.add_argument("--num-samples", type=int, default=None, help="starting noises the search scores on")
    search.add_argument("--heldout-samples", type=int, default=None, help="other starting noises for the final score")
    search.add_argument("--guidance-scale", type=float, default=1.0,
                        help="digits models and text pipelines: classifier-free guidance")
    search.add_argument("--prompts", nargs="+", default=None,
                        help="text pipelines: the prompts, taken in turn by the starting noises")
    search.add_argument("--resolution", type=int, default=None,
                        help="SDXL and Flux pipelines: the image size in pixels (default: the pipeline's own)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--log", type=Path, default=None, help="JSON-lines evaluation log (resume source); default OUT.nfeN.jsonl")
    search.add_argument("--out", type=Path, default=Path("usf_schedule.json"))
    search.set_defaults(func=_search)


def _search(args: argparse.Namespace) -> None:
    import json

    from .samplers.search import s3_search
    from .samplers.search_objectives import build_objective

    schedules = {}
    for nfe in args.nfe:
        objective, space = build_objective(args.model, args.metric, nfe, setting=args.setting, dim=args.dim,
                                           num_samples=args.num_samples, heldout_samples=args.heldout_samples,
                                           guidance_scale=args.guidance_scale, seed=args.seed, prompts=args.prompts,
                                           resolution=args.resolution)
        log = args.log.with_suffix(f".nfe{nfe}.jsonl") if args.log else args.out.with_suffix(f".nfe{nfe}.jsonl")
        result = s3_search(objective, space, mode=args.mode, max_evaluations=args.max_evaluations,
                           max_minutes=args.max_minutes, seed=args.seed, log_path=log)
        result.best["metadata"].update(model=args.model, metric=args.metric, heldout_score=result.heldout_score,
                                       seconds=round(result.seconds, 1))
        schedules[str(nfe)] = result.best
        print(f"NFE {nfe}: {args.metric} {result.search_score:.4g} on the search noise, {result.heldout_score:.4g} held out "
              f"({result.evaluations} evaluations, {result.seconds:.0f} s; log {log})")
    data = schedules[str(args.nfe[0])] if len(args.nfe) == 1 else {"schedules": schedules}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}: USFScheduler.from_config(pipe.scheduler.config, decisions={str(args.out)!r})")


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
    _add_distill(sub)
    _add_align(sub)
    _add_guidance(sub)
    _add_fid(sub)
    _add_search(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .eval.weights import WeightsError
    from .models.hub import ModelFilesError

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError, ModelFilesError, WeightsError, ArithmeticError) as err:  # user errors: a message, not a traceback
        parser.exit(2, f"difflab {args.command}: error: {err}\n")
    finally:
        leave_process_group()


if __name__ == "__main__":
    main()
