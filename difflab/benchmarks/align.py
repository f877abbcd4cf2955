"""AWM against a DDPO-style baseline: reward versus generated samples on the digits models and a 2-D mixture.

Both methods run in the same harness (:mod:`difflab.distill.aligner`): each round draws 4 groups of 16
samples from the current policy for the null class (the unconditional prompt), scores them, normalizes
the rewards into group advantages (group mean, global std, clip 5, scale to [-1, 1]) and takes ONE
AdamW step (weight decay 1e-4, gradient norm clipped at 1); full fine-tuning of the UNet, or with
``--lora_rank R`` LoRA adapters of rank R (``peft``) on every linear layer of the UNet for both methods --
the attention projections and the time-embedding layers; the convolutions stay frozen -- which is how
the AWM and DDPO reference codes train Stable Diffusion. They differ only in the loss and in how the
rollouts are sampled:

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
method that never reaches it within its budget shows "> budget", and "FD to class there" is the FD-digits
at that evaluation (a run that is fast because it games the classifier shows a large one). Both methods use the same
learning-rate grid (in the tables); each is reported at its best learning rate (fewest samples to the
threshold). Because the grid runs are evaluated every 3 rounds (192 samples), the best AWM and DDPO
runs of each model are re-run with ``--resolve`` for three seeds and evaluated after every round (64
samples) until they reach the threshold; the mean over seeds is the headline ratio (the grid itself
runs one seed, 0). "awm KL b" rows are AWM with a larger KL weight.

*LoRA* (``--lora_rank 8``, docs/benchmarks/align-lora.md): the same comparison with both methods
training rank-8 adapters instead of every weight, the AWM reference code's mode; its learning-rate
grid is higher (1e-3 to 3e-2), since the adapters start at zero and move few weights. Read the two
pages together: the fine-tuning mode alone changes how far ahead AWM is on digits-ddpm.

*No-collapse check* (``--fd_checks``): AWM with the page's KL weight, trained longer than the grid and for
three seeds, at two learning rates (one table each), with FD-digits to the real class digits along the
run. On-policy fine-tuning narrows the samples to a few styles of the target digit while the reward
climbs, and the KL and EMA terms pull the other way, so FD moves a lot from one checkpoint to the next
(less at the smaller learning rate); the tables show the whole curves, not a chosen point. Three references: the base
model's class-conditional samples (what "stays digits" is measured against), the base model's
unconditional samples that the classifier labels as the target (the KL-regularized optimum of a
target-class reward on this base would look like these), and the 256 of those unconditional samples the
classifier is most sure of (the best targets the base model draws without a label, by the reward itself).

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
from tqdm.auto import tqdm

from .report import bench_main, publish

LEARNING_RATES = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]  # the same grid for both methods
EVAL_SAMPLES = 256  # fixed-noise samples of every evaluation and every reference FD on the page
UNCONDITIONAL_POOL = 4000  # base-model samples drawn for the unconditional reference of the no-collapse check
FD_CHECKS = ["1e-4:60:5", "3e-5:90:10"]  # no-collapse runs: learning rate : rounds : evaluate every N rounds


def fd_check_spec(text: str) -> tuple[float, int, int]:
    """``LR:ROUNDS:EVERY`` of ``--fd_checks`` as (learning rate, rounds, evaluation interval)."""
    try:
        lr, rounds, every = text.split(":")
        spec = float(lr), int(rounds), int(every)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LR:ROUNDS:EVERY (for example 3e-5:90:10).") from None
    if spec[0] <= 0 or spec[1] < 1 or spec[2] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the learning rate must be > 0, rounds and EVERY >= 1.")
    return spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["digits-flow", "digits-ddpm"])
    parser.add_argument("--target_class", type=int, default=3)
    parser.add_argument("--awm_rounds", type=int, default=30)
    parser.add_argument("--ddpo_rounds", type=int, default=48)
    parser.add_argument("--lrs", type=float, nargs="+", default=LEARNING_RATES, help="Learning-rate grid (both).")
    parser.add_argument("--lora_rank", type=int, default=0,
                        help="LoRA rank of both methods' adapters on the UNet's linear layers (0: full fine-tuning).")
    parser.add_argument("--awm_kl", type=float, default=0.1, help="KL weight of AWM to the base model.")
    parser.add_argument("--awm_kl_sweep", type=float, nargs="*", default=[0.3, 1.0],
                        help="Extra AWM KL weights, at --kl_sweep_lr, --kl_sweep_rounds rounds (FD check).")
    parser.add_argument("--kl_sweep_lr", type=float, default=1e-4)
    parser.add_argument("--kl_sweep_rounds", type=int, default=45)
    parser.add_argument("--fd_checks", type=fd_check_spec, nargs="*", metavar="LR:ROUNDS:EVERY",
                        default=[fd_check_spec(spec) for spec in FD_CHECKS],
                        help="No-collapse runs (AWM, --awm_kl): learning rate, rounds, evaluate every N rounds; "
                             "one table each (none: skip the check).")
    parser.add_argument("--fd_check_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mixture_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    parser.add_argument("--resolve_seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Seeds of the --resolve runs.")
    parser.add_argument("--resolve", action="store_true",
                        help="Re-run the best AWM and DDPO runs per model with an evaluation after every round.")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the runs already in the JSON next to --out; run only the missing ones.")
    parser.add_argument("--eval_every", type=int, default=3)
    parser.add_argument("--ink", action="store_true", help="Also the ink reward on the first model.")
    parser.add_argument("--mixture_rounds", type=int, default=300)
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
        problem = digits_problem(job["model"], reward, None, eval_samples=EVAL_SAMPLES, target_class=job.get("target_class"))
    extra = {"kl_beta": job["kl"]} if job["method"] == "awm" else {}
    config = AlignConfig(method=job["method"], learning_rate=job["lr"], max_train_steps=job["rounds"],
                         seed=job.get("seed", 0), **extra)
    state = build_state(problem, config, lora_rank=job.get("lora_rank", 0))
    history = [{"samples": 0, "seconds": 0.0, **problem.evaluate(state.policy, config.num_inference_steps)}]
    start = time.time()
    for _ in range(job["rounds"]):
        align_iteration(state, problem, config)
        if state.step % job["eval_every"] == 0 or state.step == job["rounds"]:
            entry = problem.evaluate(state.policy, config.num_inference_steps)
            history.append({"samples": state.samples, "seconds": time.time() - start, **entry})
            if entry["eval_reward"] >= job.get("stop_at", float("inf")):
                break  # a resolution run: only the first crossing of the threshold matters
    result = {**job, "history": history, "seconds": time.time() - start}
    if job["model"] != "mixture":
        from ..distill.aligner import policy_samples

        x = policy_samples(problem, state.policy, 16, config.num_inference_steps)
        result["grid"] = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).tolist()
    else:
        from ..distill.aligner import policy_samples

        result["points"] = policy_samples(problem, state.policy, 2000, config.num_inference_steps).tolist()
    print(f"done {job['model']} {job['method']} lr {job['lr']:g} {job['reward']}: final {history[-1]} "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    """Run ``jobs`` in ``workers`` spawned processes, in order, with a progress bar over finished runs."""
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(run_job, jobs, chunksize=1), total=len(jobs), desc="align runs", unit="run"))


def base_class_fd(model: str, target_class: int, n: int = EVAL_SAMPLES) -> float:
    """FD-digits to the real class digits of the base model's class-conditional samples (same sampler)."""
    from ..distill.aligner import digits_problem, policy_samples
    from ..distill.rewards import DigitsClassReward
    from ..eval.digits import fd_to_class

    problem = digits_problem(model, DigitsClassReward(target_class), target_class)
    return fd_to_class(policy_samples(problem, problem.net, n, 10), target_class)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def base_unconditional_references(model: str, target_class: int, n: int = EVAL_SAMPLES,
                                  pool: int = UNCONDITIONAL_POOL) -> dict:
    """FD-digits to the real class digits of two selections of the base model's UNCONDITIONAL samples.

    ``labelled``: the first ``n`` of ``pool`` samples that the classifier labels ``target_class``
    (``hits`` of the pool are labelled so); ``confident``: the ``n`` samples of the pool with the highest
    probability of ``target_class`` (the lowest of them is ``confident_min_p``), i.e. the best "3"s the base
    model draws without a label, by the reward's own measure.
    """
    from ..distill.aligner import digits_problem, policy_samples
    from ..distill.rewards import DigitsClassReward
    from ..eval.digits import classifier_outputs, fd_to_class

    problem = digits_problem(model, DigitsClassReward(target_class), None)
    x = policy_samples(problem, problem.net, pool, 10)
    _, predicted = classifier_outputs(x)
    hits = x[torch.as_tensor(predicted) == target_class]
    probability = problem.reward(x, None).double()
    top = probability.argsort(descending=True)[:n]
    return {"labelled": fd_to_class(hits[:n], target_class), "hits": len(hits),
            "confident": fd_to_class(x[top], target_class), "confident_min_p": probability[top[-1]].item()}


