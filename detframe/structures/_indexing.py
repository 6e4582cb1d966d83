"""Index normalisation shared by the structures.

Every structure is indexed the same way: an int (which keeps the result a length-1
structure), a slice, a bool mask [N], or an integer index tensor [K]. Plain Python lists
of per-instance items are indexed with the same keys through `index_list`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import torch
from torch import Tensor

Index: TypeAlias = int | slice | Tensor


def as_tensor_index(item: Index, length: int) -> slice | Tensor:
    """Returns `item` as a slice or a tensor index; an int i becomes slice(i, i + 1).

    Raises:
        IndexError: an int outside [-length, length) or a bool mask whose length is not
            `length`.
        TypeError: `item` is neither an int, a slice nor a bool / integer tensor.
    """
    if isinstance(item, bool):
        raise TypeError("index with a bool is ambiguous; use a bool mask tensor")
    if isinstance(item, int):
        if not -length <= item < length:
            raise IndexError(f"index {item} is out of range for length {length}")
        start = item % length
        return slice(start, start + 1)
    if isinstance(item, slice):
        return item
    if isinstance(item, Tensor):
        if item.dtype == torch.bool:
            if item.dim() != 1 or item.numel() != length:
                raise IndexError(
                    f"bool mask of shape {tuple(item.shape)} does not match length {length}"
                )
            return item
        if not item.is_floating_point() and not item.is_complex() and item.dim() <= 1:
            return item.reshape(-1)
    raise TypeError(
        f"index must be an int, a slice, a bool mask or an integer index tensor, got {item!r}"
    )


def index_list(items: list[Any], item: Index) -> list[Any]:
    """Indexes a list of per-instance items [N] like a tensor; returns a new list."""
    key = as_tensor_index(item, len(items))
    if isinstance(key, slice):
        return items[key]
    if key.dtype == torch.bool:
        key = key.nonzero().flatten()
    return [items[i] for i in key.tolist()]
