"""The core config keys, familiar to detectron2 users.

A key is declared next to the code that reads it. The keys here are read in several places
(the model, the data pipeline, the trainer and the command line: device, weights, input
sizes, datasets, batch size, run length, seed, output folder) or by the config loader
itself (IMPORTS); component-specific keys live with their component (e.g. the optimizer's
and the schedule's in detframe/engine/).

Defaults follow detectron2 (BGR 0..255 input, its ImageNet pixel statistics), except
`SEED`, where null (rather than -1) means "pick a random seed".
"""

from __future__ import annotations

from .schema import declare

# Read by the config loader.
declare("IMPORTS", list[str], [], "modules to import before the config is validated or used")

# Model (meta-architecture, weights, input normalisation).
declare("MODEL.DEVICE", str, "cuda", "device the model runs on, e.g. cuda, cuda:1, cpu")
declare("MODEL.WEIGHTS", str, "", "checkpoint path or URL to initialise from; empty for none")
declare("MODEL.META_ARCHITECTURE", str, "GeneralizedRCNN", "name in META_ARCH_REGISTRY")
declare(
    "MODEL.PIXEL_MEAN",
    list[float],
    [103.530, 116.280, 123.675],
    "per-channel mean subtracted from input images, in INPUT.FORMAT order",
)
declare(
    "MODEL.PIXEL_STD",
    list[float],
    [1.0, 1.0, 1.0],
    "per-channel std input images are divided by, in INPUT.FORMAT order",
    min=0,
    min_exclusive=True,
)
declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 80, "number of foreground classes", min=1)

# Input resizing and format.
declare(
    "INPUT.MIN_SIZE_TRAIN",
    list[int],
    [800],
    "shorter side at training; one picked at random",
    min=1,
)
declare("INPUT.MAX_SIZE_TRAIN", int, 1333, "longest side at training, after resizing", min=1)
declare("INPUT.MIN_SIZE_TEST", int, 800, "shorter side at test time", min=1)
declare("INPUT.MAX_SIZE_TEST", int, 1333, "longest side at test time, after resizing", min=1)
declare(
    "INPUT.FORMAT", str, "BGR", "channel order of images fed to the model", choices=("RGB", "BGR")
)

# Data.
declare("DATASETS.TRAIN", list[str], [], "names in DATASET_REGISTRY to train on")
declare("DATASETS.TEST", list[str], [], "names in DATASET_REGISTRY to evaluate on")
declare(
    "DATALOADER.NUM_WORKERS", int, 4, "data-loading worker processes per training process", min=0
)

# Solver: read by the data loader and the trainer; the optimizer's and the learning-rate
# schedule's keys are in detframe/engine/.
declare("SOLVER.IMS_PER_BATCH", int, 16, "images per iteration, summed over all processes", min=1)
declare("SOLVER.MAX_ITER", int, 90000, "number of training iterations", min=1)

# Run.
declare("SEED", int | None, None, "random seed; null picks one at random (and logs it)", min=0)
declare("OUTPUT_DIR", str, "./output", "directory for checkpoints, logs and the effective config")
