"""detframe.config: declarations, _BASE_ chains, overrides, errors, ranges, saving, IMPORTS,
layering, docs.

Configs are loaded through `detframe.engine.setup.load_config` (detframe's keys declared),
except where a test shows what the config layer does on its own.

Fixture files live in tests/fixtures/configs/ (the 3-level chain spans base/, family/ and
family/exp/); one-off files are written to tmp_path. Tests that declare keys or import the
user plugin run on a copy of the schema and of BACKBONE_REGISTRY (the `isolated` fixture).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from detframe.config import REQUIRED, SCHEMA, ConfigError, declare, format_config, save_config
from detframe.config.schema import type_name
from detframe.engine.setup import load_config
from detframe.registry import BACKBONE_REGISTRY, UnknownNameError, build

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = FIXTURES / "configs"
EXPERIMENT = CONFIGS / "family" / "exp" / "experiment.yaml"


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Declarations and registrations made in the test are undone afterwards."""
    monkeypatch.setattr(SCHEMA, "_keys", dict(SCHEMA._keys))
    monkeypatch.setattr(BACKBONE_REGISTRY, "_obj_map", dict(BACKBONE_REGISTRY._obj_map))
    monkeypatch.syspath_prepend(str(FIXTURES))
    sys.modules.pop("user_plugin", None)
    yield
    sys.modules.pop("user_plugin", None)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- loading and merging ---------------------------------------------------------------


def test_empty_file_gives_every_default_read_only(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    for key in SCHEMA:
        assert OmegaConf.select(cfg, key.name) == key.default
    assert cfg.INPUT.FORMAT == "BGR" and cfg.SEED is None
    with pytest.raises(ConfigAttributeError):
        _ = cfg.MODEL.NO_SUCH_KEY
    with pytest.raises(Exception, match="read-only"):
        cfg.SEED = 3


def test_base_chain_three_levels_later_files_win() -> None:
    cfg = load_config(EXPERIMENT)
    assert cfg.MODEL.DEVICE == "cpu"  # root only
    assert cfg.DATASETS.TRAIN == ["shapes_train"]  # root only
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20  # family only
    assert cfg.SOLVER.BASE_LR == 0.005  # root, then family
    assert cfg.SOLVER.MAX_ITER == 200  # root, then experiment
    assert cfg.INPUT.MIN_SIZE_TRAIN == [800]  # a list is replaced, not merged
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.OUTPUT_DIR == "out/experiment"
    assert cfg.SOLVER.IMS_PER_BATCH == 16  # default: set by no file


def test_base_paths_are_relative_to_the_file_not_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(CONFIGS / "base")
    from_base = load_config("../family/exp/experiment.yaml")
    monkeypatch.chdir(ROOT)
    from_root = load_config("tests/fixtures/configs/family/exp/experiment.yaml")
    assert from_base == from_root == load_config(EXPERIMENT)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("SOLVER.MAX_ITER=5", "SOLVER.MAX_ITER", 5),
        ("SOLVER.BASE_LR=0.1", "SOLVER.BASE_LR", 0.1),
        ("SOLVER.BASE_LR=1e-3", "SOLVER.BASE_LR", 0.001),
        ("SOLVER.BASE_LR=1", "SOLVER.BASE_LR", 1.0),
        ("TEST.FLAG=true", "TEST.FLAG", True),
        ("TEST.FLAG=false", "TEST.FLAG", False),
        ("MODEL.DEVICE=cuda:1", "MODEL.DEVICE", "cuda:1"),
        ("MODEL.WEIGHTS='123'", "MODEL.WEIGHTS", "123"),
        ("INPUT.MIN_SIZE_TRAIN=[1,2]", "INPUT.MIN_SIZE_TRAIN", [1, 2]),
        ("INPUT.MIN_SIZE_TRAIN=[]", "INPUT.MIN_SIZE_TRAIN", []),
        ("MODEL.PIXEL_STD=[1, 2.5, 3]", "MODEL.PIXEL_STD", [1.0, 2.5, 3.0]),
        ("DATASETS.TEST=[a, b]", "DATASETS.TEST", ["a", "b"]),
        ("SEED=null", "SEED", None),
        ("SEED=7", "SEED", 7),
        ("INPUT={FORMAT: BGR, MAX_SIZE_TEST: 3}", "INPUT.MAX_SIZE_TEST", 3),
    ],
)
def test_override_of_every_type(isolated: None, override: str, key: str, expected: Any) -> None:
    declare("TEST.FLAG", bool, True, "a bool key for this test")
    cfg = load_config(EXPERIMENT, [override])
    value = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_overrides_win_over_files_and_each_other() -> None:
    cfg = load_config(EXPERIMENT, ["SOLVER.MAX_ITER=3", "SEED=1", "SOLVER.MAX_ITER=4"])
    assert cfg.SOLVER.MAX_ITER == 4 and cfg.SEED == 1
    assert cfg.SOLVER.BASE_LR == 0.005  # untouched


