"""DeepMask (Pinheiro, Collobert, Dollar, NIPS 2015): segment proposals.

`DeepMask` (META_ARCH_REGISTRY) trains on patches and runs on whole images; its heads are in
`heads.py`, the full-image geometry in `inference.py`; `DeepMaskProposals`
(PROPOSAL_GENERATOR_REGISTRY) makes a trained DeepMask the proposal generator of a detector.
"""

from .heads import DeepMaskHead, DeepMaskPaperHead
from .inference import PyramidSettings
from .model import DeepMask, deepmask_losses
from .proposals import DeepMaskProposals
from .sharpmask import SharpMask, SharpMaskRefinement, sharpmask_loss

__all__ = [
    "DeepMask",
    "DeepMaskHead",
    "DeepMaskPaperHead",
    "DeepMaskProposals",
    "PyramidSettings",
    "SharpMask",
    "SharpMaskRefinement",
    "deepmask_losses",
    "sharpmask_loss",
]
