"""Evaluation: Frechet distances, FD-digits and class accuracy of the built-in digits classifier.

Only this subpackage may import torchvision or clean-fid (the ``eval`` extra), and only lazily.
"""

from .digits import DigitsScore, evaluate_digits, noise_floor
from .frechet import feature_statistics, frechet_distance, frechet_distance_of_features

__all__ = ["DigitsScore", "evaluate_digits", "feature_statistics", "frechet_distance",
           "frechet_distance_of_features", "noise_floor"]
