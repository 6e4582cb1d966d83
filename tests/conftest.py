"""Fixtures shared by the engine and command-line tests: a tiny shapes dataset (the model
that trains on it is in tiny_run.py)."""

from __future__ import annotations

import pytest

from detframe.data import ShapesConfig, generate_shapes


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides that register a 12-image training and a 6-image validation shapes split of
    64 x 64 pixels as COCO datasets "tiny_train" and "tiny_val", and train and test on them."""
    root = tmp_path_factory.mktemp("tiny_shapes")
    entries = []
    for name, count, seed in (("tiny_train", 12, 5), ("tiny_val", 6, 6)):
        json_file = generate_shapes(root / name, ShapesConfig(count, 64, seed=seed))
        entries.append(f"{name},{json_file},{json_file.parent / 'images'}")
    return [
        f"DATASETS.COCO=[{','.join(repr(e) for e in entries)}]",
        "DATASETS.TRAIN=[tiny_train]",
        "DATASETS.TEST=[tiny_val]",
    ]
