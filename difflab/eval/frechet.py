"""Frechet distance between Gaussians, in float64 through symmetric eigendecompositions.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})  (Dowson & Landau 1982).
The trace term uses sqrt(S1) S2 sqrt(S1), which is symmetric positive semi-definite, so both square
roots come from ``eigh`` with tiny negative eigenvalues (rounding) clamped to zero — no scipy sqrtm.
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different feature dimensions: {mu1.shape} vs {mu2.shape}.")
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of an (N, D) feature array in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {features.shape}.")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
