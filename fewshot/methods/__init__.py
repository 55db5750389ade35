"""Few-shot methods behind one contract (learner.py: a task's support set and query images in,
query logits out); gradient-based ones share an update rule over explicit state driven by one
adapt loop (gradient.py); tasks scored in a loop, batched by vmap or grouped in lockstep,
evaluation optionally compiled (tasks.py)."""

from fewshot.methods.learner import Learner
from fewshot.methods.tasks import (
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
