"""Properties every learner must have, whatever its inner loop."""

import pytest
import torch

from fewshot.learners import plain_backward
from tests.conftest import LEARNER_NAMES, conv_episode, meta_batch, small


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_meta_gradient_reaches_every_initial_weight(name):
    learner, _ = small(name)
    meta_batch(learner, conv_episode(), training=True).loss.backward()
    for param_name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_evaluation_adapts_without_building_an_outer_graph(name):
    learner, yields = small(name)
    with torch.no_grad():  # as Lightning runs validation
        results = meta_batch(learner, conv_episode(), training=False, track_steps=True)
    assert not results.loss.requires_grad
    assert results.step_accuracy.shape == (yields,)  # before and after each inner step
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_adaptation_starts_from_the_backbones_weights(name):
    learner, _ = small(name)
    batch = conv_episode()
    first = next(learner.adapt(batch.support_x[0], batch.support_y[0], training=True))
    params = dict(learner.backbone.named_parameters())
    assert list(first) == list(params)
    for param_name, w in first.items():
        assert torch.equal(w, params[param_name]), param_name


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_adapted_weights_change_the_predictions(name):
    learner, _ = small(name)
    batch = conv_episode()
    *_, adapted = learner.adapt(batch.support_x[0], batch.support_y[0], training=False)
    with torch.no_grad():
        before = learner.backbone.forward_with(
            dict(learner.backbone.named_parameters()), batch.query_x[0]
        )
        after = learner.backbone.forward_with(adapted, batch.query_x[0])
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_backward_per_task_gives_the_meta_gradient_of_one_batched_backward(name):
    learner, _ = small(name)
    batch = conv_episode(tasks=3)
    batched = meta_batch(learner, batch, training=True)
    batched.loss.backward()
    expected = {n: p.grad.clone() for n, p in learner.named_parameters()}
    learner.zero_grad()
    per_task = meta_batch(learner, batch, training=True, backward=plain_backward)
    assert not per_task.loss.requires_grad  # the graphs are gone, the value is kept
    torch.testing.assert_close(per_task.loss, batched.loss.detach())
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
