"""MetaArchitecture: what every whole model shares — inputs in, one dict per image out.

Shorthand: N images in a batch, H x W an image as given, H' x W' the padded batch.

Input, one dict per image (what a mapper such as `detframe.data.DatasetMapper` produces)::

    {"image": Tensor[3, H, W] uint8 or float, channels in INPUT.FORMAT,
     "height": int, "width": int   (size to report outputs at; default H, W),
     "instances": Instances(gt_boxes, gt_classes[, gt_masks])   (targets; optional),
     ...                           (anything else a model reads, e.g. "proposals")}

Protocol, the only thing evaluation, the demo, the benchmark and export rely on:

    model(batched_inputs)                 training mode: {loss name: scalar Tensor}
                                          evaluation mode: N dicts {OUTPUT_KEY: Instances}
    model.outputs_and_losses(batched_inputs)
                                          (N output dicts, or [] in training mode;
                                           losses, or {} when the inputs carry no targets)

`NUM_CLASSES_KEY` names the config key of the model's number of classes (checked against the
datasets by the trainer; None for a model without classes). `OUTPUT_KEY` is "instances" for a
detector (pred_boxes, scores, pred_classes[, pred_masks])
and "proposals" for a proposal network (proposal_boxes, objectness_logits[, proposal_masks]),
as in detectron2; the Instances are rescaled to each input's (height, width). Losses in
evaluation mode (when targets are given) are the validation losses.

A subclass implements `run(images, batched_inputs, targets)` -> (per-image results in the
padded batch's coordinates, losses) and may override `postprocess_one`; the base normalises
and pads the images, collects the targets and applies the output convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from detframe.structures import ImageList, Instances

from ..postprocessing import detector_postprocess

__all__ = ["MetaArchitecture"]


class MetaArchitecture(nn.Module):
    """The shared half of every meta-architecture (see the module docstring).

    Args:
        pixel_mean, pixel_std: per channel, in the input's channel order and units; images
            are normalised as (image - pixel_mean) / pixel_std.
        size_divisibility: the padded batch's sides are rounded up to a multiple of this
            (the stride of the coarsest feature map; 1 for none).
    """

    OUTPUT_KEY: ClassVar[str] = "instances"
    # The config key of the model's number of classes, which the trainer checks against the
    # datasets' categories; None for a model without classes (a proposal network).
    NUM_CLASSES_KEY: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 1,
    ) -> None:
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"pixel_mean and pixel_std need 3 values, got {list(pixel_mean)} and "
                f"{list(pixel_std)}"
            )
        if min(pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {list(pixel_std)}")
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        self.size_divisibility = int(size_divisibility)
        # float64, so that a model cast to float64 normalises with the exact values; images
        # are normalised in the dtype of the model's parameters.
        mean = torch.tensor(pixel_mean, dtype=torch.float64).view(-1, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float64).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: Sequence[dict[str, Any]]) -> Any:
        """Losses (dict of scalars) in training mode; N output dicts otherwise."""
        outputs, losses = self.outputs_and_losses(batched_inputs)
        return losses if self.training else outputs

    def outputs_and_losses(
        self, batched_inputs: Sequence[dict[str, Any]]
    ) -> tuple[list[dict[str, Instances]], dict[str, Tensor]]:
        """One pass that returns the outputs (evaluation mode) and the losses (given targets).

        Returns:
            (outputs, losses): outputs is [] in training mode, else one {OUTPUT_KEY:
            Instances} per input; losses is {} when the inputs carry no "instances".

        Raises:
            ValueError: no inputs, an input without a [3, H, W] "image", training mode
                without "instances" in every input, or "instances" in only some inputs.
        """
        if len(batched_inputs) == 0:
            raise ValueError(f"{type(self).__name__} needs at least one input image")
        images = self.preprocess_image(batched_inputs)
        targets = self.targets(batched_inputs)
        results, losses = self.run(images, batched_inputs, targets)
        if self.training:
            return [], losses
        return self.postprocess(results, batched_inputs), losses

    def run(
        self,
        images: ImageList,
        batched_inputs: Sequence[dict[str, Any]],
        targets: list[Instances] | None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """The model itself.

        Args:
            images: the normalised, padded batch [N, 3, H', W'] with each image's size.
            batched_inputs: the inputs as given (for anything else a model reads).
            targets: per image its gt Instances on the model's device, or None.

        Returns:
            (per image its results in the coordinates of `images` ([] allowed in training
            mode), {loss name: scalar Tensor} ({} without targets)).
        """
        raise NotImplementedError

    def inference(self, batched_inputs: Sequence[dict[str, Any]]) -> list[dict[str, Instances]]:
        """Outputs for images without targets (any "instances" are ignored)."""
        if self.training:
            raise RuntimeError("inference() needs evaluation mode: call model.eval() first")
        inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batched_inputs]
        return self.outputs_and_losses(inputs)[0]

    def preprocess_image(self, batched_inputs: Sequence[dict[str, Any]]) -> ImageList:
        """Normalises the images and pads them into one batch [N, 3, H', W'], in the dtype
        of the model's parameters."""
        dtype = next(self.parameters()).dtype
        mean, std = self.pixel_mean.to(dtype), self.pixel_std.to(dtype)
        images = []
        for i, x in enumerate(batched_inputs):
            if "image" not in x:
                raise ValueError(f"input {i} has no 'image' (keys: {sorted(x)})")
            image = x["image"].to(self.device, non_blocking=True)
            if image.dim() != 3 or image.size(0) != 3:
                raise ValueError(f"input {i}: image must be [3, H, W], got {tuple(image.shape)}")
            images.append((image.to(dtype) - mean) / std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def targets(self, batched_inputs: Sequence[dict[str, Any]]) -> list[Instances] | None:
        """Each input's "instances" on the model's device; None when no input has any."""
        required_by = f"{type(self).__name__} in training mode" if self.training else None
        return self.gather_inputs(batched_inputs, "instances", required_by)

    def gather_inputs(
        self, batched_inputs: Sequence[dict[str, Any]], key: str, required_by: str | None = None
    ) -> list[Instances] | None:
        """Every input's `key` (an Instances) on the model's device; None when no input has it.

        Args:
            required_by: who needs `key` (for the error message), or None when it is optional.

        Raises:
            ValueError: some inputs have `key` and others do not, or none has it and it is
                required; the message names the inputs.
        """
        has = [key in x for x in batched_inputs]
        if not any(has):
            if required_by is not None:
                raise ValueError(f"{required_by} needs {key!r} in every input")
            return None
        if not all(has):
            missing = [i for i, h in enumerate(has) if not h]
            raise ValueError(f"inputs {missing} have no {key!r} but others do")
        return [x[key].to(self.device) for x in batched_inputs]

    def postprocess(
        self, results: Sequence[Instances], batched_inputs: Sequence[dict[str, Any]]
    ) -> list[dict[str, Instances]]:
        """Each image's results rescaled to its requested size (height, width), as
        {OUTPUT_KEY: Instances}."""
        outputs = []
        for result, x in zip(results, batched_inputs, strict=True):
            height = int(x.get("height", x["image"].shape[1]))
            width = int(x.get("width", x["image"].shape[2]))
            outputs.append({self.OUTPUT_KEY: self.postprocess_one(result, height, width)})
        return outputs

    def postprocess_one(self, result: Instances, height: int, width: int) -> Instances:
        """One image's result rescaled to (height, width): `detector_postprocess`."""
        return detector_postprocess(result, height, width)
