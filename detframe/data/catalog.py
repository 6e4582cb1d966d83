"""The dataset catalog: dataset name -> a loader of dataset dicts, plus metadata.

`DATASETS` is the default catalog; its names are the ones `DATASETS.TRAIN` / `DATASETS.TEST`
in the config choose. It keeps its entries in `detframe.registry.DATASET_REGISTRY`, so an
unknown name raises `UnknownNameError` (a `KeyError`) listing the registered names and the
closest one, and registering a name twice raises ValueError.

    DATASETS.get(name)       list[dict]: loads the dataset now (see detframe/data/coco.py
                             for the dicts); every call loads again, nothing is cached
    DATASETS.metadata(name)  dict: thing_classes (names in contiguous-id order),
                             dataset_id_to_contiguous_id, contiguous_id_to_dataset_id,
                             json_file, image_root, evaluator_type ("coco"), and
                             proposals_file when the dataset has one

Registering is cheap: nothing is read or generated until a dataset is loaded. The synthetic
splits "shapes_train" and "shapes_val" are registered here; loading one generates it (once,
cached) under `default_shapes_root()/<name>`, resolved at load time. Your own COCO data:
`register_coco(name, json_file, image_root)` from a module listed under `IMPORTS`.

From the config alone (`register_from_config`, which the CLI and the trainer call):

    DATASETS.COCO    ['NAME,ANNOTATIONS_JSON,IMAGE_ROOT[,PROPOSALS_FILE]', ...]
    DATASETS.SHAPES  ['NAME,KEY=VALUE,...', ...]: a synthetic shapes dataset (`ShapesConfig`)
                     generated into `default_shapes_root()/NAME` when first loaded. KEYs:
                     num_images (required), image_size (S, or HxW as height x width),
                     min_size, max_size, min_instances, max_instances, classes (kinds from
                     SHAPE_KINDS joined by ';'), seed, min_visible_fraction,
                     min_visible_pixels, and proposals (a proposals file, as DATASETS.COCO's).
                     e.g. 'shapes_large_train,num_images=2000,image_size=384,min_size=16,
                     max_size=200,max_instances=8,classes=circle;square;triangle;pentagon;
                     hexagon;star,seed=0,proposals=ss_train.pkl' (one string, no spaces needed)

`check_num_classes(num_classes, names)` compares a model's number of classes with the
datasets' `thing_classes` before anything is trained.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detframe.config import ConfigError, declare
from detframe.registry import DATASET_REGISTRY, Registry

from .coco import OnBad, coco_metadata, load_coco_json
from .shapes import ShapesConfig, default_shapes_root, generate_shapes, shapes_split

__all__ = [
    "DATASETS",
    "DatasetCatalog",
    "DatasetEntry",
    "check_num_classes",
    "parse_shapes_entry",
    "register_coco",
    "register_from_config",
    "register_from_config_entry",
    "register_shapes",
    "register_shapes_dataset",
]

_EVALUATOR_TYPE = "coco"


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    Attributes:
        name: the registered name.
        loader: returns the dataset dicts; called on every `DatasetCatalog.get`.
        metadata: returns the metadata dict; called on every `DatasetCatalog.metadata`.
        source: what the dataset was registered from (e.g. json_file and image_root), so
            that registering the same source again can be recognised.
    """

    name: str
    loader: Callable[[], list[dict[str, Any]]]
    metadata: Callable[[], dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def __name__(self) -> str:  # the name a Registry files the entry under
        return self.name


class DatasetCatalog:
    """Maps dataset names to loaders and metadata.

    Args:
        registry: where the entries are kept; a fresh, private Registry if None.
    """

    def __init__(self, registry: Registry | None = None) -> None:
        self._registry = Registry("DATASET") if registry is None else registry

    def register(
        self,
        name: str,
        loader: Callable[[], list[dict[str, Any]]],
        metadata: Callable[[], dict[str, Any]] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        """Registers `loader` (and a `metadata` function) as `name`.

        Raises:
            ValueError: `name` is already registered.
        """
        if name in self._registry:
            raise ValueError(
                f"dataset {name!r} is already registered (from {self.entry(name).source}); "
                "pick another name"
            )
        self._registry.register(DatasetEntry(name, loader, metadata or dict, dict(source or {})))

    def entry(self, name: str) -> DatasetEntry:
        """The entry registered as `name`; UnknownNameError (a KeyError) if there is none."""
        return self._registry.get(name)

    def get(self, name: str) -> list[dict[str, Any]]:
        """Loads the dataset `name` and returns its dataset dicts."""
        return self.entry(name).loader()

    def metadata(self, name: str) -> dict[str, Any]:
        """The metadata of the dataset `name` (see the module docstring)."""
        return self.entry(name).metadata()

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return self._registry.names()

    def __contains__(self, name: object) -> bool:
        return name in self._registry


DATASETS = DatasetCatalog(DATASET_REGISTRY)
"""The default catalog, backed by DATASET_REGISTRY."""


def _coco_source(
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    proposals_file: str | os.PathLike[str] | None,
) -> dict[str, str | None]:
    """The files a COCO dataset entry reads, as recorded in its `source`."""
    return {
        "json_file": str(json_file),
        "image_root": str(image_root),
        "proposals_file": None if proposals_file is None else str(proposals_file),
    }


def register_coco(
    name: str,
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    proposals_file: str | os.PathLike[str] | None = None,
    on_bad: OnBad = "error",
    catalog: DatasetCatalog = DATASETS,
) -> None:
    """Registers a COCO annotation file and its image folder as `name`.

    Nothing is read now. Loading calls `load_coco_json` (images without annotations kept,
    bad data handled per `on_bad`); the metadata reads the file's categories.

    Raises:
        ValueError: `name` is already registered.
    """
    source = _coco_source(json_file, image_root, proposals_file)

    def load() -> list[dict[str, Any]]:
        return load_coco_json(
            json_file, image_root, name, proposals_file=proposals_file, on_bad=on_bad
        )

    @functools.cache
    def metadata() -> dict[str, Any]:
        return {**coco_metadata(json_file), **source, "evaluator_type": _EVALUATOR_TYPE}

    catalog.register(name, load, lambda: dict(metadata()), source)


def register_from_config_entry(
    name: str,
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    proposals_file: str | os.PathLike[str] | None = None,
    on_bad: OnBad = "error",
    catalog: DatasetCatalog = DATASETS,
) -> None:
    """Registers a COCO dataset named by a config (`DATASETS.COCO`) or by a module listed
    under `IMPORTS`. Registering the same name with the same files again does nothing, so
    a config may be loaded, or a module imported, more than once; the same name with other
    files raises ValueError."""
    if name in catalog:
        source = catalog.entry(name).source
        wanted = _coco_source(json_file, image_root, proposals_file)
        if all(source.get(key) == value for key, value in wanted.items()):
            return
    register_coco(name, json_file, image_root, proposals_file, on_bad, catalog=catalog)


declare(
    "DATASETS.COCO",
    list[str],
    [],
    "COCO datasets to register, each 'NAME,ANNOTATIONS_JSON,IMAGE_ROOT[,PROPOSALS_FILE]'",
)
declare(
    "DATASETS.SHAPES",
    list[str],
    [],
    "synthetic shapes datasets to register, each 'NAME,KEY=VALUE,...' with KEYs num_images "
    "(required), image_size (S or HxW), min_size, max_size, min_instances, max_instances, "
    "classes (names joined by ';'), seed, min_visible_fraction, min_visible_pixels, proposals",
)


def register_from_config(cfg: DictConfig, catalog: DatasetCatalog = DATASETS) -> list[str]:
    """Registers every `DATASETS.COCO` and `DATASETS.SHAPES` entry of `cfg` (see the module
    docstring), so that any COCO annotation file and image folder, or a shapes dataset of any
    size, can be used from the config alone (bad data, such as an image missing from a
    proposals file, handled per DATALOADER.ON_BAD_DATA); returns the names registered, COCO
    ones first. Registering an entry again does nothing.

    Raises:
        ConfigError: an entry is malformed; the message names the key, the entry and the
            bad part.
        ValueError: a name is already registered from other files or another shapes config.
    """
    names = []
    for entry in cfg.DATASETS.COCO:
        parts = [part.strip() for part in entry.split(",")]
        if len(parts) not in (3, 4) or not all(parts):
            raise ConfigError(
                f"DATASETS.COCO: entry {entry!r} must be "
                "'NAME,ANNOTATIONS_JSON,IMAGE_ROOT' or 'NAME,ANNOTATIONS_JSON,IMAGE_ROOT,"
                "PROPOSALS_FILE'"
            )
        json_file, image_root, *proposals = parts[1:]
        register_from_config_entry(
            parts[0],
            json_file,
            image_root,
            *proposals,
            on_bad=cfg.DATALOADER.ON_BAD_DATA,
            catalog=catalog,
        )
        names.append(parts[0])
    for entry in cfg.DATASETS.SHAPES:
        name, config, proposals_file = parse_shapes_entry(entry)
        register_shapes_dataset(
            name,
            config,
            proposals_file=proposals_file,
            on_bad=cfg.DATALOADER.ON_BAD_DATA,
            catalog=catalog,
        )
        names.append(name)
    return names


def _image_size(text: str) -> int | tuple[int, int]:
    """'S' -> S; 'HxW' -> (H, W)."""
    height, sep, width = text.partition("x")
    return (int(height), int(width)) if sep else int(text)


def _names(text: str) -> tuple[str, ...]:
    """'a;b;c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(";"))


# DATASETS.SHAPES: the KEYs of an entry that set a ShapesConfig field, each with its parser
# and the form it expects (for messages).
_SHAPES_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "num_images": (int, "an int"),
    "image_size": (_image_size, "an int S or HxW (height x width), e.g. 384 or 320x480"),
    "min_size": (float, "a number"),
    "max_size": (float, "a number"),
    "min_instances": (int, "an int"),
    "max_instances": (int, "an int"),
    "classes": (_names, "shape names joined by ';', e.g. circle;square;star"),
    "seed": (int, "an int"),
    "min_visible_fraction": (float, "a number"),
    "min_visible_pixels": (int, "an int"),
}
_PROPOSALS_KEY = "proposals"


def parse_shapes_entry(entry: str) -> tuple[str, ShapesConfig, str | None]:
    """Parses one `DATASETS.SHAPES` entry 'NAME,KEY=VALUE,...' (see the module docstring).

    Returns:
        (the dataset name, its ShapesConfig, its proposals file or None).

    Raises:
        ConfigError: the message names DATASETS.SHAPES, the entry and what is wrong: no
            name, a part without '=', an unknown KEY (with the closest valid one), a KEY
            given twice, a VALUE that does not parse, num_images missing, or a value that
            ShapesConfig rejects (naming the field).
    """
    where = f"DATASETS.SHAPES: entry {entry!r}"
    name, *parts = (part.strip() for part in entry.split(","))
    if not name or "=" in name:
        raise ConfigError(f"{where} must start with the dataset's name: 'NAME,KEY=VALUE,...'")
    valid = [*_SHAPES_KEYS, _PROPOSALS_KEY]
    values: dict[str, str] = {}
    for part in parts:
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"{where}: {part!r} is not KEY=VALUE")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}valid keys: {valid}")
        if key in values:
            raise ConfigError(f"{where}: key {key!r} is given twice")
        values[key] = value
    if "num_images" not in values:
        raise ConfigError(f"{where}: num_images=N is required")
    proposals_file = values.pop(_PROPOSALS_KEY, None)
    fields: dict[str, Any] = {}
    for key, value in values.items():
        parse, expected = _SHAPES_KEYS[key]
        try:
            fields[key] = parse(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} is not {expected}") from None
    try:
        config = ShapesConfig(**fields)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return name, config, proposals_file


def register_shapes_dataset(
    name: str,
    config: ShapesConfig,
    root: str | os.PathLike[str] | None = None,
    proposals_file: str | os.PathLike[str] | None = None,
    on_bad: OnBad = "error",
    catalog: DatasetCatalog = DATASETS,
) -> None:
    """Registers the synthetic shapes dataset of `config` as `name`. Loading it generates
    the dataset into `root` (default: `default_shapes_root()/name`, resolved at load time)
    if it is not there yet, then reads it with `load_coco_json`, with the precomputed
    proposals of `proposals_file` if given (handled per `on_bad`, as for COCO data).

    Registering `name` again with the same config, root and proposals file does nothing.

    Raises:
        ValueError: `name` is already registered from something else; the message names
            both sources.
    """
    source = {
        "shapes_config": config.to_json(),
        "root": None if root is None else str(root),
        "proposals_file": None if proposals_file is None else str(proposals_file),
    }
    if name in catalog:
        registered = catalog.entry(name).source
        if registered == source:
            return
        raise ValueError(
            f"dataset {name!r} is already registered from {registered}; it cannot be "
            f"registered again from {source}: pick another name"
        )

    def folder() -> Path:
        return Path(root) if root is not None else default_shapes_root() / name

    def load() -> list[dict[str, Any]]:
        json_file = generate_shapes(folder(), config)
        return load_coco_json(
            json_file,
            json_file.parent / "images",
            name,
            proposals_file=proposals_file,
            on_bad=on_bad,
        )

    def metadata() -> dict[str, Any]:
        ids = range(1, len(config.classes) + 1)
        return {
            "thing_classes": list(config.classes),
            "dataset_id_to_contiguous_id": {i: i - 1 for i in ids},
            "contiguous_id_to_dataset_id": {i - 1: i for i in ids},
            "json_file": str(folder() / "annotations.json"),
            "image_root": str(folder() / "images"),
            "proposals_file": source["proposals_file"],
            "evaluator_type": _EVALUATOR_TYPE,
        }

    catalog.register(name, load, metadata, source)


def register_shapes(
    name: str,
    num_images: int | None = None,
    image_size: int | tuple[int, int] = 128,
    root: str | os.PathLike[str] | None = None,
    catalog: DatasetCatalog = DATASETS,
) -> None:
    """Registers the synthetic split `name` ("shapes_train" or "shapes_val", see
    `shapes_split`; `num_images` and `image_size` override its size), generated into `root`
    (see `register_shapes_dataset`)."""
    config = shapes_split(name, num_images, image_size)  # validates now, generates later
    register_shapes_dataset(name, config, root, catalog=catalog)


register_shapes("shapes_train")
register_shapes("shapes_val")


def check_num_classes(
    num_classes: int,
    dataset_names: Sequence[str],
    key: str = "MODEL.ROI_HEADS.NUM_CLASSES",
    catalog: DatasetCatalog = DATASETS,
) -> None:
    """Checks that every dataset of `dataset_names` has `num_classes` categories.

    With fewer classes than categories the last ones would be trained as background, or
    crash the loss; with more, the extra classes would never be trained and evaluation could
    not map their detections to category ids. A model without classes (a proposal network)
    simply does not call this.

    Args:
        num_classes: the model's number of foreground classes.
        dataset_names: registered datasets (e.g. DATASETS.TRAIN and DATASETS.TEST).
        key: the config key `num_classes` came from, for the message.

    Raises:
        ConfigError: a dataset's number of `thing_classes` differs; the message names the
            key, both numbers, the dataset and its classes.
    """
    for name in dataset_names:
        classes = list(catalog.metadata(name).get("thing_classes", []))
        if len(classes) != num_classes:
            shown = ", ".join(map(repr, classes[:10])) + (", ..." if len(classes) > 10 else "")
            raise ConfigError(
                f"{key} is {num_classes} but dataset {name!r} has {len(classes)} categories "
                f"({shown}): set {key}={len(classes)}"
            )
