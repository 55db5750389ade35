"""torch.compile'd evaluation gives the eager evaluation's outcome and leaves training eager."""

import pytest
import torch

from fewshot.methods import TaskLoop
from tests.helpers import LEARNER_NAMES, conv_episode, meta_batch, small

# Per task at evaluation: compiled inner gradients, and compiled logits for the scores traced
# before and after each update plus the final one.
COMPILED_CALLS = {"metalstm": (4, 5 + 1)} | dict.fromkeys(
    ("maml", "metasgd", "anil", "mamlpp"), (3, 4 + 1)
)


def twins(name: str) -> tuple[TaskLoop, TaskLoop]:
    """The same learner twice, its evaluation eager and compiled."""
    return TaskLoop(small(name)[0]), TaskLoop(small(name)[0], compiled=True)


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_compiled_evaluation_scores_episodes_as_the_eager_one(name, monkeypatch):
    calls, compiled_functions, compile_ = [], [], torch.compile

    def compile_and_count(fn, **options):  # count each call of what torch.compile returned
        compiled, index = compile_(fn, **options), len(compiled_functions)
        compiled_functions.append(fn)
        return lambda *args: calls.append(index) or compiled(*args)

    monkeypatch.setattr(torch, "compile", compile_and_count)
    eager, compiled = twins(name)
    batch = conv_episode(tasks=2)
    with torch.no_grad():  # as Lightning runs validation
        expected = meta_batch(eager, batch, training=False, track_steps=True)
        got = meta_batch(compiled, batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    gradients, logits = COMPILED_CALLS[name]
    assert len(compiled_functions) == 2  # the inner gradients, then the query logits
    assert calls.count(0) == 2 * gradients and calls.count(1) == 2 * logits


def test_compiled_inner_gradients_equal_the_eager_ones():
    eager, compiled = twins("maml")
    batch = conv_episode()
    weights = eager.learner.initial_weights(training=False)
    names = eager.learner.adapted
    with torch.no_grad():
        results = [
            tasks.eval_passes.loss_and_gradients(
                weights, batch.support_x[0], batch.support_y[0], False, names
            )
            for tasks in (eager, compiled)
        ]
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_compiled_evaluation_leaves_the_meta_gradient_eager(name):
    eager, compiled = twins(name)
    batch = conv_episode(tasks=2)
    for tasks in (eager, compiled):
        meta_batch(tasks, batch, training=True).loss.backward()
    for (name, a), b in zip(eager.learner.named_parameters(), compiled.learner.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