# --- errors ------------------------------------------------------------------------------


def test_typo_in_file_names_file_key_and_closest_key() -> None:
    message = error_of(CONFIGS / "typo.yaml")
    assert str(CONFIGS / "typo.yaml") in message
    assert "unknown key MODEL.ROI_HEADS.NUM_CLASS; did you mean MODEL.ROI_HEADS.NUM_CLASSES?" in (
        message
    )


def test_typo_in_override_names_command_line_and_closest_key() -> None:
    message = error_of(EXPERIMENT, ("SOLVER.BASE_LRR=0.1",))
    assert message == "command line: unknown key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR?"


def test_unknown_key_far_from_all_has_no_suggestion(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "XYZZY: 1\n"))
    assert message.endswith("unknown key XYZZY")


def test_unknown_key_of_an_undeclared_section_asks_for_its_module(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "XYZZY:\n  PLUGH: 1\n"))
    assert message.endswith(
        "unknown key XYZZY.PLUGH (no key of XYZZY is declared: is the module that declares it"
        " imported, e.g. through IMPORTS?)"
    )


def test_a_section_given_a_value_is_an_error(tmp_path: Path) -> None:
    assert "MODEL is a section" in error_of(write(tmp_path, "MODEL: 3\n"))


def test_wrong_type_in_file() -> None:
    message = error_of(CONFIGS / "wrong_type.yaml")
    path = CONFIGS / "wrong_type.yaml"
    assert message == f"{path}: SOLVER.MAX_ITER: expected int, got str 'many'"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("SOLVER.MAX_ITER=1.5", "SOLVER.MAX_ITER: expected int, got float 1.5"),
        ("SOLVER.MAX_ITER=true", "SOLVER.MAX_ITER: expected int, got bool True"),
        ("MODEL.DEVICE=123", "MODEL.DEVICE: expected str, got int 123"),
        ("MODEL.DEVICE=null", "MODEL.DEVICE: expected str, got null"),
        ("INPUT.MIN_SIZE_TRAIN=800", "expected list[int], got int 800"),
        ("INPUT.MIN_SIZE_TRAIN=[800, x]", "MIN_SIZE_TRAIN: element [1]: expected int, got str 'x'"),
        (
            "INPUT.FORMAT=RGBA",
            "INPUT.FORMAT: 'RGBA' is not one of the allowed values: 'RGB', 'BGR'",
        ),
    ],
)
def test_wrong_type_or_choice_in_override(override: str, expected: str) -> None:
    message = error_of(EXPERIMENT, (override,))
    assert message.startswith("command line: ")
    assert expected in message


# --- lists of lists ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "text", "expected"),
    [
        (list[list[float]], "[[32, 40.5], [64]]", [[32.0, 40.5], [64.0]]),
        (list[list[float]], "[[], [1e-3]]", [[], [0.001]]),
        (list[list[int]], "[[1, 2], [3]]", [[1, 2], [3]]),
        (list[list[str]], "[[res4], [res5, p6]]", [["res4"], ["res5", "p6"]]),
        (list[list[int]] | None, "null", None),
        (list[list[int]], "[]", []),
    ],
)
def test_list_of_lists_in_file_and_override(
    isolated: None, tmp_path: Path, type_: Any, text: str, expected: Any
) -> None:
    declare("TEST.NESTED", type_, [], "a nested list for this test")
    from_file = load_config(write(tmp_path, f"TEST:\n  NESTED: {text}\n")).TEST.NESTED
    from_override = load_config(write(tmp_path, "", "empty.yaml"), [f"TEST.NESTED={text}"])
    for value in (from_file, from_override.TEST.NESTED):
        value = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
        assert value == expected
        if expected:
            assert [[type(x) for x in row] for row in value] == [
                [type(x) for x in row] for row in expected
            ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32", "expected list[list[float]], got int 32"),
        ("[32, 64]", "element [0]: expected list[float], got int 32"),
        ("[[32], 64]", "element [1]: expected list[float], got int 64"),
        ("[[32], [64, big]]", "element [1][1]: expected float, got str 'big'"),
        ("[[32], [64, true]]", "element [1][1]: expected float, got bool True"),
        ("[[32], [null]]", "element [1][0]: expected float, got null"),
        ("[[32], [[64]]]", "element [1][0]: expected float, got list [64]"),
    ],
)
def test_list_of_lists_errors_name_key_and_position(
    isolated: None, tmp_path: Path, text: str, expected: str
) -> None:
    declare("TEST.SIZES", list[list[float]], [[32.0]], "a nested list for this test")
    path = write(tmp_path, f"TEST:\n  SIZES: {text}\n")
    assert error_of(path) == f"{path}: TEST.SIZES: {expected}"
    assert error_of(write(tmp_path, "", "empty.yaml"), (f"TEST.SIZES={text}",)) == (
        f"command line: TEST.SIZES: {expected}"
    )


