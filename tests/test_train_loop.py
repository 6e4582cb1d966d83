"""The training loop on a toy model: hook order, the update it makes, non-finite losses,
gradient clipping and mixed precision."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from detframe.engine.train_loop import HookBase, SimpleStep, TrainerBase, TrainStep


class Regression(nn.Module):
    """A linear model whose forward returns {"loss_mse": ..., "loss_l1": ...} for a batch
    of (x [N, 2], y [N]) pairs, like a detector's dict of losses."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.linear.bias.fill_(0.5)

    def forward(self, batch: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        prediction = self.linear(x).squeeze(1)
        return {
            "loss_mse": ((prediction - y) ** 2).mean(),
            "loss_l1": (prediction - y).abs().mean(),
        }


def _batches() -> itertools.cycle:
    return itertools.cycle(
        [
            [
                (torch.tensor([1.0, 2.0]), torch.tensor(3.0)),
                (torch.tensor([0.0, 1.0]), torch.tensor(-1.0)),
            ]
        ]
    )


class Recorder(HookBase):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_train(self) -> None:
        self.log.append(f"{self.name}.before_train")

    def before_step(self) -> None:
        self.log.append(f"{self.name}.before_step{self.trainer.iter}")

    def after_step(self) -> None:
        self.log.append(f"{self.name}.after_step{self.trainer.iter}")

    def after_train(self) -> None:
        self.log.append(f"{self.name}.after_train({self.trainer.completed})")


def test_hooks_run_in_order_around_each_step() -> None:
    model = Regression()
    trainer = TrainerBase(
        SimpleStep(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.0))
    )
    log: list[str] = []
    trainer.register_hooks([Recorder("a", log), None, Recorder("b", log)])
    trainer.train(3, 5)
    assert log == [
        "a.before_train", "b.before_train",
        "a.before_step3", "b.before_step3", "a.after_step3", "b.after_step3",
        "a.before_step4", "b.before_step4", "a.after_step4", "b.after_step4",
        "a.after_train(True)", "b.after_train(True)",
    ]  # fmt: skip
    assert trainer.iter == 5 and trainer.start_iter == 3
    with pytest.raises(ValueError, match="start_iter 6 is beyond max_iter 5"):
        trainer.train(6, 5)


def test_step_is_one_sgd_update_of_the_summed_losses() -> None:
    model = Regression()
    trainer = TrainerBase(
        SimpleStep(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1))
    )
    trainer.train(0, 1)
    # by hand: predictions w.x + b = [1 - 2 + 0.5, 0 - 1 + 0.5] = [-0.5, -0.5], errors
    # e = [-3.5, 0.5]; d(mse)/dpred = e (2/2), d(l1)/dpred = sign(e) / 2
    e = torch.tensor([-3.5, 0.5])
    dpred = e + torch.sign(e) / 2
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    expected_w = torch.tensor([[1.0, -1.0]]) - 0.1 * (dpred @ x)[None]
    expected_b = 0.5 - 0.1 * dpred.sum()
    assert torch.allclose(model.linear.weight, expected_w)
    assert torch.allclose(model.linear.bias, expected_b[None])
    assert trainer.metrics["loss_mse"] == pytest.approx((3.5**2 + 0.5**2) / 2)
    assert trainer.metrics["loss_l1"] == pytest.approx(2.0)
    assert trainer.metrics["total_loss"] == pytest.approx(6.25 + 2.0)
    assert trainer.metrics["data_time"] >= 0


class NaNAt(HookBase):
    """Makes the model's bias NaN before step `iteration`."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_step(self) -> None:
        if self.trainer.iter == self.iteration:
            with torch.no_grad():
                self.trainer.step.model.linear.bias.fill_(math.nan)


def test_non_finite_loss_stops_before_the_update_naming_iteration_and_terms() -> None:
    model = Regression()
    trainer = TrainerBase(
        SimpleStep(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1))
    )
    log: list[str] = []
    trainer.register_hooks([NaNAt(2), Recorder("r", log)])
    with pytest.raises(FloatingPointError) as error:
        trainer.train(0, 5)
    message = str(error.value)
    assert "non-finite at iteration 2" in message
    assert "loss_l1 = nan" in message and "loss_mse = nan" in message
    assert log[-2:] == ["r.before_step2", "r.after_train(False)"]  # no after_step2
    assert torch.isfinite(model.linear.weight).all()  # no update was made with NaN gradients
    assert model.linear.weight.grad is not None and torch.isfinite(model.linear.weight.grad).all()


def test_gradient_clipper_sees_the_gradients_before_the_update() -> None:
    model = Regression()
    clip = functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=0.01)
    trainer = TrainerBase(
        SimpleStep(
            model, _batches(), torch.optim.SGD(model.parameters(), lr=1.0), grad_clipper=clip
        )
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train(0, 1)
    step = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
    )
    assert step.norm().item() == pytest.approx(
        0.01, rel=1e-4
    )  # lr 1: the step is the clipped gradient


def test_cpu_mixed_precision_runs_the_forward_in_bfloat16() -> None:
    seen: list[torch.dtype] = []

    class Probe(Regression):
        def forward(self, batch: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
            seen.append(self.linear(torch.zeros(1, 2)).dtype)
            return super().forward(batch)

    model = Probe()
    trainer = TrainerBase(
        SimpleStep(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1), amp=True)
    )
    assert trainer.step.grad_scaler is None  # loss scaling is for float16 on CUDA only
    trainer.train(0, 2)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.linear.weight.dtype == torch.float32
    assert all(math.isfinite(v) for v in trainer.metrics.values())


class AccumulateTwo(TrainStep):
    """A custom step (gradient accumulation over two batches), the way a user writes one."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, self.batches = model, optimizer, _batches()

    def __call__(self, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad()
        total = 0.0
        for _ in range(2):
            loss = sum(self.model(next(self.batches)).values()) / 2
            loss.backward()
            total += float(loss)
        self.optimizer.step()
        return {"total_loss": total, "iteration": float(iteration)}


def test_a_custom_step_is_one_class_the_trainer_runs() -> None:
    model = Regression()
    reference = Regression()
    trainer = TrainerBase(AccumulateTwo(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    log: list[str] = []
    trainer.register_hooks([Recorder("r", log)])
    trainer.train(0, 1)
    assert trainer.metrics["iteration"] == 0.0
    # Two identical batches accumulated at half weight each: one plain SGD step.
    plain = TrainerBase(
        SimpleStep(reference, _batches(), torch.optim.SGD(reference.parameters(), lr=0.1))
    )
    plain.train(0, 1)
    assert trainer.metrics["total_loss"] == pytest.approx(plain.metrics["total_loss"])
    torch.testing.assert_close(model.linear.weight, reference.linear.weight)
    assert log == ["r.before_train", "r.before_step0", "r.after_step0", "r.after_train(True)"]
