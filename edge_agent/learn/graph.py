"""An ONNX graph as a PyTorch module, written here rather than with onnx2torch.

Why not onnx2torch 1.5.15 (the obvious library), as measured for this project: it fails on real
PaddleOCR exports (KeyError on initializer names) and turns MatMul weights into non-trainable
buffers, so the weights a fleet most wants to train would not move. Here every float initializer
the training output depends on becomes an `nn.Parameter` under its own ONNX name (or a frozen
buffer), and the trained values go back into the same initializers, so the release's per-tensor
delta machinery moves only what changed.

Supported: the ops common in edge models (OPS below). Another op refuses the graph with its name
(`UnsupportedGraph`). `check_against_onnxruntime` compares the module with ONNX Runtime on real
inputs before any training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from edge_agent.learn.onnxinfo import UnsupportedGraph, needed_nodes

Op = Callable[[list[Any], dict[str, Any]], list[Any]]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _ints(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]


@op("Identity", "Dropout")
def _identity(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0]]


@op("Add")
def _add(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0] + x[1]]


@op("Sub")
def _sub(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0] - x[1]]


@op("Mul")
def _mul(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0] * x[1]]


@op("Div")
def _div(x: list[Any], a: dict[str, Any]) -> list[Any]:
    if not x[0].is_floating_point():
        return [torch.div(x[0], x[1], rounding_mode="trunc")]
    return [x[0] / x[1]]


@op("MatMul")
def _matmul(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.matmul(x[0], x[1])]


@op("Gemm")
def _gemm(x: list[Any], a: dict[str, Any]) -> list[Any]:
    left = x[0].t() if a.get("transA", 0) else x[0]
    right = x[1].t() if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (left @ right)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return [out]


def _padding(a: dict[str, Any], x: torch.Tensor, kernel: Sequence[int]) -> tuple[torch.Tensor, Any]:
    """ONNX pads (begins then ends) -> symmetric padding for torch, or an explicit F.pad."""
    spatial = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        strides = a.get("strides", [1] * spatial)
        dilations = a.get("dilations", [1] * spatial)
        pads_begin, pads_end = [], []
        for i in range(spatial):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto == "SAME_UPPER" else big)
            pads_end.append(big if auto == "SAME_UPPER" else small)
        pads = pads_begin + pads_end
    elif auto in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 2 * spatial))
    else:  # VALID
        pads = [0] * 2 * spatial
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, tuple(begin)
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):
        torch_pads += [begin[i], end[i]]
    return F.pad(x, torch_pads), (0,) * spatial


@op("Conv")
def _conv(x: list[Any], a: dict[str, Any]) -> list[Any]:
    weight = x[1]
    kernel = list(weight.shape[2:])
    data, padding = _padding(a, x[0], kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(len(kernel))
    if conv is None:
        raise UnsupportedGraph(f"Conv with {len(kernel)} spatial dimensions")
    bias = x[2] if len(x) > 2 else None
    return [
        conv(
            data,
            weight,
            bias,
            stride=tuple(a.get("strides", [1] * len(kernel))),
            padding=padding,
            dilation=tuple(a.get("dilations", [1] * len(kernel))),
            groups=a.get("group", 1),
        )
    ]


@op("ConvTranspose")
def _conv_transpose(x: list[Any], a: dict[str, Any]) -> list[Any]:
    weight = x[1]
    spatial = len(weight.shape) - 2
    if spatial != 2:
        raise UnsupportedGraph("ConvTranspose other than 2D")
    pads = list(a.get("pads", [0] * 4))
    if pads[:2] != pads[2:] or "output_shape" in a:
        raise UnsupportedGraph("ConvTranspose with asymmetric pads or output_shape")
    bias = x[2] if len(x) > 2 else None
    return [
        F.conv_transpose2d(
            x[0],
            weight,
            bias,
            stride=tuple(a.get("strides", [1, 1])),
            padding=tuple(pads[:2]),
            output_padding=tuple(a.get("output_padding", [0, 0])),
            groups=a.get("group", 1),
            dilation=tuple(a.get("dilations", [1, 1])),
        )
    ]


@op("BatchNormalization")
def _batch_norm(x: list[Any], a: dict[str, Any]) -> list[Any]:
    # Inference form: the running statistics stay fixed (a few examples on a device would only
    # make them worse); scale and bias train.
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False, eps=a.get("epsilon", 1e-5))]


@op("Relu")
def _relu(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.relu(x[0])]


@op("LeakyRelu")
def _leaky(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.leaky_relu(x[0], a.get("alpha", 0.01))]


@op("Sigmoid")
def _sigmoid(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.sigmoid(x[0])]


@op("Tanh")
def _tanh(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.tanh(x[0])]


@op("HardSigmoid")
def _hard_sigmoid(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)]


@op("HardSwish")
def _hard_swish(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0] * torch.clamp(x[0] / 6 + 0.5, 0, 1)]


@op("Clip")
def _clip(x: list[Any], a: dict[str, Any]) -> list[Any]:
    low = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return [torch.clamp(x[0], low, high)]


def _pooling(average: bool) -> Op:
    def run(x: list[Any], a: dict[str, Any]) -> list[Any]:
        kernel = list(a["kernel_shape"])
        data, padding = _padding(a, x[0], kernel)
        if len(kernel) != 2:
            raise UnsupportedGraph("pooling other than 2D")
        stride = tuple(a.get("strides", [1, 1]))
        ceil = bool(a.get("ceil_mode", 0))
        if average:
            return [
                F.avg_pool2d(
                    data,
                    tuple(kernel),
                    stride,
                    padding,
                    ceil_mode=ceil,
                    count_include_pad=bool(a.get("count_include_pad", 0)),
                )
            ]
        return [F.max_pool2d(data, tuple(kernel), stride, padding, ceil_mode=ceil)]

    return run


OPS["MaxPool"] = _pooling(False)
OPS["AveragePool"] = _pooling(True)


@op("GlobalAveragePool")
def _global_average(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]


@op("GlobalMaxPool")
def _global_max(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.amax(x[0], dim=tuple(range(2, x[0].dim())), keepdim=True)]


@op("Flatten")
def _flatten(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axis = a.get("axis", 1)
    axis = axis if axis >= 0 else x[0].dim() + axis
    return [x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)]


@op("Reshape")
def _reshape(x: list[Any], a: dict[str, Any]) -> list[Any]:
    shape = _ints(x[1])
    shape = [
        x[0].shape[i] if d == 0 and not a.get("allowzero", 0) else d for i, d in enumerate(shape)
    ]
    return [x[0].reshape(shape)]


@op("Transpose")
def _transpose(x: list[Any], a: dict[str, Any]) -> list[Any]:
    perm = a.get("perm", list(reversed(range(x[0].dim()))))
    return [x[0].permute(*perm)]


@op("Concat")
def _concat(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.cat(list(x), dim=a["axis"])]


@op("Slice")
def _slice(x: list[Any], a: dict[str, Any]) -> list[Any]:
    data = x[0]
    starts = _ints(x[1]) if len(x) > 1 else list(a["starts"])
    ends = _ints(x[2]) if len(x) > 2 else list(a["ends"])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else a.get("axes", range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        if step < 1:
            raise UnsupportedGraph("Slice with a negative step")
        size = data.shape[axis]
        index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return [data[tuple(index)]]


@op("Squeeze")
def _squeeze(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axes = _ints(x[1]) if len(x) > 1 else a.get("axes")
    if axes is None:
        return [x[0].squeeze()]
    out = x[0]
    for axis in sorted((ax % x[0].dim() for ax in axes), reverse=True):
        out = out.squeeze(axis)
    return [out]


@op("Unsqueeze")
def _unsqueeze(x: list[Any], a: dict[str, Any]) -> list[Any]:
    axes = _ints(x[1]) if len(x) > 1 else list(a["axes"])
    out = x[0]
    rank = x[0].dim() + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        out = out.unsqueeze(axis)
    return [out]


@op("Softmax")
def _softmax(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [F.softmax(x[0], dim=a.get("axis", -1))]


@op("Resize", "Upsample")
def _resize(x: list[Any], a: dict[str, Any]) -> list[Any]:
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
    if sizes is None and scales is None and len(x) == 2:  # Upsample: scales is input 1
        scales = x[1]
    kind = {"nearest": "nearest", "linear": "bilinear"}.get(mode)
    if kind is None:
        raise UnsupportedGraph(f"Resize mode {mode!r}")
    if sizes is not None:
        return [F.interpolate(x[0], size=_ints(sizes)[2:], mode=kind)]
    assert scales is not None
    factors = [float(s) for s in scales.flatten().tolist()][2:]
    return [F.interpolate(x[0], scale_factor=factors, mode=kind)]


@op("ArgMax")
def _argmax(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.argmax(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))]


@op("Shape")
def _shape(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [torch.tensor(list(x[0].shape), dtype=torch.int64)]


@op("Gather")
def _gather(x: list[Any], a: dict[str, Any]) -> list[Any]:
    return [
        torch.index_select(x[0], a.get("axis", 0), x[1].flatten()).reshape(
            *x[0].shape[: a.get("axis", 0)], *x[1].shape, *x[0].shape[a.get("axis", 0) + 1 :]
        )
    ]


_CASTS = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


@op("Cast")
def _cast(x: list[Any], a: dict[str, Any]) -> list[Any]:
    target = _CASTS.get(a["to"])
    if target is None:
        raise UnsupportedGraph(f"Cast to {onnx.TensorProto.DataType.Name(a['to'])}")
    return [x[0].to(target)]


class OnnxModule(torch.nn.Module):
    """`outputs` of `graph` from `inputs` (feed names); the float initializers in `trainable`
    are parameters (by ONNX name in `parameters`), every other initializer a frozen tensor."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        inputs: Sequence[str],
        outputs: Sequence[str],
        trainable: set[str],
        values: Mapping[str, np.ndarray],
    ) -> None:
        super().__init__()
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.nodes = needed_nodes(graph, outputs, inputs)
        unsupported = sorted({n.op_type for n in self.nodes if n.op_type not in OPS or n.domain})
        if unsupported:
            raise UnsupportedGraph(f"the trainer does not support the ops {unsupported}")
        self.attrs = [
            {attr.name: helper.get_attribute_value(attr) for attr in n.attribute}
            for n in self.nodes
        ]
        for attrs, node in zip(self.attrs, self.nodes, strict=True):
            if node.op_type == "Constant":
                attrs["value"] = numpy_helper.to_array(attrs["value"])
        used = {i for n in self.nodes for i in n.input}
        self.parameters_by_name: dict[str, torch.nn.Parameter] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        for name, value in values.items():
            if name not in used or name in self.inputs:
                continue
            tensor = torch.from_numpy(np.array(value))
            if name in trainable and tensor.is_floating_point():
                parameter = torch.nn.Parameter(tensor.float())
                self.parameters_by_name[name] = parameter
                self.register_parameter(f"p{len(self.parameters_by_name)}", parameter)
            else:
                self.frozen[name] = tensor

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = {**self.frozen, **self.parameters_by_name, **feeds}
        for node, attrs in zip(self.nodes, self.attrs, strict=True):
            if node.op_type == "Constant":
                results = [torch.from_numpy(np.array(attrs["value"]))]
            else:
                args = [env[i] if i else None for i in node.input]
                results = OPS[node.op_type](args, attrs)
            for name, value in zip(node.output, results, strict=False):
                env[name] = value
        return {o: env[o] for o in self.outputs}