def test_list_of_lists_choices_apply_to_each_element(isolated: None) -> None:
    declare("TEST.NAMES", list[list[str]], [["a"]], "a nested list for this test", choices="ab")
    assert load_config(EXPERIMENT, ["TEST.NAMES=[[a, b], [b]]"]).TEST.NAMES == [["a", "b"], ["b"]]
    assert error_of(EXPERIMENT, ("TEST.NAMES=[[a], [b, c]]",)) == (
        "command line: TEST.NAMES: element [1][1]: 'c' is not one of the allowed values: 'a', 'b'"
    )


def test_list_of_lists_type_name_and_schema_row(isolated: None) -> None:
    declare("TEST.A", list[list[int]] | None, None, "nested ints for this test")
    declare("TEST.B", list[list[str]], [["p2"], ["p3", "p4"]], "nested names for this test")
    assert type_name(SCHEMA["TEST.A"].type) == "list[list[int]] | None"
    assert type_name(list[list[float]]) == "list[list[float]]"
    table = SCHEMA.markdown()
    assert "| `TEST.A` | `list[list[int]] \\| None` | `null` | nested ints for this test |" in table
    assert '| `TEST.B` | `list[list[str]]` | `[["p2"], ["p3", "p4"]]` |' in table


# --- mappings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "text", "expected"),
    [
        (
            dict[str, float],
            "{backbone.bottom_up: 0.1, head: 2, 'a b': 1e-3}",
            {"backbone.bottom_up": 0.1, "head": 2.0, "a b": 0.001},
        ),
        (dict[str, int], "{res4: 3, '0': -1}", {"res4": 3, "0": -1}),
        (dict[str, str], "{res4: p4, res5: '5'}", {"res4": "p4", "res5": "5"}),
        (dict[str, bool], "{frozen: true, head: false}", {"frozen": True, "head": False}),
        (dict[str, float] | None, "null", None),
        (dict[str, float], "{}", {}),
    ],
)
def test_mapping_in_file_and_override(
    isolated: None, tmp_path: Path, type_: Any, text: str, expected: Any
) -> None:
    declare("TEST.MAP", type_, {}, "a mapping for this test")
    flow = load_config(write(tmp_path, f"TEST:\n  MAP: {text}\n")).TEST.MAP
    block_text = "".join(f"\n    {k!r}: {v!r}" for k, v in (expected or {}).items())
    block = load_config(write(tmp_path, f"TEST:\n  MAP: {block_text or text}\n", "block.yaml"))
    override = load_config(write(tmp_path, "", "empty.yaml"), [f"TEST.MAP={text}"])
    for value in (flow, block.TEST.MAP, override.TEST.MAP):
        value = OmegaConf.to_container(value) if OmegaConf.is_dict(value) else value
        assert value == expected
        if expected:
            assert [type(v) for v in value.values()] == [type(v) for v in expected.values()]


