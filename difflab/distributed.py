"""Ending a multi-process (``accelerate launch``) run without a hang or an abort at exit.

Two failure modes of gloo process groups on CPU, both seen in this project's multi-process tests:

* **Deadlock in the group's destructor.** In torch 2.13 every backward pass stashes a Python object
  in thread-local state, and each DistributedDataParallel gradient all-reduce issued in that backward
  captures a copy of it. A gloo worker thread that ends up holding the last reference to such a work
  needs the GIL to drop it. ``~ProcessGroupGloo`` joins the worker threads while the thread that
  destroys the group holds the GIL (a DDP wrapper freed on return from the training function, say), so
  a worker still releasing a finished all-reduce waits for the GIL forever and the join never returns.
  The run has finished and written its outputs, but one process never exits.
* **Abort at interpreter exit.** A group that is still open when the interpreter exits can end the
  process with "terminate called without an active exception", after all its work is done.

:func:`end_training` closes the group after letting the worker threads settle, and
:func:`leave_process_group` is the last-resort close for command-line entry points.
"""

from __future__ import annotations

import gc
import time

# Seconds with the GIL released so that gloo's worker threads can drop the collectives they have
# finished (microseconds of work; the margin is for a loaded machine).
SETTLE_SECONDS = 0.2


def cpu_without_cuda() -> bool:
    """accelerate's ``cpu`` flag for difflab's process groups: True where CUDA is missing.

    Without it, ``accelerate launch --multi_gpu --num_processes N`` on a CPU machine starts N independent
    single-process runs (writing the same output_dir) instead of one gloo group of N.
    """
    import torch

    return not torch.cuda.is_available()


def end_training(accelerator, *wrapper_holders: dict) -> None:
    """``accelerator.end_training()`` for a run whose trained modules may be DDP-wrapped.

    With several processes: drop accelerate's and the given dicts' references to the wrapped modules,
    give gloo's workers time to release finished collectives (``time.sleep`` frees the GIL), then a
    barrier whose own work holds nothing from a backward pass, then destroy the group. A single process
    just calls ``accelerator.end_training()``.
    """
    if accelerator.num_processes > 1:
        for holder in wrapper_holders:
            holder.clear()
        accelerator.free_memory()  # accelerate's own references to the prepared modules; runs gc
        gc.collect()
        time.sleep(SETTLE_SECONDS)
        accelerator.wait_for_everyone()
        time.sleep(SETTLE_SECONDS)
    accelerator.end_training()


def leave_process_group() -> None:
    """Close the torch.distributed group if a run left one open (see the module docstring)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        time.sleep(SETTLE_SECONDS)
        dist.destroy_process_group()
