"""FID: difflab against clean-fid on the same folders and weights files — values and end-to-end time.

Needs the ``eval`` extra (clean-fid, torchvision). Two folders of digit PNGs (train-split digits,
64x64 RGB; folder B tinted and shifted so the distance is not small) are scored in each of
clean-fid's three modes by ``difflab.eval.compute_fid`` and by ``cleanfid.fid.compute_fid``, with
the same weights files, batch size, DataLoader workers and device. difflab's timed run starts with
an empty feature cache (it pays for hashing the files and writing the cache); a second run, served
from the cache, is timed separately. Without network access the
official Inception files cannot be downloaded, so by default both libraries load stand-in files
with the official names and interfaces and the real Inception-v3 layout and cost, with random
weights (``--weights-dir`` points both at the official files instead). The numbers are then not
FIDs of any published protocol, but the comparison is exact: same files in, same numbers out.
Also timed: the Frechet distance of two 2048-d Gaussians (our eigh route, scipy's sqrtm, and the
closed form for commuting covariances), and a 2-process ``accelerate launch`` run against one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..eval.fid import compute_fid
from ..eval.frechet import frechet_distance, frechet_distance_scipy
from ..eval.networks import make_standin_weights
from ..eval.weights import KNOWN_WEIGHTS
from .report import bench_main, write_report

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")


def write_digit_folders(root: Path, n: int) -> tuple[Path, Path]:
    """Two folders of n 64x64 RGB digit PNGs: plain train digits, and other train digits tinted and shifted."""
    from ..models.digits import load_digits_dataset

    images, _ = load_digits_dataset("train")
    gray = ((images[:, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    if 2 * n > len(gray):
        raise ValueError(f"--n must be at most {len(gray) // 2}.")
    folders = root / "A", root / "B"
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = Image.fromarray(gray[i]).resize((64, 64), Image.BICUBIC).convert("RGB")
        a.save(folders[0] / f"{i:04d}.png")
        b = np.asarray(Image.fromarray(gray[n + i]).resize((64, 64), Image.BICUBIC).convert("RGB")).astype(np.float32)
        b = np.roll(b * np.array([1.0, 0.8, 0.6]) + np.array([0.0, 20.0, 40.0]), shift=(3, 2), axis=(0, 1))
        Image.fromarray(b.clip(0, 255).astype(np.uint8)).save(folders[1] / f"{i:04d}.png")
    return folders


def cleanfid_extractor(mode: str, weights_dir: Path):
    """clean-fid's own network classes, loading the given files (its feature_extractor with our paths)."""
    if mode == "legacy_pytorch":
        hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
        hub.mkdir(parents=True, exist_ok=True)
        target = hub / KNOWN_WEIGHTS["pytorch_inception"].filename
        if not target.exists():
            os.symlink(weights_dir / KNOWN_WEIGHTS["pytorch_inception"].filename, target)
        from cleanfid.inception_pytorch import InceptionV3

        model = InceptionV3(output_blocks=[3], resize_input=False).eval()
        return lambda x: model(x / 255)[0].squeeze(-1).squeeze(-1)
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights_dir), download=False, resize_inside=mode == "legacy_tensorflow").eval()
    return lambda x: model(x)


