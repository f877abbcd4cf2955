"""FID, KID and reference statistics from folders, zip files, arrays, statistics files or generators.

The protocols are clean-fid's (modes ``clean``, ``legacy_tensorflow``, ``legacy_pytorch``: same
resize, same networks), so numbers are interchangeable with clean-fid's and its published
statistics. What differs is how the work is done:

- decoding and resizing run in DataLoader workers while the network runs;
- features are cached by content (file bytes, mode, network hash), so a second run is instant;
- under ``accelerate launch`` every process takes every W-th batch and the features are gathered,
  so one or many processes compute the same numbers;
- the Frechet distance uses float64 symmetric eigendecompositions instead of scipy's ``sqrtm``;
- KID subsets are seeded.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .frechet import checked_frechet_distance, feature_statistics, frechet_distance, kernel_distance
from .images import (
    EXTENSIONS,
    RESIZERS,
    ArrayDataset,
    FileDataset,
    ImageInputError,
    Item,
    check_mode,
    collate_items,
    group_by_shape,
    images_to_rgb_list,
    list_image_files,
)
from .networks import FeatureNetwork, build_feature_network
from .weights import cache_dir

CACHE_VERSION = "1"


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


class Score(float):
    """A float (the score) that also says how it was computed: ``str(score)`` is the full report."""

    metric: str
    details: dict[str, Any]

    def __new__(cls, value: float, metric: str, **details: Any) -> Score:
        score = super().__new__(cls, value)
        score.metric, score.details = metric, details
        return score

    def as_dict(self) -> dict[str, Any]:
        return {self.metric.lower(): float(self), **self.details}

    def __str__(self) -> str:
        d = self.details
        extra = f" +- {d['std']:.6g}" if "std" in d else ""
        return (f"{self.metric} {float(self):.6g}{extra}  (mode {d['mode']}, network {d['network']}, "
                f"{d['n_a']} vs {d['n_b']} images, A = {d['a']}, B = {d['b']})")


# ----------------------------------------------------------------------------------------------
# Distributed helpers (accelerate): one process behaves as world size 1
# ----------------------------------------------------------------------------------------------


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _process_state():
    """accelerate's PartialState when launched with several processes (CPU-only machines need cpu=True)."""
    if not _launched_distributed():
        return None
    from accelerate import PartialState

    from ..distributed import cpu_without_cuda

    return PartialState(cpu=cpu_without_cuda())


def _gather(obj: Any, state) -> list[Any]:
    if state is None:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    description: str
    features: np.ndarray | None = None
    metadata: dict[str, str] | None = None


def _is_generator(obj: Any) -> bool:
    return callable(obj) and not isinstance(obj, (str, os.PathLike, np.ndarray, torch.Tensor))


def load_stats(path_or_name: str | os.PathLike) -> Stats:
    """Statistics from an ``.npz`` (ours, clean-fid's or pytorch-fid's: keys ``mu``, ``sigma``) or a reference name.

    A name (``cifar10_clean_train_32``, clean-fid's naming) is looked up in ``$DIFFLAB_CACHE/stats/``
    and in clean-fid's own stats folder when clean-fid is installed.
    """
    path = Path(path_or_name)
    if not path.suffix == ".npz":
        path = _find_reference(str(path_or_name))
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read statistics file {path} ({err}).") from err
    feats = arrays.get("feats")
    if "mu" not in arrays or "sigma" not in arrays:
        if feats is None:
            raise ValueError(f"{path} has no 'mu'/'sigma' (or 'feats') arrays; it is not a statistics file. "
                             "Make one with `difflab fid-stats DIR -o FILE.npz`.")
        arrays["mu"], arrays["sigma"] = feature_statistics(feats)
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}.")
    metadata = {k: str(arrays[k]) for k in ("mode", "network", "weights_sha256") if k in arrays}
    n = int(arrays["n"]) if "n" in arrays else (len(feats) if feats is not None else None)
    return Stats(mu, sigma, n, path.name, feats, metadata)


