"""The optimizer and gradient clipping a config describes.

Parameter groups: every trainable parameter gets

- lr = SOLVER.BASE_LR x the factor of the longest SOLVER.LR_MULTIPLIERS prefix (whole dotted
  parts) of its name (e.g. {backbone.bottom_up: 0.1} slows the ResNet down ten times; 1 when
  none matches);
- weight decay = SOLVER.WEIGHT_DECAY_NORM for the parameters of normalisation layers
  (batch, group, layer, instance norm), SOLVER.WEIGHT_DECAY_BIAS for other biases (null: the
  same as SOLVER.WEIGHT_DECAY), SOLVER.WEIGHT_DECAY for the rest;

and parameters with equal settings share one group, in the order the model lists them.
The learning-rate schedule (lr_scheduler.py) scales every group's lr by the same factor.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from detframe.config import ConfigError, declare

__all__ = ["build_grad_clipper", "build_optimizer", "param_groups"]

# Called with the parameters that have gradients, after backward (and unscaling).
GradientClipper = Callable[[Iterable[nn.Parameter]], Any]

declare("SOLVER.OPTIMIZER", str, "SGD", "optimizer of the weights", choices=("SGD", "AdamW"))
declare("SOLVER.BASE_LR", float, 0.02, "learning rate at IMS_PER_BATCH images per iteration", min=0)
declare("SOLVER.MOMENTUM", float, 0.9, "SGD momentum", min=0)
declare("SOLVER.NESTEROV", bool, False, "SGD with Nesterov momentum")
declare(
    "SOLVER.ADAMW_BETAS",
    list[float],
    [0.9, 0.999],
    "AdamW's (beta1, beta2)",
    min=0,
    max=1,
    max_exclusive=True,
)
declare("SOLVER.WEIGHT_DECAY", float, 1e-4, "weight decay of weights", min=0)
declare(
    "SOLVER.WEIGHT_DECAY_NORM",
    float,
    0.0,
    "weight decay of normalisation layers' parameters",
    min=0,
)
declare(
    "SOLVER.WEIGHT_DECAY_BIAS",
    float | None,
    None,
    "weight decay of biases (outside norm layers); null: SOLVER.WEIGHT_DECAY",
    min=0,
)
declare(
    "SOLVER.LR_MULTIPLIERS",
    dict[str, float],
    {},
    "lr factor per parameter-name prefix (longest prefix wins), e.g. {backbone: 0.1}",
    min=0,
    max=math.inf,
    max_exclusive=True,
)
declare("SOLVER.CLIP_GRADIENTS.ENABLED", bool, False, "clip gradients before each update")
declare(
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    str,
    "norm",
    "clip the gradients' total norm, or each element's value",
    choices=("norm", "value"),
)
declare("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", float, 1.0, "largest gradient norm, or absolute value")
declare(
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE",
    float,
    2.0,
    "p of the p-norm clipped by 'norm'",
    min=0,
    min_exclusive=True,
)

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def _lr_multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    """The factor of the longest prefix (whole dotted parts) of `name`, or 1."""
    matches = [p for p in multipliers if name == p or name.startswith(p + ".")]
    return multipliers[max(matches, key=len)] if matches else 1.0


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_bias: float | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups (see the module docstring).

    Returns:
        [{"params": [...], "lr": float, "weight_decay": float}, ...]; frozen parameters
        (requires_grad False) are left out and each parameter appears once.

    Raises:
        ValueError: a multiplier prefix that names no trainable parameter (the closest
            module names are suggested).
    """
    multipliers = dict(lr_multipliers or {})
    decay_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    names: list[str] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            names.append(name)
            if isinstance(module, _NORM_TYPES):
                decay = weight_decay_norm
            elif param_name == "bias":
                decay = decay_bias
            else:
                decay = weight_decay
            lr = base_lr * _lr_multiplier(name, multipliers)
            groups.setdefault((lr, decay), []).append(param)
    for prefix in multipliers:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            close = difflib.get_close_matches(prefix, modules, n=3)
            raise ValueError(
                f"SOLVER.LR_MULTIPLIERS: {prefix!r} names no trainable parameter"
                + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
            )
    return [
        {"params": params, "lr": lr, "weight_decay": decay}
        for (lr, decay), params in groups.items()
    ]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW (SOLVER.OPTIMIZER) over `param_groups` of `model` from SOLVER.*."""
    solver = cfg.SOLVER
    groups = param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        lr_multipliers=solver.LR_MULTIPLIERS,
    )
    if solver.OPTIMIZER == "SGD":
        return torch.optim.SGD(
            groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV
        )
    if len(solver.ADAMW_BETAS) != 2:
        raise ConfigError(f"SOLVER.ADAMW_BETAS needs 2 values, got {list(solver.ADAMW_BETAS)}")
    return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.ADAMW_BETAS))


def build_grad_clipper(cfg: DictConfig) -> GradientClipper | None:
    """The clipping function of SOLVER.CLIP_GRADIENTS, or None when it is disabled.

    "norm" rescales all gradients together so that their NORM_TYPE-norm is at most
    CLIP_VALUE (`clip_grad_norm_`); "value" clamps each element to [-CLIP_VALUE, CLIP_VALUE].
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_VALUE <= 0:
        raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip.CLIP_VALUE}")
    if clip.CLIP_TYPE == "norm":
        return functools.partial(
            torch.nn.utils.clip_grad_norm_, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
        )
    return functools.partial(torch.nn.utils.clip_grad_value_, clip_value=clip.CLIP_VALUE)