def test_a_mapping_replaces_the_earlier_one_whole(isolated: None, tmp_path: Path) -> None:
    declare("TEST.MAP", dict[str, float], {"default": 1.0}, "a mapping for this test")
    write(tmp_path, "TEST:\n  MAP: {a: 1, b.c: 2}\n", "base.yaml")
    path = write(tmp_path, "_BASE_: base.yaml\nTEST:\n  MAP:\n    b.c: 3\n")
    assert load_config(path).TEST.MAP == {"b.c": 3.0}  # "a" is not merged in
    assert load_config(path, ["TEST.MAP={d: 4}"]).TEST.MAP == {"d": 4.0}
    assert load_config(path, ["TEST.MAP={d: 4}", "TEST={MAP: {}}"]).TEST.MAP == {}
    assert load_config(write(tmp_path, "", "empty.yaml")).TEST.MAP == {"default": 1.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", "expected dict[str, float], got float 0.5"),
        ("[backbone=0.5]", "expected dict[str, float], got list ['backbone=0.5']"),
        ("backbone=0.5", "expected dict[str, float], got str 'backbone=0.5'"),
        ("null", "expected dict[str, float], got null"),
        ("{head: 1, backbone: fast}", "entry 'backbone': expected float, got str 'fast'"),
        ("{backbone: true}", "entry 'backbone': expected float, got bool True"),
        ("{backbone: null}", "entry 'backbone': expected float, got null"),
        ("{backbone: [0.5]}", "entry 'backbone': expected float, got list [0.5]"),
        ("{backbone: {res2: 0.5}}", "entry 'backbone': expected float, got dict {'res2': 0.5}"),
        ("{0: 0.5}", "entry 0: expected a str name, got int 0"),
        ("{backbone: -0.5}", "entry 'backbone': -0.5 is out of range: must be in [0, inf)"),
        ("{backbone: .inf}", "entry 'backbone': inf is out of range: must be in [0, inf)"),
        ("{backbone: .nan}", "entry 'backbone': nan is out of range: must be in [0, inf)"),
    ],
)
def test_mapping_errors_name_key_and_entry(
    isolated: None, tmp_path: Path, text: str, expected: str
) -> None:
    declare(
        "TEST.MAP",
        dict[str, float],
        {},
        "factors for this test",
        min=0,
        max=float("inf"),
        max_exclusive=True,
    )
    path = write(tmp_path, f"TEST:\n  MAP: {text}\n")
    assert error_of(path) == f"{path}: TEST.MAP: {expected}"
    assert error_of(write(tmp_path, "", "empty.yaml"), (f"TEST.MAP={text}",)) == (
        f"command line: TEST.MAP: {expected}"
    )


def test_mapping_choices_and_range_apply_to_each_value(isolated: None) -> None:
    declare("TEST.NAMES", dict[str, str], {}, "names for this test", choices=("p4", "p5"))
    declare("TEST.FRACTIONS", dict[str, float], {}, "fractions for this test", min=0, max=1)
    cfg = load_config(EXPERIMENT, ["TEST.NAMES={res4: p4, res5: p5}", "TEST.FRACTIONS={a: 1}"])
    assert cfg.TEST.NAMES == {"res4": "p4", "res5": "p5"} and cfg.TEST.FRACTIONS == {"a": 1.0}
    assert error_of(EXPERIMENT, ("TEST.NAMES={res4: p4, res5: p6}",)) == (
        "command line: TEST.NAMES: entry 'res5': 'p6' is not one of the allowed values: 'p4', 'p5'"
    )
    assert error_of(EXPERIMENT, ("TEST.FRACTIONS={a: 0.5, b.c: 1.5}",)) == (
        "command line: TEST.FRACTIONS: entry 'b.c': 1.5 is out of range: must be in [0, 1]"
    )


def test_an_entry_given_as_a_dotted_key_is_an_error(isolated: None, tmp_path: Path) -> None:
    declare("TEST.MAP", dict[str, float], {}, "a mapping for this test")
    expected = (
        "unknown key TEST.MAP.backbone: TEST.MAP is a key of type dict[str, float], not a"
        " section; set its whole value"
    )
    assert error_of(EXPERIMENT, ("TEST.MAP.backbone=0.5",)) == f"command line: {expected}"
    path = write(tmp_path, "TEST:\n  MAP.backbone: 0.5\n")
    assert error_of(path) == f"{path}: {expected}"


def test_interpolation_in_a_mapping_or_nested_list_is_rejected(isolated: None) -> None:
    declare("TEST.MAP", dict[str, str], {}, "a mapping for this test")
    declare("TEST.NESTED", list[list[str]], [], "a nested list for this test")
    for override in ("TEST.MAP={a: '${SEED}'}", "TEST.NESTED=[[a], ['${SEED}']]"):
        key = override.partition("=")[0]
        assert error_of(EXPERIMENT, (override,)) == (
            f"command line: {key}: interpolation (${{...}}) is not supported"
        )


