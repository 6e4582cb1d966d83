"""detframe.engine.optimizer: parameter groups, LR multipliers, optimizers, gradient clipping.

Every expectation is written out by hand from the documented rules (module docstring of
detframe/engine/optimizer.py) for a small hand-made model whose parameter names are known.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import detframe.engine  # noqa: F401  (declares the SOLVER keys)
from detframe.config import ConfigError
from detframe.engine.optimizer import build_grad_clipper, build_optimizer, param_groups
from detframe.engine.setup import load_config

BASE_LR = 0.1
WD = 1e-4
WD_NORM = 2e-5
WD_BIAS = 3e-5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1)
        self.res2 = Block()
        self.res3 = Block()


class Net(nn.Module):
    """Parameter names, in the order named_modules() lists them:

    scale; backbone.stem.{weight,bias}; backbone.res2.conv.weight;
    backbone.res2.bn.{weight,bias}; backbone.res3.conv.weight; backbone.res3.bn.{weight,bias};
    neck.{weight,bias} (GroupNorm); head.{weight,bias}; head_extra.{weight,bias};
    cls.{weight,bias}; tied.bias (tied.weight IS cls.weight); frozen.bias (frozen.weight is
    frozen).
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.backbone = Backbone()
        self.neck = nn.GroupNorm(1, 3)
        self.head = nn.Conv2d(3, 4, 1)
        self.head_extra = nn.Conv2d(4, 4, 1)
        self.cls = nn.Linear(4, 5)
        self.tied = nn.Linear(4, 5)
        self.tied.weight = self.cls.weight
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.weight.requires_grad_(False)


MULTIPLIERS = {
    "backbone": 0.5,
    "backbone.res2": 0.1,
    "backbone.res2.bn.bias": 2.0,  # a whole parameter name
    "head": 3.0,  # must not reach head_extra.*
}

# name -> (lr, weight decay), by hand from MULTIPLIERS and the decay rules.
EXPECTED = {
    "scale": (0.1, WD),
    "backbone.stem.weight": (0.05, WD),
    "backbone.stem.bias": (0.05, WD_BIAS),
    "backbone.res2.conv.weight": (0.01, WD),
    "backbone.res2.bn.weight": (0.01, WD_NORM),
    "backbone.res2.bn.bias": (0.2, WD_NORM),
    "backbone.res3.conv.weight": (0.05, WD),
    "backbone.res3.bn.weight": (0.05, WD_NORM),
    "backbone.res3.bn.bias": (0.05, WD_NORM),
    "neck.weight": (0.1, WD_NORM),
    "neck.bias": (0.1, WD_NORM),
    "head.weight": (0.3, WD),
    "head.bias": (0.3, WD_BIAS),
    "head_extra.weight": (0.1, WD),
    "head_extra.bias": (0.1, WD_BIAS),
    "cls.weight": (0.1, WD),
    "cls.bias": (0.1, WD_BIAS),
    "tied.bias": (0.1, WD_BIAS),
    "frozen.bias": (0.1, WD_BIAS),
}