def time_frechet(dim: int = 2048, seed: int = 0) -> dict:
    """Two dim-d Gaussians with commuting covariances, so tr sqrt(S1 S2) = sum sqrt(a_i b_i) exactly."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.1, 2.0, dim), rng.uniform(0.1, 2.0, dim)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    exact = float(((mu1 - mu2) ** 2).sum() + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum())
    t0 = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t1 = time.perf_counter()
    theirs = frechet_distance_scipy(mu1, s1, mu2, s2)
    t2 = time.perf_counter()
    return dict(exact=exact, ours=ours, scipy=theirs, ours_s=t1 - t0, scipy_s=t2 - t1,
                ours_rel=abs(ours - exact) / exact, scipy_rel=abs(theirs - exact) / exact)


def free_port() -> int:
    """A local port nobody listens on (the default 29500 may still be held by an earlier run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_accelerate(a: Path, b: Path, mode: str, weights: str, processes: int, args: argparse.Namespace) -> dict:
    command = ["fid", str(a), str(b), "--mode", mode, "--inception-weights", weights, "--json", "--quiet",
               "--no-cache", "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--device", "cpu"]
    if processes == 1:
        full = [sys.executable, "-m", "difflab.cli", *command]
    else:  # CPU-only machines: --multi_gpu starts torch.distributed; difflab uses accelerate's gloo CPU backend
        full = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "difflab.cli", *command]
    t0 = time.perf_counter()
    out = subprocess.run(full, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed:\n{out.stderr[-3000:]}")
    line = [text for text in out.stdout.splitlines() if text.startswith("{")][-1]
    return {**json.loads(line), "seconds": time.perf_counter() - t0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=300, help="images per folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--weights-dir", default=None, help="folder with the official weights files (default: stand-ins)")
    parser.add_argument("--standin-size", default="inception", choices=["inception", "tiny"])
    parser.add_argument("--skip-accelerate", action="store_true")
    parser.add_argument("--out", default="docs/benchmarks/fid.md")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> None:
    import cleanfid.fid

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="difflab-fid-bench-"))
    os.environ["TORCH_HOME"] = str(work / "torch-home")
    os.environ["DIFFLAB_CACHE"] = str(work / "cache")
    a, b = write_digit_folders(work / "images", args.n)
    weights_dir = Path(args.weights_dir) if args.weights_dir else work / "weights"
    if not args.weights_dir:
        make_standin_weights(weights_dir, size=args.standin_size)
    rows = []
    for mode in args.modes.split(","):
        kind = "pytorch_inception" if mode == "legacy_pytorch" else "torchscript_inception"
        weights = str(weights_dir / KNOWN_WEIGHTS[kind].filename)
        common = dict(mode=mode, num_workers=args.workers, batch_size=args.batch_size, device=torch.device("cpu"))
        t0 = time.perf_counter()
        theirs = cleanfid.fid.compute_fid(str(a), str(b), custom_feat_extractor=cleanfid_extractor(mode, weights_dir),
                                          verbose=False, use_dataparallel=False, **common)
        t1 = time.perf_counter()
        ours = compute_fid(a, b, inception_weights=weights, verbose=False, **common)  # cold cache: hashes, fills it
        t2 = time.perf_counter()
        cached = compute_fid(a, b, inception_weights=weights, verbose=False, **common)
        t3 = time.perf_counter()
        rows.append(dict(mode=mode, cleanfid=float(theirs), difflab=float(ours), cached=float(cached),
                         rel=abs(float(ours) - float(theirs)) / abs(float(theirs)), cleanfid_s=t1 - t0,
                         difflab_s=t2 - t1, cached_s=t3 - t2, network=ours.details["network"]))
        print(rows[-1], flush=True)
    fd = time_frechet()
    print(fd, flush=True)
    acc = []
    if not args.skip_accelerate:
        for mode in ("clean",):
            weights = str(weights_dir / KNOWN_WEIGHTS["torchscript_inception"].filename)
            one, two = (run_accelerate(a, b, mode, weights, p, args) for p in (1, 2))
            acc.append(dict(mode=mode, one=one["fid"], two=two["fid"], rel=abs(one["fid"] - two["fid"]) / one["fid"],
                            one_s=one["seconds"], two_s=two["seconds"]))
            print(acc[-1], flush=True)
    write(args, argv, rows, fd, acc, time.perf_counter() - start)


def write(args: argparse.Namespace, argv: list[str] | None, rows: list[dict], fd: dict, acc: list[dict],
          seconds: float) -> None:
    weights = "the official weights files" if args.weights_dir else (
        f"stand-in weights files (`make_standin_weights(size='{args.standin_size}')`: official names and interfaces, "
        + ("the real Inception-v3 layout and cost" if args.standin_size == "inception" else "a tiny network")
        + ", random weights)")
    body = [f"## FID, {args.n} vs {args.n} PNGs (64x64), {weights}\n",
            f"Batch size {args.batch_size}, {args.workers} DataLoader workers, device cpu, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.\n",
            "| mode | clean-fid | difflab | relative difference | clean-fid time | difflab time | speed-up | difflab, cached features |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        body.append(f"| {r['mode']} | {r['cleanfid']:.6f} | {r['difflab']:.6f} | {r['rel']:.1e} | {r['cleanfid_s']:.1f} s "
                    f"| {r['difflab_s']:.1f} s | {r['cleanfid_s'] / r['difflab_s']:.2f}x | {r['cached_s']:.2f} s |")
    body += ["", "## Frechet distance of two 2048-d Gaussians (float64)\n",
             "Covariances Q diag(a) Q^T and Q diag(b) Q^T share eigenvectors, so the exact value is "
             "||mu1 - mu2||^2 + sum(a) + sum(b) - 2 sum(sqrt(a b)).\n",
             "| route | value | relative error vs exact | time |", "|---|---|---|---|",
             f"| closed form | {fd['exact']:.10f} | 0 | - |",
             f"| difflab (eigh) | {fd['ours']:.10f} | {fd['ours_rel']:.1e} | {fd['ours_s']:.2f} s |",
             f"| scipy sqrtm (clean-fid's route) | {fd['scipy']:.10f} | {fd['scipy_rel']:.1e} | {fd['scipy_s']:.2f} s |"]
    if acc:
        body += ["", "## accelerate: 2 processes against 1\n",
                 "`accelerate launch --multi_gpu --num_processes 2 -m difflab.cli fid A B ...` (on a CPU-only machine "
                 "`--multi_gpu` starts the torch.distributed launcher and difflab joins with accelerate's gloo CPU "
                 "backend; `--cpu --num_processes 2` would start one process only). Same folders, no cache.\n",
                 "| mode | 1 process | 2 processes | relative difference | 1-process time | 2-process time |",
                 "|---|---|---|---|---|---|"]
        for r in acc:
            body.append(f"| {r['mode']} | {r['one']:.8f} | {r['two']:.8f} | {r['rel']:.1e} | {r['one_s']:.1f} s | "
                        f"{r['two_s']:.1f} s |")
    write_report(Path(args.out), "FID: difflab vs clean-fid", "fid", argv, seconds, __doc__.split("\n", 1)[1],
                 "\n".join(body))


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, add_arguments, run, argv)
