"""The ResNet-12 of MetaOptNet (Lee et al., CVPR 2019): four residual blocks, DropBlock in the
last two."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.models.functional import Statistics, Weights
from fewshot.models.hashing import content_key, mix
from fewshot.settings import BOOLEAN, Rule, int_at_least

SLOPE = 0.1  # LeakyReLU's negative slope (MetaOptNet's)
BLOCKS = 4  # residual blocks, each ending in a 2x2 max-pool
DROPBLOCK_BLOCKS = 2  # the last two blocks drop square blocks; the first ones single activations


def _is_widths(v: Any) -> bool:
    return (
        (OmegaConf.is_list(v) or isinstance(v, list | tuple))
        and len(v) == BLOCKS
        and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in v)
    )


def _is_rate(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1


WIDTHS: Rule = (_is_widths, f"a list of {BLOCKS} integers >= 1 (each block's channels)")
RATE: Rule = (_is_rate, "a number >= 0 and < 1")

# SplitMix64's increment (Steele et al., OOPSLA 2014), as the signed int64 a tensor holds.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def keyed_uniform(key: Tensor, salt: int, shape: Sequence[int]) -> Tensor:
    """[*shape] float32 in [0, 1), a function of `key` [] (int64) and `salt` alone: SplitMix64's
    stream from their seed, in int64 arithmetic on key's device (the same values on any device,
    and no random op, so torch.func.vmap batches it and a recomputed pass draws it again)."""
    seed = mix(key + salt)
    bits = mix(seed + torch.arange(1, math.prod(shape) + 1, device=key.device) * _GOLDEN)
    return ((bits >> 40) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24).view(*shape)


def dropblock(x: Tensor, drop: float, block_size: int, key: Tensor, salt: int) -> Tensor:
    """x [N, C, H, W] with square blocks of side `block_size` (at most the map's) zeroed over
    about a `drop` share of it, and the rest scaled by all / kept, so that the sum is kept in
    expectation. The blocks' seeds fall where a whole block fits, each with probability gamma:
    DropBlock (Ghiasi, Lin & Le, NeurIPS 2018, Algorithm 1 and Eq. 1) as MetaOptNet's code
    computes it; block size 1 is dropout. The seeds are `keyed_uniform(key, salt)`."""
    n, c, h, w = x.shape
    size = min(block_size, h, w)
    gamma = drop / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
    seeds = (keyed_uniform(key, salt, (n, c, h - size + 1, w - size + 1)) < gamma).to(x.dtype)
    # A seed at (i, j) drops rows i..i+size-1 and columns j..j+size-1: a max over the window
    # ending there, on the seeds padded by size - 1 on every side.
    kept = 1 - F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)  # [N, C, H, W]
    return x * (kept * (kept.numel() / kept.sum().clamp_min(1)))


class ResidualBlock(nn.Module):
    """One block's layers: three 3x3 convolutions (no bias), each followed by batch norm, and a
    1x1 convolution + batch norm shortcut. They hold shapes and settings only: ResNet12 runs them
    on given weights."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.shortcut_conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(channels, track_running_stats=False)


class ResNet12(nn.Module):
    """4 x (residual block -> LeakyReLU(0.1) -> 2x2 max-pool [-> DropBlock]) -> global average
    pool (or, `global_pool=false`, flatten) -> linear to `num_classes`.

    A block is (conv 3x3 -> BN -> LeakyReLU) x 2 -> conv 3x3 -> BN, plus a 1x1 conv -> BN
    shortcut, `widths` channels per block (64-160-320-640: 12.4M weights, 640 features). The
    head is what the MAML family adapts; a metric method (ProtoNet) uses `embed_with` alone.

    `drop_rate` > 0 regularises as MetaOptNet's network: while the module is in training mode
    (`.train()`, which Lightning sets for meta-training steps and clears for validation, test
    and prediction), each block's output loses about that share of its activations, single
    ones in the first two blocks (dropout) and squares of `dropblock_size` in the last two
    (DropBlock). DropBlock's share grows linearly from 0 to drop_rate over the first
    `dropblock_ramp` meta-iterations (0: drop_rate from the start), as MetaOptNet's keep rate
    falls from 1; `at_iteration` tells the module where meta-training stands (fewshot.methods.
    tasks.run_tasks calls it before each training meta-batch). The masks are a function of the images passed in (content_key) and the block,
    not of a random generator: the same pass draws the same mask, so a pass recomputed in
    backward (algo.checkpoint_inner), a batch-norm statistics pass over the same images, the
    module forward and `forward_with`, and vmapped tasks (algo.task_batching=vmap) all agree.
    `drop` (keyword of the functional forward) overrides the rate for one pass.

    Batch norm keeps no running statistics: what it normalises with is an argument of
    `forward_with` (fewshot.models.functional). No `forward_tasks`: algo.task_batching=grouped
    is refused for it.

    References: Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex
    Optimization", CVPR 2019, Section 4 and its code (kjunelee/MetaOptNet,
    models/ResNet12_embedding.py); Ghiasi, Lin & Le, "DropBlock", NeurIPS 2018.
    """

    settings: ClassVar[dict[str, Rule]] = {
        "widths": WIDTHS,
        "drop_rate": RATE,
        "dropblock_size": int_at_least(1),
        "dropblock_ramp": int_at_least(0),
        "global_pool": BOOLEAN,
    }

    @classmethod
    def check_fits(cls, backbone: Mapping[str, Any], image_size: int) -> None:
        """Raise ConfigError if the blocks' 2x2 max-pools shrink images of side `image_size`
        (data.image_size) to nothing."""
        if image_size >> BLOCKS < 1:
            raise ConfigError(
                f"backbone: ResNet-12's {BLOCKS} 2x2 max-pools leave no spatial size for "
                f"data.image_size={image_size}: expected data.image_size >= {1 << BLOCKS}"
            )

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        widths: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        dropblock_ramp: int = 0,
        global_pool: bool = True,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.drop_rate, self.dropblock_size = drop_rate, dropblock_size
        self.dropblock_ramp, self.meta_iteration = dropblock_ramp, 0
        self.global_pool = global_pool
        self.blocks = nn.ModuleList(
            ResidualBlock(a, b) for a, b in zip([in_channels, *widths], widths)
        )
        side = image_size >> len(widths)  # each pool floors: 84 -> 42 -> 21 -> 10 -> 5
        self.head = nn.Linear(widths[-1] * (1 if global_pool else side * side), num_classes)
        for module in self.blocks.modules():  # MetaOptNet's initialisation; the head torch's
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def at_iteration(self, iteration: int) -> None:
        """Meta-training's passes from now on are meta-iteration `iteration`'s (0-based)."""
        self.meta_iteration = iteration

    def dropped_shares(self) -> tuple[float, float]:
        """The shares dropped in training mode now: (blocks 1-2's dropout, blocks 3-4's
        DropBlock, ramped)."""
        if self.dropblock_ramp == 0:
            return self.drop_rate, self.drop_rate
        ramped = self.drop_rate * min(1.0, self.meta_iteration / self.dropblock_ramp)
        return self.drop_rate, ramped

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] images -> [N, num_classes] logits, normalised with the batch's statistics."""
        return self.forward_with(dict(self.named_parameters()), x)

    def forward_with(
        self,
        weights: Weights,
        x: Tensor,
        statistics: Statistics | None = None,
        *,
        drop: float | None = None,
    ) -> Tensor:
        """`forward` on the given weights (names as in `state_dict`); batch norm normalises with
        `statistics` when given, else with those of the batch. `drop`: the share every block
        drops in this pass; None: `dropped_shares()` in training mode, none in evaluation."""
        features = self.embed_with(weights, x, statistics, drop=drop)
        return F.linear(features, weights["head.weight"], weights["head.bias"])

    def embed_with(
        self,
        weights: Weights,
        x: Tensor,
        statistics: Statistics | None = None,
        *,
        drop: float | None = None,
    ) -> Tensor:
        """[N, C, H, W] -> [N, features]: the last block's output averaged over space (widths[-1]
        features), or flattened without `global_pool`."""
        x = self._features(weights, x, statistics, None, drop)
        return x.mean((2, 3)) if self.global_pool else x.flatten(1)

    def statistics(self, weights: Weights, x: Tensor, *, drop: float | None = None) -> Statistics:
        """Each batch-norm layer's input statistics on `x` under `weights`."""
        record: Statistics = {}
        self._features(weights, x, None, record, drop)
        return record

    def _features(
        self,
        weights: Weights,
        x: Tensor,
        given: Statistics | None,
        record: Statistics | None,
        drop: float | None,
    ) -> Tensor:
        """The last block's output [N, widths[-1], h, w]."""
        if drop is not None:
            shares = (drop, drop)
        else:
            shares = self.dropped_shares() if self.training else (0.0, 0.0)
        key = content_key(x) if max(shares) > 0 else None  # of the images, before any layer
        for i, block in enumerate(self.blocks):
            x = _residual_block(block, f"blocks.{i}.", weights, x, given, record)
            last = i >= len(self.blocks) - DROPBLOCK_BLOCKS
            if shares[last] > 0:
                x = dropblock(x, shares[last], self.dropblock_size if last else 1, key, salt=i)
        return x