def param_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter under every name it has (the shared one twice)."""
    return dict(model.named_parameters(remove_duplicate=False))


def settings_by_id(groups: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """id(param) -> the (lr, weight decay) of every group it appears in."""
    found: dict[int, list[tuple[float, float]]] = {}
    for group in groups:
        assert set(group) == {"params", "lr", "weight_decay"}
        for p in group["params"]:
            found.setdefault(id(p), []).append((group["lr"], group["weight_decay"]))
    return found


def write_config(tmp_path: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    path = tmp_path / "config.yaml"
    path.write_text(f"SOLVER: {{BASE_LR: {BASE_LR}}}\n")
    return load_config(path, list(overrides))


# --- param_groups ------------------------------------------------------------------------


def test_every_trainable_parameter_once_with_hand_computed_settings() -> None:
    model = Net()
    groups = param_groups(model, BASE_LR, WD, WD_NORM, WD_BIAS, MULTIPLIERS)
    found = settings_by_id(groups)
    params = param_by_name(model)

    # The shared parameter is one object under two names, listed once.
    assert params["tied.weight"] is params["cls.weight"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(found) == trainable
    assert len(trainable) == len(EXPECTED) == 19
    assert id(params["frozen.weight"]) not in found
    for name, (lr, wd) in EXPECTED.items():
        settings = found[id(params[name])]
        assert len(settings) == 1, name
        assert settings[0] == (pytest.approx(lr), pytest.approx(wd)), name
    assert found[id(params["tied.weight"])] == found[id(params["cls.weight"])]


def test_equal_settings_share_one_group_in_model_order() -> None:
    model = Net()
    groups = param_groups(model, BASE_LR, WD, WD_NORM, WD_BIAS, MULTIPLIERS)
    # Distinct settings in the order of their first parameter in EXPECTED (model order).
    order: list[tuple[float, float]] = []
    for lr, wd in EXPECTED.values():
        key = (round(lr, 12), wd)
        if key not in order:
            order.append(key)
    assert [(round(g["lr"], 12), g["weight_decay"]) for g in groups] == order
    # Within a group, parameters keep the model's order.
    params = param_by_name(model)
    bias_group = next(g for g in groups if any(p is params["cls.bias"] for p in g["params"]))
    ids = [id(p) for p in bias_group["params"]]
    names = [n for n, (lr, wd) in EXPECTED.items() if (lr, wd) == (0.1, WD_BIAS)]
    assert names == ["head_extra.bias", "cls.bias", "tied.bias", "frozen.bias"]
    assert ids == [id(params[n]) for n in names]


def test_weight_decay_bias_none_means_weight_decay() -> None:
    model = Net()
    found = settings_by_id(param_groups(model, BASE_LR, WD, WD_NORM, None))
    params = param_by_name(model)
    for name in ("backbone.stem.bias", "head.bias", "cls.bias", "tied.bias", "frozen.bias"):
        assert found[id(params[name])] == [(BASE_LR, WD)], name
    # Norm-layer biases keep the norm decay; weights keep WEIGHT_DECAY.
    for name in ("backbone.res2.bn.bias", "neck.bias", "neck.weight"):
        assert found[id(params[name])] == [(BASE_LR, WD_NORM)], name
    assert found[id(params["head.weight"])] == [(BASE_LR, WD)]


def test_defaults_no_multiplier_and_zero_norm_decay() -> None:
    model = Net()
    groups = param_groups(model, 0.02, 5e-4)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.02, 5e-4), (0.02, 0.0)]


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(4),
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4),
        nn.InstanceNorm1d(4, affine=True),
        nn.SyncBatchNorm(4),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_norm_layer_gets_norm_decay(norm: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(4, 4), norm)
    found = settings_by_id(param_groups(model, 1.0, WD, WD_NORM, WD_BIAS))
    assert found[id(model[0].weight)] == [(1.0, WD)]
    assert found[id(model[0].bias)] == [(1.0, WD_BIAS)]
    assert found[id(norm.weight)] == [(1.0, WD_NORM)]
    assert found[id(norm.bias)] == [(1.0, WD_NORM)]


def test_longest_prefix_wins_whatever_the_order() -> None:
    reordered = dict(reversed(list(MULTIPLIERS.items())))
    model = Net()
    found = settings_by_id(param_groups(model, BASE_LR, WD, WD_NORM, WD_BIAS, reordered))
    params = param_by_name(model)
    for name, (lr, _) in EXPECTED.items():
        assert found[id(params[name])][0][0] == pytest.approx(lr), name


def test_prefix_matches_whole_dotted_parts_only() -> None:
    model = Net()
    # "head" reaches head.* but not head_extra.* (checked in EXPECTED); "backbone.res" names no
    # parameter, since it would only match "backbone.res2..." as a string prefix.
    with pytest.raises(ValueError, match=r"'backbone\.res'"):
        param_groups(model, BASE_LR, WD, lr_multipliers={"backbone.res": 2.0})
    with pytest.raises(ValueError, match=r"'hea'"):
        param_groups(model, BASE_LR, WD, lr_multipliers={"hea": 2.0})


def test_unknown_prefix_suggests_close_module_name() -> None:
    with pytest.raises(ValueError, match=r"'backbone\.res2\.cnv'") as info:
        param_groups(Net(), BASE_LR, WD, lr_multipliers={"backbone.res2.cnv": 0.1})
    assert "did you mean" in str(info.value)
    assert "'backbone.res2.conv'" in str(info.value)


def test_prefix_naming_only_frozen_parameters_raises() -> None:
    with pytest.raises(ValueError, match=r"'frozen\.weight'"):
        param_groups(Net(), BASE_LR, WD, lr_multipliers={"frozen.weight": 0.1})
    # The module itself still has a trainable bias, so "frozen" is fine.
    model = Net()
    found = settings_by_id(param_groups(model, BASE_LR, WD, lr_multipliers={"frozen": 0.5}))
    assert found[id(model.frozen.bias)] == [(pytest.approx(0.05), WD)]


# --- SOLVER.LR_MULTIPLIERS: a mapping checked by the config schema ----------------------


def multipliers_of(cfg: DictConfig) -> dict:
    """The loaded mapping as a plain dict; the factors' types are checked too."""
    value = OmegaConf.to_container(cfg.SOLVER.LR_MULTIPLIERS)
    assert all(type(v) is float for v in value.values())
    return value


