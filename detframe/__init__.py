"""detframe: a config-driven detection and instance-segmentation framework for PyTorch."""

__version__ = "0.1.0"
