"""The functional-forward protocol every backbone implements: run on given weights, with the
statistics that batch norm normalises with passed in, never toggled by `.train()`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

Weights = dict[str, Tensor]
# Batch-norm layer name -> (mean, var) of its input over batch and space, [channels] each; var
# with Bessel's correction, as nn.BatchNorm's running_var holds it.
Statistics = dict[str, tuple[Tensor, Tensor]]


@runtime_checkable
class FunctionalBackbone(Protocol):
    """A backbone that runs on weights it is given (a task's, not its own parameters)."""

    def forward_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """[N, C, H, W] -> [N, classes] logits on `weights`; batch norm normalises with
        `statistics` when given, else with the statistics of `x` itself."""
        ...

    def embed_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """[N, C, H, W] -> [N, features]: what `forward_with` computes before its head."""
        ...

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        """The statistics each batch-norm layer sees on `x` [N, C, H, W] under `weights`."""
        ...


@runtime_checkable
class Annealed(Protocol):
    """A backbone with a setting that changes over meta-training (ResNet-12's DropBlock rate)."""

    def at_iteration(self, iteration: int) -> None:
        """Meta-training's passes from now on are meta-iteration `iteration`'s (0-based)."""
        ...


@runtime_checkable
class GroupedBackbone(FunctionalBackbone, Protocol):
    """A backbone that also runs T tasks at once, each on its own weights (algo.task_batching=
    grouped): every weight with a leading task axis [T, ...], images [T, N, C, H, W]."""

    def forward_tasks(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        """[T, N, C, H, W] -> [T, N, classes]; `statistics` [T, channels] each."""
        ...

    def task_statistics(self, weights: Weights, x: Tensor) -> Statistics:
        """The statistics of each task's images, [T, channels] each."""
        ...
