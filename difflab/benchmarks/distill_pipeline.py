"""A one-step student of a trained diffusers DDPMPipeline, through the generic pipeline path of `difflab distill`.

The teacher is digits-ddpm made into an unconditional ``DDPMPipeline``: its UNet adds the embedding of
the null class (label 10, the one classifier-free guidance uses) to the time embedding, so a
``UNet2DModel`` without class embeddings whose time-embedding output bias holds that vector computes
exactly the same function (checked to 1e-5 before anything runs). Nothing digits-specific is left:
the trainer sees a saved DDPMPipeline directory and an image folder (the 1,438 train-split digits as
16x16 PNGs), as a user with their own DDPM and images would:

    difflab distill f-distill --model DDPM_DIR --train_data_dir PNG_DIR --divergence js ...

with the settings of the digits-ddpm student in distill-digits.md (batch 32, AdamW 3e-5 / 1e-4, GAN
weight 1e-3, four critic updates per generator update, EMA 0.99), one CPU thread. The student is
scored after training: FD-digits of unconditional samples (three noise draws of ``--eval-samples``)
against the 359 held-out real digits; the teacher with DPM-Solver++ 2M at 50 steps, the student with
its saved one-step pipeline. The unconditional teacher is much weaker than the class-conditional one
(its null-class samples mix styles), so compare the student with this teacher, not with digits.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .report import bench_main, publish


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=4000, help="distillation iterations (critic + generator updates)")
    parser.add_argument("--divergence", default="js")
    parser.add_argument("--eval-samples", type=int, default=500, help="samples per noise draw (three draws)")
    parser.add_argument("--teacher-steps", type=int, default=50, help="DPM-Solver++ 2M steps of the teacher")
    parser.add_argument("--workdir", type=Path, default=Path("bench_runs/distill_pipeline"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/distill-pipeline.md"))


def unconditional_digits_pipeline(output_dir: Path) -> Path:
    """Save digits-ddpm as an exactly equivalent unconditional DDPMPipeline (null class folded into the bias)."""
    from diffusers import DDPMPipeline, UNet2DModel

    from ..models import NULL_CLASS, load

    pipe = load("digits-ddpm")
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "num_class_embeds": None})
    state = {k: v for k, v in pipe.unet.state_dict().items() if not k.startswith("class_embedding.")}
    # UNet2DModel: emb = time_embedding(t) + class_embedding(label); time_embedding ends in linear_2
    state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + \
        pipe.unet.class_embedding.weight[NULL_CLASS].detach()
    unet.load_state_dict(state, strict=True)
    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 300, 610, 999])
    with torch.no_grad():
        gap = (unet(x, t).sample - pipe.unet(x, t, class_labels=torch.full((4,), NULL_CLASS)).sample).abs().max()
    if gap > 1e-5:
        raise RuntimeError(f"the unconditional UNet differs from digits-ddpm's null class by {gap:.2e}.")
    DDPMPipeline(unet=unet, scheduler=pipe.scheduler).save_pretrained(output_dir)
    return output_dir


def write_digits_folder(folder: Path) -> int:
    """The train-split digits as 16x16 grayscale PNGs; returns their count."""
    from PIL import Image

    from ..models import load_digits_dataset

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_digits_dataset("train")
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(folder / f"{i:04d}.png")
    return len(pixels)


def trainer_command(args: argparse.Namespace, teacher: Path, images: Path) -> list[str]:
    return [sys.executable, "-m", "difflab.distill.train", "f-distill", "--model", str(teacher),
            "--train_data_dir", str(images), "--output_dir", str(args.workdir / "student"),
            "--divergence", args.divergence, "--max_train_steps", str(args.steps), "--train_batch_size", "32",
            "--learning_rate", "3e-05", "--critic_learning_rate", "0.0001", "--gan_weight", "0.001",
            "--validation_steps", str(max(args.steps // 4, 1)), "--checkpointing_steps", "500",
            "--checkpoints_total_limit", "1", "--seed", str(args.seed), "--no_progress"]


@torch.no_grad()
def pipeline_fd(path: Path, steps: int, num_samples: int) -> tuple[list[float], float]:
    """FD-digits of three noise draws of unconditional samples of a saved pipeline, and the noise floor."""
    from diffusers import DiffusionPipeline

    from ..eval.digits import evaluate_digits

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    scores = []
    for seed in (1, 2, 3):
        x = pipe(batch_size=num_samples, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 output_type="np").images
        scores.append(evaluate_digits(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1))
    return [s.fd_digits for s in scores], scores[-1].noise_floor


def samples_png(teacher: Path, student: Path, teacher_steps: int, png: Path) -> None:
    """Two rows of 16 from the same noise: the teacher (top) and the one-step student (bottom)."""
    from diffusers import DiffusionPipeline

    from ..distill.pipelines import save_image_grid

    rows = []
    for path, steps in ((teacher, teacher_steps), (student, 1)):
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        x = pipe(batch_size=16, generator=torch.Generator().manual_seed(7), num_inference_steps=steps,
                 output_type="np").images
        rows.append(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1)
    save_image_grid(torch.cat(rows), png, 16)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    teacher = unconditional_digits_pipeline(args.workdir / "teacher")
    count = write_digits_folder(args.workdir / "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = trainer_command(args, teacher, args.workdir / "train")
    print("train:", " ".join(command), flush=True)
    with open(args.workdir / "student.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    train_seconds = time.time() - start
    student = args.workdir / "student"
    t_fd, floor = pipeline_fd(teacher, args.teacher_steps, args.eval_samples)
    s_fd, _ = pipeline_fd(student, 1, args.eval_samples)
    png = args.out.with_name(args.out.stem + "-samples.png")
    samples_png(teacher, student, args.teacher_steps, png)
    t_mean, s_mean = sum(t_fd) / 3, sum(s_fd) / 3
    generator_steps = args.steps // 5
    table = "\n".join([
        "| model | sampling | FD-digits per noise draw | mean FD-digits | / teacher |", "|---|---|---|---|---|",
        f"| teacher (unconditional DDPMPipeline) | DPM-Solver++ 2M, {args.teacher_steps} steps | "
        f"{' / '.join(f'{v:.1f}' for v in t_fd)} | {t_mean:.1f} | 1.00 |",
        f"| one-step student ({args.divergence}, {generator_steps} generator steps) | its saved one-step pipeline | "
        f"{' / '.join(f'{v:.1f}' for v in s_fd)} | {s_mean:.1f} | {s_mean / t_mean:.2f} |"])
    body = (f"\n{count} training PNGs; {args.eval_samples} samples per draw; noise floor of {args.eval_samples} real "
            f"digits {floor:.1f}. Training ({args.steps} iterations, one thread) took {train_seconds / 60:.1f} min; "
            f"the trainer's command:\n\n```\n{' '.join(command[1:])}\n```\n\n"
            f"{table}\n\nSame noise, teacher (top) and one-step student (bottom):\n\n![samples]({png.name})\n")
    return publish(args.out, "A one-step student of a trained DDPMPipeline (the generic pipeline path)",
                   "distill_pipeline", argv, time.time() - start, __doc__, table, body=body)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