def test_mapping_type_name_and_schema_row(isolated: None) -> None:
    declare("TEST.A", dict[str, int] | None, None, "a mapping of ints for this test")
    declare("TEST.B", dict[str, float], {"backbone.res2": 0.1}, "factors for this test", min=0)
    assert type_name(SCHEMA["TEST.A"].type) == "dict[str, int] | None"
    assert type_name(dict[str, float]) == "dict[str, float]"
    table = SCHEMA.markdown()
    assert (
        "| `TEST.A` | `dict[str, int] \\| None` | `null` | a mapping of ints for this test |"
        in table
    )
    assert (
        '| `TEST.B` | `dict[str, float]` | `{"backbone.res2": 0.1}` | factors for this test'
        " (range: >= 0) |" in table
    )


def test_mapping_key_declared_by_an_imported_module(
    isolated: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping key that only exists once IMPORTS ran is still taken whole, not opened."""
    write(
        tmp_path,
        "from detframe.config import declare\n\n"
        'declare("MODEL.MAPPING_PLUGIN.FACTORS", dict[str, float], {}, "factors for this test")\n',
        "mapping_plugin.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(
        tmp_path,
        "IMPORTS: [mapping_plugin]\nMODEL:\n  MAPPING_PLUGIN:\n    FACTORS:\n      head.cls: 2\n",
    )
    try:
        assert load_config(path).MODEL.MAPPING_PLUGIN.FACTORS == {"head.cls": 2.0}
    finally:
        sys.modules.pop("mapping_plugin", None)


# --- value ranges ------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("SOLVER.IMS_PER_BATCH", "0", "0 is out of range: must be >= 1"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", "-1", "-1 is out of range: must be >= 1"),
    ("SOLVER.BASE_LR", "-1", "-1.0 is out of range: must be >= 0"),
    ("SOLVER.BASE_LR", ".nan", "nan is out of range: must be >= 0"),
    ("MODEL.RPN.NMS_THRESH", "1.5", "1.5 is out of range: must be in [0, 1]"),
    ("MODEL.PIXEL_STD", "[58.4, 0, 57.4]", "element [1]: 0.0 is out of range: must be > 0"),
    ("INPUT.MIN_SIZE_TRAIN", "[640, 0]", "element [1]: 0 is out of range: must be >= 1"),
]


@pytest.mark.parametrize(("key", "text", "expected"), OUT_OF_RANGE)
def test_out_of_range_override_names_command_line_key_value_and_range(
    key: str, text: str, expected: str
) -> None:
    assert error_of(EXPERIMENT, (f"{key}={text}",)) == f"command line: {key}: {expected}"


@pytest.mark.parametrize(("key", "text", "expected"), OUT_OF_RANGE)
def test_out_of_range_in_file_names_file_key_value_and_range(
    tmp_path: Path, key: str, text: str, expected: str
) -> None:
    *sections, leaf = key.split(".")
    nested = "".join(f"{section}: {{" for section in sections) + f"{leaf}: {text}"
    path = write(tmp_path, nested + "}" * len(sections) + "\n")
    assert error_of(path) == f"{path}: {key}: {expected}"


def test_values_at_the_bounds_load(tmp_path: Path) -> None:
    cfg = load_config(
        EXPERIMENT,
        ["SOLVER.IMS_PER_BATCH=1", "SOLVER.BASE_LR=0", "MODEL.RPN.NMS_THRESH=1", "SEED=0"],
    )
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.MODEL.RPN.NMS_THRESH) == (1, 0.0, 1)


def test_a_range_applies_to_every_element_of_a_list_of_lists(isolated: None) -> None:
    declare(
        "TEST.SIZES", list[list[float]], [[32.0]], "sizes for this test", min=0, min_exclusive=True
    )
    assert load_config(EXPERIMENT, ["TEST.SIZES=[[1e-3], [1, 2]]"]).TEST.SIZES == [[1e-3], [1, 2]]
    assert error_of(EXPERIMENT, ("TEST.SIZES=[[32, 40], [64, -8]]",)) == (
        "command line: TEST.SIZES: element [1][1]: -8.0 is out of range: must be > 0"
    )


@pytest.mark.parametrize(
    ("bounds", "inside", "outside", "words"),
    [
        ({"min": 1}, [1, 2, float("inf")], [0.999, -1, float("nan")], ">= 1"),
        ({"min": 0, "min_exclusive": True}, [1e-9, 5], [0, -1e-9], "> 0"),
        ({"max": 1}, [1, -5], [1.5], "<= 1"),
        ({"max": 1, "max_exclusive": True}, [0.999], [1], "< 1"),
        ({"min": 0, "max": 1}, [0, 0.5, 1], [-0.1, 1.1, float("nan")], "in [0, 1]"),
        ({"min": 0, "max": 1, "max_exclusive": True}, [0, 0.999], [1], "in [0, 1)"),
        ({"min": 0.5, "max": 2, "min_exclusive": True}, [2, 0.51], [0.5], "in (0.5, 2]"),
        ({}, [-1e9, float("nan")], [], None),
    ],
)
def test_range_bounds_and_words(
    isolated: None, bounds: dict, inside: list[float], outside: list[float], words: str | None
) -> None:
    key = declare("TEST.X", float, inside[0], "a bounded key for this test", **bounds)
    assert key.range == words
    assert all(key.in_range(v) for v in inside)
    assert not any(key.in_range(v) for v in outside)
    for value in outside:
        with pytest.raises(ConfigError, match=f"is out of range: must be {re.escape(str(words))}$"):
            key.check(value)


def test_schema_table_shows_ranges(isolated: None) -> None:
    declare("TEST.FRACTION", float, 0.25, "a fraction for this test", min=0, max=1)
    table = SCHEMA.markdown()
    assert (
        "| `TEST.FRACTION` | `float` | `0.25` | a fraction for this test (range: in [0, 1]) |"
        in (table)
    )
    assert "number of foreground classes (range: >= 1) |" in table


def test_missing_required_value_names_the_key(isolated: None, tmp_path: Path) -> None:
    declare("MODEL.TEST.ANCHORS", list[int], REQUIRED, "a required key for this test")
    path = write(tmp_path, "SEED: 1\n")
    assert error_of(path) == (
        f"{path}: required key not set: MODEL.TEST.ANCHORS "
        "(set it in the file or as KEY=VALUE on the command line)"
    )
    assert load_config(path, ["MODEL.TEST.ANCHORS=[32, 64]"]).MODEL.TEST.ANCHORS == [32, 64]


def test_base_cycle_is_an_error() -> None:
    message = error_of(CONFIGS / "cycle_a.yaml")
    assert "_BASE_ cycle" in message
    assert re.search(r"cycle_a\.yaml -> .*cycle_b\.yaml -> .*cycle_a\.yaml$", message)


def test_file_that_is_its_own_base_is_a_cycle(tmp_path: Path) -> None:
    assert "_BASE_ cycle" in error_of(write(tmp_path, "_BASE_: config.yaml\n"))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_missing_base_names_the_path_and_the_file_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "_BASE_: base/nope.yaml\n")
    message = error_of(path)
    assert message == f"config file not found: {tmp_path / 'base/nope.yaml'} (the _BASE_ of {path})"


def test_binary_file_names_the_file_and_says_it_is_not_yaml_text(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": {"conv.weight": torch.randn(8, 3, 3, 3)}}, checkpoint)
    message = error_of(checkpoint)
    assert message.startswith(f"{checkpoint}: not a YAML text file: byte 0x")
    assert "is not UTF-8" in message
    config = write(tmp_path, "_BASE_: model_final.pth\nSEED: 1\n")
    assert error_of(config).startswith(f"{checkpoint}: not a YAML text file")


def test_yaml_syntax_error_names_file_and_line() -> None:
    message = error_of(CONFIGS / "bad_syntax.yaml")
    assert message.startswith(f"{CONFIGS / 'bad_syntax.yaml'}, line 4, column")
    assert "invalid YAML" in message


def test_key_given_twice_in_a_file_is_an_error(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "SOLVER:\n  MAX_ITER: 1\n  MAX_ITER: 2\n"))
    assert "line 3" in message and "'MAX_ITER' is given twice" in message


@pytest.mark.parametrize("override", ["SOLVER.MAX_ITER", "=3"])
def test_override_without_key_and_value_is_an_error(override: str) -> None:
    assert error_of(EXPERIMENT, (override,)).endswith("is not KEY=VALUE")


def test_interpolation_is_rejected(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "OUTPUT_DIR: ${MODEL.DEVICE}/out\n"))
    assert "OUTPUT_DIR: interpolation" in message


# --- saving ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    overrides = ["SOLVER.BASE_LR=1e-4", "MODEL.WEIGHTS='007'", "SEED=null", "DATASETS.TEST=[x]"]
    cfg = load_config(EXPERIMENT, overrides)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert again.MODEL.WEIGHTS == "007" and again.SOLVER.BASE_LR == 1e-4
    assert format_config(again) == format_config(cfg)
    assert "MAX_ITER: 200" in format_config(cfg)


def test_save_and_load_round_trip_of_mappings(isolated: None, tmp_path: Path) -> None:
    declare("TEST.FACTORS", dict[str, float], {"head": 1.0}, "factors for this test")
    declare("TEST.NAMES", dict[str, str] | None, None, "names for this test")
    # Entry names that YAML would read as other things unless quoted, and dotted ones.
    factors = "{backbone.bottom_up: 0.1, '0': 2, '1e-3': 3, 'null': 4, 'true': 5, 'a b': 6}"
    overrides = [f"TEST.FACTORS={factors}", "TEST.NAMES={'007': '1e-3', x.y: 'null'}"]
    cfg = load_config(EXPERIMENT, overrides)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert OmegaConf.to_container(again.TEST.FACTORS) == {
        "backbone.bottom_up": 0.1,
        "0": 2.0,
        "1e-3": 3.0,
        "null": 4.0,
        "true": 5.0,
        "a b": 6.0,
    }
    assert OmegaConf.to_container(again.TEST.NAMES) == {"007": "1e-3", "x.y": "null"}
    empty = load_config(EXPERIMENT, ["TEST.FACTORS={}"])
    save_config(empty, tmp_path / "empty" / "config.yaml")
    assert load_config(tmp_path / "empty" / "config.yaml").TEST.FACTORS == {}


# --- IMPORTS and user modules ----------------------------------------------------------


def test_user_module_imported_through_imports(isolated: None) -> None:
    with pytest.raises(ConfigError, match=r"unknown key MODEL\.USER_BACKBONE\.NAME"):
        load_config(CONFIGS / "plugin.yaml", ["IMPORTS=[]"])
    cfg = load_config(CONFIGS / "plugin.yaml")
    assert cfg.IMPORTS == ["user_plugin"]
    assert cfg.MODEL.USER_BACKBONE.DEPTH == 18
    backbone = build(BACKBONE_REGISTRY, cfg.MODEL.USER_BACKBONE.NAME, cfg)
    assert type(backbone).__module__ == "user_plugin"
    assert len(backbone.body) == 18
    assert type(backbone) is BACKBONE_REGISTRY.get("UserBackbone")


def test_user_module_key_is_validated(isolated: None) -> None:
    message = error_of(CONFIGS / "plugin.yaml", ("MODEL.USER_BACKBONE.DEPTH=deep",))
    assert message == "command line: MODEL.USER_BACKBONE.DEPTH: expected int, got str 'deep'"
    message = error_of(CONFIGS / "plugin.yaml", ("MODEL.USER_BACKBONE.DEPT=3",))
    assert message.endswith("did you mean MODEL.USER_BACKBONE.DEPTH?")


def test_user_backbone_not_registered_without_import(isolated: None) -> None:
    with pytest.raises(UnknownNameError, match="No BACKBONE named 'UserBackbone'"):
        BACKBONE_REGISTRY.get("UserBackbone")


def test_import_failure_names_module_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "IMPORTS: [detframe_no_such_module]\n")
    message = error_of(path)
    assert message.startswith(f"{path}: IMPORTS: cannot import module 'detframe_no_such_module'")
    assert "ModuleNotFoundError" in message


# --- declarations ------------------------------------------------------------------------


def test_identical_redeclaration_is_allowed_a_different_one_is_not(isolated: None) -> None:
    declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 80, "number of foreground classes", min=1)
    with pytest.raises(ValueError, match="already declared differently"):
        declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 81, "number of foreground classes", min=1)
    with pytest.raises(ValueError, match="already declared differently"):
        declare("MODEL.ROI_HEADS.NUM_CLASSES", int, 80, "number of foreground classes", min=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("TEST.X", int, "a", "help"), {}, "default 'a' is invalid"),
        (("TEST.X", str, "C", "help"), {"choices": ("A", "B")}, "default 'C' is invalid"),
        (("TEST.X", dict, {}, "help"), {}, "unsupported type"),
        (("TEST.X", list[list[list[int]]], [], "help"), {}, "unsupported type"),
        (("TEST.X", list[dict], [], "help"), {}, "unsupported type"),
        (("TEST.X", dict[int, float], {}, "help"), {}, "unsupported type"),
        (("TEST.X", dict[str, list[int]], {}, "help"), {}, "unsupported type"),
        (("TEST.X", dict[str, dict[str, int]], {}, "help"), {}, "unsupported type"),
        (("TEST.X", list[dict[str, int]], [], "help"), {}, "unsupported type"),
        (("TEST.X", dict[str, int], {"a": "1"}, "help"), {}, "entry 'a': expected int"),
        (("TEST.X", dict[str, int], {"a": 0}, "help"), {"min": 1}, "entry 'a': 0 is out of"),
        (("TEST.X", dict[str, str], {}, "help"), {"min": 1}, r"not dict\[str, str\]"),
        (("TEST.X", list[list[int]], [1], "help"), {}, r"element \[0\]: expected list\[int\]"),
        (("TEST.X", int, 0, "help"), {"min": 1}, "default 0 is invalid: 0 is out of range"),
        (("TEST.X", list[int], [2, 0], "help"), {"min": 1}, r"element \[1\]: 0 is out of range"),
        (("TEST.X", str, "a", "help"), {"min": 1}, "a range needs a number type, not str"),
        (("TEST.X", list[bool], [], "help"), {"max": 1}, r"a range needs a number type"),
        (("TEST.X", int, 1, "help"), {"min_exclusive": True}, "exclusive bound needs its min"),
        (("TEST.X", int, 1, "help"), {"min": 1, "max": 1}, "empty range"),
        (("test.x", int, 1, "help"), {}, "dotted UPPER_CASE"),
        (("TEST.X", int, 1, ""), {}, "one non-empty line"),
        (("MODEL.DEVICE.X", int, 1, "help"), {}, "clashes with MODEL.DEVICE"),
        (("MODEL", int, 1, "help"), {}, "clashes with MODEL."),
    ],
)
def test_malformed_declarations(isolated: None, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        declare(*args, **kwargs)
    assert "TEST.X" not in SCHEMA


# --- layering: the config layer imports nothing above it -------------------------------

UPPER_LAYERS = ("detframe.data", "detframe.modeling", "detframe.engine", "detframe.evaluation")


def test_config_package_names_no_upper_layer_in_its_source() -> None:
    """No import of, and no string naming (as `importlib` would need), a package above."""
    for path in sorted((ROOT / "detframe" / "config").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docstring = ast.get_docstring(tree, clean=False)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # The module docstring may point upwards (to where detframe's keys get declared).
                names = [] if node.value == docstring else re.findall(r"detframe\.\w+", node.value)
            for name in names:
                assert not name.startswith(UPPER_LAYERS), f"{path.name}:{node.lineno}: {name}"
                assert not name.startswith(".."), f"{path.name}:{node.lineno}: {name}"


def test_config_layer_validates_what_is_declared_at_that_moment(tmp_path: Path) -> None:
    """In a fresh process: detframe.config alone knows only its core keys and imports no
    component; after the engine layer is imported, the same file loads."""
    path = write(tmp_path, "SOLVER:\n  BASE_LR: 0.01\nMODEL:\n  RPN:\n    NMS_THRESH: 0.6\n")
    script = f"""
import sys
from detframe.config import ConfigError, load_config
try:
    load_config({str(path)!r})
except ConfigError as e:
    print("error:", e)
upper = sorted(m for m in sys.modules if m.startswith({UPPER_LAYERS!r}))
print("upper layers imported:", upper)
import detframe.engine.setup
cfg = detframe.engine.setup.load_config({str(path)!r})
print("loaded:", cfg.SOLVER.BASE_LR, cfg.MODEL.RPN.NMS_THRESH)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert out[0].startswith(f"error: {path}: unknown key SOLVER.BASE_LR")
    assert out[1] == "upper layers imported: []"
    assert out[2] == "loaded: 0.01 0.6"


# --- the schema table in the docs --------------------------------------------------------


def test_docs_schema_table_is_what_the_code_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "detframe", "schema"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    doc = (ROOT / "docs" / "configs.md").read_text()
    match = re.search(r"<!-- schema:begin[^>]*-->\n(.*?)<!-- schema:end -->", doc, re.S)
    assert match, "docs/configs.md lacks the <!-- schema:begin --> ... <!-- schema:end --> markers"
    assert match.group(1) == printed, "regenerate the table: detframe schema"
    assert "`MODEL.ROI_HEADS.NUM_CLASSES` | `int` | `80` |" in printed