def _residual_block(
    block: ResidualBlock,
    prefix: str,
    weights: Weights,
    x: Tensor,
    given: Statistics | None,
    record: Statistics | None,
) -> Tensor:
    """`block` on `weights` (named `prefix` + layer): x [N, C, H, W] -> [N, C', H/2, W/2]."""

    def conv(h: Tensor, name: str) -> Tensor:
        padding = getattr(block, name).padding
        return F.conv2d(h, weights[prefix + name + ".weight"], None, 1, padding)

    def norm(h: Tensor, name: str) -> Tensor:
        return _batch_norm(h, weights, prefix + name, given, record, block.bn1.eps)

    out = F.leaky_relu(norm(conv(x, "conv1"), "bn1"), SLOPE)
    out = F.leaky_relu(norm(conv(out, "conv2"), "bn2"), SLOPE)
    out = norm(conv(out, "conv3"), "bn3")
    shortcut = norm(conv(x, "shortcut_conv"), "shortcut_bn")
    return F.max_pool2d(F.leaky_relu(out + shortcut, SLOPE), 2)


def _batch_norm(
    x: Tensor,
    weights: Weights,
    name: str,
    given: Statistics | None,
    record: Statistics | None,
    eps: float,
) -> Tensor:
    """Batch norm `name` on x [N, C, H, W]: with `given` statistics, else the batch's own;
    the input's statistics go into `record` when given one."""
    if record is not None:
        record[name] = (x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1))
    mean, var = given[name] if given is not None else (None, None)
    weight, bias = weights[name + ".weight"], weights[name + ".bias"]
    if mean is not None and not x.dtype == mean.dtype == weight.dtype:
        # Under bf16 autocast, as Conv4: the CPU's batch norm takes given statistics only when
        # input, statistics and weights share one dtype, the weights'.
        x, mean, var = x.to(weight.dtype), mean.to(weight.dtype), var.to(weight.dtype)
    return F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, eps)
