"""AWM against a DDPO-style baseline: reward versus generated samples on the digits models and a 2-D mixture.

Both methods run in the same harness (:mod:`difflab.distill.aligner`): each round draws 4 groups of 16
samples from the current policy for the null class (the unconditional prompt), scores them, normalizes
the rewards into group advantages (group mean, global std, clip 5, scale to [-1, 1]) and takes ONE
AdamW step (weight decay 1e-4, gradient norm clipped at 1); full fine-tuning of the UNet. They differ
only in the loss and in how the rollouts are sampled:

* AWM (Xue et al. 2025): rollouts with the model's own scheduler (digits-flow: FlowMatchEuler; digits-ddpm:
  DPM-Solver++ 2M), 10 steps, ODE; the pretraining loss on the final samples at 6 timesteps of that grid
  (first step and last 10% skipped, fresh noise each), weighted by the advantages with the reference
  code's ghuber psi; velocity/eps-MSE KL to the frozen base with weight ``--awm_kl``; EMA anchor weight 1.
* DDPO / Flow-GRPO style: stochastic rollouts on the same 10-step grid (DDIM eta = 1: the DDPM ancestral
  step, or the matching flow SDE step), the clipped policy-gradient surrogate over every noisy step
  (clip 1e-4; on-policy the ratio is 1), no KL (as DDPO).

Reward "class K": the built-in digits classifier's probability of class K. Every ``--eval_every`` rounds
the policy is evaluated on 256 fixed-noise ODE samples with its own scheduler (the same evaluation for
both methods, so DDPO's noisier SDE rollouts do not count against it): mean reward, share classified as
K, and FD-digits to ALL real digits of class K (about 180; a small reference, so only compare FD numbers
within this page). "Samples to 90%" is the number of generated (rollout) samples after which the
evaluated reward first reaches 90% of AWM's final evaluated reward at its chosen learning rate; a
method that never reaches it within its budget shows "> budget". The learning-rate grid of each method
is in the tables; each method is reported at its best learning rate (fewest samples to the threshold).

The 2-D case: the ring of 8 unequal modes (``difflab.models.gmm.unequal_ring``), an MLP fitted to the
exact eps-denoiser as the base model, the reward a soft disk of radius 0.3 on the lightest mode. The
ideal aligned distribution -- the mixture restricted to the disk -- is sampled exactly, so the energy
distance to it measures both reward and "no collapse".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

from .report import bench_main, write_report

GRID = {"awm": [1e-5, 3e-5, 1e-4], "ddpo": [1e-4, 3e-4, 1e-3]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["digits-flow", "digits-ddpm"])
    parser.add_argument("--target_class", type=int, default=3)
    parser.add_argument("--awm_rounds", type=int, default=30)
    parser.add_argument("--ddpo_rounds", type=int, default=48)
    parser.add_argument("--awm_lrs", type=float, nargs="+", default=GRID["awm"])
    parser.add_argument("--ddpo_lrs", type=float, nargs="+", default=GRID["ddpo"])
    parser.add_argument("--awm_kl", type=float, default=0.1, help="KL weight of AWM to the base model.")
    parser.add_argument("--eval_every", type=int, default=3)
    parser.add_argument("--ink", action="store_true", help="Also the ink reward on the first model.")
    parser.add_argument("--mixture_rounds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/align.md"))


# --------------------------------------------------------------------------------------------
# One run (in a worker process)
# --------------------------------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """Train one (model, method, learning rate, reward) configuration; the evaluation history."""
    torch.set_num_threads(1)
    from ..distill.aligner import AlignConfig, align_iteration, build_state, digits_problem, mixture_problem
    from ..distill.rewards import build_reward

    reward = build_reward(job["reward"])
    if job["model"] == "mixture":
        problem = mixture_problem(reward, teacher_steps=2000, eval_samples=2000)
    else:
        problem = digits_problem(job["model"], reward, None, eval_samples=256, target_class=job.get("target_class"))
    extra = {"kl_beta": job["kl"]} if job["method"] == "awm" else {}
    config = AlignConfig(method=job["method"], learning_rate=job["lr"], max_train_steps=job["rounds"], **extra)
    state = build_state(problem, config)
    history = [{"samples": 0, "seconds": 0.0, **problem.evaluate(state.policy, config.num_inference_steps)}]
    start = time.time()
    for _ in range(job["rounds"]):
        align_iteration(state, problem, config)
        if state.step % job["eval_every"] == 0 or state.step == job["rounds"]:
            entry = problem.evaluate(state.policy, config.num_inference_steps)
            history.append({"samples": state.samples, "seconds": time.time() - start, **entry})
    result = {**job, "history": history, "seconds": time.time() - start}
    if job["model"] != "mixture":
        from ..distill.aligner import policy_samples

        result["grid"] = policy_samples(problem, state.policy, 32, config.num_inference_steps).tolist()
    else:
        from ..distill.aligner import policy_samples

        result["points"] = policy_samples(problem, state.policy, 2000, config.num_inference_steps).tolist()
    print(f"done {job['model']} {job['method']} lr {job['lr']:g} {job['reward']}: final {history[-1]} "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def base_class_fd(model: str, target_class: int, n: int = 256) -> float:
    """FD-digits to the real class digits of the base model's class-conditional samples (same sampler)."""
    from ..distill.aligner import digits_problem, policy_samples
    from ..distill.rewards import DigitsClassReward
    from ..eval.digits import fd_to_class

    problem = digits_problem(model, DigitsClassReward(target_class), target_class)
    return fd_to_class(policy_samples(problem, problem.net, n, 10), target_class)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def samples_to(history: list[dict], level: float) -> int | None:
    for entry in history:
        if entry["eval_reward"] >= level:
            return entry["samples"]
    return None