def _find_reference(name: str) -> Path:
    filename = name.lower() + ".npz"
    folders = [cache_dir() / "stats"]
    try:  # clean-fid keeps its downloads inside the package; reuse them when present
        import importlib.util

        spec = importlib.util.find_spec("cleanfid")
        if spec and spec.origin:
            folders.append(Path(spec.origin).parent / "stats")
    except (ImportError, ValueError):
        pass
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    raise FileNotFoundError(
        f"no reference statistics named {name!r} (looked for {filename} in {', '.join(map(str, folders))}). "
        f"clean-fid's published statistics can be downloaded from https://www.cs.cmu.edu/~clean-fid/stats/{filename} "
        f"into {folders[0]}; or make your own with `difflab fid-stats DIR -o FILE.npz`.")


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


@dataclass
class Features:
    features: np.ndarray
    description: str
    bad_files: list[tuple[str, str]]
    from_cache: bool = False


def _content_key(parts: Sequence[bytes], network: FeatureNetwork, mode: str) -> str | None:
    if network.weights_sha256 is None:
        return None  # custom networks: no stable identity to key a cache on
    digest = hashlib.sha256(f"difflab-fid-{CACHE_VERSION}|{mode}|{network.weights_sha256}|".encode())
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _file_bytes(files: Sequence[str], archive_path: str | None) -> list[bytes]:
    if archive_path is not None:
        with zipfile.ZipFile(archive_path) as archive:
            return [archive.read(f) for f in files]
    return [Path(f).read_bytes() for f in files]


def _cache_path(key: str) -> Path:
    return cache_dir() / "features" / f"{key}.npy"


def _save_cache(key: str, features: np.ndarray) -> None:
    path = _cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(temp, features)
    os.replace(temp, path)


def _assemble(blocks: list[tuple[list[int], np.ndarray]], n: int) -> np.ndarray:
    """(n, D) features from (indices, features) blocks gathered from every process, in item order."""
    features = np.full((n, blocks[0][1].shape[1]), np.nan, np.float32)
    for indices, block in blocks:
        features[indices] = block
    return features