def fd_check_lines(checks: list[dict], model: str, target_class: int, base_fd: float) -> list[str]:
    """The no-collapse tables, one per (learning rate, rounds) setting."""
    if not checks:
        return []
    ref = base_unconditional_references(model, target_class)
    settings = sorted({(r["lr"], r["rounds"]) for r in checks}, reverse=True)
    return [line for lr, rounds in settings
            for line in fd_check_table([r for r in checks if (r["lr"], r["rounds"]) == (lr, rounds)], model,
                                       target_class, base_fd, ref)]


def fd_check_table(checks: list[dict], model: str, target_class: int, base_fd: float, ref: dict) -> list[str]:
    """One no-collapse table: FD-digits to the real class digits along each seed's run, and the verdict."""
    checks = sorted(checks, key=lambda r: r["seed"])
    rounds = [round(e["samples"] / 64) for e in checks[0]["history"]]
    first = checks[0]
    lines = [f"**No-collapse check, {model}**: AWM lr {first['lr']:g}, KL {first['kl']:g}, {first['rounds']} rounds, "
             f"seeds {[r['seed'] for r in checks]}. FD-digits to the real class-{target_class} digits after each "
             f"evaluated round (and the final reward / class share). References: base model's class-conditional "
             f"samples {base_fd:.1f} (2x = {2 * base_fd:.1f}); base model's unconditional samples labelled "
             f"{target_class} ({ref['hits']} of {UNCONDITIONAL_POOL}) {ref['labelled']:.1f}; the {EVAL_SAMPLES} of those "
             f"{UNCONDITIONAL_POOL} with the highest class-{target_class} probability (all >= "
             f"{ref['confident_min_p']:.4f}) {ref['confident']:.1f} = {ref['confident'] / base_fd:.2f}x.", "",
             "| seed | " + " | ".join(f"round {k}" for k in rounds) + " | final reward | final class share |",
             "|---|" + "---|" * (len(rounds) + 2)]
    for r in checks:
        h = r["history"]
        lines.append(f"| {r['seed']} | " + " | ".join(f"{e['fd_to_class']:.0f}" for e in h)
                     + f" | {h[-1]['eval_reward']:.3f} | {h[-1]['eval_class_share']:.3f} |")
    finals = [r["history"][-1]["fd_to_class"] for r in checks]
    late = [_late_mean([e["fd_to_class"] for e in r["history"]]) for r in checks]
    mean, late_mean = sum(finals) / len(finals), sum(late) / len(late)
    lines += ["", f"Final FD-digits: mean {mean:.1f} = **{mean / base_fd:.2f}x** the base model's class-conditional "
              f"samples (seeds: {', '.join(f'{f / base_fd:.2f}x' for f in finals)}). Averaged over the evaluations "
              f"of the last third of each run (one checkpoint is noisy at {EVAL_SAMPLES} samples): {late_mean:.1f} = "
              f"**{late_mean / base_fd:.2f}x** (seeds: {', '.join(f'{f / base_fd:.2f}x' for f in late)}).", ""]
    return lines


