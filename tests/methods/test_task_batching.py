"""The ways of running a meta-batch's tasks (a loop, one torch.func.vmap, grouped kernel calls in
lockstep) agree."""

import copy

import pytest
import torch

from fewshot.config import backbone_config
from fewshot.errors import ConfigError
from fewshot.methods import TaskLoop, plain_backward, task_scorer
from fewshot.methods.tasks import GroupedTasks
from fewshot.training.build import build_module
from tests.helpers import compose_train, conv_episode, meta_batch, small

SUPPORT_NORM = {"batch_norm_train": "support", "batch_norm_test": "support"}
# (batching, learner, settings): every batched way with the settings that change its path. vmap
# takes only the backbone's weights as meta-parameters; grouped also takes the others.
CASES = {
    "vmap": ("vmap", "maml", {}),
    "vmap-first-order": ("vmap", "maml", {"first_order": True}),
    "vmap-support-norm": ("vmap", "maml", SUPPORT_NORM),
    "vmap-first-order-support-norm": ("vmap", "maml", {"first_order": True, **SUPPORT_NORM}),
    "grouped": ("grouped", "maml", {}),
    "grouped-first-order": ("grouped", "maml", {"first_order": True}),
    "grouped-support-norm": ("grouped", "maml", SUPPORT_NORM),
    "grouped-checkpoint-inner": ("grouped", "maml", {"checkpoint_inner": True}),
    "grouped-anil": ("grouped", "anil", {}),
    "grouped-metasgd": ("grouped", "metasgd", {}),
    "grouped-mamlpp": ("grouped", "mamlpp", {}),  # multi-step loss, per-step norm shared
}
EVALUATION_CASES = ["vmap", "vmap-support-norm", "grouped", "grouped-support-norm"]


def twins(case: str) -> tuple[TaskLoop, object]:
    """The same float64 learner twice: its tasks in a loop, and batched the case's way."""
    batching, name, settings = CASES[case]
    learner, _ = small(name, **settings)
    learner.double()
    return TaskLoop(learner), task_scorer(copy.deepcopy(learner), batching)


def double_episodes(tasks: int):
    batch = conv_episode(tasks=tasks)
    return batch._replace(support_x=batch.support_x.double(), query_x=batch.query_x.double())


@pytest.mark.parametrize("case", CASES)
def test_batched_tasks_give_the_loops_meta_loss_and_meta_gradient(case):
    batch = double_episodes(tasks=3)
    results = []
    for tasks in twins(case):
        outcome = meta_batch(tasks, batch, True, track_steps=True, backward=plain_backward)
        results.append((outcome, {n: p.grad for n, p in tasks.learner.named_parameters()}))
    (loop, loop_grads), (batched, batched_grads) = results
    torch.testing.assert_close(batched.loss, loop.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(batched.accuracy, loop.accuracy)
    torch.testing.assert_close(batched.step_accuracy, loop.step_accuracy)
    assert len(loop.step_accuracy) == 3  # before + 2 inner steps: the traces were compared
    for name, grad in loop_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name  # a gradient that was compared
        torch.testing.assert_close(batched_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", EVALUATION_CASES)
def test_batched_evaluation_gives_the_loops_per_task_accuracy(case):
    batch = double_episodes(tasks=4)
    loop, batched = twins(case)
    with torch.no_grad():  # as Lightning runs validation: adaptation must still differentiate
        expected = meta_batch(loop, batch, training=False, track_steps=True)
        got = meta_batch(batched, batch, training=False, track_steps=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.accuracy, expected.accuracy)
    torch.testing.assert_close(got.step_accuracy, expected.step_accuracy)
    assert len(got.step_accuracy) == 4 and got.step_accuracy[-1] != got.step_accuracy[0]


@pytest.mark.parametrize("case", ["vmap", "grouped"])
def test_batched_tasks_hand_the_whole_meta_loss_to_one_backward(case):
    calls = []
    _, batched = twins(case)
    meta_batch(batched, double_episodes(3), True, backward=lambda loss, last: calls.append(last))
    assert calls == [True]  # under DDP: one all-reduce for the batch


def test_vmapped_tasks_build_a_backbone_that_auto_would_lay_out_channels_last_standard():
    cfg = compose_train("algo.task_batching=vmap", "data.image_size=84")
    assert cfg.backbone.channels_last == "auto"
    assert backbone_config(cfg).channels_last is False
    assert backbone_config(compose_train("data.image_size=84")).channels_last == "auto"


@pytest.mark.parametrize("algo", ["metasgd", "mamlpp"])
def test_vmapped_tasks_refuse_learners_with_meta_parameters_beside_the_backbones(algo):
    with pytest.raises(ConfigError, match="algo.task_batching=vmap cannot meta-learn rule.rates.0"):
        build_module(compose_train(f"algo={algo}", "algo.task_batching=vmap"))


def test_grouped_tasks_refuse_a_rule_that_reads_each_tasks_loss():
    with pytest.raises(ConfigError, match="algo.task_batching=grouped cannot run MetaLSTM"):
        GroupedTasks(small("metalstm")[0])