def _run_batches(dataset: torch.utils.data.Dataset, network: FeatureNetwork, batch_size: int, num_workers: int,
                 state, description: str, verbose: bool) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Features of every item, in order; each process takes every W-th batch; results gathered."""
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    mine = [i for b in range(rank, n_batches, world) for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_items)
    blocks: list[tuple[list[int], np.ndarray]] = []
    errors: list[tuple[int, str]] = []
    for items in tqdm(loader, desc=description, disable=not verbose or rank != 0, unit="batch"):
        errors += [(item.index, item.error) for item in items if item.error is not None]
        for indices, images in group_by_shape(items):
            blocks.append((indices, network(images)))
    gathered = _gather((blocks, errors), state)
    all_blocks = [b for part, _ in gathered for b in part]
    all_errors = sorted(e for _, part in gathered for e in part)
    if not all_blocks:
        return np.zeros((0, 0), np.float32), all_errors
    features = _assemble(all_blocks, len(dataset))
    good = np.ones(len(dataset), bool)
    good[[i for i, _ in all_errors]] = False
    return features[good], all_errors


def _bad_files_error(bad: list[tuple[str, str]], description: str) -> ImageInputError:
    listing = "\n".join(f"  {name}: {error}" for name, error in bad[:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    return ImageInputError(f"{len(bad)} unreadable image file(s) in {description}:\n{listing}{more}\n"
                           "Fix or remove them, or pass --skip-bad (Python: skip_bad=True) to leave them out.")


def extract_features(source: Any, network: FeatureNetwork, mode: str = "clean", batch_size: int = 32,
                     num_workers: int = 2, skip_bad: bool = False, use_cache: bool = True, verbose: bool = True,
                     num_gen: int | None = None, seed: int = 0, gen_kwargs: dict | None = None) -> Features:
    """(N, D) features of an image source: folder, zip, array/tensor/list of images, or a generator."""
    check_mode(mode)
    preprocess = network.preprocess or RESIZERS[mode]
    state = _process_state()
    if _is_generator(source):
        return _generator_features(source, network, preprocess, batch_size, num_gen, seed, gen_kwargs or {},
                                   state, verbose)
    if isinstance(source, (str, os.PathLike)):
        files = list_image_files(source)
        archive = str(source) if zipfile.is_zipfile(source) and Path(source).is_file() else None
        description = str(source)
        dataset: torch.utils.data.Dataset = FileDataset(files, preprocess, archive)
        names = files
        key_parts = lambda: _file_bytes(files, archive)  # noqa: E731 - read only when a cache is used
    else:
        images = images_to_rgb_list(source)
        description = f"{len(images)} images in memory"
        dataset, names = ArrayDataset(images, preprocess), [f"image {i}" for i in range(len(images))]
        key_parts = lambda: [np.ascontiguousarray(i).tobytes() + str(i.shape).encode() for i in images]  # noqa: E731
    if len(dataset) < 2:
        raise ImageInputError(f"{description} holds {len(dataset)} image(s); FID and KID need at least 2 "
                              f"(files with extensions {', '.join(sorted(EXTENSIONS))}).")
    key = _content_key(key_parts(), network, mode) if use_cache else None
    if key is not None and _cache_path(key).is_file():
        return Features(np.load(_cache_path(key)), description, [], from_cache=True)
    features, errors = _run_batches(dataset, network, batch_size, num_workers, state, f"features {description}", verbose)
    bad = [(names[i], message) for i, message in errors]
    if bad and not skip_bad:
        raise _bad_files_error(bad, description)
    if len(features) < 2:
        raise ImageInputError(f"{description}: fewer than 2 readable images ({len(bad)} unreadable).")
    if key is not None and (state is None or state.is_main_process):
        _save_cache(key, features)
    return Features(features, description, bad)


def _call_generator(generator: Callable, n: int, seed: int, gen_kwargs: dict) -> Any:
    """A diffusers pipeline (called with its batch-size argument, a seeded generator, output_type="np") or f(n, seed)."""
    from diffusers import DiffusionPipeline

    if isinstance(generator, DiffusionPipeline):
        params = inspect.signature(generator.__call__).parameters
        size_arg = next((a for a in ("batch_size", "num_images_per_prompt", "num_images_per_label") if a in params),
                        "num_images_per_prompt")
        kwargs = {size_arg: n, "output_type": "np", "generator": torch.Generator("cpu").manual_seed(seed), **gen_kwargs}
        return generator(**kwargs).images
    return generator(n, seed, **gen_kwargs)


def _generator_features(generator: Callable, network: FeatureNetwork, preprocess: Callable, batch_size: int,
                        num_gen: int | None, seed: int, gen_kwargs: dict, state, verbose: bool) -> Features:
    if not num_gen or num_gen < 2:
        raise ValueError("a generator source needs num_gen >= 2 (how many images to generate).")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    n_batches = (num_gen + batch_size - 1) // batch_size
    blocks = []
    for b in tqdm(range(rank, n_batches, world), desc="generate + features", disable=not verbose or rank != 0):
        n = min(batch_size, num_gen - b * batch_size)
        images = images_to_rgb_list(_call_generator(generator, n, seed + b, gen_kwargs))  # rounded to uint8
        if len(images) != n:
            raise ValueError(f"the generator returned {len(images)} images for a batch of {n}.")
        tensors = [preprocess(image) for image in images]
        blocks += [([b * batch_size + i for i in idx], network(x))
                   for idx, x in group_by_shape([Item(i, t) for i, t in enumerate(tensors)])]
    features = _assemble([blk for part in _gather(blocks, state) for blk in part], num_gen)
    return Features(features, f"{getattr(generator, '__name__', type(generator).__name__)} ({num_gen} generated)", [])


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _names_statistics(source: Any) -> bool:
    """An ``.npz`` path, or a bare name that is not an existing path (a reference name such as cifar10_clean_train_32)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = str(source)
    return text.endswith(".npz") or not (Path(source).exists() or os.sep in text or text.startswith("."))


