"""bench/align.py's bookkeeping: the LoRA setting reaches every run, and the headline survives edge cases."""

import argparse

from difflab.benchmarks.align import add_arguments, build_jobs, headline, job_key, reward_table


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--models", "digits-ddpm", "--lrs", "1e-3", "3e-3", "--awm_kl_sweep", "--fd_checks",
                              "--mixture_rounds", "0", *argv])


def test_lora_rank_reaches_every_job_and_its_key():
    lora, full = build_jobs(_args("--lora_rank", "8")), build_jobs(_args())
    assert len(lora) == len(full) == 4
    assert {job["lora_rank"] for job in lora} == {8} and {job["lora_rank"] for job in full} == {0}
    # a LoRA run is never mistaken for the full fine-tuning run of the same settings (--reuse)
    assert not {job_key(j) for j in lora} & {job_key(j) for j in full}


def test_headline_when_the_start_already_meets_the_threshold():
    run = {"lr": 1e-3, "eval_every": 1, "history": [{"eval_reward": 0.5, "samples": 0}]}
    info = {"level": 0.45, "chosen": run, "best": {"awm": ((0, -0.5), run, 0, 0), "ddpo": ((0, -0.5), run, 0, 0)}}
    text = headline("digits-ddpm", "class:3", info, None)
    assert "the start reward already meets it, so there is no ratio" in text


def test_the_table_shows_fd_where_a_run_first_reaches_the_threshold():
    def run(method: str, rewards: list[float], fds: list[float]) -> dict:
        history = [{"eval_reward": r, "fd_to_class": f, "samples": 64 * i} for i, (r, f) in enumerate(zip(rewards, fds))]
        return {"model": "digits-ddpm", "reward": "class:3", "method": method, "kl": 0.1, "lr": 1e-3, "rounds": 3,
                "seconds": 1.0, "history": history}

    rows, info = reward_table([run("awm", [0.1, 0.5, 1.0], [900, 300, 100]),
                               run("ddpo", [0.1, 0.95, 0.7], [900, 2500, 800])], "digits-ddpm", "class:3", 0.1)
    assert "FD to class there" in rows[0]
    assert rows[2].endswith("| 128 | 100 | 1 |")  # awm first reaches 0.9 at its last evaluation
    assert rows[3].endswith("| 64 | 2500 | 1 |")  # ddpo's early crossing comes with FD 2500