def _fmt(n: int | None, budget: int) -> str:
    return f"> {budget}" if n is None else str(n)


def reward_table(results: list[dict], model: str, reward: str) -> tuple[list[str], dict]:
    """Rows per (method, lr) and the headline comparison for one model and reward."""
    runs = [r for r in results if r["model"] == model and r["reward"] == reward]
    awm = [r for r in runs if r["method"] == "awm"]
    # AWM's chosen learning rate: the highest final reward, ties to the lower FD
    chosen = max(awm, key=lambda r: (round(r["history"][-1]["eval_reward"], 2), -r["history"][-1].get("fd_to_class", 0)))
    level = 0.9 * chosen["history"][-1]["eval_reward"]
    rows = ["| method | lr | rounds x 64 | start reward | final reward | final class share | final FD to class | "
            f"samples to {level:.3f} | train s |", "|---|---|---|---|---|---|---|---|---|"]
    best: dict[str, tuple] = {}
    for r in sorted(runs, key=lambda r: (r["method"], r["lr"])):
        h, budget = r["history"], r["history"][-1]["samples"]
        n = samples_to(h, level)
        rows.append(f"| {r['method']} | {r['lr']:g} | {r['rounds']} | {h[0]['eval_reward']:.3f} | "
                    f"{h[-1]['eval_reward']:.3f} | {h[-1].get('eval_class_share', float('nan')):.3f} | "
                    f"{h[-1].get('fd_to_class', float('nan')):.0f} | {_fmt(n, budget)} | {r['seconds']:.0f} |")
        key = (n if n is not None else 10**9, -h[-1]["eval_reward"])
        if r["method"] not in best or key < best[r["method"]][0]:
            best[r["method"]] = (key, r, n, budget)
    return rows, {"level": level, "best": best, "chosen": chosen}


def headline(model: str, reward: str, info: dict, base_fd: float | None) -> str:
    (_, awm, n_awm, _), (_, ddpo, n_ddpo, budget) = info["best"]["awm"], info["best"]["ddpo"]
    if n_awm is None:
        ratio = "AWM did not reach the threshold"
    elif n_ddpo is None:
        ratio = f"> {budget / n_awm:.1f}x (DDPO did not reach it within {budget} samples)"
    else:
        ratio = f"{n_ddpo / n_awm:.1f}x"
    text = (f"**{model}, {reward}**: 90% of AWM's final reward = {info['level']:.3f}. AWM (lr {awm['lr']:g}) reaches "
            f"it after {_fmt(n_awm, 0)} samples, DDPO (best lr {ddpo['lr']:g}) after {_fmt(n_ddpo, budget)}: "
            f"AWM needs {ratio} fewer samples.")
    if base_fd is not None:
        fd = info["chosen"]["history"][-1].get("fd_to_class")
        text += (f" FD-digits to the real class digits: base model's class-conditional samples {base_fd:.0f}, "
                 f"AWM final {fd:.0f} ({fd / base_fd:.1f}x).")
    return text


