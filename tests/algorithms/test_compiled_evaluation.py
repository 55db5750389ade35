"""torch.compile'd evaluation gives the eager evaluation's outcome and leaves training eager."""

import pytest
import torch

from tests.algorithms.test_interface import ALGORITHM_NAMES, small
from tests.conftest import conv_episode

# Per task at evaluation: compiled inner gradients, and compiled logits for the scores traced
# before and after each update plus the final one.
COMPILED_CALLS = {"maml": (3, 4 + 1), "metalstm": (4, 5 + 1)}


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_compiled_evaluation_scores_episodes_as_the_eager_one(name):
    (eager, _), (compiled, _) = small(name), small(name)
    compiled.compile_evaluation()
    calls = []

    def spy(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    compiled._compiled = tuple(spy(n, f) for n, f in zip(("grad", "logits"), compiled._compiled))
    batch = conv_episode(tasks=2)
    with torch.no_grad():  # as Lightning runs validation
        expected = eager(batch, training=False, track_steps=True)
        got = compiled(batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    gradients, logits = COMPILED_CALLS[name]
    assert calls.count("grad") == 2 * gradients and calls.count("logits") == 2 * logits


def test_compiled_inner_gradients_equal_the_eager_ones():
    (eager, _), (compiled, _) = small("maml"), small("maml")
    compiled.compile_evaluation()
    batch = conv_episode()
    weights = {n: w.detach() for n, w in eager.backbone.named_parameters()}
    with torch.no_grad():
        results = [
            a.support_loss_and_gradients(weights, batch.support_x[0], batch.support_y[0], False)
            for a in (eager, compiled)
        ]
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ALGORITHM_NAMES)
def test_compiled_evaluation_leaves_the_meta_gradient_eager(name):
    (eager, _), (compiled, _) = small(name), small(name)
    compiled.compile_evaluation()
    batch = conv_episode(tasks=2)
    for algorithm in (eager, compiled):
        algorithm(batch, training=True).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
