"""detframe's models: backbones, proposal generators, ROI heads and meta-architectures.

Importing this package registers every built-in component and declares its config keys.
`build_model(cfg)` builds the detector a config describes; `load_weights` loads detframe
checkpoints and torchvision's detection and ImageNet weights into it.
"""

from .backbone import FPN, Backbone, ResNet, build_backbone
from .build import build_model
from .deepmask import DeepMask, DeepMaskProposals  # noqa: F401  (registers them)
from .meta_arch import GeneralizedRCNN, MetaArchitecture, ProposalNetwork
from .proposal_generator import RPN, PrecomputedProposals, build_proposal_generator
from .roi_heads import StandardROIHeads, build_roi_heads
from .weights import (
    LoadReport,
    convert_torchvision_classifier,
    convert_torchvision_detection,
    load_weights,
)

__all__ = [
    "FPN",
    "RPN",
    "Backbone",
    "GeneralizedRCNN",
    "LoadReport",
    "MetaArchitecture",
    "PrecomputedProposals",
    "ProposalNetwork",
    "ResNet",
    "StandardROIHeads",
    "build_backbone",
    "build_model",
    "build_proposal_generator",
    "build_roi_heads",
    "convert_torchvision_classifier",
    "convert_torchvision_detection",
    "load_weights",
]
