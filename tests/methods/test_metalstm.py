"""Meta-LSTM's update against gradient descent and by hand, its batches, and its meta-gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data.episodes import Episodes
from fewshot.methods.metalstm import (
    MetaLSTM,
    SupportMiniBatches,
    flatten,
    permutation,
    preprocess,
    unflatten,
)
from fewshot.models.conv4 import Conv4
from fewshot.models.hashing import content_key
from tests.helpers import (
    TRANSDUCTIVE,
    FunctionalLinear,
    make_learner,
    meta_batch,
    small_backbone,
)

ALPHA = 0.3


def linear_task(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx, qx = (
        torch.randn(6, 3, generator=g, dtype=dtype),
        torch.randn(8, 3, generator=g, dtype=dtype),
    )
    sy, qy = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (8,), generator=g)
    return sx, sy, qx, qy


def metalstm(backbone: nn.Module, epochs: int = 1, batch: int = 100, learn_init=True) -> MetaLSTM:
    settings = {"inner_epochs": epochs, "inner_batch_size": batch, "learn_init": learn_init}
    return make_learner("metalstm", backbone, **settings, **TRANSDUCTIVE)


def fix_gates(learner: MetaLSTM, forget: float, input_: float) -> None:
    """Gates that ignore their inputs: sigmoid(bias) = forget and input_ exactly."""
    with torch.no_grad():
        for gate, value in ((learner.rule.forget_gate, forget), (learner.rule.input_gate, input_)):
            gate.weight.zero_()
            # sigmoid(1e4) is 1.0 in floating point; otherwise the logit of the value.
            gate.bias.fill_(1e4 if value == 1 else math.log(value / (1 - value)))


def test_preprocessing_matches_hand_computed_values_on_both_branches():
    x = torch.tensor([1.0, -0.5, 100.0, 1e-4, 1e-5, -2e-5, 0.0], dtype=torch.float64)
    expected = torch.tensor(
        [
            [0.0, 1.0],  # log(1) / 10, sign
            [-0.06931471805599453, -1.0],  # log(0.5) / 10
            [0.46051701859880914, 1.0],  # log(100) / 10
            [-0.9210340371976183, 1.0],  # 1e-4 >= e^-10 = 4.54e-5: log(1e-4) / 10
            [-1.0, 0.22026465794806718],  # 1e-5 < e^-10: (-1, e^10 * 1e-5)
            [-1.0, -0.44052931589613436],
            [-1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(preprocess(x), expected, rtol=1e-12, atol=1e-12)


def test_flatten_and_unflatten_round_trip_and_keep_the_graph():
    weights = dict(
        Conv4(1, 8, 3, channels=2, padding=1, stride=1, pool=True, blocks=2).named_parameters()
    )
    vector = flatten(weights)
    assert vector.shape == (sum(w.numel() for w in weights.values()),)
    back = unflatten(vector, weights)
    assert list(back) == list(weights)
    for name, w in weights.items():
        assert torch.equal(back[name], w)
    back["head.bias"].sum().backward()
    assert weights["head.bias"].grad is not None and weights["head.weight"].grad.abs().sum() == 0


@pytest.mark.parametrize("forget", [1.0, 0.5])
def test_one_step_with_fixed_gates_is_a_gradient_step_with_decay(forget):
    """Forget gate 1 and input gate alpha: one SGD step of size alpha; forget < 1 shrinks."""
    sx, sy, _, _ = linear_task()
    backbone = FunctionalLinear(3, 2, bias=False).double()
    learner = metalstm(backbone).double()
    fix_gates(learner, forget, ALPHA)
    before, after = learner.adapt(sx, sy, training=True)

    W = backbone.weight.detach()
    p = torch.softmax(sx @ W.T, dim=1)
    grad = (p - F.one_hot(sy, 2).double()).T @ sx / len(sx)  # of mean cross-entropy, by hand
    torch.testing.assert_close(before["weight"], W, rtol=0, atol=0)
    torch.testing.assert_close(after["weight"], forget * W - ALPHA * grad, rtol=1e-12, atol=1e-14)


def test_with_gates_fixed_several_epochs_follow_mamls_gradient_steps():
    torch.manual_seed(0)
    backbone = small_backbone().double()
    learner = metalstm(backbone, epochs=3).double()
    fix_gates(learner, 1.0, ALPHA)
    steps = {"inner_steps": 3, "inner_steps_test": 3}
    maml = make_learner("maml", backbone, base_lr=ALPHA, **steps, **TRANSDUCTIVE)
    x, y = torch.rand(6, 1, 12, 12, dtype=torch.float64), torch.arange(3).repeat(2)
    for ours, theirs in zip(learner.adapt(x, y, False), maml.adapt(x, y, False), strict=True):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12)


def test_with_gates_fixed_the_meta_gradient_is_first_order_mamls():
    """The learner's gradient enters as data: no second-order term reaches c_0."""
    sx, sy, qx, qy = linear_task()
    batch = Episodes(sx[None], sy[None], qx[None], qy[None])
    grads = []
    for name in ("maml", "metalstm"):
        torch.manual_seed(0)
        backbone = FunctionalLinear(3, 2).double()
        if name == "maml":
            steps = {"inner_steps": 1, "inner_steps_test": 1, "first_order": True}
            learner = make_learner("maml", backbone, base_lr=ALPHA, **steps, **TRANSDUCTIVE)
        else:
            learner = metalstm(backbone).double()
            fix_gates(learner, 1.0, ALPHA)
        meta_batch(learner, batch, training=True).loss.backward()
        grads.append(backbone.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def conv_episode(way=3, shot=2, query=4):
    torch.manual_seed(0)
    x = torch.rand(1, way * (shot + query), 1, 12, 12)
    labels = torch.arange(way)
    return Episodes(
        x[:, : way * shot],
        labels.repeat_interleave(shot)[None],
        x[:, way * shot :],
        labels.repeat_interleave(query)[None],
    )


def small_metalstm(epochs=2, batch=100, learn_init=True) -> MetaLSTM:
    torch.manual_seed(0)
    return metalstm(small_backbone(), epochs, batch, learn_init)


@pytest.mark.parametrize("learn_init", [True, False])
def test_meta_gradient_reaches_the_lstm_and_c0_only_when_init_is_learned(learn_init):
    learner = small_metalstm(learn_init=learn_init)
    meta_batch(learner, conv_episode(), training=True).loss.backward()
    for name, p in learner.named_parameters():
        if name.startswith("backbone."):
            assert (p.grad is not None) == learn_init, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gate_biases_start_as_small_step_gradient_descent():
    learner = small_metalstm()
    assert 4 <= learner.rule.forget_gate.bias.item() <= 6
    assert -5 <= learner.rule.input_gate.bias.item() <= -4


def separable_task(n_per_class=10):
    """Two classes of 8x8 images told apart by which half is bright."""
    g = torch.Generator().manual_seed(1)
    x = 0.1 * torch.rand(2 * n_per_class, 1, 8, 8, generator=g)
    x[:n_per_class, :, :4] += 0.9
    x[n_per_class:, :, 4:] += 0.9
    return x, torch.arange(2).repeat_interleave(n_per_class)


def test_adaptation_lowers_the_support_loss_on_a_separable_task():
    torch.manual_seed(0)
    backbone = Conv4(1, 8, num_classes=2, channels=4, padding=1, stride=1, pool=True, blocks=2)
    learner = metalstm(backbone, epochs=12, batch=5)
    x, y = separable_task()
    losses = [
        F.cross_entropy(learner.backbone.forward_with(w, x), y).item()
        for w in learner.adapt(x, y, training=False)
    ]
    assert len(losses) == 1 + 12 * 4
    assert losses[-1] < 0.9 * losses[0]


def test_a_support_set_within_one_batch_is_used_whole_every_epoch():
    x, y = separable_task(3)
    batches = list(SupportMiniBatches(6)(x, y, 4))
    assert len(batches) == 4 and all(torch.equal(bx, x) for bx, _ in batches)


def test_smaller_batches_cover_the_support_set_once_per_epoch_in_a_reproducible_order():
    x, y = separable_task(5)  # 10 images, batches of at most 4: 3 batches of 4, 3, 3
    support_batches = SupportMiniBatches(4)
    batches = list(support_batches(x, y, 3))
    assert [len(by) for _, by in batches] == [4, 3, 3] * 3
    epochs = [torch.cat([bx for bx, _ in batches[3 * e : 3 * e + 3]]) for e in range(3)]
    for images in epochs:  # every image exactly once per epoch
        key = lambda t: t.flatten(1).sum(1).sort().values  # noqa: E731
        torch.testing.assert_close(key(images), key(x))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    again = list(support_batches(x, y, 3))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again))
    other = list(support_batches(x.flip(0), y.flip(0), 3))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, other))


def test_frozen_init_leaves_the_backbone_out_of_the_meta_parameters():
    learner = small_metalstm(learn_init=False)
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)


def test_the_batch_order_key_depends_on_the_images_not_their_float_type():
    x, _ = separable_task(5)
    assert content_key(x) == content_key(x.double()) == content_key(x.clone())
    assert content_key(x) != content_key(x.flip(0))
    orders = [permutation(content_key(x), epoch, 10) for epoch in range(3)]
    assert all(sorted(o.tolist()) == list(range(10)) for o in orders)
    assert not torch.equal(orders[0], orders[1])
