"""Properties every learner must have, whatever its inner loop; the contract a method fits."""

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.methods import plain_backward, run_tasks, task_scorer
from tests.helpers import LEARNER_NAMES, conv_episode, meta_batch, small, small_backbone
from tests.methods.nearest_centroid import NearestCentroid


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
def test_a_gradient_learners_adapted_weights_change_the_predictions(name):
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


def nearest_centroid() -> NearestCentroid:
    torch.manual_seed(0)
    return NearestCentroid(small_backbone(classes=3), way=3)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_a_method_written_on_the_contract_alone_meta_trains_and_scores(batching):
    """A metric method in one file (tests/methods/nearest_centroid.py) runs through the task
    scorers as the gradient methods do: the meta-gradient reaches its embedding, not the head
    it never uses, and evaluation scores its one set of weights."""
    learner = nearest_centroid()
    tasks = task_scorer(learner, batching)
    run_tasks(tasks, conv_episode(), training=True, backward=plain_backward)
    for name, p in learner.named_parameters():
        if name.startswith("backbone.head."):  # vmap's meta-gradient holds zeros for it
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        results = run_tasks(tasks, conv_episode(), training=False, track_steps=True)
    assert results.accuracy.shape == (2,) and results.step_accuracy.shape == (1,)


def test_the_contracts_logits_are_the_methods_own_on_one_task():
    learner = nearest_centroid()
    batch = conv_episode()
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    weights = dict(learner.backbone.named_parameters())
    embed = learner.backbone.embed_with
    centroids = torch.stack([embed(weights, sx)[sy == c].mean(0) for c in range(3)])
    expected = -(torch.cdist(embed(weights, qx), centroids) ** 2)
    with torch.no_grad():
        torch.testing.assert_close(learner.logits(sx, sy, qx), expected, rtol=1e-4, atol=1e-4)


def test_grouped_batching_refuses_a_method_that_cannot_run_in_lockstep():
    with pytest.raises(ConfigError, match="algo.task_batching=grouped cannot run NearestCentroid"):
        task_scorer(nearest_centroid(), "grouped")
