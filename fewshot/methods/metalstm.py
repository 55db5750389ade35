"""Meta-LSTM: an LSTM whose cell state is the learner's parameters learns the update rule."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewshot.methods.gradient import GradientLearner
from fewshot.models.functional import FunctionalBackbone, Weights
from fewshot.models.hashing import content_key, mix
from fewshot.settings import BOOLEAN, Rule, int_at_least

PREPROCESS_P = 10.0  # Andrychowicz et al.'s p: gradients below e^-10 take the linear branch

# (c [P], f [P], i [P], layer 1's (h, cell) [P, hidden] each or None before the first step)
LSTMState = tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]


def flatten(weights: Weights) -> Tensor:
    """The tensors of `weights`, in the dict's order, as one vector [P]; the graph is kept."""
    return torch.cat([w.reshape(-1) for w in weights.values()])


def unflatten(vector: Tensor, like: Weights) -> Weights:
    """Views of `vector` [P] with the names and shapes of `like`; gradients flow to `vector`."""
    sizes = [w.numel() for w in like.values()]
    return {name: part.view_as(w) for (name, w), part in zip(like.items(), vector.split(sizes))}


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """[...] -> [..., 2]: (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x).

    Puts gradients and losses of very different magnitudes on one scale for the LSTM.

    References: Andrychowicz et al., "Learning to learn by gradient descent by gradient
    descent", NeurIPS 2016, Appendix A.
    """
    large = x.abs() >= math.exp(-p)
    # Clamped so that the branch torch.where discards never holds log(0) = -inf.
    magnitude = torch.where(large, x.abs().clamp_min(math.exp(-p)).log() / p, -1.0)
    direction = torch.where(large, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, direction], dim=-1)


def permutation(key: Tensor, pass_index: int, n: int) -> Tensor:
    """A permutation of range(n) [n] that is a function of `key` and `pass_index` alone."""
    ranks = torch.arange(n, device=key.device) + (key + pass_index * n)
    return mix(ranks).argsort()


class LSTMUpdate(nn.Module):
    """The meta-learner cell: `c_t = f_t * c_{t-1} - i_t * grad_t` over the flat parameters.

    Per coordinate, layer 1 (an LSTM, `hidden_size` units) reads the preprocessed loss and
    gradient (4 inputs); the gates are `sigmoid(W [h_t, c_{t-1}, gate_{t-1}] + b)`, with the
    previous gate's value as in the paper (the authors' code feeds its pre-activation). All
    weights are shared across coordinates. Forget-gate bias starts in [4, 6] and input-gate bias
    in [-5, -4], so adaptation starts as gradient descent with steps of about 0.01; the other
    weights start in [-0.01, 0.01] (the authors' code).
    """

    reads_loss = True  # the loss is one of each coordinate's inputs

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden_size)  # input: preprocessed (loss, gradient)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)  # [h_t, c_{t-1}, f_{t-1}] -> f_t
        self.input_gate = nn.Linear(hidden_size + 2, 1)  # [h_t, c_{t-1}, i_{t-1}] -> i_t
        for weight in (*self.lstm.parameters(), self.forget_gate.weight, self.input_gate.weight):
            nn.init.uniform_(weight, -0.01, 0.01)
        nn.init.uniform_(self.forget_gate.bias, 4.0, 6.0)
        nn.init.uniform_(self.input_gate.bias, -5.0, -4.0)

    def init(self, weights: Weights) -> LSTMState:
        c = flatten(weights)  # c_0 [P]: the learner's initial weights
        f = i = torch.zeros_like(c, requires_grad=False)  # f_0 = i_0 = 0 [P]
        return c, f, i, None

    def update(
        self, grads: Weights, state: LSTMState, weights: Weights, step: int, loss: Tensor
    ) -> tuple[Weights, LSTMState]:
        # The cell state is the flat parameter vector itself: `weights` are views of it.
        c, f, i, lstm_state = state
        grad = flatten(grads)
        features = torch.cat([preprocess(loss).expand(len(grad), 2), preprocess(grad)], dim=1)
        h, cell = self.lstm(features, lstm_state)  # [P, hidden] each
        f = torch.sigmoid(self.forget_gate(torch.cat([h, c[:, None], f[:, None]], 1))).squeeze(1)
        i = torch.sigmoid(self.input_gate(torch.cat([h, c[:, None], i[:, None]], 1))).squeeze(1)
        c = f * c - i * grad
        return unflatten(c, weights), (c, f, i, (h, cell))


class SupportMiniBatches:
    """The support batches of `epochs` passes: the whole set per update when `batch_size` >= the
    set; otherwise a permutation of the set split into ceil(n / batch_size) batches of near-equal
    size (no short remainder batch for batch norm to normalise poorly). The permutations are a
    function of the support images (`content_key`) and the epoch, computed on their device, so an
    episode adapts the same way every time it is seen, while different episodes get different
    orders."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def __call__(self, x: Tensor, y: Tensor, epochs: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(y)
        if self.batch_size >= n:
            for _ in range(epochs):
                yield x, y
            return
        key = content_key(x)
        count = math.ceil(n / self.batch_size)
        for epoch in range(epochs):
            for index in permutation(key, epoch, n).tensor_split(count):
                yield x[index], y[index]


class MetaLSTM(GradientLearner):
    """Learns the learner's update rule as the cell of a coordinate-wise, two-layer LSTM
    (`LSTMUpdate`), over `inner_epochs` passes of `SupportMiniBatches(inner_batch_size)`.

    `c_0` is the backbone's parameters, meta-learned unless `learn_init` is false. The
    learner's loss and gradient enter as data (computed with create_graph=False): no
    second-order term.

    References: Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017,
    Eqs. 2-4 (cell update, input and forget gates), Section 3.2 (parameter sharing and
    preprocessing), Algorithm 1 (training).
    """

    test_keys = ("inner_epochs", "inner_batch_size")
    settings: ClassVar[dict[str, Rule]] = {
        "hidden_size": int_at_least(1),
        "inner_epochs": int_at_least(1),
        "inner_batch_size": int_at_least(1),
        "learn_init": BOOLEAN,
        **GradientLearner.settings,
    }

    def __init__(
        self,
        backbone: FunctionalBackbone,
        hidden_size: int,
        inner_epochs: int,
        inner_batch_size: int,
        learn_init: bool,
        batch_norm_train: str,
        batch_norm_test: str,
    ) -> None:
        super().__init__(
            backbone,
            LSTMUpdate(hidden_size),
            inner_epochs,
            inner_epochs,
            False,
            batch_norm_train,
            batch_norm_test,
            adapted=tuple(name for name, _ in backbone.named_parameters()),
            support_batches=SupportMiniBatches(inner_batch_size),
        )
        # Frozen, c_0 stays the backbone's random initialisation: only the update rule learns.
        self.backbone.requires_grad_(learn_init)
