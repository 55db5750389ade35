"""Meta-LSTM: an LSTM whose cell state is the learner's parameters learns the update rule."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fewshot.algorithms.base import Algorithm, Weights

PREPROCESS_P = 10.0  # Andrychowicz et al.'s p: gradients below e^-10 take the linear branch


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


def content_seed(x: Tensor) -> int:
    """A seed from the bytes of images in [0, 1]: the same images give it on any device."""
    pixels = (x.detach() * 255).round().to(torch.uint8).cpu().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(pixels).digest()[:8], "little") >> 1


class MetaLSTM(Algorithm):
    """Learns the learner's update rule as the cell of a coordinate-wise, two-layer LSTM.

    The learner's flat parameter vector is the cell state: `c_t = f_t * c_{t-1} - i_t * grad_t`,
    where `grad_t` is the gradient of the support loss on a batch at `c_{t-1}`. Per coordinate,
    layer 1 (an LSTM, `hidden_size` units) reads the preprocessed loss and gradient (4 inputs);
    the gates are `sigmoid(W [h_t, c_{t-1}, gate_{t-1}] + b)`, with the previous gate's value as
    in the paper (the authors' code feeds its pre-activation). All weights are shared across
    coordinates. `c_0` is the backbone's parameters, meta-learned unless `learn_init` is false.
    Forget-gate bias starts in [4, 6] and input-gate bias in [-5, -4], so adaptation starts as
    gradient descent with steps of about 0.01; the other meta-learner weights start in
    [-0.01, 0.01] (the authors' code). The learner's loss and gradient enter as data (computed
    with create_graph=False and detached): no second-order term.

    Batches: each of `inner_epochs` passes over the support set is one batch holding the whole
    set when `inner_batch_size` >= way*shot (the paper's settings); otherwise a permutation of
    the support set is split into ceil(way*shot / inner_batch_size) batches of near-equal size
    (no short remainder batch for batch norm to normalise poorly). The permutations come from a generator
    seeded by the support images' bytes, so an episode adapts the same way every time it is
    seen, while different episodes get different orders.

    References: Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017,
    Eqs. 2-4 (cell update, input and forget gates), Section 3.2 (parameter sharing and
    preprocessing), Algorithm 1 (training).
    """

    test_keys = ("inner_epochs", "inner_batch_size")

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        inner_epochs: int,
        inner_batch_size: int,
        learn_init: bool,
        batch_norm_train: str,
        batch_norm_test: str,
    ) -> None:
        super().__init__(backbone, batch_norm_train, batch_norm_test)
        self.inner_epochs, self.inner_batch_size = inner_epochs, inner_batch_size
        self.lstm = nn.LSTMCell(4, hidden_size)  # input: preprocessed (loss, gradient)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)  # [h_t, c_{t-1}, f_{t-1}] -> f_t
        self.input_gate = nn.Linear(hidden_size + 2, 1)  # [h_t, c_{t-1}, i_{t-1}] -> i_t
        for weight in (*self.lstm.parameters(), self.forget_gate.weight, self.input_gate.weight):
            nn.init.uniform_(weight, -0.01, 0.01)
        nn.init.uniform_(self.forget_gate.bias, 4.0, 6.0)
        nn.init.uniform_(self.input_gate.bias, -5.0, -4.0)
        # Frozen, c_0 stays the backbone's random initialisation: only the update rule learns.
        self.backbone.requires_grad_(learn_init)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, training: bool, start: Weights | None = None
    ) -> Iterator[Weights]:
        start = self.initial_weights(training, start)
        c = flatten(start)  # c_0 [P]
        yield unflatten(c, start)
        f = i = torch.zeros_like(c, requires_grad=False)  # f_0 = i_0 = 0 [P]
        state = None  # layer 1's (h, cell) [P, hidden]
        for x, y in self.batches(support_x, support_y):
            # The learner's loss and gradient enter the update as data: no second-order term.
            loss, grads = self.support_loss_and_gradients(
                unflatten(c.detach(), start), x, y, create_graph=False
            )
            grad = flatten(grads)
            # At evaluation the update builds no graph: nothing is differentiated through it.
            with torch.set_grad_enabled(training):
                c, f, i, state = self.step(c, grad, loss, f, i, state)
            yield unflatten(c, start)

    def batches(self, support_x: Tensor, support_y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The support batches of every inner epoch, in order (see the class docstring)."""
        n = len(support_y)
        if self.inner_batch_size >= n:
            for _ in range(self.inner_epochs):
                yield support_x, support_y
            return
        generator = torch.Generator().manual_seed(content_seed(support_x))
        count = math.ceil(n / self.inner_batch_size)
        for _ in range(self.inner_epochs):
            order = torch.randperm(n, generator=generator).to(support_y.device)
            for index in order.tensor_split(count):
                yield support_x[index], support_y[index]

    def step(
        self,
        c: Tensor,
        grad: Tensor,
        loss: Tensor,
        f: Tensor,
        i: Tensor,
        state: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """One update of the parameters c [P] from the gradient [P] and loss [], given the previous
        forget and input gates f, i [P]; returns the new c, f, i and layer-1 state."""
        features = torch.cat([preprocess(loss).expand(len(grad), 2), preprocess(grad)], dim=1)
        h, cell = self.lstm(features, state)  # [P, hidden] each
        f = torch.sigmoid(self.forget_gate(torch.cat([h, c[:, None], f[:, None]], 1))).squeeze(1)
        i = torch.sigmoid(self.input_gate(torch.cat([h, c[:, None], i[:, None]], 1))).squeeze(1)
        return f * c - i * grad, f, i, (h, cell)
