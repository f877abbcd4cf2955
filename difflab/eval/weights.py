"""Feature-network weights for FID: a verified user cache, atomic downloads, and offline overrides.

Where a weights file is looked for, in order:

1. an explicit path (``inception_weights=`` in Python, ``--inception-weights FILE`` on the CLI);
2. the environment variable named in :data:`KNOWN_WEIGHTS` for that file;
3. ``$DIFFLAB_CACHE/weights/`` (default ``$XDG_CACHE_HOME/difflab/weights``, i.e. ``~/.cache/difflab/weights``).

If none holds the file it is downloaded into the cache: to a temporary file in the same folder,
checked against its sha256, then renamed into place, so an interrupted or corrupted download never
leaves a file that later runs would trust. Files given explicitly are hashed too; the hash is
reported with every score, and a file that is not the official one is flagged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or not the file it should be; the message says what to do."""


@dataclass(frozen=True)
class WeightsFile:
    filename: str
    url: str
    sha256: str  # the official file's full digest, or its published prefix
    env_var: str
    description: str


KNOWN_WEIGHTS: dict[str, WeightsFile] = {
    "torchscript_inception": WeightsFile(
        filename="inception-2015-12-05.pt",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
        # 95,607,719 bytes; the digest recorded independently by k-diffusion and other projects.
        sha256="f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
        env_var="DIFFLAB_INCEPTION_WEIGHTS",
        description="NVIDIA's TorchScript Inception (modes clean and legacy_tensorflow, as in clean-fid)",
    ),
    "pytorch_inception": WeightsFile(
        filename="pt_inception-2015-12-05-6726825d.pth",
        url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d",  # torch-hub naming: the file name carries the sha256 prefix
        env_var="DIFFLAB_PT_INCEPTION_WEIGHTS",
        description="pytorch-fid's Inception state dict (mode legacy_pytorch, as in clean-fid)",
    ),
}


def cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` or ``$XDG_CACHE_HOME/difflab`` (``~/.cache/difflab``)."""
    if os.environ.get("DIFFLAB_CACHE"):
        return Path(os.environ["DIFFLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "difflab"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def is_official(sha256: str, weights: WeightsFile) -> bool:
    return sha256.startswith(weights.sha256)


def _missing_message(weights: WeightsFile, target: Path, reason: str) -> str:
    return (
        f"{reason}\nNeeded: {weights.description}. On a machine with internet access, download\n"
        f"  {weights.url}\n"
        f"and either copy it to {target}, or pass its path with --inception-weights FILE "
        f"(Python: inception_weights=FILE), or set {weights.env_var}=FILE."
    )


def download(url: str, target: Path, expected_sha256: str | None) -> Path:
    """Download url to target atomically (temporary file + rename), checking the sha256 first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        got = sha256_of(temp_name)
        if expected_sha256 and not got.startswith(expected_sha256):
            raise WeightsError(f"the download of {url} has sha256 {got}, expected {expected_sha256}; "
                               "nothing was saved. Try again, or download the file by hand.")
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)
    return target


def resolve_weights(kind: str, path: str | os.PathLike | None = None, allow_download: bool = True) -> tuple[Path, str]:
    """(path, sha256) of the weights file for ``kind`` (a key of :data:`KNOWN_WEIGHTS`).

    An explicit path or environment variable must exist; any file is accepted (its hash is
    returned, so a stand-in network is visible in every report). A cached file must match the
    official hash; a cached file that does not is an error naming the file to delete.
    """
    weights = KNOWN_WEIGHTS[kind]
    explicit = path or os.environ.get(weights.env_var)
    if explicit:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            source = "--inception-weights" if path else weights.env_var
            raise WeightsError(_missing_message(weights, cache_dir() / "weights" / weights.filename,
                                                f"the weights file {explicit} (from {source}) does not exist."))
        return explicit, sha256_of(explicit)
    target = cache_dir() / "weights" / weights.filename
    if target.is_file():
        got = sha256_of(target)
        if not is_official(got, weights):
            raise WeightsError(f"the cached weights file {target} is corrupted (sha256 {got}, expected "
                               f"{weights.sha256}). Delete it and run again to download it afresh.")
        return target, got
    if not allow_download:
        raise WeightsError(_missing_message(weights, target, f"no weights file at {target}."))
    try:
        download(weights.url, target, weights.sha256)
    except WeightsError:
        raise
    except OSError as err:  # no network, DNS failure, refused connection, disk full
        raise WeightsError(_missing_message(weights, target, f"could not download the weights ({err}).")) from err
    return target, sha256_of(target)
