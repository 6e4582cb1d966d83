"""Meta-architectures: whole models, registered in META_ARCH_REGISTRY.

Every one derives from `MetaArchitecture` (the input and output protocol, see `base.py`).
"""

from .base import MetaArchitecture
from .rcnn import GeneralizedRCNN, ProposalNetwork
from .region_cnn import RegionCNN
from .retinanet import RetinaNet, RetinaNetHead

__all__ = [
    "GeneralizedRCNN",
    "MetaArchitecture",
    "ProposalNetwork",
    "RegionCNN",
    "RetinaNet",
    "RetinaNetHead",
]
