"""Datasets, loading and transforms."""

from .catalog import (
    DATASETS,
    DatasetCatalog,
    DatasetEntry,
    register_coco,
    register_from_config_entry,
    register_shapes,
)
from .coco import DatasetError, coco_metadata, load_coco_json, load_proposals
from .shapes import (
    SHAPE_CLASSES,
    RenderedImage,
    ShapeInstance,
    ShapesConfig,
    default_shapes_root,
    generate_shapes,
    render_image,
    shapes_split,
)

__all__ = [
    "DATASETS",
    "SHAPE_CLASSES",
    "DatasetCatalog",
    "DatasetEntry",
    "DatasetError",
    "RenderedImage",
    "ShapeInstance",
    "ShapesConfig",
    "coco_metadata",
    "default_shapes_root",
    "generate_shapes",
    "load_coco_json",
    "load_proposals",
    "register_coco",
    "register_from_config_entry",
    "register_shapes",
    "render_image",
    "shapes_split",
]
