"""Training an ONNX model's initializers on labelled examples, with PyTorch autograd.

The training output is the model's first float output of rank 2 (class scores); when a Softmax
produces it, the Softmax's input (the logits) is trained with cross-entropy, else the output
itself is taken as logits. `trainable`:
- "all": every float initializer the training output depends on;
- "last:N": the last N weight-carrying layers (Gemm, MatMul, Conv, ConvTranspose with an
  initializer weight) and everything after them (their biases, batch norms). The frozen part
  before them runs once in ONNX Runtime to produce features, and only the head runs in PyTorch
  for every epoch: what a weak device can afford.
The converted module is checked against ONNX Runtime on the examples before training starts.
With `proximal_mu` > 0 the loss carries FedProx's term mu/2 * |w - w_start|^2 (w_start: the
values training started from, the task's global weights), so a device's update drifts less from
the global on data unlike the others'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from edge_agent.errors import InvalidArgument
from edge_agent.learn.graph import OnnxModule, check_against_onnxruntime
from edge_agent.learn.onnxinfo import (
    features,
    initializer_values,
    trainable_names,
    training_output,
)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    trainable: str = "all"  # "all" or "last:N"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam
    seconds: float = 600.0  # time budget: training stops at the end of the epoch past it
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx (0: off)

    def __post_init__(self) -> None:
        if self.trainable != "all" and not (
            self.trainable.startswith("last:") and self.trainable[5:].isdigit()
        ):
            raise InvalidArgument(f"trainable {self.trainable!r}: use all or last:N")
        if self.optimizer not in ("sgd", "adam"):
            raise InvalidArgument(f"optimizer {self.optimizer!r}: use sgd or adam")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InvalidArgument("epochs, batch_size and lr must be positive")
        if not 0 <= self.proximal_mu < float("inf"):
            raise InvalidArgument("proximal_mu must be >= 0")


@dataclasses.dataclass
class TrainResult:
    deltas: dict[str, np.ndarray]
    loss_before: float
    loss_after: float
    epochs: int
    examples: int
    seconds: float
    check_error: float


def train(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    labels: np.ndarray,
    spec: TrainSpec,
    loss: Any = None,
    masks: Mapping[str, np.ndarray] | None = None,
    before_batch: Callable[[], float] | None = None,
    after_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model`'s initializers on the examples; returns trained - original per trainable
    tensor. `loss(logits, labels, rows)` replaces cross-entropy (distillation); `masks` (name ->
    0/1 array) keep those weights' zeros at zero (fine-tuning a pruned model); `before_batch`
    runs before each mini-batch (the worker yields to serving there) and returns the seconds it
    waited, which the time budget does not count; `after_epoch(epochs done, loss)` is told each
    epoch's mean loss over its batches as it ends (a command's progress)."""
    import torch

    torch.manual_seed(spec.seed)
    started = time.monotonic()
    output, _ = training_output(model)
    names, inputs = trainable_names(model, output, spec.trainable)
    values = initializer_values(model)
    data = features(model, feeds, inputs)
    module = OnnxModule(model.graph, inputs, [output], names, values)
    rows_checked = min(32, len(labels))
    check_error = check_against_onnxruntime(
        model,
        module,
        {k: v[:rows_checked] for k, v in feeds.items()},
        {k: v[:rows_checked] for k, v in data.items()},
    )
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in data.items()}
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    rows = int(target.shape[0])
    parameters = list(module.parameters_by_name.values())
    if not parameters:
        raise InvalidArgument("nothing to train: no float initializer feeds the output")
    optimizer = (
        torch.optim.Adam(parameters, lr=spec.lr)
        if spec.optimizer == "adam"
        else torch.optim.SGD(parameters, lr=spec.lr)
    )
    mask_tensors = _mask_tensors(module, masks or {})
    objective = _Objective(module, output, target, loss, spec.proximal_mu)
    before = objective.on_all(tensors)
    epochs = 0
    waited = 0.0
    generator = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.epochs):
        order = torch.randperm(rows, generator=generator)
        summed = 0.0  # the epoch's loss, row-weighted; read back only for after_epoch
        for start in range(0, rows, spec.batch_size):
            if before_batch is not None:
                waited += before_batch()
            index = order[start : start + spec.batch_size]
            optimizer.zero_grad()
            value = objective.to_minimise({k: v[index] for k, v in tensors.items()}, index)
            value.backward()
            optimizer.step()
            if after_epoch is not None:
                summed += float(value.detach()) * len(index)
            if mask_tensors:
                with torch.no_grad():
                    for name, mask in mask_tensors.items():
                        module.parameters_by_name[name].mul_(mask)
        epochs += 1
        if after_epoch is not None:
            after_epoch(epochs, summed / rows)
        if time.monotonic() - started - waited > spec.seconds:
            break
    deltas = {
        name: (p.detach().numpy() - values[name]).astype(np.float32)
        for name, p in module.parameters_by_name.items()
    }
    after = objective.on_all(tensors)
    return TrainResult(deltas, before, after, epochs, rows, time.monotonic() - started, check_error)


def _mask_tensors(module: OnnxModule, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The masks of parameters being trained, as tensors to multiply them with after a step."""
    import torch

    return {
        name: torch.from_numpy(np.asarray(m, dtype=np.float32))
        for name, m in masks.items()
        if name in module.parameters_by_name
    }


class _Objective:
    """The loss on some rows: cross-entropy on the training output's logits, or the caller's
    `loss`; what is minimised adds FedProx's term (`proximal_mu` > 0) against the values
    training started from."""

    def __init__(
        self, module: OnnxModule, output: str, target: Any, loss: Any, proximal_mu: float
    ) -> None:
        self._module = module
        self._output = output
        self._target = target
        self._loss = loss
        self._mu = proximal_mu
        self._start = {n: p.detach().clone() for n, p in module.parameters_by_name.items()}

    def __call__(self, batch: Any, index: Any) -> Any:
        import torch

        logits = self._module(batch)[self._output]
        if self._loss is not None:
            return self._loss(logits, self._target[index], index)
        return torch.nn.functional.cross_entropy(logits, self._target[index])

    def to_minimise(self, batch: Any, index: Any) -> Any:
        import torch

        value = self(batch, index)
        if self._mu > 0:
            value = value + (self._mu / 2) * sum(
                torch.sum((p - self._start[n]) ** 2)
                for n, p in self._module.parameters_by_name.items()
            )
        return value

    def on_all(self, tensors: Mapping[str, Any]) -> float:
        """The loss on every row, without gradients (before and after training)."""
        import torch

        with torch.no_grad():
            return float(self(tensors, torch.arange(int(self._target.shape[0]))))
