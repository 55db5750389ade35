"""Update rules: what one inner step does with a task's gradients, as a pair of pure functions
over explicit state (the shape of optax's GradientTransformation)."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from fewshot.models.functional import Weights

State = Any  # a rule's own: None for a plain gradient step, gates and LSTM state for Meta-LSTM


class UpdateRule(Protocol):
    """`init(weights) -> state`, then per inner step `update(...) -> (weights, state)`.

    `weights` and `grads` hold only the parameters that adapt; `step` counts inner steps from 0
    (for rules with a setting per step); `loss` is the support loss the gradients are of, for
    rules that read it (as optax passes `value` to line searches). A rule with meta-parameters
    is an nn.Module, so the outer loop learns them with the initialisation. A rule that reads
    the loss says so with a class attribute `reads_loss = True` (tasks batched in lockstep sum
    their losses, so they cannot run it).
    """

    def init(self, weights: Weights) -> State: ...

    def update(
        self, grads: Weights, state: State, weights: Weights, step: int, loss: Tensor
    ) -> tuple[Weights, State]: ...


class GradientStep:
    """`w <- w - base_lr * grad`: MAML's inner step (Finn et al. 2017, Eq. 1)."""

    def __init__(self, base_lr: float) -> None:
        self.base_lr = base_lr

    def init(self, weights: Weights) -> None:
        return None

    def update(
        self, grads: Weights, state: None, weights: Weights, step: int, loss: Tensor
    ) -> tuple[Weights, None]:
        return {n: w - self.base_lr * grads[n] for n, w in weights.items()}, None
