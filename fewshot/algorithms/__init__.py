"""Meta-learning algorithms behind one interface: initial weights + support set -> task weights."""

from fewshot.algorithms.base import Algorithm, EpisodeResults, Weights, plain_backward
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.metalstm import MetaLSTM

ALGORITHMS: dict[str, type[Algorithm]] = {"maml": MAML, "metalstm": MetaLSTM}

__all__ = [
    "ALGORITHMS",
    "MAML",
    "Algorithm",
    "EpisodeResults",
    "MetaLSTM",
    "Weights",
    "plain_backward",
]