def _as_stats_or_features(source: Any, network: FeatureNetwork, mode: str, need_features: bool, **kw) -> Stats:
    if isinstance(source, Stats):
        return source
    if _names_statistics(source):
        stats = load_stats(source)
        _check_stats_match(stats, network, mode)
        if need_features and stats.features is None:
            raise ValueError(f"{stats.description} holds only mean and covariance; KID needs the features. "
                             "Make it with `difflab fid-stats DIR -o FILE.npz --keep-features`.")
        return stats
    feats = extract_features(source, network, mode, **kw)
    mu, sigma = feature_statistics(feats.features)
    stats = Stats(mu, sigma, len(feats.features), feats.description, feats.features)
    stats.metadata = {"bad_files_skipped": str(len(feats.bad_files))} if feats.bad_files else {}
    return stats


def check_sources(*sources: Any) -> None:
    """A clear error for a path or reference name that does not exist, before any network is built."""
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            continue
        if _names_statistics(source):
            if Path(source).suffix != ".npz":
                _find_reference(str(source))
            elif not Path(source).is_file():
                raise FileNotFoundError(f"statistics file {source} does not exist.")
        elif not Path(source).exists():
            raise ImageInputError(f"{source} does not exist; pass an image folder, a zip file, a .npz statistics "
                                  "file or a reference name.")


def _check_stats_match(stats: Stats, network: FeatureNetwork, mode: str) -> None:
    meta = stats.metadata or {}
    if meta.get("mode") and meta["mode"] != mode:
        raise ValueError(f"{stats.description} was made in mode {meta['mode']}, not {mode}; pass --mode {meta['mode']}.")
    if meta.get("weights_sha256") and network.weights_sha256 and meta["weights_sha256"] != network.weights_sha256:
        raise ValueError(f"{stats.description} was made with network weights sha256 {meta['weights_sha256'][:12]}, "
                         f"but this run uses {network.describe()}; use the same weights file.")


def _details(network: FeatureNetwork, mode: str, a: Stats, b: Stats) -> dict[str, Any]:
    details = {"mode": mode, "network": network.describe(), "weights_sha256": network.weights_sha256,
               "n_a": a.n, "n_b": b.n, "a": a.description, "b": b.description}
    for side, stats in (("a", a), ("b", b)):
        skipped = (stats.metadata or {}).get("bad_files_skipped")
        if skipped:
            details[f"bad_files_skipped_{side}"] = int(skipped)
    return details


def compute_fid(a: Any, b: Any, mode: str = "clean", features: str | Callable = "inception",
                inception_weights: str | os.PathLike | None = None, batch_size: int = 32, num_workers: int = 2,
                device: str | torch.device = "cpu", skip_bad: bool = False, use_cache: bool = True,
                num_gen: int | None = None, seed: int = 0, gen_kwargs: dict | None = None,
                cross_check: bool = False, verbose: bool = True, network: FeatureNetwork | None = None) -> Score:
    """FID between two image sources, in one of clean-fid's modes.

    ``a`` and ``b`` may each be a folder, a zip file, a ``.npz`` statistics file or a reference name
    (see :func:`load_stats`), an array / tensor / list of images, or a generator (a diffusers
    pipeline or ``f(n, seed) -> images``, with ``num_gen``). Generated floats in [0, 1] are rounded
    to uint8 first. ``cross_check=True`` also computes the distance with scipy's ``sqrtm`` and
    raises if the two differ by more than 1e-6 relative. Returns a :class:`Score` (a float).
    """
    check_sources(a, b)
    network = network or build_feature_network(mode, features, inception_weights, device)
    kw = dict(batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad, use_cache=use_cache,
              verbose=verbose, num_gen=num_gen, seed=seed, gen_kwargs=gen_kwargs)
    stats_a = _as_stats_or_features(a, network, mode, False, **kw)
    stats_b = _as_stats_or_features(b, network, mode, False, **kw)
    if stats_a.mu.shape != stats_b.mu.shape:
        raise ValueError(f"statistics of different feature dimensions: {stats_a.description} has "
                         f"{stats_a.mu.shape[0]}, {stats_b.description} has {stats_b.mu.shape[0]}. Use statistics "
                         "made with the same feature network.")
    distance = checked_frechet_distance if cross_check else frechet_distance
    value = distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    return Score(value, "FID", **_details(network, mode, stats_a, stats_b))