def test_lr_multipliers_default_to_empty(tmp_path: Path) -> None:
    assert multipliers_of(write_config(tmp_path)) == {}


def test_lr_multipliers_from_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "SOLVER:\n"
        "  LR_MULTIPLIERS:\n"
        "    backbone.bottom_up: 0.1\n"
        "    roi_heads: 2\n"
        "    rpn: 0\n"
        "    head.cls: 1e-3\n"
    )
    expected = {"backbone.bottom_up": 0.1, "roi_heads": 2.0, "rpn": 0.0, "head.cls": 0.001}
    assert multipliers_of(load_config(path)) == expected


def test_lr_multipliers_from_the_command_line_replace_the_files(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("SOLVER:\n  LR_MULTIPLIERS: {backbone: 0.5, head: 2}\n")
    override = "SOLVER.LR_MULTIPLIERS={backbone.bottom_up: 0.1, roi_heads: 2}"
    cfg = load_config(path, [override])
    assert multipliers_of(cfg) == {"backbone.bottom_up": 0.1, "roi_heads": 2.0}
    assert multipliers_of(load_config(path, ["SOLVER.LR_MULTIPLIERS={}"])) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A NaN factor would make every lr of that module NaN (and the weights NaN after one
        # step); an infinite one likewise.
        ("{head: 2, backbone: -0.1}", "entry 'backbone': -0.1 is out of range"),
        ("{backbone: .inf}", "entry 'backbone': inf is out of range"),
        ("{backbone: .nan}", "entry 'backbone': nan is out of range"),
        ("{backbone: fast}", "entry 'backbone': expected float, got str 'fast'"),
        ("{backbone: '0.1'}", "entry 'backbone': expected float, got str '0.1'"),
        ("{backbone: true}", "entry 'backbone': expected float, got bool True"),
        ("{backbone: null}", "entry 'backbone': expected float, got null"),
        ("[backbone=0.1]", "expected dict[str, float], got list ['backbone=0.1']"),
        ("backbone=0.1", "expected dict[str, float], got str 'backbone=0.1'"),
        ("0.1", "expected dict[str, float], got float 0.1"),
    ],
)
def test_bad_lr_multipliers_are_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, [f"SOLVER.LR_MULTIPLIERS={text}"])
    assert str(info.value).startswith(f"command line: SOLVER.LR_MULTIPLIERS: {expected}")
    path = tmp_path / "bad.yaml"
    path.write_text(f"SOLVER:\n  LR_MULTIPLIERS: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: SOLVER.LR_MULTIPLIERS: {expected}")


def test_out_of_range_message_states_the_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must be in \[0, inf\)$"):
        write_config(tmp_path, ["SOLVER.LR_MULTIPLIERS={backbone: .inf}"])


# --- build_optimizer ---------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)


