"""torch.compile'd evaluation gives the eager evaluation's outcome and leaves training eager."""

import torch

from fewshot.algorithms import MAML
from fewshot.models.conv4 import Conv4
from tests.conftest import conv_episode


def maml() -> MAML:
    torch.manual_seed(0)
    backbone = Conv4(1, 12, num_classes=3, channels=4, padding=1, stride=1, pool=True, blocks=2)
    return MAML(backbone, 0.5, 1, 3, False, "transductive", "transductive")


def test_compiled_evaluation_scores_episodes_as_the_eager_one():
    eager, compiled = maml(), maml()
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
    assert got.step_accuracy[-1] != got.step_accuracy[0]  # adaptation ran
    # 2 tasks x 3 steps of compiled gradients; compiled logits for the 4 traced + 1 final scores
    assert calls.count("grad") == 6 and calls.count("logits") == 2 * 5


def test_compiled_evaluation_leaves_the_meta_gradient_eager():
    eager, compiled = maml(), maml()
    compiled.compile_evaluation()
    batch = conv_episode(tasks=2)
    for algorithm in (eager, compiled):
        algorithm(batch, training=True).loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
