"""A batch of images of different sizes, padded into one tensor.

Shapes: N images, C channels, image i of size H_i x W_i, padded to H x W.

    ImageList.tensor       [N, C, H, W]  image i in tensor[i, :, :H_i, :W_i], the rest padding
    ImageList.image_sizes  list [N] of (H_i, W_i)

H and W are the largest H_i and W_i, rounded up to a multiple of `size_divisibility` when
it is > 1 (the stride of the coarsest backbone level, e.g. 32 for FPN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ImageList:
    """Padded images [N, C, H, W] and the size (H_i, W_i) of each before padding."""

    def __init__(self, tensor: Tensor, image_sizes: Sequence[tuple[int, int]]) -> None:
        """
        Args:
            tensor: [N, C, H, W] padded images.
            image_sizes: N pairs (H_i, W_i), each within (H, W).

        Raises:
            ValueError: `tensor` is not 4-D, or the sizes do not fit it.
        """
        if tensor.dim() != 4:
            raise ValueError(f"ImageList expects a tensor [N, C, H, W], got {tensor.shape}")
        if len(image_sizes) != tensor.size(0):
            raise ValueError(
                f"ImageList has {tensor.size(0)} images but {len(image_sizes)} image sizes"
            )
        height, width = tensor.shape[-2:]
        for i, (h, w) in enumerate(image_sizes):
            if h > height or w > width:
                raise ValueError(f"image {i} of size {(h, w)} exceeds the batch {(height, width)}")
        self.tensor = tensor
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]

    @classmethod
    def from_tensors(
        cls, tensors: Sequence[Tensor], size_divisibility: int = 0, pad_value: float = 0.0
    ) -> ImageList:
        """Pads images [C, H_i, W_i] into one batch [N, C, H, W].

        Args:
            tensors: N images of one channel count, dtype and device.
            size_divisibility: if > 1, H and W are rounded up to a multiple of it.
            pad_value: value of the padding.

        Raises:
            ValueError: no images, an image that is not 3-D, or differing channels,
                dtypes or devices.
        """
        if len(tensors) == 0:
            raise ValueError("ImageList.from_tensors needs at least one image")
        first = tensors[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor) or t.dim() != 3:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"image {i} must be a tensor [C, H, W], got {shape}")
            if t.size(0) != first.size(0):
                raise ValueError(
                    f"image {i} has {t.size(0)} channels but image 0 has {first.size(0)}"
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"image {i} is {t.dtype} on {t.device} but image 0 is "
                    f"{first.dtype} on {first.device}"
                )
        sizes = [(t.size(1), t.size(2)) for t in tensors]
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        if size_divisibility > 1:
            height = -(-height // size_divisibility) * size_divisibility
            width = -(-width // size_divisibility) * size_divisibility
        batch = first.new_full((len(tensors), first.size(0), height, width), pad_value)
        for image, padded in zip(tensors, batch, strict=True):
            padded[:, : image.size(1), : image.size(2)].copy_(image)
        return cls(batch, sizes)

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, index: int) -> Tensor:
        """Image `index` without its padding: [C, H_i, W_i] (a view)."""
        h, w = self.image_sizes[index]
        return self.tensor[index, :, :h, :w]

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def to(self, device: torch.device | str) -> ImageList:
        return ImageList(self.tensor.to(device), self.image_sizes)
