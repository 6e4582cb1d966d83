"""detframe: a config-driven detection and instance-segmentation framework for PyTorch."""

from . import layers  # loads the compiled operators (or falls back, with a warning)

__version__ = "0.1.0"
__all__ = ["layers"]
