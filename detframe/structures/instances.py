"""Per-image instances: named fields of one length N, indexed together.

Shapes: N instances of one image of size (H, W).

    Instances(image_size=(H, W), boxes=Boxes[N], scores=Tensor[N], classes=Tensor[N],
              masks=BitMasks[N] or PolygonMasks[N], names=list[N], ...)

A field is anything with a length and the indexing of a Tensor (Tensor, Boxes, BitMasks,
PolygonMasks) or a plain list. `Instances[i]` indexes every field: an int gives a length-1
Instances, a slice, a bool mask [N] or an index tensor [K] give the selected instances.
Fields are reached as attributes (`instances.boxes`) or with `get` / `set`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._indexing import Index, as_tensor_index, index_list


class Instances:
    """The instances of one image: fields of equal length N, plus the image size (H, W)."""

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        """
        Args:
            image_size: (height, width) of the image.
            fields: initial fields, all of one length.

        Raises:
            ValueError: `image_size` is not two ints, or a field's length differs.
        """
        if len(image_size) != 2 or not all(isinstance(s, int) for s in image_size):
            raise ValueError(f"image_size must be (height, width) ints, got {image_size!r}")
        self._image_size = (int(image_size[0]), int(image_size[1]))
        self._fields: dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width)."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("_fields")
        if fields is None or name not in fields:
            known = ", ".join(fields) if fields else "none"
            raise AttributeError(f"Instances has no field {name!r} (fields: {known})")
        return fields[name]

    def set(self, name: str, value: Any) -> None:
        """Sets field `name`; its length must equal that of the other fields.

        Raises:
            ValueError: the length differs, or `name` is private or shadows a method.
        """
        if name.startswith("_") or hasattr(type(self), name):
            raise ValueError(f"{name!r} cannot be a field name: it is private or a method")
        others = [(n, len(v)) for n, v in self._fields.items() if n != name]
        if others and len(value) != others[0][1]:
            raise ValueError(
                f"field {name!r} has length {len(value)}, but field {others[0][0]!r} "
                f"has length {others[0][1]}"
            )
        self._fields[name] = value

    def get(self, name: str) -> Any:
        """Returns field `name`; raises AttributeError if it does not exist."""
        return self.__getattr__(name)

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        """Deletes field `name`; raises AttributeError if it does not exist."""
        self.get(name)
        del self._fields[name]

    def fields(self) -> dict[str, Any]:
        """The fields by name (a new dict that shares the values)."""
        return dict(self._fields)

    def __len__(self) -> int:
        """N; 0 when there are no fields yet."""
        for value in self._fields.values():
            return len(value)
        return 0

    def __getitem__(self, item: Index) -> Instances:
        """Indexes every field; an int keeps a length-1 Instances."""
        key = as_tensor_index(item, len(self))
        result = Instances(self._image_size)
        for name, value in self._fields.items():
            if isinstance(value, list):
                result.set(name, index_list(value, key))
            else:
                result.set(name, value[key])
        return result

    def to(self, device: torch.device | str) -> Instances:
        """A new Instances whose fields with a `to` method are moved; lists are shared."""
        result = Instances(self._image_size)
        for name, value in self._fields.items():
            result.set(name, value.to(device) if hasattr(value, "to") else value)
        return result

    @classmethod
    def cat(cls, instances_list: Sequence[Instances]) -> Instances:
        """Concatenates Instances of one image size and one set of fields.

        Tensors are joined with `torch.cat`, lists with `+`, other fields with their
        type's `cat` classmethod.
        """
        if len(instances_list) == 0:
            raise ValueError("Instances.cat needs at least one Instances")
        first = instances_list[0]
        for other in instances_list[1:]:
            if other.image_size != first.image_size:
                raise ValueError(
                    f"Instances.cat needs one image size, got {first.image_size} "
                    f"and {other.image_size}"
                )
            if set(other._fields) != set(first._fields):
                raise ValueError(
                    f"Instances.cat needs the same fields, got {sorted(first._fields)} "
                    f"and {sorted(other._fields)}"
                )
        result = cls(first.image_size)
        for name, value in first._fields.items():
            values = [i._fields[name] for i in instances_list]
            if isinstance(value, Tensor):
                joined = torch.cat(values, dim=0)
            elif isinstance(value, list):
                joined = [x for v in values for x in v]
            elif hasattr(type(value), "cat"):
                joined = type(value).cat(values)
            else:
                raise TypeError(f"Instances.cat cannot join field {name!r} of {type(value)}")
            result.set(name, joined)
        return result

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}: {_describe(v)}" for n, v in self._fields.items())
        return (
            f"Instances(num_instances={len(self)}, image_height={self._image_size[0]}, "
            f"image_width={self._image_size[1]}, fields=[{fields}])"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)} {value.dtype}"
    return f"{type(value).__name__}[{len(value)}]"
