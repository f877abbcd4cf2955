"""Test-wide settings: no network, one CPU thread.

The suite works on tiny tensors, where OpenMP threads only add synchronization; with a second
busy process on a 2-core machine, multi-threaded tiny ops spin-wait for milliseconds each.
"""

import os
import subprocess
import sys
from pathlib import Path

# Before numpy loads: one BLAS thread (the 2048-d eigendecompositions of FID spin-wait otherwise).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


def _accelerate_launch(launch_args: list[str], script_args: list[str], timeout: int = 300):
    """``accelerate launch LAUNCH_ARGS --main_process_port P SCRIPT_ARGS`` with the repository on the path.

    Tried twice, each with a fresh port: on this 2-core machine a gloo rendezvous has hung or failed
    about once in ten runs under heavy load; a real error fails both tries.
    """
    from difflab.benchmarks.fid import free_port

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = None
    for _ in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *script_args]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            proc = subprocess.CompletedProcess(cmd, -1, str(err.stdout or ""), f"timed out after {timeout} s")
        if proc.returncode == 0:
            break
    return proc


@pytest.fixture
def accelerate_launch():
    """The :func:`_accelerate_launch` runner (two tries, fresh ports)."""
    return _accelerate_launch