def check_against_onnxruntime(
    model: onnx.ModelProto,
    module: OnnxModule,
    feeds: Mapping[str, np.ndarray],
    module_feeds: Mapping[str, np.ndarray] | None = None,
    atol: float = 1e-3,
) -> float:
    """The module's outputs (from `module_feeds`, default `feeds`: a head's inputs are the
    frozen part's outputs) vs ONNX Runtime's on the model's `feeds`. Returns the worst absolute
    difference; raises UnsupportedGraph when it exceeds `atol` (relative to the output's
    scale)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_outputs = {o.name for o in probe.graph.output}
    for name in module.outputs:
        if name not in graph_outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip(module.outputs, session.run(module.outputs, dict(feeds)), strict=True))
    with torch.no_grad():
        own = feeds if module_feeds is None else module_feeds
        got = module({k: torch.from_numpy(np.asarray(v)) for k, v in own.items()})
    worst = 0.0
    for name in module.outputs:
        ours = got[name].detach().numpy().astype(np.float64)
        theirs = np.asarray(expected[name], dtype=np.float64)
        if ours.shape != theirs.shape:
            raise UnsupportedGraph(f"output {name!r}: shape {ours.shape} vs ORT {theirs.shape}")
        difference = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        scale = max(1.0, float(np.max(np.abs(theirs))) if theirs.size else 1.0)
        if difference > atol * scale:
            raise UnsupportedGraph(
                f"the converted graph differs from ONNX Runtime on {name!r} by {difference:.3g}"
            )
        worst = max(worst, difference)
    return worst
