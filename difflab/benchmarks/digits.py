"""Quality of the built-in digits models: class accuracy and FD-digits against the noise floor.

For each model, 50 samples per class (500) with its reference sampler (DPM-Solver++ 2M for
``digits-ddpm``, FlowMatch Euler for ``digits-flow``) at 10, 20 and 50 steps and guidance 1 and
3, plus guidance 2 at 20 steps (the acceptance setting). FD-digits is measured against the 359 held-out real digits; the noise floor is the FD-digits of
500 real train-split digits against the same held-out set (mean of 10 random subsets). How the
models were trained (commands, times): docs/benchmarks/digits-training.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .report import bench_main, publish

MODELS = {"digits-ddpm": "dpm++2m", "digits-flow": "flow-euler"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--also", type=str, nargs="*", default=["20:2"],
                        help="extra STEPS:GUIDANCE cells (default: the 20-step, guidance-2 acceptance setting)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/digits.md"))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    from ..eval.digits import evaluate_digits, noise_floor
    from ..models import load
    from ..models.digits import make_grid
    from ..samplers import get_scheduler

    start = time.time()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    floor = noise_floor(len(labels))
    lines = ["| model | sampler | steps | guidance | class accuracy | FD-digits | FD / floor | sampling s |", "|---|---|---|---|---|---|---|---|"]
    grids = []
    cells = [(s, w) for s in args.steps for w in args.guidance]
    cells += [(int(c.split(":")[0]), float(c.split(":")[1])) for c in args.also if c]
    with tqdm(total=len(args.models) * len(cells), desc="digits", unit="run") as progress:
        for name in args.models:
            pipe = load(name)
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = get_scheduler(MODELS[name], pipe.scheduler.config)
            for steps, w in cells:
                t0 = time.time()
                x = pipe(class_labels=labels, guidance_scale=w, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(args.seed), output_type="latent").images
                seconds = time.time() - t0
                score = evaluate_digits(x.clamp(-1, 1), labels)
                lines.append(f"| {name} | {MODELS[name]} | {steps} | {w:g} | {score.accuracy:.3f} | "
                             f"{score.fd_digits:.2f} | {score.fd_ratio:.2f} | {seconds:.1f} |")
                if steps == 20 and w == 2.0:
                    grid_path = args.out.parent / f"{name}-grid.png"
                    picks = torch.cat([x[c * args.per_class: c * args.per_class + 10] for c in range(10)])
                    make_grid((picks.clamp(-1, 1) + 1) / 2, nrow=10, labels=[str(c) for c in range(10)]).save(grid_path)
                    grids.append((name, grid_path.name))
                progress.update(1)
    table = "\n".join(lines)
    body = f"Noise floor (real vs real, {len(labels)} samples): **{floor:.2f}**.\n\n" + table + "\n\n"
    body += "\n".join(f"{name}, 20 steps, guidance 2 (rows = classes 0-9):\n\n![{name}]({png})\n" for name, png in grids)
    return publish(args.out, "Built-in digits models", "digits", argv, time.time() - start, __doc__, table, body)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
