"""Training after compression, on the learning engine (learn/train.py, PyTorch):

- `fine_tune`: a pruned model trained on labelled data with its pruning mask held fixed (every
  weight pruned to zero stays zero after each step), so the sparsity survives and the accuracy
  pruning cost comes back.
- `distill`: a smaller student trained on a teacher's soft outputs (Hinton et al.):
  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, labels)      (the second term only with labels)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from edge_agent.errors import InvalidArgument
from edge_agent.learn.onnxinfo import apply, features, training_output


def _spec(epochs: int, lr: float, batch_size: int) -> object:
    from edge_agent.learn.train import TrainSpec

    # The epochs asked for are the budget: TrainSpec's default time limit is the fleet worker's
    # (a device's run must end), and would cut an `optimize`/`distill` short without a word.
    return TrainSpec(
        trainable="all", epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adam",
        seconds=math.inf,
    )  # fmt: skip


def fine_tune(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    on_epoch: Callable[[int, float], None] | None = None,
) -> onnx.ModelProto:
    """`on_epoch(epochs done, loss)` as each epoch ends (learn/train.train's after_epoch)."""
    from edge_agent.learn.train import train

    if labels is None:
        raise InvalidArgument("--fine-tune needs `labels` in its .npz (class indices)")
    masks = {
        t.name: (numpy_helper.to_array(t) != 0).astype(np.float32)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2
    }
    spec = _spec(epochs, lr, batch_size)
    result = train(model, feeds, labels, spec, masks=masks, after_epoch=on_epoch)  # type: ignore[arg-type]
    return apply(model, result.deltas)


def distill(
    teacher: onnx.ModelProto,
    student: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    temperature: float,
    alpha: float,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    on_epoch: Callable[[int, float], None] | None = None,
) -> onnx.ModelProto:
    """`on_epoch(epochs done, loss)` as each epoch ends (learn/train.train's after_epoch)."""
    import torch
    import torch.nn.functional as F

    from edge_agent.learn.train import train

    if temperature <= 0 or not 0 <= alpha <= 1:
        raise InvalidArgument("--temperature must be positive and --alpha lie in [0, 1]")
    teacher_output, _ = training_output(teacher)
    soft = torch.from_numpy(features(teacher, feeds, [teacher_output])[teacher_output])
    weight = alpha if labels is not None else 1.0

    def loss(logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        teacher_probs = F.softmax(soft[index] / temperature, dim=1)
        student_log = F.log_softmax(logits / temperature, dim=1)
        kl = F.kl_div(student_log, teacher_probs, reduction="batchmean") * temperature**2
        if weight >= 1.0:
            return kl
        return weight * kl + (1 - weight) * F.cross_entropy(logits, target)

    rows = len(next(iter(feeds.values())))
    targets = labels if labels is not None else np.zeros(rows, np.int64)
    spec = _spec(epochs, lr, batch_size)
    result = train(student, feeds, targets, spec, loss=loss, after_epoch=on_epoch)  # type: ignore[arg-type]
    return apply(student, result.deltas)
