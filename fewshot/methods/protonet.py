"""Prototypical Networks: a class's prototype is the mean embedding of its support images, and a
query's logits are its negative squared Euclidean distances to the prototypes. No inner loop."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from fewshot.methods.learner import BATCH_NORM_SETTINGS, Learner
from fewshot.methods.passes import EagerPasses
from fewshot.models.functional import FunctionalBackbone, Weights
from fewshot.settings import Rule


def prototypes(support: Tensor, labels: Tensor, way: int) -> Tensor:
    """Each class's mean embedding [..., way, features] of support [..., n, features] with
    labels [..., n] in 0..way-1 (Eq. 1). The one-hot is `way` wide whatever the labels hold:
    no read of their values, so vmap batches it."""
    classes = torch.arange(way, device=labels.device)
    members = (labels[..., None] == classes).to(support.dtype)  # [..., n, way]
    return members.transpose(-1, -2) @ support / members.sum(-2)[..., None]


def squared_distances(query: Tensor, centres: Tensor) -> Tensor:
    """||q - c||^2 [..., q, way] of query [..., q, features] to centres [..., way, features],
    as differences (the authors' code): no cancellation, as ||q||^2 - 2 q.c + ||c||^2 has."""
    return (query[..., :, None, :] - centres[..., None, :, :]).pow(2).sum(-1)


class ProtoNet(Learner):
    """Meta-learns an embedding (the backbone's output before its head, which it never uses) in
    which a query lies nearest the mean of its class's support images.

    `adapt` is the contract's own: the backbone's weights, once. `way` and `train_way` are the
    one-hot widths of evaluation's and meta-training's tasks; no weight is sized by them
    (`any_way`), so a checkpoint scores tasks of any way and meta-training may draw more classes
    per task than the test (the paper's 60-way Omniglot episodes): train.py gives both from the
    run's `way` and `train_way`, evaluate.py the way it tests.

    `batch_norm_train` / `batch_norm_test`: `transductive` embeds the support set and the query
    set each with its own batch statistics (the query's prediction then depends on the other
    queries); `support` embeds both with the support set's statistics, so that each query is
    scored on its own. fewshot keeps no running statistics (the paper's code tests with those).
    Support statistics enter as constants, not differentiated (as GradientLearner's); a batch's
    own statistics are differentiated, as batch norm trains.

    References: Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS
    2017, Eqs. 1-2 and Algorithm 1 (squared Euclidean distance).
    """

    any_way: ClassVar[bool] = True
    settings: ClassVar[dict[str, Rule]] = dict(BATCH_NORM_SETTINGS)

    def __init__(
        self,
        backbone: FunctionalBackbone,
        batch_norm_train: str,
        batch_norm_test: str,
        *,
        way: int,
        train_way: int | None = None,
    ) -> None:
        super().__init__(backbone)
        self.batch_norm_train, self.batch_norm_test = batch_norm_train, batch_norm_test
        self.way = way
        self.train_way = way if train_way is None else train_way

    @property
    def lockstep(self) -> bool:
        # Not grouped: the grouped passes embed no T tasks at once (GroupedPasses has no
        # `embedding` of its own).
        return False

    def query_logits(
        self,
        weights: Weights,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
    ) -> Tensor:
        """[queries, way] negative squared distances of query_x [queries, C, H, W] to the
        prototypes of support_x [way*shot, C, H, W], support_y [way*shot] (train_way wide when
        `training`)."""
        passes = passes or EagerPasses(self.backbone)
        if (self.batch_norm_train if training else self.batch_norm_test) == "transductive":
            support = passes.embedding(weights, support_x)  # [way*shot, features]
            query = passes.embedding(weights, query_x)  # [queries, features]
        else:
            with torch.no_grad():  # batch norm takes given statistics as constants only
                statistics = passes.statistics(weights, support_x)
            # One pass over both sets, normalised alike.
            both = passes.embedding(weights, torch.cat([support_x, query_x]), statistics)
            support, query = both[: len(support_x)], both[len(support_x) :]
        way = self.train_way if training else self.way
        return -squared_distances(query, prototypes(support, support_y, way))
