"""Evaluation: FID / KID in clean-fid's protocols, FD-digits and class accuracy of the built-in digits classifier.

Only this subpackage may import torchvision or clean-fid (the ``eval`` extra), and only lazily.
"""

from .digits import DigitsScore, evaluate_digits, noise_floor
from .energy import energy_distance
from .fid import Score, compute_fid, compute_kid, load_stats, make_stats
from .frechet import (
    checked_frechet_distance,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    kernel_distance,
)
from .networks import build_feature_network, make_standin_weights
from .weights import WeightsError

__all__ = ["DigitsScore", "Score", "WeightsError", "build_feature_network", "checked_frechet_distance", "energy_distance",
           "compute_fid", "compute_kid", "evaluate_digits", "feature_statistics", "frechet_distance",
           "frechet_distance_of_features", "kernel_distance", "load_stats", "make_stats", "make_standin_weights",
           "noise_floor"]