def _late_mean(values: list[float]) -> float:
    """Mean of the last third of an evaluation curve (at least the last value)."""
    tail = values[-max(1, len(values) // 3):]
    return sum(tail) / len(tail)


def first_at(history: list[dict], level: float) -> dict | None:
    """The first evaluation whose reward reaches ``level`` (None if none does)."""
    return next((entry for entry in history if entry["eval_reward"] >= level), None)


def samples_to(history: list[dict], level: float) -> int | None:
    entry = first_at(history, level)
    return None if entry is None else entry["samples"]


def fd_there(history: list[dict], level: float) -> str:
    """FD to the class at the evaluation that first reaches ``level``: a fast run whose samples are already
    far from the class digits there is gaming the classifier, not drawing better digits."""
    entry = first_at(history, level)
    return "-" if entry is None or "fd_to_class" not in entry else f"{entry['fd_to_class']:.0f}"


def _fmt(n: int | None, budget: int) -> str:
    return f"> {budget}" if n is None else str(n)


def run_label(r: dict, main_kl: float) -> str:
    """``awm`` / ``ddpo``, or ``awm KL b`` for the runs of the KL sweep."""
    return f"awm KL {r['kl']:g}" if r["method"] == "awm" and r["kl"] != main_kl else r["method"]


def reward_table(results: list[dict], model: str, reward: str, main_kl: float) -> tuple[list[str], dict]:
    """Rows per (method, lr) and the headline comparison for one model and reward."""
    runs = [r for r in results if r["model"] == model and r["reward"] == reward]
    awm = [r for r in runs if run_label(r, main_kl) == "awm"]
    # AWM's reference run: the highest final reward (to 2 decimals), ties to the lower FD
    chosen = max(awm, key=lambda r: (round(r["history"][-1]["eval_reward"], 2), -r["history"][-1].get("fd_to_class", 0)))
    level = 0.9 * chosen["history"][-1]["eval_reward"]
    rows = ["| method | lr | rounds x 64 | start reward | final reward | final class share | final FD to class | "
            f"samples to {level:.3f} | FD to class there | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    best: dict[str, tuple] = {}
    for r in sorted(runs, key=lambda r: (run_label(r, main_kl), r["lr"])):
        h, budget, label = r["history"], r["history"][-1]["samples"], run_label(r, main_kl)
        n = samples_to(h, level)
        rows.append(f"| {label} | {r['lr']:g} | {r['rounds']} | {h[0]['eval_reward']:.3f} | "
                    f"{h[-1]['eval_reward']:.3f} | {h[-1].get('eval_class_share', float('nan')):.3f} | "
                    f"{h[-1].get('fd_to_class', float('nan')):.0f} | {_fmt(n, budget)} | {fd_there(h, level)} | "
                    f"{r['seconds']:.0f} |")
        key = (n if n is not None else 10**9, -h[-1]["eval_reward"])
        if label not in best or key < best[label][0]:
            best[label] = (key, r, n, budget)
    return rows, {"level": level, "best": best, "chosen": chosen}


def headline(model: str, reward: str, info: dict, base_fd: float | None) -> str:
    (_, awm, n_awm, _), (_, ddpo, n_ddpo, budget) = info["best"]["awm"], info["best"]["ddpo"]
    if n_awm is None:
        comparison = "AWM did not reach it, so there is no ratio."
    elif n_awm == 0:
        comparison = "the start reward already meets it, so there is no ratio (train longer)."
    elif n_ddpo is None:
        comparison = f"AWM needs > {budget / n_awm:.1f}x fewer samples (DDPO did not reach it within {budget})."
    else:
        comparison = f"AWM needs {n_ddpo / n_awm:.1f}x fewer samples."
    text = (f"**{model}, {reward}**: 90% of AWM's final reward = {info['level']:.3f}. On the grid (evaluated every "
            f"{awm['eval_every']} rounds) AWM (lr {awm['lr']:g}) reaches it after {_fmt(n_awm, 0)} samples, DDPO "
            f"(best lr {ddpo['lr']:g}) after {_fmt(n_ddpo, budget)}: {comparison}")
    if base_fd is not None:
        fd = info["chosen"]["history"][-1].get("fd_to_class")
        text += (f" FD-digits to the real class digits: base model's class-conditional samples {base_fd:.0f}, "
                 f"AWM final {fd:.0f} ({fd / base_fd:.1f}x).")
    return text


def curves_figure(results: list[dict], png: Path, main_kl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["reward"]) for r in results})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.5), squeeze=False)
    for col, (model, reward) in enumerate(panels):
        for r in sorted((r for r in results if (r["model"], r["reward"]) == (model, reward)),
                        key=lambda r: (run_label(r, main_kl), r["lr"])):
            style = "-" if r["method"] == "awm" else "--"
            xs = [e["samples"] for e in r["history"]]
            label = f"{run_label(r, main_kl)} lr {r['lr']:g}"
            axes[0][col].plot(xs, [e["eval_reward"] for e in r["history"]], style, marker=".", label=label)
            axes[1][col].plot([e["seconds"] for e in r["history"]], [e["eval_reward"] for e in r["history"]], style,
                              label=label)
        axes[0][col].set(title=f"{model}: {reward}", xlabel="generated samples", ylabel="reward (eval)")
        axes[1][col].set(xlabel="wall seconds (1 CPU thread)", ylabel="reward (eval)")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def mixture_figure(results: list[dict], png: Path) -> None:
    """Samples of each method's final 2-D policy (best learning rate) over the exact restricted target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..distill.aligner import restricted_mixture_samples
    from ..distill.rewards import build_reward
    from ..models.gmm import unequal_ring

    runs = [r for r in results if r["model"] == "mixture" and "points" in r]
    if not runs:
        return
    best = {}
    for r in runs:
        if r["method"] not in best or r["history"][-1]["energy_to_target"] < best[r["method"]]["history"][-1]["energy_to_target"]:
            best[r["method"]] = r
    ring = unequal_ring()
    reward = build_reward(runs[0]["reward"])
    target = restricted_mixture_samples(ring, reward, 2000)
    base = ring.sample(2000, generator=torch.Generator().manual_seed(5))
    panels = [("exact mixture (what the base MLP learned)", base)] + [
        (f"{m} lr {r['lr']:g}: ED {r['history'][-1]['energy_to_target']:.3f}", torch.tensor(r["points"]))
        for m, r in sorted(best.items())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4))
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(target[:, 0], target[:, 1], s=1, color="tab:gray", alpha=0.3, label="exact target")
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.35, color="tab:blue")
        ax.add_patch(plt.Circle(reward.center.tolist(), reward.radius, fill=False, color="tab:red"))
        ax.set(title=title, xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def grids_figure(results: list[dict], png: Path) -> None:
    from ..models.digits import make_grid

    rows, labels = [], []
    for r in results:
        if "grid" in r:
            rows.append(torch.tensor(r["grid"], dtype=torch.float32) / 255)
            check = f" seed {r['seed']}, no-collapse check" if r.get("fd_check") else ""
            kl = f" KL {r['kl']:g}" if r["method"] == "awm" else ""  # DDPO runs without a KL term
            lora = f" LoRA {r['lora_rank']}" if r.get("lora_rank") else ""
            labels.append(f"{r['model']} {r['method']} lr {r['lr']:g}{kl}{lora} {r['reward']}{check}")
    if rows:
        make_grid(torch.cat(rows), nrow=16).save(png)
        png.with_suffix(".txt").write_text("rows, top to bottom:\n" + "\n".join(labels) + "\n")


def job_key(job: dict) -> tuple:
    kl = job["kl"] if job["method"] == "awm" else 0
    return (job["model"], job["method"], job["lr"], job["reward"], job["rounds"], kl, job.get("stop_at"),
            job.get("seed", 0), job.get("fd_check", False), job.get("lora_rank", 0))


def build_jobs(args: argparse.Namespace) -> list[dict]:
    """Every (model, method, learning rate, reward) run of the benchmark, plus the AWM KL sweep."""
    jobs = []
    cls = f"class:{args.target_class}"

    def add(model, method, lr, reward, rounds, kl=args.awm_kl, **extra):
        jobs.append({"model": model, "method": method, "lr": lr, "reward": reward, "rounds": rounds, "kl": kl,
                     "eval_every": args.eval_every, "target_class": args.target_class, "lora_rank": args.lora_rank,
                     **extra})

    for model in args.models:
        for method, rounds in (("awm", args.awm_rounds), ("ddpo", args.ddpo_rounds)):
            for lr in args.lrs:
                add(model, method, lr, cls, rounds)
        for kl in args.awm_kl_sweep:
            add(model, "awm", args.kl_sweep_lr, cls, args.kl_sweep_rounds, kl)
        for lr, rounds, every in args.fd_checks:
            for seed in args.fd_check_seeds:
                add(model, "awm", lr, cls, rounds, seed=seed, eval_every=every, fd_check=True)
    if args.ink:
        add(args.models[0], "awm", 3e-5, "ink", args.awm_rounds)
        add(args.models[0], "ddpo", 3e-4, "ink", args.ddpo_rounds)
    if args.mixture_rounds:
        from ..models.gmm import unequal_ring

        ring = unequal_ring()
        light = ring.means[int(ring.weights.argmin())].tolist()
        region = f"region:{light[0]:.4f},{light[1]:.4f},0.3"
        for method in ("awm", "ddpo"):
            for lr in args.mixture_lrs:
                add("mixture", method, lr, region, args.mixture_rounds)
    return jobs


def resolution_runs(results: list[dict], done: list[dict], args: argparse.Namespace) -> list[dict]:
    """Re-run each model's best AWM and best DDPO configuration evaluating after EVERY round, until the
    threshold is reached (or the budget ends): the samples-to-threshold without the grid's coarse steps."""
    jobs = []
    for model in args.models:
        reward = f"class:{args.target_class}"
        _, info = reward_table([r for r in results if "stop_at" not in r], model, reward, args.awm_kl)
        for label in ("awm", "ddpo"):
            _, best, n, _ = info["best"][label]
            if n is not None:
                for seed in args.resolve_seeds:
                    jobs.append({**{k: best[k] for k in ("model", "method", "lr", "reward", "rounds", "kl",
                                                         "target_class")}, "lora_rank": best.get("lora_rank", 0),
                                 "eval_every": 1, "stop_at": round(info["level"], 6), "seed": seed})
    have = {job_key(r): r for r in done if "stop_at" in r}
    todo = [j for j in jobs if job_key(j) not in have]
    fresh = run_jobs(todo, args.workers)
    return [have[job_key(j)] for j in jobs if job_key(j) in have] + fresh


