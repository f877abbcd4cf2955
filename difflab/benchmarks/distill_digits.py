"""One-step students of digits-ddpm: f-distill (rkl = DMD2, js, kl) and DisBack, FD-digits versus generator steps.

Every run is the real trainer, ``difflab distill f-distill|disback --model digits-ddpm`` (one CPU thread
per run, two runs at a time on the 2-core machine), with the same seed, batch, learning rates, GAN
weight and iterations; only the method / divergence changes. The generator is a copy of the teacher
UNet conditioned at t = 610 on pure noise (``--generator_timestep auto``: at t = 999 the linear-beta
schedule has alpha = 0.006, and x0 = (z - sigma eps) / alpha amplifies every change of eps 156-fold,
which made training diverge at once in a pilot). Four fake-score / discriminator updates per
generator update (the paper's two-time-scale rule), discriminator head on the fake score's mid-block
features, EMA 0.99 of the generator (the evaluated and saved weights).

Every ``validation_steps`` iterations the trainer scores the EMA generator: FD-digits of 50 one-step
samples per class (500, fixed noise) against the 359 held-out real digits, and class accuracy by the
digits classifier. The teacher's number uses the same protocol: 500 samples of digits-ddpm with
DPM-Solver++ 2M at 50 steps, no guidance. "Train time" is the trainer's own clock (one thread,
including validation; DisBack's includes stage 1). Generator steps = iterations / 5. ``js-bf16`` is the
js run with ``--mixed_precision bf16`` (every training forward pass under bfloat16 autocast, float32
weights); its train time depends on the CPU's bfloat16 support.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .report import bench_main, publish

RUNS = {  # name: (method, divergence, extra trainer flags)
    "js": ("f-distill", "js", []),
    "disback-js": ("disback", "js", []),
    "rkl": ("f-distill", "rkl", []),
    "kl": ("f-distill", "kl", []),
    "disback-js-i500": ("disback", "js", ["--backtrack_interval", "500"]),
    "disback-js-plateau": ("disback", "js", ["--switch", "plateau", "--backtrack_interval", "500",
                                             "--min_node_steps", "100", "--plateau_window", "40"]),
    "js-bf16": ("f-distill", "js", ["--mixed_precision", "bf16"]),  # the js run under bfloat16 autocast
}
DEFAULT_RUNS = ["js", "disback-js", "rkl", "kl"]
SMOOTHING = 3  # validations in the running mean of the smoothed DisBack comparison


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=3000, help="iterations per run (critic + generator updates)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-generator", type=float, default=3e-5)
    parser.add_argument("--lr-critic", type=float, default=1e-4)
    parser.add_argument("--gan-weight", type=float, default=1e-3)
    parser.add_argument("--validation-steps", type=int, default=250)
    parser.add_argument("--num-nodes", type=int, default=4, help="DisBack: path nodes")
    parser.add_argument("--node-interval", type=int, default=100, help="DisBack: stage-1 DSM steps per node")
    parser.add_argument("--backtrack-interval", type=int, default=150, help="DisBack: iterations per target")
    parser.add_argument("--init-generator", type=Path, default=None,
                        help="every run starts from this one-step student (the trainer's --init_generator), e.g. a "
                             "short f-distill run: DisBack's setting in the paper's SDXL experiment")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_runs/distill_digits"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --workdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/distill-digits.md"))


def trainer_command(args: argparse.Namespace, name: str) -> list[str]:
    method, divergence, extra = RUNS[name]
    cmd = [sys.executable, "-m", "difflab.distill.train", method, "--model", "digits-ddpm",
           "--output_dir", str(args.workdir / name), "--divergence", divergence,
           "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
           "--learning_rate", str(args.lr_generator), "--critic_learning_rate", str(args.lr_critic),
           "--gan_weight", str(args.gan_weight), "--validation_steps", str(args.validation_steps),
           "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--seed", str(args.seed),
           "--no_progress"]
    if method == "disback":
        cmd += ["--num_nodes", str(args.num_nodes), "--node_interval", str(args.node_interval),
                "--degradation_learning_rate", str(args.lr_critic), "--backtrack_interval", str(args.backtrack_interval)]
    if args.init_generator is not None:
        cmd += ["--init_generator", str(args.init_generator)]
    return cmd + extra  # later flags win


def run_trainers(args: argparse.Namespace) -> dict[str, dict]:
    """Run (or reuse) every trainer, ``--parallel`` at a time, one thread each; their summaries by name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = [n for n in args.runs if not (args.reuse and (args.workdir / n / "train_summary.json").is_file())]
    running: list[tuple[str, subprocess.Popen]] = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(args.workdir / f"{name}.log", "w")
            print(f"start {name}: {' '.join(trainer_command(args, name))}", flush=True)
            running.append((name, subprocess.Popen(trainer_command(args, name), env=env, stdout=log,
                                                   stderr=subprocess.STDOUT)))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode != 0:
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {args.workdir / name}.log")
                print(f"finished {name}", flush=True)
    return {n: json.loads((args.workdir / n / "train_summary.json").read_text()) for n in args.runs}


