"""Datasets, loading and transforms."""

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
    "SHAPE_CLASSES",
    "RenderedImage",
    "ShapeInstance",
    "ShapesConfig",
    "default_shapes_root",
    "generate_shapes",
    "render_image",
    "shapes_split",
]
