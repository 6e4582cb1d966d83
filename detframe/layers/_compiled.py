"""Loads detframe's compiled operators (`detframe._C`) and registers their fake kernels.

Importing the extension runs its static registrations: the schemas `torch.ops.detframe.*`
and their CPU, CUDA, Autograd and Autocast kernels. The fake kernels below give output
shapes without computing anything, so that `torch.compile` and `torch.export` can trace
through the operators.

When the library cannot be loaded (not built, or built against another torch), detframe
still imports: the RoI functions fall back to the pure-PyTorch reference implementation,
with one warning that says why. `ops_backend()` reports which implementation is active.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache

import torch

_OPS = ("roi_align", "_roi_align_backward", "roi_pool", "_roi_pool_backward")

try:
    from detframe import _C
except ImportError as error:
    _C = None
    _LOAD_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    _LOAD_ERROR = None


@dataclass(frozen=True)
class OpsBackend:
    """Which implementation of detframe's operators is active.

    Attributes:
        name: "compiled" when `detframe._C` is loaded, else "reference" (pure PyTorch).
        devices: device types with compiled kernels, e.g. ("cpu",) or ("cpu", "cuda").
        library: path of the loaded library, or None.
        error: why the library could not be loaded, or None.
    """

    name: str
    devices: tuple[str, ...]
    library: str | None
    error: str | None

    def __str__(self) -> str:
        if self.name == "compiled":
            return f"compiled ({', '.join(self.devices)}) from {self.library}"
        return f"reference (pure PyTorch): {self.error}"


def _compiled_devices() -> tuple[str, ...]:
    """Device types for which every operator has a compiled kernel."""
    if _C is None:
        return ()
    return tuple(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"detframe::{op}", key) for op in _OPS
        )
    )


_DEVICES = _compiled_devices()  # kernels register when the library loads, so once suffices


def ops_backend() -> OpsBackend:
    """Returns which implementation of `roi_align` / `roi_pool` is active, and why."""
    if _C is None:
        return OpsBackend("reference", (), None, _LOAD_ERROR)
    return OpsBackend("compiled", _DEVICES, _C.__file__, None)


@cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"detframe: using the pure-PyTorch reference RoI operators, which are much slower: "
        f"{reason}. Build the compiled operators with `make install` "
        f"(or `pip install --no-build-isolation -e .`).",
        RuntimeWarning,
        stacklevel=4,  # the caller of roi_align / roi_pool
    )


def use_compiled(device: torch.device) -> bool:
    """True when compiled kernels exist for `device`; else warns once and returns False."""
    if device.type in _DEVICES:
        return True
    if _C is None:
        _warn_fallback(f"detframe._C could not be loaded ({_LOAD_ERROR})")
    else:
        _warn_fallback(f"detframe._C was built without {device.type} kernels")
    return False


if _C is not None:

    def _check_scale_fake(spatial_scale: float) -> None:
        torch._check(
            math.isfinite(spatial_scale) and spatial_scale > 0,
            lambda: f"spatial_scale must be a finite positive number, got {spatial_scale}",
        )

    @torch.library.register_fake("detframe::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, *_):
        _check_scale_fake(spatial_scale)
        torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
        torch._check(input.dtype == rois.dtype, lambda: "input and rois dtypes differ")
        return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))

    @torch.library.register_fake("detframe::_roi_align_backward")
    def _roi_align_backward_fake(
        grad, rois, spatial_scale, pooled_height, pooled_width, batch, channels, height, width, *_
    ):
        return grad.new_empty((batch, channels, height, width))

    @torch.library.register_fake("detframe::roi_pool")
    def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
        _check_scale_fake(spatial_scale)
        torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
        torch._check(input.dtype == rois.dtype, lambda: "input and rois dtypes differ")
        size = (rois.size(0), input.size(1), pooled_height, pooled_width)
        return input.new_empty(size), input.new_empty(size, dtype=torch.int32)

    @torch.library.register_fake("detframe::_roi_pool_backward")
    def _roi_pool_backward_fake(
        grad,
        rois,
        argmax,
        spatial_scale,
        pooled_height,
        pooled_width,
        batch,
        channels,
        height,
        width,
    ):
        return grad.new_empty((batch, channels, height, width))