def curve(summary: dict) -> list[tuple[int, float, float]]:
    """(generator steps, FD-digits, accuracy) of every validation of a run, step 0 first if present."""
    every = int(summary["args"]["critic_updates"]) + 1
    return [(h["step"] // every, h["fd_digits"], h["accuracy"]) for h in summary["history"] if h.get("validation")]


def first_reaching(points: list[tuple[int, float, float]], level: float) -> int | None:
    """Generator steps of the first validation with FD-digits <= level (None if never)."""
    return next((steps for steps, fd, _ in points if fd <= level), None)


def running_mean(points: list[tuple[int, float, float]], window: int = SMOOTHING) -> list[tuple[int, float, float]]:
    """The curve averaged over ``window`` consecutive validations, each mean placed at the last of them.

    One validation's FD-digits moves by a unit or two between neighbouring checkpoints, which on a flat
    stretch of the curve decides "first reaching" by luck; the running mean is the steadier comparison.
    """
    return [(points[i][0], sum(fd for _, fd, _ in points[i - window + 1:i + 1]) / window, points[i][2])
            for i in range(window - 1, len(points))]


def cpu_description() -> str:
    """The CPU's model name and whether it has bfloat16 instructions (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown")
    flags = {f for line in info.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name}, bfloat16 instructions: {', '.join(bf16) if bf16 else 'none'}"


def teacher_score(seeds: list[int]) -> dict:
    """FD-digits / accuracy of digits-ddpm with DPM-Solver++ 2M, 50 steps, no guidance, 50 per class:
    the mean over ``seeds`` (500-sample FD-digits moves by several units from one noise draw to another)
    and the per-seed values."""
    from ..eval.digits import evaluate_digits
    from ..models import load

    pipe = load("digits-ddpm")
    labels = torch.arange(10).repeat_interleave(50)
    scores = []
    for seed in seeds:
        images = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=50, output_type="latent",
                      generator=torch.Generator().manual_seed(seed)).images
        scores.append(evaluate_digits(images, labels).as_dict())
    mean = {k: sum(s[k] for s in scores) / len(scores) for k in ("fd_digits", "accuracy", "noise_floor")}
    return {**mean, "per_seed": [s["fd_digits"] for s in scores]}


def start_note(args: argparse.Namespace, curves: dict[str, list]) -> list[str]:
    """The page's line on where the runs start when they refine a student (``--init-generator``)."""
    if args.init_generator is None:
        return []
    first = next(iter(curves.values()))[0]
    made = ""
    summary = Path(args.init_generator) / "train_summary.json"
    if summary.is_file():  # a difflab distill result says how it was trained
        a = json.loads(summary.read_text())["args"]
        made = (f" It was trained by `difflab distill {a['method']}` ({a['divergence']}, {a['max_train_steps']} "
                f"iterations = {a['max_train_steps'] // (a['critic_updates'] + 1)} generator steps, batch "
                f"{a['train_batch_size']}, lr {a['learning_rate']:g} / {a['critic_learning_rate']:g}, seed {a['seed']}).")
    return [f"Start: every run begins at the one-step student `{args.init_generator}` (`--init_generator`; FD-digits "
            f"{first[1]:.1f} at generator step 0) instead of a teacher copy, with a fresh fake score (a teacher copy; "
            f"DisBack: its path's student end) and discriminator head; generator steps count from there.{made}\n"]


def own_first(points: list[tuple[int, float, float]], level: float, last: int) -> str:
    """", which it first reached at N steps" when a curve was at its final level before its last step: on a
    plateau the "reaches the baseline's final level" ratio then says little about speed."""
    steps = first_reaching(points, level)
    return "" if steps is None or steps >= last else f", a level it had first reached at {steps} steps"


def curves_png(curves: dict[str, list], teacher_fd: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=name)
    ax.axhline(teacher_fd, color="black", lw=1, label="teacher, 50 steps")
    ax.axhline(2 * teacher_fd, color="black", lw=1, ls="--", label="2x teacher")
    ax.set_yscale("log")
    ax.set_xlabel("generator steps")
    ax.set_ylabel("FD-digits (500 samples, EMA generator)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    summaries = run_trainers(args)
    torch.set_num_threads(2)
    teacher = teacher_score([args.seed + 1, args.seed + 2, args.seed + 3])
    t_fd = teacher["fd_digits"]
    curves = {name: curve(s) for name, s in summaries.items()}
    png = args.out.with_suffix(".png")
    curves_png(curves, t_fd, png)
    grid = args.out.with_name(args.out.stem + "-samples.png")
    best = min(summaries, key=lambda n: summaries[n]["fd_digits"])
    shutil.copyfile(args.workdir / best / "samples.png", grid)
    lines = ["| run | method | divergence | final FD-digits | final / teacher | accuracy | generator steps to "
             "<= 2x teacher | train time to <= 2x teacher | generator steps | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        points = curves[name]
        reach = first_reaching(points, 2 * t_fd)
        seconds_per_step = s["train_seconds"] / max(points[-1][0], 1)
        reach_s = "-" if reach is None else f"about {reach * seconds_per_step / 60:.0f} min"
        lines.append(f"| {name} | {s['method']} | {s['divergence']} | {s['fd_digits']:.1f} | {s['fd_digits'] / t_fd:.2f}"
                     f" | {s['accuracy']:.3f} | {'never' if reach is None else reach} | {reach_s} | {points[-1][0]} |"
                     f" {s['train_seconds'] / 60:.1f} min |")
    per_seed = ", ".join(f"{v:.1f}" for v in teacher["per_seed"])
    disback_runs = [n for n in summaries if RUNS[n][0] == "disback"]
    body = [f"Teacher (digits-ddpm, DPM-Solver++ 2M, 50 steps, no guidance): FD-digits {t_fd:.1f} (mean of three "
            f"noise draws: {per_seed}), accuracy {teacher['accuracy']:.3f}; noise floor of 500 real digits "
            f"{teacher['noise_floor']:.1f}. The students' 500 samples use one fixed noise draw.\n",
            f"Settings: {args.steps} iterations (4 critic updates per generator update), batch {args.batch_size}, "
            f"AdamW lr {args.lr_generator:g} (generator) / {args.lr_critic:g} (fake score, head), GAN weight "
            f"{args.gan_weight:g}, seed {args.seed}."
            + (f" DisBack: {args.num_nodes} nodes of {args.node_interval} DSM steps (lr {args.lr_critic:g}), then "
               f"{args.backtrack_interval} iterations per target." if disback_runs else "") + "\n",
            *start_note(args, curves), *lines, "", "FD-digits of the EMA generator at each validation (generator steps: FD / accuracy):\n"]
    for name, points in curves.items():
        body.append(f"- {name}: " + ", ".join(f"{st}: {fd:.1f} / {acc:.2f}" for st, fd, acc in points))
    if any("bf16" in RUNS[n][2] for n in summaries):
        body.append(f"\nCPU of these runs: {cpu_description()}. The bf16 run's time depends on it.")
    if "js" in summaries and disback_runs:
        target, base_steps = summaries["js"]["fd_digits"], curves["js"][-1][0]
        body.append(f"\nDisBack against its baseline (f-distill js): the baseline's final FD-digits {target:.1f} after "
                    f"{base_steps} generator steps{own_first(curves['js'], target, base_steps)}. Generator steps until "
                    "DisBack's EMA generator first reaches it (stage-2 steps; stage 1 trains no generator):\n")
        for name in disback_runs:
            steps = first_reaching(curves[name], target)
            ratio = "never within the run" if steps is None else f"{steps} steps, {steps / base_steps:.2f}x the baseline's"
            every = int(summaries[name]["args"]["critic_updates"]) + 1
            switches = [sw["iteration"] // every for sw in summaries[name].get("switches", [])]
            body.append(f"- {name} ({' '.join(RUNS[name][2]) or 'defaults'}): {ratio}; final FD-digits "
                        f"{summaries[name]['fd_digits']:.1f}; targets switched at generator steps {switches}.")
        smooth_base = running_mean(curves["js"])
        smooth_target = smooth_base[-1][1]
        body.append(f"\nThe same comparison on the running mean of {SMOOTHING} consecutive validations (the baseline's "
                    f"level: the mean of its last {SMOOTHING}, {smooth_target:.1f}"
                    f"{own_first(smooth_base, smooth_target, base_steps)}; DisBack reaches it when the mean of "
                    f"{SMOOTHING} consecutive validations first drops to it, counted at the last of them):\n")
        for name in disback_runs:
            steps = first_reaching(running_mean(curves[name]), smooth_target)
            ratio = "never within the run" if steps is None else f"{steps} steps, {steps / base_steps:.2f}x the baseline's"
            body.append(f"- {name}: {ratio}.")
    body.append(f"\nSamples of the best run ({best}, one step, EMA weights):\n\n![samples]({grid.name})")
    title = "One-step digits-ddpm students: f-distill" + (" and DisBack" if disback_runs else "")
    return publish(args.out, title, "distill_digits", argv,
                   time.time() - start, __doc__, "\n".join(lines), body="\n".join(body) + "\n", picture=png.name)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
