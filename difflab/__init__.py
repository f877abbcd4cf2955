"""difflab: recent diffusion-sampling research as drop-in Hugging Face diffusers components."""

from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["NoiseSchedule", "__version__"]
