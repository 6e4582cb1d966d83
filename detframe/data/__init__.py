"""Datasets, loading and transforms."""

from .build import (
    ConditionsSteps,
    PreparesDataset,
    TrainLoader,
    build_test_loader,
    build_train_loader,
    build_train_loader_from_config,
)
from .catalog import (
    DATASETS,
    DatasetCatalog,
    DatasetEntry,
    parse_shapes_entry,
    register_coco,
    register_from_config,
    register_from_config_entry,
    register_shapes,
    register_shapes_dataset,
)
from .coco import DatasetError, coco_metadata, load_coco_json, load_proposals
from .deepmask_sampling import DeepMaskPatchMapper
from .mapper import DatasetMapper
from .samplers import AspectRatioGroupedBatcher, Batcher, InferenceSampler, TrainingSampler
from .shapes import (
    SHAPE_CLASSES,
    SHAPE_KINDS,
    RenderedImage,
    ShapeInstance,
    ShapesConfig,
    default_shapes_root,
    generate_shapes,
    render_image,
    shapes_split,
)
from .transforms import RandomFlip, ResizeShortestEdge, apply_transforms

__all__ = [
    "DATASETS",
    "SHAPE_CLASSES",
    "SHAPE_KINDS",
    "AspectRatioGroupedBatcher",
    "Batcher",
    "ConditionsSteps",
    "DatasetCatalog",
    "DatasetEntry",
    "DatasetError",
    "DatasetMapper",
    "DeepMaskPatchMapper",
    "InferenceSampler",
    "PreparesDataset",
    "RandomFlip",
    "RenderedImage",
    "ResizeShortestEdge",
    "ShapeInstance",
    "ShapesConfig",
    "TrainLoader",
    "TrainingSampler",
    "apply_transforms",
    "build_test_loader",
    "build_train_loader",
    "build_train_loader_from_config",
    "coco_metadata",
    "default_shapes_root",
    "generate_shapes",
    "load_coco_json",
    "load_proposals",
    "parse_shapes_entry",
    "register_coco",
    "register_from_config",
    "register_from_config_entry",
    "register_shapes",
    "register_shapes_dataset",
    "render_image",
    "shapes_split",
]
