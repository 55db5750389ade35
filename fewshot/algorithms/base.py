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

    def __init__(
        self,
        backbone: nn.Module,
        batch_norm_train: str,
        batch_norm_test: str,
        vmap_tasks: bool = False,
    ) -> None:
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
        self.vmap_tasks = vmap_tasks
        if vmap_tasks and getattr(backbone, "channels_last", False):
            # vmap cannot lay out batched tensors channels-last; an explicit
            # backbone.channels_last=true with vmap_tasks is refused by check_config.
            backbone.channels_last = False
        # Passed for the buffers, None makes batch norm normalise with the batch's own statistics
        # and record none: nothing to copy, nothing written.
        self._no_buffers = {name: None for name, _ in backbone.named_buffers()}
        self._compiled: tuple[Callable, Callable] | None = None  # see compile_evaluation

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
    def adapt(
        self, support_x: Tensor, support_y: Tensor, training: bool, start: Weights | None = None
    ) -> Iterator[Weights]:
        """Yield the task's weights before adaptation and after every inner step.

        support_x [way*shot, C, H, W], support_y [way*shot]; `start`: the initial weights, the
        backbone's when None. When `training`, the last weights carry the graph back to the
        meta-parameters; otherwise nothing does.
        """

    def initial_weights(self, training: bool, start: Weights | None = None) -> Weights:
        weights = dict(self.backbone.named_parameters()) if start is None else start
        if training:
            return weights
        # Evaluation differentiates only the inner loop, from constants.
        return {name: w.detach() for name, w in weights.items()}

    def compile_evaluation(self) -> None:
        """torch.compile the passes that evaluation runs without any graph: the inner loop's
        gradients and the query's logits. Measured on a 1-thread CPU: MAML test episodes
        1.1-1.4x faster (Omniglot and Mini-ImageNet) after 3-20 s of compiling per shape;
        Meta-LSTM's 1.3x slower (its 84 px learner gradients)."""
        self._compiled = (
            torch.compile(torch.func.grad_and_value(self.support_loss), dynamic=False),
            torch.compile(self._logits, dynamic=False),
        )

    def _logits(self, weights: Weights, x: Tensor) -> Tensor:
        return self.run_backbone(weights, self._no_buffers, x)

    def run_backbone(
        self, weights: Weights, buffers: dict[str, Tensor | None], x: Tensor
    ) -> Tensor:
        """The backbone's forward pass on `weights` and `buffers` instead of its own: by its
        `forward_with` where it has one (Conv4), else by torch.func.functional_call."""
        forward_with = getattr(self.backbone, "forward_with", None)
        if forward_with is not None:
            return forward_with(weights, buffers, x)
        return functional_call(self.backbone, (weights, buffers), (x,))

    def _compiled_applies(self, weights: Weights) -> bool:
        # Only in evaluation: no graph wanted (Lightning validates and tests under no_grad) and
        # weights that carry none. Training stays eager, Meta-LSTM's data-only gradients too.
        return (
            self._compiled is not None
            and not torch.is_grad_enabled()
            and not any(w.requires_grad for w in weights.values())
        )

    def predict(self, weights: Weights, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, way] logits on `weights`, batch norm using the statistics of `x`."""
        self._batch_norm_mode(training=True)
        if self._compiled_applies(weights):
            return self._compiled[1](weights, x)
        return self._logits(weights, x)

    def support_loss(self, weights: Weights, x: Tensor, y: Tensor) -> Tensor:
        """The learner's cross-entropy on a support batch x [N, C, H, W], y [N]."""
        return F.cross_entropy(self.predict(weights, x), y)

    def support_gradients(
        self, weights: Weights, x: Tensor, y: Tensor, create_graph: bool
    ) -> Weights:
        """The gradient of `support_loss` at `weights`; with `create_graph`, differentiable."""
        return self.support_loss_and_gradients(weights, x, y, create_graph)[1]

    def support_loss_and_gradients(
        self, weights: Weights, x: Tensor, y: Tensor, create_graph: bool
    ) -> tuple[Tensor, Weights]:
        """`support_loss` at `weights` (detached) and its gradient, differentiable with
        `create_graph`.

        torch.func.grad under vmap (torch.autograd.grad cannot see per-task gradients there);
        torch.autograd.grad otherwise, which measured 5-10% faster per task on CPU.
        """
        if self._compiled_applies(weights) and not self.vmap_tasks:
            self._batch_norm_mode(training=True)
            grads, loss = self._compiled[0](weights, x, y)
            return loss, grads
        if self.vmap_tasks:
            grads, loss = torch.func.grad_and_value(self.support_loss)(weights, x, y)
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            return loss.detach(), grads
        with torch.enable_grad():
            # Weights that carry no graph (at evaluation) become leaves to differentiate.
            weights = {
                n: w if w.requires_grad else w.detach().requires_grad_() for n, w in weights.items()
            }
            loss = self.support_loss(weights, x, y)
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
        return loss.detach(), dict(zip(weights, grads))

    def predict_query(
        self,
        weights: Weights,
        support_x: Tensor,
        query_x: Tensor,
        batch_norm: str,
        buffers: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """[way*query, way] logits of the query set under the given batch-norm mode.

        `buffers` are the initial batch-norm buffers to copy (the backbone's when None; under
        vmap, per-task copies, since batched statistics cannot be written into shared ones).
        """
        if batch_norm == "transductive":
            return self.predict(weights, query_x)
        # One pass over the support set fills fresh buffers with its statistics (the backbone's
        # batch norm keeps the last batch's); the query set is then normalised with them. Fresh
        # buffers per episode: nothing leaks between episodes.
        buffers = {
            name: b.clone() for name, b in (buffers or dict(self.backbone.named_buffers())).items()
        }
        self._batch_norm_mode(training=True)
        with torch.no_grad():
            self.run_backbone(weights, buffers, support_x)
        self._batch_norm_mode(training=False)
        return self.run_backbone(weights, buffers, query_x)

    def _batch_norm_mode(self, training: bool) -> None:
        # train() walks every submodule on every call (a hot path: once per forward pass);
        # the backbone's own flag says whether the walk is needed.
        if self.backbone.training != training:
            self.backbone.train(training)

    def forward(
        self,
        batch: Episodes,
        training: bool,
        track_steps: bool = False,
        backward: Callable[[Tensor, bool], None] | None = None,
    ) -> EpisodeResults:
        """Adapt to every task of `batch` and score its query set (see `Episodes` for shapes).

        With `backward`, the meta-loss is handed to `backward(loss_share, last)` as soon as it
        exists, and the returned loss is detached. Task by task (the default) each task's share
        (its loss / tasks) goes as soon as the task is done, so one task's graph is alive at a
        time: memory stays flat in the number of tasks. With `vmap_tasks` all tasks run as one
        batched computation (torch.func.vmap) and the mean loss goes at once.
        """
        if self.vmap_tasks:
            return self._forward_batched(batch, training, track_steps, backward)
        tasks = len(batch.query_y)
        losses, accuracies, step_accuracies = [], [], []
        for index, episode in enumerate(zip(*batch)):
            loss, acc, trace = self.score_task(None, *episode, training, track_steps)
            if backward is not None:
                backward(loss / tasks, index == tasks - 1)
                loss = loss.detach()
            losses.append(loss)
            accuracies.append(acc)
            step_accuracies.append(trace)
        return EpisodeResults(
            torch.stack(losses).mean(),
            torch.stack(accuracies),
            torch.stack(step_accuracies).mean(0),
        )

    def _forward_batched(
        self,
        batch: Episodes,
        training: bool,
        track_steps: bool,
        backward: Callable[[Tensor, bool], None] | None,
    ) -> EpisodeResults:
        tasks = len(batch.query_y)
        buffers = {n: b.expand(tasks, *b.shape) for n, b in self.backbone.named_buffers()}
        start = self.initial_weights(training)

        def task(start: Weights, buffers: dict[str, Tensor], *episode: Tensor):
            loss, accuracy, trace = self.score_task(buffers, *episode, training, track_steps, start)
            return loss, (loss.detach(), accuracy, trace)

        per_task = (None, 0, 0, 0, 0, 0)  # the meta-parameters are shared, the rest is per task
        if not training:
            _, (losses, accuracies, traces) = torch.func.vmap(task, per_task)(
                start, buffers, *batch
            )
            return EpisodeResults(losses.mean(), accuracies, traces.mean(0))
        # The meta-gradient is taken with torch.func.grad too, not by a backward pass through
        # the vmapped graph: with batch norm inside, that one is wrong (torch 2.15; the test of
        # this path catches it), while grad of the vmapped second-order loop is right.
        meta_grad = torch.func.vmap(torch.func.grad(task, has_aux=True), per_task)
        constants = {n: w.detach() for n, w in start.items()}  # no graph beside func.grad's
        grads, (losses, accuracies, traces) = meta_grad(constants, buffers, *batch)
        # A loss whose gradient is the mean of the tasks' meta-gradients, so that the caller's
        # backward (DDP's all-reduce, gradient clipping, the optimiser) works as with the loop.
        surrogate = sum((w * grads[n].mean(0)).sum() for n, w in start.items())
        loss = losses.mean()
        if backward is not None:
            backward(surrogate, True)
        else:
            loss = loss + (surrogate - surrogate.detach())  # same value, same gradient
        return EpisodeResults(loss, accuracies, traces.mean(0))

    def score_task(
        self,
        buffers: dict[str, Tensor] | None,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        training: bool,
        track_steps: bool,
        start: Weights | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adapt to one task from `start` (the backbone's weights when None) and score its query
        set: loss [], accuracy [], and the accuracy before and after each inner step [steps + 1]
        (empty unless `track_steps`)."""
        batch_norm = self.batch_norm_train if training else self.batch_norm_test
        trace = []
        for weights in self.adapt(support_x, support_y, training, start):
            if track_steps:
                with torch.no_grad():  # for logging only: no graph kept
                    logits = self.predict_query(weights, support_x, query_x, batch_norm, buffers)
                    trace.append(accuracy(logits, query_y))
        logits = self.predict_query(weights, support_x, query_x, batch_norm, buffers)
        step_accuracy = torch.stack(trace) if trace else logits.new_empty(0)
        return F.cross_entropy(logits, query_y), accuracy(logits.detach(), query_y), step_accuracy


def plain_backward(loss: Tensor, last: bool) -> None:
    """`Algorithm.forward`'s backward outside a Trainer: accumulate every share's gradient."""
    loss.backward()


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()
