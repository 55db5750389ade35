"""The interface every algorithm implements, and the task loop they share."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError

Weights = dict[str, Tensor]


@dataclass
class EpisodeResults:
    """Outcome of a meta-batch: mean query loss (the meta-loss when training), query accuracy
    of every task [tasks], and the mean query accuracy before and after each inner step
    [steps + 1] (empty unless tracked)."""

    loss: Tensor
    accuracy: Tensor
    step_accuracy: Tensor


BATCH_NORM_MODES = ("transductive", "support")


class Algorithm(nn.Module, ABC):
    """Turns the backbone's weights and a task's support set into weights for that task.

    The backbone's parameters are the learned initialisation; subclasses add the inner loop.
    `batch_norm_train` / `batch_norm_test` say which statistics normalise the query set:
    `transductive`, those of the query batch itself (the MAML paper's code), or `support`,
    those of the support set, so that each query prediction is independent of the others
    (Ravi & Larochelle at meta-test). Support statistics enter as constants, not differentiated.
    """

    # The `algo` keys that shape adaptation at test time, recorded beside every test number.
    test_keys: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, batch_norm_train: str, batch_norm_test: str) -> None:
        super().__init__()
        for key, mode in (
            ("batch_norm_train", batch_norm_train),
            ("batch_norm_test", batch_norm_test),
        ):
            if mode not in BATCH_NORM_MODES:
                raise ConfigError(
                    f"algo.{key}={mode!r} is unknown; choose one of {BATCH_NORM_MODES}"
                )
        self.backbone = backbone
        self.batch_norm_train, self.batch_norm_test = batch_norm_train, batch_norm_test

    @classmethod
    def from_config(cls, algo: DictConfig, backbone: nn.Module) -> Algorithm:
        """Build from the `algo` config group, whose keys name the constructor's arguments (the
        group's other keys, such as meta_lr, belong to the outer loop). A key the config lacks
        takes the argument's default: the configs stored in older checkpoints predate it."""
        parameters = inspect.signature(cls.__init__).parameters
        names = [
            n
            for n, p in parameters.items()
            if n not in ("self", "backbone") and (n in algo or p.default is inspect.Parameter.empty)
        ]
        return cls(backbone, **{name: algo[name] for name in names})

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
        """[N, C, H, W] -> [N, way] logits on `weights`, batch norm using the statistics of `x`."""
        self._batch_norm_mode(training=True)
        return functional_call(self.backbone, (weights, self._fresh_buffers()), (x,))

    def predict_query(
        self, weights: Weights, support_x: Tensor, query_x: Tensor, batch_norm: str
    ) -> Tensor:
        """[way*query, way] logits of the query set under the given batch-norm mode."""
        if batch_norm == "transductive":
            return self.predict(weights, query_x)
        # One pass over the support set fills fresh buffers with its statistics (the backbone's
        # batch norm averages cumulatively, so one batch gives them exactly); the query set is
        # then normalised with them. Fresh buffers per episode: nothing leaks between episodes.
        buffers = self._fresh_buffers()
        self._batch_norm_mode(training=True)
        with torch.no_grad():
            functional_call(self.backbone, (weights, buffers), (support_x,))
        self._batch_norm_mode(training=False)
        return functional_call(self.backbone, (weights, buffers), (query_x,))

    def _batch_norm_mode(self, training: bool) -> None:
        # train() walks every submodule on every call (a hot path: once per forward pass);
        # the backbone's own flag says whether the walk is needed.
        if self.backbone.training != training:
            self.backbone.train(training)

    def _fresh_buffers(self) -> dict[str, Tensor]:
        # The module's own buffers are never written (every call gets copies), so they hold
        # their initial values.
        return {name: b.clone() for name, b in self.backbone.named_buffers()}

    def forward(
        self,
        batch: Episodes,
        training: bool,
        track_steps: bool = False,
        backward: Callable[[Tensor], None] | None = None,
    ) -> EpisodeResults:
        """Adapt to every task of `batch` and score its query set (see `Episodes` for shapes).

        With `backward`, each task's share of the meta-loss (its loss / tasks) is handed to it as
        soon as the task is done, so one task's graph is alive at a time: memory stays flat in
        the number of tasks (and time drops a little). The returned loss is then detached.
        """
        batch_norm = self.batch_norm_train if training else self.batch_norm_test
        tasks = len(batch.query_y)
        losses, accuracies, step_accuracies = [], [], []
        for support_x, support_y, query_x, query_y in zip(*batch):
            trace = []
            for weights in self.adapt(support_x, support_y, training):
                if track_steps:
                    with torch.no_grad():  # for logging only: no graph kept
                        logits = self.predict_query(weights, support_x, query_x, batch_norm)
                        trace.append(accuracy(logits, query_y))
            logits = self.predict_query(weights, support_x, query_x, batch_norm)
            loss = F.cross_entropy(logits, query_y)
            if backward is not None:
                backward(loss / tasks)
                loss = loss.detach()
            losses.append(loss)
            accuracies.append(accuracy(logits.detach(), query_y))
            step_accuracies.append(torch.stack(trace) if trace else logits.new_empty(0))
        return EpisodeResults(
            torch.stack(losses).mean(),
            torch.stack(accuracies),
            torch.stack(step_accuracies).mean(0),
        )


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()