def curves_figure(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["reward"]) for r in results})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.5), squeeze=False)
    for col, (model, reward) in enumerate(panels):
        for r in sorted((r for r in results if (r["model"], r["reward"]) == (model, reward)),
                        key=lambda r: (r["method"], r["lr"])):
            style = "-" if r["method"] == "awm" else "--"
            xs = [e["samples"] for e in r["history"]]
            label = f"{r['method']} lr {r['lr']:g}"
            axes[0][col].plot(xs, [e["eval_reward"] for e in r["history"]], style, marker=".", label=label)
            axes[1][col].plot([e["seconds"] for e in r["history"]], [e["eval_reward"] for e in r["history"]], style,
                              label=label)
        axes[0][col].set(title=f"{model}: {reward}", xlabel="generated samples", ylabel="reward (eval)")
        axes[1][col].set(xlabel="wall seconds (1 CPU thread)", ylabel="reward (eval)")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def grids_figure(results: list[dict], png: Path) -> None:
    from ..models.digits import make_grid

    rows, labels = [], []
    for r in results:
        if "grid" in r:
            rows.append((torch.tensor(r["grid"])[:16].clamp(-1, 1) + 1) / 2)
            labels.append(f"{r['model']} {r['method']} {r['lr']:g} {r['reward']}")
    if rows:
        make_grid(torch.cat(rows), nrow=16).save(png)
        png.with_suffix(".txt").write_text("rows, top to bottom:\n" + "\n".join(labels) + "\n")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = []
    cls = f"class:{args.target_class}"
    for model in args.models:
        rewards = [cls] + (["ink"] if args.ink and model == args.models[0] else [])
        for reward in rewards:
            for method, lrs, rounds in (("awm", args.awm_lrs, args.awm_rounds), ("ddpo", args.ddpo_lrs, args.ddpo_rounds)):
                if reward == "ink":
                    lrs = lrs[1:2]
                for lr in lrs:
                    jobs.append({"model": model, "method": method, "lr": lr, "reward": reward, "rounds": rounds,
                                 "kl": args.awm_kl, "eval_every": args.eval_every,
                                 "target_class": args.target_class})
    if args.mixture_rounds:
        from ..models.gmm import unequal_ring

        ring = unequal_ring()
        light = ring.means[int(ring.weights.argmin())].tolist()
        region = f"region:{light[0]:.4f},{light[1]:.4f},0.3"
        for method, lr in (("awm", 1e-3), ("ddpo", 1e-3)):
            jobs.append({"model": "mixture", "method": method, "lr": lr, "reward": region,
                         "rounds": args.mixture_rounds, "kl": args.awm_kl, "eval_every": args.eval_every})
    jobs.sort(key=lambda j: -j["rounds"] * (2 if j["model"] != "mixture" else 0.1))
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run_job, jobs, chunksize=1)
    raw = args.out.with_suffix(".json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("grid", "points")} for r in results], indent=1))
    return report(results, args, argv, time.time() - start)


def report(results: list[dict], args: argparse.Namespace, argv: list[str] | None, seconds: float) -> str:
    png = args.out.with_suffix(".png")
    digits = [r for r in results if r["model"] != "mixture"]
    curves_figure(results, png)
    grids_figure(digits, args.out.with_name(args.out.stem + "-samples.png"))
    body = []
    for model, reward in sorted({(r["model"], r["reward"]) for r in digits}):
        rows, info = reward_table(results, model, reward)
        base = base_class_fd(model, args.target_class) if reward.startswith("class") else None
        body += [headline(model, reward, info, base), "", *rows, ""]
    mixture = [r for r in results if r["model"] == "mixture"]
    if mixture:
        body += ["**2-D mixture, reward = soft disk on the lightest mode** (energy distance to exact samples of the "
                 "mixture restricted to the disk; lower is better):", "",
                 "| method | lr | rounds x 64 | start reward | final reward | share inside | energy to target | "
                 "train s |", "|---|---|---|---|---|---|---|---|"]
        for r in mixture:
            h = r["history"]
            body.append(f"| {r['method']} | {r['lr']:g} | {r['rounds']} | {h[0]['eval_reward']:.3f} | "
                        f"{h[-1]['eval_reward']:.3f} | {h[-1]['inside_share']:.3f} | {h[-1]['energy_to_target']:.4f} "
                        f"| {r['seconds']:.0f} |")
        body.append("")
    body.append(f"Samples of the final policies: {args.out.stem}-samples.png (16 per run, rows listed in "
                f"{args.out.stem}-samples.txt). Raw histories: {args.out.stem}.json.")
    table = "\n".join(body)
    write_report(args.out, "Alignment: AWM against a DDPO-style baseline", "align", argv, seconds,
                 __doc__.split("\n\n", 1)[1], table + "\n", png.name)
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