def compute_kid(a: Any, b: Any, mode: str = "clean", features: str | Callable = "inception",
                inception_weights: str | os.PathLike | None = None, batch_size: int = 32, num_workers: int = 2,
                device: str | torch.device = "cpu", skip_bad: bool = False, use_cache: bool = True,
                num_gen: int | None = None, seed: int = 0, gen_kwargs: dict | None = None,
                num_subsets: int = 100, max_subset_size: int = 1000, kid_seed: int = 0, verbose: bool = True,
                network: FeatureNetwork | None = None) -> Score:
    """KID (mean over seeded random subsets; the standard deviation is in ``score.details['std']``)."""
    check_sources(a, b)
    network = network or build_feature_network(mode, features, inception_weights, device)
    kw = dict(batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad, use_cache=use_cache,
              verbose=verbose, num_gen=num_gen, seed=seed, gen_kwargs=gen_kwargs)
    stats_a = _as_stats_or_features(a, network, mode, True, **kw)
    stats_b = _as_stats_or_features(b, network, mode, True, **kw)
    if stats_a.features.shape[1] != stats_b.features.shape[1]:
        raise ValueError(f"features of different dimensions: {stats_a.features.shape[1]} vs {stats_b.features.shape[1]}.")
    mean, std = kernel_distance(stats_a.features, stats_b.features, num_subsets, max_subset_size, kid_seed)
    return Score(mean, "KID", std=std, kid_seed=kid_seed, num_subsets=num_subsets,
                 **_details(network, mode, stats_a, stats_b))


def make_stats(source: Any, out: str | os.PathLike | None = None, mode: str = "clean",
               features: str | Callable = "inception", inception_weights: str | os.PathLike | None = None,
               keep_features: bool = False, batch_size: int = 32, num_workers: int = 2,
               device: str | torch.device = "cpu", skip_bad: bool = False, use_cache: bool = True,
               num_gen: int | None = None, seed: int = 0, gen_kwargs: dict | None = None, verbose: bool = True,
               network: FeatureNetwork | None = None) -> Stats:
    """Reference statistics (mean, covariance; optionally the features for KID), saved to ``out`` if given.

    The ``.npz`` holds ``mu``, ``sigma`` (clean-fid's keys) plus ``n``, ``mode``, ``network`` and
    ``weights_sha256``, which later runs check against their own network.
    """
    network = network or build_feature_network(mode, features, inception_weights, device)
    feats = extract_features(source, network, mode, batch_size, num_workers, skip_bad, use_cache, verbose,
                             num_gen, seed, gen_kwargs)
    mu, sigma = feature_statistics(feats.features)
    meta = {"mode": mode, "network": network.name, "weights_sha256": network.weights_sha256 or ""}
    stats = Stats(mu, sigma, len(feats.features), feats.description, feats.features if keep_features else None, meta)
    state = _process_state()
    if out is not None and (state is None or state.is_main_process):
        arrays = {"mu": mu, "sigma": sigma, "n": np.int64(stats.n), **{k: np.str_(v) for k, v in meta.items()}}
        if keep_features:
            arrays["feats"] = feats.features
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npz")
        np.savez(temp, **arrays)
        os.replace(temp, out)
    return stats
