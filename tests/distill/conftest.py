"""Shared fixture of the distillation tests: a 4-mode 2-D mixture."""

import pytest

from difflab.models.gmm import GaussianMixture


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture([[0.6, 0.0], [-0.6, 0.0], [0.0, 0.6], [0.0, -0.6]], 0.08**2, [0.4, 0.3, 0.2, 0.1])
