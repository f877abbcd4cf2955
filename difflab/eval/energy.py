"""Energy distance between two samples (Szekely & Rizzo 2013), for low-dimensional exact targets.

E(X, Y) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| >= 0, zero iff the distributions are equal.
The V-statistic below (all pairs, diagonal included) is what the composition benchmark reports.
"""

from __future__ import annotations

import torch


def energy_distance(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Energy distance of samples x (n, d) and y (m, d), computed in float64 in row chunks."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples have different dimensions: {x.shape[1]} and {y.shape[1]}.")

    def mean_dist(a: torch.Tensor, b: torch.Tensor) -> float:
        total = sum(float(torch.cdist(a[i:i + chunk], b).sum()) for i in range(0, len(a), chunk))
        return total / (len(a) * len(b))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
