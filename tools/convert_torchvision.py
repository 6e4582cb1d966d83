"""Converts a torchvision detection checkpoint into a detframe checkpoint.

    python tools/convert_torchvision.py maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth out.pth

The input is a torchvision `fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn` (v1) or
`retinanet_resnet50_fpn` state dict, as a local file or a URL (downloaded through torch.hub's
cache). The output is {"model": state_dict} in detframe's key names and class layout (see
detframe/modeling/weights.py), which `MODEL.WEIGHTS=out.pth` loads with
configs/torchvision/*.yaml. `MODEL.WEIGHTS` also takes torchvision's files directly and
converts them as it loads; a converted file only saves doing that each time, and can be
inspected.

An ImageNet classifier (`resnet50-*.pth`) needs no conversion: `MODEL.WEIGHTS` takes it as it
is, and the model's backbone maps its keys (see detframe/modeling/weights.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from detframe.modeling.weights import (
    convert_torchvision_detection,
    read_state_dict,
    state_dict_format,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="torchvision checkpoint: a file path or URL")
    parser.add_argument("output", type=Path, help="where to write the detframe checkpoint")
    args = parser.parse_args(argv)
    try:
        state_dict = read_state_dict(args.source)
        kind = state_dict_format(state_dict)
        if kind != "torchvision_detection":
            raise ValueError(
                f"{args.source} is not a torchvision detection checkpoint (it looks like "
                f"{kind}); an ImageNet classifier or a detframe checkpoint is given to "
                "MODEL.WEIGHTS as it is"
            )
        converted = convert_torchvision_detection(state_dict)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".tmp")
    torch.save({"model": converted, "source": str(args.source)}, partial)
    os.replace(partial, args.output)
    print(f"{kind}: {len(converted)} tensors written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