def resolution_lines(results: list[dict], model: str, main_kl: float) -> list[str]:
    runs = [r for r in results if "stop_at" in r and r["model"] == model]
    if not runs:
        return []
    found: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: r.get("seed", 0)):
        found.setdefault(run_label(r, main_kl), []).append((r, samples_to(r["history"], r["stop_at"])))
    parts = []
    for label, items in sorted(found.items()):
        counts = ", ".join(_fmt(n, r["history"][-1]["samples"]) for r, n in items)
        parts.append(f"{label} (lr {items[0][0]['lr']:g}) {counts}")
    line = (f"**Evaluated after every round** (64 samples), samples to {runs[0]['stop_at']:.3f} for seeds "
            f"{sorted({r.get('seed', 0) for r in runs})}: " + "; ".join(parts))
    means = {label: [n for _, n in items] for label, items in found.items()}
    if all(n is not None for n in means.get("awm", [None])) and "ddpo" in means \
            and all(n is not None for n in means["ddpo"]) and sum(means["awm"]) > 0:
        awm, ddpo = sum(means["awm"]) / len(means["awm"]), sum(means["ddpo"]) / len(means["ddpo"])
        line += f". Means: AWM {awm:.0f}, DDPO {ddpo:.0f}: **AWM needs {ddpo / awm:.1f}x fewer samples**."
    elif "ddpo" not in means:
        line += " (DDPO never reached it on the grid)."
    return [line, ""]


