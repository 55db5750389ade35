"""Properties every algorithm must have, whatever its inner loop."""

import pytest
import torch

from fewshot.algorithms import MAML, Algorithm, MetaLSTM, plain_backward
from fewshot.models.conv4 import Conv4
from tests.conftest import conv_episode

TRANSDUCTIVE = {"batch_norm_train": "transductive", "batch_norm_test": "transductive"}


def small(name: str) -> tuple[Algorithm, int]:
    """A small instance and the number of weights its `adapt` yields at evaluation."""
    torch.manual_seed(0)
    backbone = Conv4(1, 12, num_classes=3, channels=4, padding=1, stride=1, pool=True, blocks=2)
    if name == "maml":
        settings = {"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3, "first_order": False}
        return MAML(backbone, **settings, **TRANSDUCTIVE), 1 + 3
    settings = {"hidden_size": 20, "inner_epochs": 2, "inner_batch_size": 4, "learn_init": True}
    return MetaLSTM(backbone, **settings, **TRANSDUCTIVE), 1 + 2 * 2  # 6 support images


ALGORITHM_NAMES = ["maml", "metalstm"]


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_meta_gradient_reaches_every_initial_weight(name):
    algorithm, _ = small(name)
    algorithm(conv_episode(), training=True).loss.backward()
    for param_name, p in algorithm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_evaluation_adapts_without_building_an_outer_graph(name):
    algorithm, yields = small(name)
    with torch.no_grad():  # as Lightning runs validation
        results = algorithm(conv_episode(), training=False, track_steps=True)
    assert not results.loss.requires_grad
    assert results.step_accuracy.shape == (yields,)  # before and after each inner step
    assert all(p.grad is None for p in algorithm.parameters())


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_adaptation_starts_from_the_backbones_weights(name):
    algorithm, _ = small(name)
    batch = conv_episode()
    first = next(algorithm.adapt(batch.support_x[0], batch.support_y[0], training=True))
    params = dict(algorithm.backbone.named_parameters())
    assert list(first) == list(params)
    for param_name, w in first.items():
        assert torch.equal(w, params[param_name]), param_name


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_adapted_weights_change_the_predictions(name):
    algorithm, _ = small(name)
    batch = conv_episode()
    *_, adapted = algorithm.adapt(batch.support_x[0], batch.support_y[0], training=False)
    with torch.no_grad():
        before = algorithm.predict(dict(algorithm.backbone.named_parameters()), batch.query_x[0])
        after = algorithm.predict(adapted, batch.query_x[0])
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_backward_per_task_gives_the_meta_gradient_of_one_batched_backward(name):
    algorithm, _ = small(name)
    batch = conv_episode(tasks=3)
    batched = algorithm(batch, training=True)
    batched.loss.backward()
    expected = {n: p.grad.clone() for n, p in algorithm.named_parameters()}
    algorithm.zero_grad()
    per_task = algorithm(batch, training=True, backward=plain_backward)
    assert not per_task.loss.requires_grad  # the graphs are gone, the value is kept
    torch.testing.assert_close(per_task.loss, batched.loss.detach())
    for n, p in algorithm.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
