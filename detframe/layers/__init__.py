"""Layers that know nothing of models: detframe's compiled operators and their references.

`roi_align` / `roi_pool` run detframe's own C++/CUDA kernels (`torch.ops.detframe.*`) and
fall back, with one warning, to the pure-PyTorch reference in `detframe.layers.reference`
when the compiled library is missing; `ops_backend()` says which is active.
"""

from ._compiled import OpsBackend, ops_backend
from .roi_align import RoIAlign, roi_align
from .roi_pool import RoIPool, roi_pool
from .shape_spec import ShapeSpec

__all__ = ["OpsBackend", "RoIAlign", "RoIPool", "ShapeSpec", "ops_backend", "roi_align", "roi_pool"]
