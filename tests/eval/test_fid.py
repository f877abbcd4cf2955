"""FID / KID: exact math, clean-fid's preprocessing, every input kind, bad inputs, weights handling, CLI.

No test downloads anything: the networks are stand-in files with the official names and
interfaces (``make_standin_weights``), and every run points DIFFLAB_CACHE at a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.benchmarks.fid import free_port
from difflab.cli import main as cli_main
from difflab.eval import compute_fid, compute_kid, frechet_distance, make_stats
from difflab.eval.fid import extract_features, load_stats
from difflab.eval.frechet import checked_frechet_distance, frechet_distance_scipy, kernel_distance
from difflab.eval.images import ImageInputError, array_to_rgb_uint8, images_to_rgb_list, read_image_file
from difflab.eval.inception import FIDInceptionV3
from difflab.eval.networks import build_feature_network, make_standin_weights
from difflab.eval.weights import WeightsError, download, resolve_weights, sha256_of


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    return make_standin_weights(tmp_path_factory.mktemp("weights"), size="tiny", feature_dim=64)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    for var in ("DIFFLAB_INCEPTION_WEIGHTS", "DIFFLAB_PT_INCEPTION_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def write_pngs(folder: Path, n: int, seed: int, size: int = 24, shift: float = 0.0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.clip(rng.normal(120 + shift, 50, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    return write_pngs(tmp_path / "a", 12, 0), write_pngs(tmp_path / "b", 12, 1, shift=40)


def fid(a, b, weights, mode="clean", **kw):
    kind = "pytorch_inception" if mode == "legacy_pytorch" else "torchscript_inception"
    return compute_fid(a, b, mode=mode, inception_weights=weights[kind], num_workers=0, verbose=False, **kw)


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID
# ----------------------------------------------------------------------------------------------


def commuting_gaussians(dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.1, 2.0, dim), rng.uniform(0.1, 2.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    exact = ((mu1 - mu2) ** 2).sum() + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    return mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, exact


def test_frechet_distance_matches_closed_form_and_scipy():
    mu1, s1, mu2, s2, exact = commuting_gaussians(256)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)
    assert frechet_distance_scipy(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-8)
    assert checked_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)


def test_frechet_distance_of_singular_sample_covariances_matches_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 96)), 1.3 * rng.standard_normal((50, 96)) + 0.2  # n < d: singular
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (x, y)]
    ours = frechet_distance(*stats[0], *stats[1])
    assert ours == pytest.approx(frechet_distance_scipy(*stats[0], *stats[1]), rel=1e-6)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-6 * np.trace(stats[0][1]))


def test_cross_check_fails_loudly_when_the_routes_disagree(monkeypatch):
    import difflab.eval.frechet as frechet

    mu1, s1, mu2, s2, _ = commuting_gaussians(16)
    monkeypatch.setattr(frechet, "frechet_distance_scipy", lambda *a: 1.0)
    with pytest.raises(ArithmeticError, match="cross-check failed"):
        frechet.checked_frechet_distance(mu1, s1, mu2, s2)


def test_kid_is_the_unbiased_cubic_kernel_mmd_and_seeded():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8)) + 0.5
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    m = 30
    expected = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
                - 2 * k(x, y).mean())
    mean, std = kernel_distance(x, y, num_subsets=3, max_subset_size=1000, seed=0)  # m = n: every subset is all
    assert mean == pytest.approx(expected, rel=1e-12) and std < 1e-12
    a = kernel_distance(x, y, num_subsets=10, max_subset_size=10, seed=1)
    assert a == kernel_distance(x, y, num_subsets=10, max_subset_size=10, seed=1)
    assert a != kernel_distance(x, y, num_subsets=10, max_subset_size=10, seed=2)


# ----------------------------------------------------------------------------------------------
# Preprocessing: clean-fid's conversions and resizes
# ----------------------------------------------------------------------------------------------


def test_float_images_are_rounded_to_uint8_as_a_saved_png_would_be():
    x = np.array([[[0.0, 0.5 / 255 + 1e-4, 1.0]]], np.float32)  # 0.5/255 + eps rounds up to 1
    assert array_to_rgb_uint8(x).tolist() == [[[0, 1, 255]]]
    with pytest.raises(ImageInputError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        array_to_rgb_uint8(np.full((4, 4, 3), -0.5, np.float32))


def test_grayscale_and_rgba_convert_like_pil(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    assert np.array_equal(array_to_rgb_uint8(rgba), np.array(Image.fromarray(rgba, "RGBA").convert("RGB")))
    gray = rgba[:, :, 0]
    assert np.array_equal(array_to_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, axis=2))
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert read_image_file(str(tmp_path / "g.png")).shape == (8, 8, 3)


def test_tensor_and_array_layouts_agree():
    images = torch.rand(3, 3, 10, 12)
    from_tensor = images_to_rgb_list(images)
    from_array = images_to_rgb_list(images.permute(0, 2, 3, 1).numpy())
    assert all(np.array_equal(a, b) for a, b in zip(from_tensor, from_array)) and from_tensor[0].shape == (10, 12, 3)


def test_clean_resize_is_pil_bicubic_in_float_mode_per_channel():
    from difflab.eval.images import RESIZERS

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = RESIZERS["clean"](image)
    channel = Image.fromarray(image[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    assert out.shape == (3, 299, 299) and np.array_equal(out[1].numpy(), np.asarray(channel).clip(0, 255))


# ----------------------------------------------------------------------------------------------
# compute_fid / compute_kid / make_stats on every input kind
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow", "legacy_pytorch"])
def test_fid_in_each_mode_reports_how_it_was_computed(folders, weights, mode, tmp_path):
    a, b = folders
    if mode == "legacy_pytorch":  # the full Inception-v3 layout (2048-d): keep it to a few images
        a, b = write_pngs(tmp_path / "a3", 3, 0), write_pngs(tmp_path / "b3", 3, 1, shift=40)
    score = fid(a, b, weights, mode=mode)
    assert float(score) > 0
    assert score.details["mode"] == mode and score.details["n_a"] == score.details["n_b"] >= 3
    assert "NOT the official weights" in score.details["network"] and mode in str(score)
    assert float(fid(a, a, weights, mode=mode)) == pytest.approx(0.0, abs=1e-6 * float(score) + 1e-9)


def test_folder_zip_arrays_and_statistics_give_the_same_fid(folders, weights, tmp_path):
    a, b = folders
    reference = float(fid(a, b, weights))
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(a.iterdir()):
            z.write(f, f"sub/{f.name}")
    arrays = np.stack([np.array(Image.open(f)) for f in sorted(a.iterdir())])
    make_stats(b, tmp_path / "b.npz", inception_weights=weights["torchscript_inception"], num_workers=0, verbose=False)
    assert float(fid(archive, b, weights)) == pytest.approx(reference, rel=1e-12)
    assert float(fid(arrays, b, weights)) == pytest.approx(reference, rel=1e-12)
    assert float(fid(torch.from_numpy(arrays).permute(0, 3, 1, 2), b, weights)) == pytest.approx(reference, rel=1e-12)
    assert float(fid(a, tmp_path / "b.npz", weights)) == pytest.approx(reference, rel=1e-12)


def test_features_are_cached_by_content(folders, weights):
    a, _ = folders
    network = build_feature_network("clean", inception_weights=weights["torchscript_inception"])
    first = extract_features(a, network, num_workers=0, verbose=False)
    second = extract_features(a, network, num_workers=0, verbose=False)
    assert not first.from_cache and second.from_cache and np.array_equal(first.features, second.features)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(a / "000.png")  # new content: a new key
    assert not extract_features(a, network, num_workers=0, verbose=False).from_cache


def test_workers_give_the_same_features(folders, weights):
    a, b = folders
    assert float(fid(a, b, weights)) == float(compute_fid(a, b, inception_weights=weights["torchscript_inception"],
                                                           num_workers=2, use_cache=False, verbose=False))


def test_kid_from_folders_and_from_saved_features(folders, weights, tmp_path):
    a, b = folders
    kid = compute_kid(a, b, inception_weights=weights["torchscript_inception"], num_workers=0, verbose=False,
                      max_subset_size=8, num_subsets=20)
    assert "std" in kid.details and kid.details["kid_seed"] == 0
    make_stats(b, tmp_path / "b.npz", inception_weights=weights["torchscript_inception"], keep_features=True,
               num_workers=0, verbose=False)
    again = compute_kid(a, tmp_path / "b.npz", inception_weights=weights["torchscript_inception"], num_workers=0,
                        verbose=False, max_subset_size=8, num_subsets=20)
    assert float(again) == pytest.approx(float(kid), rel=1e-12)


def test_generators_are_quantized_like_saved_pngs(weights, tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)

    def generator(n: int, seed: int) -> np.ndarray:  # batches of 4: seeds 0 and 1
        return pool[4 * seed:4 * seed + n]

    folder = tmp_path / "saved"
    folder.mkdir()
    for i, image in enumerate(pool):
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(folder / f"{i}.png")
    other = write_pngs(tmp_path / "other", 8, 5, size=16)
    generated = fid(generator, other, weights, num_gen=8, batch_size=4)
    assert float(generated) == pytest.approx(float(fid(folder, other, weights)), rel=1e-12)


def test_a_diffusers_pipeline_is_a_generator(tmp_path):
    from difflab.models import load

    pipe = load("digits-ddpm")
    real = tmp_path / "real"
    real.mkdir()
    from difflab.models.digits import load_digits_dataset

    for i, image in enumerate(load_digits_dataset("heldout")[0][:8]):
        Image.fromarray(((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(real / f"{i}.png")
    score = compute_fid(pipe, real, features="digits", num_gen=6, batch_size=3, num_workers=0, verbose=False,
                        gen_kwargs={"num_inference_steps": 2})
    assert score.details["n_a"] == 6 and score.details["network"] == "digits-classifier" and float(score) > 0


def test_mixed_sizes_are_resized_by_the_protocol(tmp_path, weights):
    a = write_pngs(tmp_path / "a", 4, 0, size=20)
    write_pngs(tmp_path / "a" / "nested", 4, 1, size=33)
    b = write_pngs(tmp_path / "b", 6, 2, size=20)
    for mode in ("clean", "legacy_tensorflow"):
        assert fid(a, b, weights, mode=mode).details["n_a"] == 8


# ----------------------------------------------------------------------------------------------
# Bad input: a clear message, nothing half-done
# ----------------------------------------------------------------------------------------------


def test_empty_and_single_image_folders_are_refused(tmp_path, weights, folders):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageInputError, match="holds 0 image"):
        fid(tmp_path / "empty", folders[1], weights)
    write_pngs(tmp_path / "one", 1, 0)
    with pytest.raises(ImageInputError, match="at least 2"):
        fid(tmp_path / "one", folders[1], weights)
    with pytest.raises(ImageInputError, match="neither a folder nor a zip"):
        fid(folders[0] / "000.png", folders[1], weights)
    with pytest.raises(ImageInputError, match="does not exist"):
        fid(tmp_path / "missing", folders[1], weights)


def test_unreadable_files_are_listed_or_skipped(folders, weights):
    a, b = folders
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = (a / "001.png").read_bytes()
    (a / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError) as err:
        fid(a, b, weights)
    assert "2 unreadable" in str(err.value) and "broken.png" in str(err.value) and "truncated.png" in str(err.value)
    assert "--skip-bad" in str(err.value)
    score = fid(a, b, weights, skip_bad=True)
    assert score.details["n_a"] == 12 and score.details["bad_files_skipped_a"] == 2


def test_statistics_of_another_dimension_or_mode_are_refused(folders, weights, tmp_path):
    a, _ = folders
    np.savez(tmp_path / "small.npz", mu=np.zeros(32), sigma=np.eye(32))  # the stand-in has 64
    with pytest.raises(ValueError, match="different feature dimensions"):
        fid(a, tmp_path / "small.npz", weights)
    make_stats(a, tmp_path / "tf.npz", mode="legacy_tensorflow", inception_weights=weights["torchscript_inception"],
               num_workers=0, verbose=False)
    with pytest.raises(ValueError, match="mode legacy_tensorflow"):
        fid(a, tmp_path / "tf.npz", weights)
    with pytest.raises(ValueError, match="KID needs the features"):
        compute_kid(a, tmp_path / "tf.npz", mode="legacy_tensorflow",
                    inception_weights=weights["torchscript_inception"], num_workers=0, verbose=False)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read statistics"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="clean-fid/stats/cifar10_clean_train_32.npz"):
        load_stats("cifar10_clean_train_32")


def test_missing_inputs_are_reported_before_the_weights(tmp_path, folders):
    # a missing folder is the first thing to fix: say so before looking for the Inception weights
    with pytest.raises(ImageInputError, match="does not exist"):
        compute_fid(tmp_path / "missing", folders[1], inception_weights=tmp_path / "nope.pt", verbose=False)
    with pytest.raises(FileNotFoundError, match="no reference statistics named"):
        compute_kid(folders[0], "no_such_reference", inception_weights=tmp_path / "nope.pt", verbose=False)


def test_missing_and_corrupted_weights_say_what_to_do(tmp_path, folders):
    with pytest.raises(WeightsError, match=r"(?s)does not exist.*nvlabs-fi-cdn.*--inception-weights"):
        compute_fid(*folders, inception_weights=tmp_path / "nope.pt", verbose=False)
    (tmp_path / "garbage.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(WeightsError, match="damaged"):
        compute_fid(*folders, inception_weights=tmp_path / "garbage.pt", verbose=False)
    cached = tmp_path / "cache" / "weights" / "inception-2015-12-05.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"partial download")
    with pytest.raises(WeightsError, match="(?s)corrupted.*Delete it"):
        resolve_weights("torchscript_inception")
    cached.unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        resolve_weights("torchscript_inception", allow_download=False)


def test_downloads_are_verified_and_atomic(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    target = tmp_path / "cache" / "w.bin"
    with pytest.raises(WeightsError, match="nothing was saved"):
        download(source.as_uri(), target, "0" * 64)
    assert not target.exists() and not list(target.parent.iterdir())  # no partial file left behind
    download(source.as_uri(), target, sha256_of(source))
    assert target.read_bytes() == b"weights"


def test_environment_variable_points_at_weights(folders, weights, monkeypatch):
    monkeypatch.setenv("DIFFLAB_INCEPTION_WEIGHTS", weights["torchscript_inception"])
    assert float(compute_fid(*folders, num_workers=0, verbose=False)) == pytest.approx(
        float(fid(*folders, weights)), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def test_fid_inception_loads_the_pytorch_fid_layout_and_fast_path_matches(weights):
    model = FIDInceptionV3.from_state_dict_file(weights["pytorch_inception"])
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        slow = model(x)
    fast = build_feature_network("legacy_pytorch", inception_weights=weights["pytorch_inception"])(x)
    assert slow.shape == (2, 2048) and np.allclose(fast, slow.numpy(), rtol=1e-4, atol=1e-5 * slow.abs().max().item())
    state = torch.load(weights["pytorch_inception"])
    assert "fc.weight" in state and "Mixed_7c.branch_pool.conv.weight" in state  # torchvision Inception3 names


# ----------------------------------------------------------------------------------------------
# CLI and accelerate
# ----------------------------------------------------------------------------------------------


def test_cli_fid_stats_ref_and_kid(folders, weights, tmp_path, capsys):
    a, b = folders
    w = ["--inception-weights", weights["torchscript_inception"], "--workers", "0", "--quiet"]
    cli_main(["fid", str(a), str(b), *w, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "clean" and result["n_a"] == 12 and "sha256" in result["network"]
    cli_main(["fid-stats", str(b), "-o", str(tmp_path / "ref.npz"), "--keep-features", *w])
    assert "wrote" in capsys.readouterr().out
    cli_main(["fid", str(a), "--ref", str(tmp_path / "ref.npz"), *w, "--json"])
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(result["fid"], rel=1e-12)
    cli_main(["kid", str(a), str(b), *w, "--subset-size", "6"])
    assert capsys.readouterr().out.startswith("KID ")


def test_cli_errors_are_one_message(tmp_path, weights, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fid", str(tmp_path / "empty"), str(tmp_path / "empty"), "--inception-weights",
                  weights["torchscript_inception"]])
    assert exit_info.value.code == 2 and "holds 0 image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["fid", str(tmp_path / "empty")])
    assert "exactly one of B and --ref" in capsys.readouterr().err


def test_two_accelerate_processes_give_the_same_fid(folders, weights, tmp_path):
    a, b = folders
    args = ["fid", str(a), str(b), "--inception-weights", weights["torchscript_inception"], "--json", "--quiet",
            "--no-cache", "--workers", "0", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def launch() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", "difflab.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    two = launch()
    if two.returncode != 0:  # one retry: process-group start-up on a busy machine can fail transiently
        two = launch()
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if "W" not in line[:1])[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process prints
    one = float(compute_fid(a, b, inception_weights=weights["torchscript_inception"], batch_size=4, num_workers=0,
                            use_cache=False, verbose=False))
    assert json.loads(lines[0])["fid"] == pytest.approx(one, rel=1e-6)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_fast_torchscript_path_matches_the_plain_one(weights, mode):
    x = torch.rand(3, 3, 299 if mode == "clean" else 40, 299 if mode == "clean" else 40) * 255
    plain = build_feature_network(mode, inception_weights=weights["torchscript_inception"], fast=False)(x)
    fast = build_feature_network(mode, inception_weights=weights["torchscript_inception"])(x)
    assert np.allclose(fast, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
