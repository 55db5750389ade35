"""The four-block convolutional backbone of Vinyals et al. (2016), used by MAML and Meta-LSTM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.models.functional import Statistics, Weights
from fewshot.settings import BOOLEAN, BOOLEAN_OR_AUTO, Rule, int_at_least


def conv_output_size(size: int, padding: int, stride: int, pool: bool) -> int:
    """Side of a block's output: 3x3 conv, then an optional 2x2 max-pool."""
    size = (size + 2 * padding - 3) // stride + 1
    return size // 2 if pool else size


def smallest_image_size(blocks: int, padding: int, stride: int, pool: bool) -> int:
    """The smallest image side that leaves every block a spatial size of at least 1."""
    size = 1
    while True:
        side = size
        for _ in range(blocks):
            side = conv_output_size(side, padding, stride, pool)
        if side >= 1:
            return size
        size += 1


class Conv4(nn.Module):
    """`blocks` x (conv 3x3 -> BatchNorm -> ReLU -> [2x2 max-pool]) -> linear to `num_classes`.

    Padding, stride and pooling are settings because they change what the net learns: on
    Omniglot 5-way 1-shot, padding 2 / stride 2 without pooling plateaus lower than padding 1
    with max-pooling (measured accuracies belong in docs/, not in this docstring).
    Batch norm keeps no running statistics: what it normalises with is an argument of
    `forward_with` (see fewshot.models.functional).

    `channels_last` lays the activations out channels-last; "auto" does so for nets that
    max-pool and for images from 64 px up, where oneDNN's channels-last kernels are the faster
    ones on CPU (docs/performance.md, Layout).

    `settings`: the `backbone` keys a run chooses and their ranges (fewshot.settings); the
    others (in_channels, image_size, num_classes) follow the data and the task. `check_fits`
    refuses settings whose blocks leave the images no spatial size.
    """

    settings: ClassVar[dict[str, Rule]] = {
        "channels": int_at_least(1),
        "padding": int_at_least(0),
        "stride": int_at_least(1),
        "pool": BOOLEAN,
        "blocks": int_at_least(1),
        "channels_last": BOOLEAN_OR_AUTO,
    }

    @classmethod
    def check_fits(cls, backbone: Mapping[str, Any], image_size: int) -> None:
        """Raise ConfigError if the blocks `backbone` (the run's `backbone` settings) describes
        shrink images of side `image_size` (data.image_size) to nothing."""
        blocks, padding, stride, pool = (
            backbone.get("blocks", 4),
            backbone["padding"],
            backbone["stride"],
            backbone["pool"],
        )
        size = image_size
        for block in range(1, blocks + 1):
            size = conv_output_size(size, padding, stride, pool)
            if size < 1:
                smallest = smallest_image_size(blocks, padding, stride, pool)
                other = ["backbone.stride=1"] * (stride > 1) + ["backbone.pool=false"] * pool
                raise ConfigError(
                    f"backbone: block {block} of {blocks} leaves no spatial size for "
                    f"data.image_size={image_size} (backbone.padding={padding}, "
                    f"backbone.stride={stride}, backbone.pool={pool}): expected "
                    f"data.image_size >= {smallest} with these"
                    + "".join(f", or {o}" for o in other)
                )

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: int,
        padding: int,
        stride: int,
        pool: bool,
        blocks: int = 4,
        channels_last: bool | str = False,
    ) -> None:
        super().__init__()
        if channels_last == "auto":
            channels_last = pool or image_size >= 64
        self.channels_last = channels_last
        layers: list[nn.Module] = []
        size, width = image_size, in_channels
        for _ in range(blocks):
            size = conv_output_size(size, padding, stride, pool)
            layers += [
                nn.Conv2d(width, channels, 3, stride=stride, padding=padding),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            width = channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] images -> [N, num_classes] logits, normalised with the batch's statistics."""
        return self.forward_with(dict(self.named_parameters()), x)

    def forward_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """`forward` on the given weights (names as in `state_dict`); batch norm normalises with
        `statistics` when given, else with those of the batch. The layers only hold the
        parameters' shapes and settings: run functionally, a pass skips functional_call's
        rebinding of every parameter."""
        features = self.embed_with(weights, x, statistics)
        return F.linear(features, weights["head.weight"], weights["head.bias"])

    def embed_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """[N, C, H, W] -> [N, features]: the blocks' output before the head, flattened (what a
        metric method compares)."""
        return self._features(weights, x, statistics, None).flatten(1)

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        """Each batch-norm layer's input statistics on `x` under `weights`."""
        record: Statistics = {}
        self._features(weights, x, None, record)
        return record

    def forward_tasks(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """`forward_with` for T tasks at once: every weight with a leading task axis [T, ...],
        x [T, N, C, H, W] -> [T, N, classes]; `statistics` [T, channels] each.

        The tasks' images are stacked along channels and each conv runs as one grouped
        convolution (groups=T), batch norm over the stacked channels is per task by
        construction, and the head is one batched matmul: a few large kernel calls where a
        loop over small tasks makes T small ones."""
        tasks, n = x.shape[:2]
        stacked = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])  # [N, T*C, H, W]
        given = None if statistics is None else _stack_statistics(statistics)
        features = self._features(_stack_tasks(weights), stacked, given, None, tasks)
        features = features.reshape(n, tasks, -1).transpose(0, 1)  # [T, N, C*h*w], each task's
        head = weights["head.weight"].transpose(1, 2)  # [T, C*h*w, classes]
        return torch.baddbmm(weights["head.bias"][:, None], features, head)

    def task_statistics(self, weights: Weights, x: Tensor) -> Statistics:
        """`statistics` for T tasks at once (shapes as in `forward_tasks`): [T, channels] each."""
        tasks, n = x.shape[:2]
        record: Statistics = {}
        stacked = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
        self._features(_stack_tasks(weights), stacked, None, record, tasks)
        return {k: (m.view(tasks, -1), v.view(tasks, -1)) for k, (m, v) in record.items()}

    def _features(
        self,
        weights: Weights,
        x: Tensor,
        given: Statistics | None,
        record: Statistics | None,
        groups: int = 1,
    ) -> Tensor:
        """The blocks' output before the head; with `groups`, that many tasks stacked along
        channels, their weights stacked along output channels."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, layer in self.features.named_children():
            key = f"features.{name}."
            if isinstance(layer, nn.Conv2d):
                weight, bias = weights[key + "weight"], weights[key + "bias"]
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding, groups=groups)
                if self.channels_last:
                    # A 1-channel input (Omniglot) is laid out both ways at once, and torch then
                    # picks the standard layout for the output: convert it, or batch norm and
                    # max-pooling run on it in the standard layout, much slower on 28 px maps.
                    x = x.contiguous(memory_format=torch.channels_last)
            elif isinstance(layer, nn.BatchNorm2d):
                if record is not None:
                    dims = (0, 2, 3)
                    record[key[:-1]] = (x.mean(dims), x.var(dims, correction=1))
                mean, var = given[key[:-1]] if given is not None else (None, None)
                weight, bias = weights[key + "weight"], weights[key + "bias"]
                if mean is not None and not x.dtype == mean.dtype == weight.dtype:
                    # Under bf16 autocast the activations (and statistics taken of them) are
                    # bfloat16, and the CPU's batch norm takes given statistics only when
                    # input, statistics and weights share one dtype: the weights'.
                    x, mean, var = x.to(weight.dtype), mean.to(weight.dtype), var.to(weight.dtype)
                x = F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, layer.eps)
            elif not isinstance(layer, nn.Flatten):  # the caller flattens, per task or not
                x = layer(x)  # ReLU, MaxPool2d: no state
        return x


def _stack_tasks(weights: Weights) -> Weights:
    """Per-task weights [T, out, ...] as one layer's [T*out, ...]: a grouped conv's weights."""
    return {n: w.reshape(-1, *w.shape[2:]) for n, w in weights.items() if not n.startswith("head.")}


def _stack_statistics(statistics: Statistics) -> Statistics:
    return {k: (m.reshape(-1), v.reshape(-1)) for k, (m, v) in statistics.items()}