def small_expected(model: Small, wd: float, wd_norm: float, wd_bias: float) -> dict:
    return {
        id(model.backbone.weight): (0.05, wd),
        id(model.backbone.bias): (0.05, wd_bias),
        id(model.bn.weight): (0.1, wd_norm),
        id(model.bn.bias): (0.1, wd_norm),
        id(model.head.weight): (0.1, wd),
        id(model.head.bias): (0.1, wd_bias),
    }


def test_build_sgd_from_config(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        [
            "SOLVER.MOMENTUM=0.8",
            "SOLVER.NESTEROV=true",
            "SOLVER.WEIGHT_DECAY=1e-3",
            "SOLVER.WEIGHT_DECAY_NORM=1e-5",
            "SOLVER.WEIGHT_DECAY_BIAS=5e-4",
            "SOLVER.LR_MULTIPLIERS={backbone: 0.5}",
        ],
    )
    model = Small()
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.SGD
    expected = small_expected(model, 1e-3, 1e-5, 5e-4)
    seen = []
    for group in opt.param_groups:
        assert group["momentum"] == 0.8
        assert group["nesterov"] is True
        for p in group["params"]:
            seen.append(id(p))
            assert (group["lr"], group["weight_decay"]) == pytest.approx(expected[id(p)])
    assert sorted(seen) == sorted(expected)


def test_build_adamw_from_config(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        [
            "SOLVER.OPTIMIZER=AdamW",
            "SOLVER.ADAMW_BETAS=[0.8,0.99]",
            "SOLVER.WEIGHT_DECAY=0.05",
            "SOLVER.WEIGHT_DECAY_NORM=0.0",
            "SOLVER.LR_MULTIPLIERS={backbone: 0.5}",
        ],
    )
    model = Small()
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW
    expected = small_expected(model, 0.05, 0.0, 0.05)  # bias decay null: WEIGHT_DECAY
    seen = []
    for group in opt.param_groups:
        assert tuple(group["betas"]) == pytest.approx((0.8, 0.99))
        for p in group["params"]:
            seen.append(id(p))
            assert (group["lr"], group["weight_decay"]) == pytest.approx(expected[id(p)])
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9,0.99,0.999]", "[]"])
def test_adamw_betas_of_wrong_length(tmp_path: Path, betas: str) -> None:
    cfg = write_config(tmp_path, ["SOLVER.OPTIMIZER=AdamW", f"SOLVER.ADAMW_BETAS={betas}"])
    with pytest.raises(ConfigError, match=r"SOLVER\.ADAMW_BETAS"):
        build_optimizer(cfg, Small())


def test_dotted_lr_multiplier_prefix_from_a_file_reaches_one_parameter(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"SOLVER:\n  BASE_LR: {BASE_LR}\n  LR_MULTIPLIERS:\n    backbone.weight: 0.5\n    head: 2\n"
    )
    model = Small()
    opt = build_optimizer(load_config(path), model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    expected = {
        "backbone.weight": 0.05,
        "backbone.bias": 0.1,
        "bn.weight": 0.1,
        "bn.bias": 0.1,
        "head.weight": 0.2,
        "head.bias": 0.2,
    }
    assert {n: lr_of[id(p)] for n, p in model.named_parameters()} == pytest.approx(expected)


def test_lr_multiplier_naming_no_parameter_of_the_model(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ["SOLVER.LR_MULTIPLIERS={backbone.bottom_up: 0.1}"])
    with pytest.raises(ValueError, match=r"'backbone\.bottom_up' names no trainable parameter"):
        build_optimizer(cfg, Small())


def test_one_sgd_step_applies_each_groups_lr_and_decay(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        [
            "SOLVER.MOMENTUM=0.0",
            "SOLVER.WEIGHT_DECAY=0.3",
            "SOLVER.WEIGHT_DECAY_NORM=0.1",
            "SOLVER.WEIGHT_DECAY_BIAS=0.2",
            "SOLVER.LR_MULTIPLIERS={head: 0.5}",
        ],
    )
    model = Small()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.copy_(torch.linspace(-1.0, 2.0, p.numel()).reshape(p.shape) + i)
    grads = {n: torch.full_like(p, 0.25) + 0.1 * k for k, (n, p) in enumerate(params.items())}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = build_optimizer(cfg, model)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()

    # p - lr * (grad + wd * p), with lr = 0.1 x multiplier.
    for name, lr, wd in [
        ("bn.weight", 0.1, 0.1),  # norm
        ("bn.bias", 0.1, 0.1),  # norm bias: norm decay, not bias decay
        ("backbone.bias", 0.1, 0.2),  # bias
        ("backbone.weight", 0.1, 0.3),  # weight
        ("head.weight", 0.05, 0.3),  # weight with a multiplier
        ("head.bias", 0.05, 0.2),
    ]:
        p0, g = before[name], grads[name]
        expected = p0 - lr * (g + wd * p0)
        torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-6)


