"""Test-wide settings: no network, one CPU thread.

The suite works on tiny tensors, where OpenMP threads only add synchronization; with a second
busy process on a 2-core machine, multi-threaded tiny ops spin-wait for milliseconds each.
"""

import os

# Before numpy loads: one BLAS thread (the 2048-d eigendecompositions of FID spin-wait otherwise).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)