def run(args: argparse.Namespace, argv: list[str] | None = None) -> str:
    start = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = build_jobs(args)
    raw = args.out.with_suffix(".json")
    done = json.loads(raw.read_text()) if args.reuse and raw.is_file() else []
    have = {job_key(r) for r in done}
    todo = [j for j in jobs if job_key(j) not in have]
    todo.sort(key=lambda j: -j["rounds"] * (2 if j["model"] != "mixture" else 0.1))
    print(f"{len(todo)} runs to do, {len(jobs) - len(todo)} reused from {raw}", flush=True)
    fresh = run_jobs(todo, args.workers)
    results = [r for r in done if job_key(r) in {job_key(j) for j in jobs}] + fresh
    if args.resolve:
        results += resolution_runs([r for r in results if not r.get("fd_check")], done, args)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps([{k: v for k, v in r.items() if k != "points"} for r in results]))
    return report(results, args, argv, start)


def report(results: list[dict], args: argparse.Namespace, argv: list[str] | None, start: float) -> str:
    """Write the page; its wall time counts from ``start`` to the end of the report (the references take a while)."""
    png = args.out.with_suffix(".png")
    resolution = [r for r in results if "stop_at" in r]
    checks = [r for r in results if r.get("fd_check")]
    results = [r for r in results if "stop_at" not in r and not r.get("fd_check")]
    digits = [r for r in results if r["model"] != "mixture"]
    curves_figure(results, png, args.awm_kl)
    mixture_figure(results, args.out.with_name(args.out.stem + "-mixture.png"))
    grids_figure(digits + checks, args.out.with_name(args.out.stem + "-samples.png"))
    body = [f"**Fine-tuning: LoRA of rank {args.lora_rank} on every linear layer, both methods.**" if args.lora_rank
            else "**Fine-tuning: full (every UNet weight), both methods.**", ""]
    for model, reward in sorted({(r["model"], r["reward"]) for r in digits}):
        rows, info = reward_table(results, model, reward, args.awm_kl)
        base = base_class_fd(model, args.target_class) if reward.startswith("class") else None
        precise = resolution_lines(resolution, model, args.awm_kl) if reward.startswith("class") else []
        body += [headline(model, reward, info, base), "", *precise, *rows, ""]
        if base is not None:
            body += fd_check_lines([r for r in checks if r["model"] == model], model, args.target_class, base)
    mixture = [r for r in results if r["model"] == "mixture"]
    if mixture:
        awm_final = max(r["history"][-1]["eval_reward"] for r in mixture if r["method"] == "awm")
        level = 0.9 * awm_final
        body += ["**2-D mixture, reward = soft disk on the lightest mode** (energy distance to exact samples of the "
                 "mixture restricted to the disk; lower is better). DDPO rises first and then collapses (the "
                 "best-reward column), so the final and the best evaluation are both shown:", "",
                 "| method | lr | rounds x 64 | start reward | best reward (at samples) | final reward | "
                 f"final share inside | final energy to target | samples to {level:.3f} | train s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mixture, key=lambda r: (r["method"], r["lr"])):
            h = r["history"]
            peak = max(h, key=lambda e: e["eval_reward"])
            body.append(f"| {r['method']} | {r['lr']:g} | {r['rounds']} | {h[0]['eval_reward']:.3f} | "
                        f"{peak['eval_reward']:.3f} ({peak['samples']}) | {h[-1]['eval_reward']:.3f} | "
                        f"{h[-1]['inside_share']:.3f} | {h[-1]['energy_to_target']:.4f} | "
                        f"{_fmt(samples_to(h, level), h[-1]['samples'])} | {r['seconds']:.0f} |")
        body.append("")
    total = sum(r["seconds"] for r in results + resolution + checks)
    body.append(f"Runs: {len(results)} grid runs, {len(resolution)} resolution runs and {len(checks)} no-collapse runs, {total / 60:.0f} minutes of "
                "training in all (one thread per run, two runs in parallel)"
                + (f"; with --reuse the runs already in {args.out.stem}.json were kept, so the wall time above is only "
                   "this invocation's; without --reuse the same command re-runs everything." if args.reuse else "."))
    body.append((f"2-D samples: {args.out.stem}-mixture.png. " if mixture else "")
                + f"Samples of the final digits policies: {args.out.stem}-samples.png (16 per run, rows listed in "
                f"{args.out.stem}-samples.txt). Raw histories: {args.out.stem}.json.")
    title = "Alignment: AWM against a DDPO-style baseline" + (f" (LoRA rank {args.lora_rank})" if args.lora_rank else "")
    return publish(args.out, title, "align", argv, time.time() - start, __doc__, "\n".join(body), picture=png.name)


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
