"""Learners behind one interface: an update rule over explicit state, driven by one adapt loop
(learner.py); tasks scored in a loop or batched by vmap, evaluation optionally compiled
(tasks.py)."""

from fewshot.learners.learner import Learner
from fewshot.learners.tasks import (
    TASK_BATCHING,
    EpisodeResults,
    TaskLoop,
    VmappedTasks,
    plain_backward,
    run_tasks,
    task_scorer,
)

__all__ = [
    "TASK_BATCHING",
    "EpisodeResults",
    "Learner",
    "TaskLoop",
    "VmappedTasks",
    "plain_backward",
    "run_tasks",
    "task_scorer",
]
