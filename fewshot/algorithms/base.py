"""The interface every algorithm implements, and the task loop they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.data.episodes import Episodes

Weights = dict[str, Tensor]


@dataclass
class EpisodeResults:
    """Outcome of a meta-batch: mean query loss (the meta-loss when training), query accuracy
    of every task [tasks], and the mean query accuracy before and after each inner step
    [steps + 1] (empty unless tracked)."""

    loss: Tensor
    accuracy: Tensor
    step_accuracy: Tensor


class Algorithm(nn.Module, ABC):
    """Turns the backbone's weights and a task's support set into weights for that task.

    The backbone's parameters are the learned initialisation; subclasses add the inner loop.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @classmethod
    @abstractmethod
    def from_config(cls, algo: DictConfig, backbone: nn.Module) -> Algorithm:
        """Build from the `algo` config group."""

    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, training: bool) -> Iterator[Weights]:
        """Yield the task's weights before adaptation and after every inner step.

        support_x [way*shot, C, H, W], support_y [way*shot]. When `training`, the last
        weights carry the graph back to the meta-parameters; otherwise nothing does.
        """

    def initial_weights(self, training: bool) -> Weights:
        weights = dict(self.backbone.named_parameters())
        if training:
            return weights
        # Evaluation differentiates only the inner loop: start it from detached leaves.
        return {name: w.detach().requires_grad_() for name, w in weights.items()}

    def predict(self, weights: Weights, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, way] logits of the backbone run on `weights`."""
        return functional_call(self.backbone, weights, (x,))

    def forward(self, batch: Episodes, training: bool, track_steps: bool = False) -> EpisodeResults:
        """Adapt to every task of `batch` and score its query set (see `Episodes` for shapes)."""
        losses, accuracies, step_accuracies = [], [], []
        for support_x, support_y, query_x, query_y in zip(*batch):
            trace = []
            for weights in self.adapt(support_x, support_y, training):
                if track_steps:
                    with torch.no_grad():  # for logging only: no graph kept
                        trace.append(accuracy(self.predict(weights, query_x), query_y))
            logits = self.predict(weights, query_x)
            losses.append(F.cross_entropy(logits, query_y))
            accuracies.append(accuracy(logits.detach(), query_y))
            step_accuracies.append(torch.stack(trace) if trace else logits.new_empty(0))
        return EpisodeResults(
            torch.stack(losses).mean(),
            torch.stack(accuracies),
            torch.stack(step_accuracies).mean(0),
        )


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()
