"""The four-block convolutional backbone of Vinyals et al. (2016), used by MAML and Meta-LSTM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError


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

    Padding, stride and pooling are settings because they matter: padding 2 / stride 2 without
    pooling plateaus near 92% on Omniglot 5-way 1-shot where padding 1 / max-pool reaches ~97.5%.
    BatchNorm's running statistics are those of the last batch seen (momentum=1): the algorithms
    use this to normalise a query set with its support set's statistics (see
    `Algorithm.predict_query`). (Not momentum=None, the cumulative average: it reads the batch
    count back as a Python number, which torch.func.vmap cannot do.)

    `channels_last` lays the activations out channels-last; "auto" does so for nets that
    max-pool and for images from 64 px up. Measured on a 1-thread CPU (oneDNN): on 84 px
    Mini-ImageNet 1.9x faster MAML test episodes and 1.4x faster Meta-LSTM meta-iterations
    (second-order MAML unchanged); on the 28 px max-pooling Omniglot net 2.2x faster test
    episodes and 1.2x faster meta-iterations (max-pooling a standard-layout 28 px map is 10x
    slower); on the 28 px strided net without pooling, meta-iterations 8% slower, hence not there.
    """

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
        if not (isinstance(channels_last, bool) or channels_last == "auto"):
            raise ConfigError(
                f"backbone.channels_last={channels_last!r} is unknown; choose true, false or auto"
            )
        if channels_last == "auto":
            channels_last = pool or image_size >= 64
        self.channels_last = channels_last
        layers: list[nn.Module] = []
        size, width = image_size, in_channels
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
            layers += [
                nn.Conv2d(width, channels, 3, stride=stride, padding=padding),
                nn.BatchNorm2d(channels, momentum=1.0),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            width = channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] images -> [N, num_classes] logits."""
        return self.forward_with(dict(self.named_parameters()), dict(self.named_buffers()), x)

    def forward_with(
        self, weights: dict[str, Tensor], buffers: dict[str, Tensor | None], x: Tensor
    ) -> Tensor:
        """`forward` on the given weights and batch-norm buffers (names as in `state_dict`),
        which the algorithms pass per task. Buffers of None: normalise with the batch's own
        statistics and record nothing. The layers only hold the parameters: run functionally,
        a pass costs ~0.13 ms less than by torch.func.functional_call, which rebinds every
        parameter of the module (1-thread CPU: 5-10% of an Omniglot 5-way test episode)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, layer in self.features.named_children():
            key = f"features.{name}."
            if isinstance(layer, nn.Conv2d):
                weight, bias = weights[key + "weight"], weights[key + "bias"]
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
                if self.channels_last:
                    # A 1-channel input (Omniglot) is laid out both ways at once, and torch then
                    # picks the standard layout for the output: convert it, or batch norm and
                    # max-pooling run on it standard (max-pool 10x slower on 28 px maps).
                    x = x.contiguous(memory_format=torch.channels_last)
            elif isinstance(layer, nn.BatchNorm2d):
                mean, var = buffers[key + "running_mean"], buffers[key + "running_var"]
                weight, bias = weights[key + "weight"], weights[key + "bias"]
                training = self.training or mean is None  # as nn.BatchNorm2d decides
                x = F.batch_norm(x, mean, var, weight, bias, training, layer.momentum, layer.eps)
            else:
                x = layer(x)  # ReLU, MaxPool2d, Flatten: no state
        return F.linear(x, weights["head.weight"], weights["head.bias"])
