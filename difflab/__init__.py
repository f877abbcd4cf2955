"""difflab: recent diffusion-sampling research as drop-in Hugging Face diffusers components."""

from . import samplers  # noqa: F401  (imports every scheduler module, so saved pipelines that use one load)
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["NoiseSchedule", "__version__"]
