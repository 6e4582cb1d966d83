"""Meta-architectures: whole detectors, registered in META_ARCH_REGISTRY."""

from .rcnn import GeneralizedRCNN

__all__ = ["GeneralizedRCNN"]