# --- build_grad_clipper ------------------------------------------------------------------


def grads_of(*values: list[float]) -> list[nn.Parameter]:
    params = []
    for v in values:
        p = nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        params.append(p)
    return params


def clip(tmp_path: Path, overrides: list[str], params: list[nn.Parameter]) -> None:
    cfg = write_config(tmp_path, ["SOLVER.CLIP_GRADIENTS.ENABLED=true", *overrides])
    clipper = build_grad_clipper(cfg)
    assert clipper is not None
    clipper(p for p in params if p.grad is not None)  # as the trainer calls it


def test_grad_clipper_disabled(tmp_path: Path) -> None:
    assert build_grad_clipper(write_config(tmp_path)) is None
    cfg = write_config(tmp_path, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE=-1.0"])
    assert build_grad_clipper(cfg) is None


def test_clip_norm_above_rescales_to_clip_value(tmp_path: Path) -> None:
    # Total 2-norm sqrt(3^2 + 4^2 + 12^2) = 13; scale 2 / 13.
    params = grads_of([3.0, 0.0], [-4.0, 12.0])
    clip(tmp_path, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE=2.0"], params)
    s = 2.0 / 13.0
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0 * s, 0.0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        params[1].grad, torch.tensor([-4.0 * s, 12.0 * s]), rtol=1e-5, atol=0
    )
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert total == pytest.approx(2.0, rel=1e-5)


def test_clip_norm_below_leaves_gradients(tmp_path: Path) -> None:
    params = grads_of([3.0, 0.0], [-4.0, 12.0])
    clip(tmp_path, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE=13.5"], params)
    assert params[0].grad.tolist() == [3.0, 0.0]
    assert params[1].grad.tolist() == [-4.0, 12.0]


def test_clip_inf_norm_scales_by_max_abs(tmp_path: Path) -> None:
    # max |g| = 5 -> scale 2.5 / 5 = 0.5 (a 2-norm clip would scale by 2.5 / sqrt(50)).
    params = grads_of([3.0, -5.0], [4.0])
    clip(
        tmp_path,
        ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE=2.5", "SOLVER.CLIP_GRADIENTS.NORM_TYPE=.inf"],
        params,
    )
    torch.testing.assert_close(params[0].grad, torch.tensor([1.5, -2.5]), rtol=1e-5, atol=0)
    torch.testing.assert_close(params[1].grad, torch.tensor([2.0]), rtol=1e-5, atol=0)


def test_clip_value_clamps_each_element(tmp_path: Path) -> None:
    params = grads_of([3.0, -5.0, 0.5], [-2.0, 2.5])
    clip(
        tmp_path,
        ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE=value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE=2.5"],
        params,
    )
    assert params[0].grad.tolist() == [2.5, -2.5, 0.5]
    assert params[1].grad.tolist() == [-2.0, 2.5]


@pytest.mark.parametrize("clip_type", ["norm", "value"])
@pytest.mark.parametrize("value", ["0.0", "-1.0"])
def test_clip_value_must_be_positive(tmp_path: Path, clip_type: str, value: str) -> None:
    cfg = write_config(
        tmp_path,
        [
            "SOLVER.CLIP_GRADIENTS.ENABLED=true",
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip_type}",
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE={value}",
        ],
    )
    with pytest.raises(ConfigError, match=r"SOLVER\.CLIP_GRADIENTS\.CLIP_VALUE"):
        build_grad_clipper(cfg)
