"""A few-shot method written on the learner contract alone, in this one file, for the tests:
each class's centroid is the mean embedding of its support images, and a query's logits are
its negative squared distances to them. No inner loop: `adapt` is the contract's own."""

import torch
from torch import Tensor

from fewshot.methods import Learner
from fewshot.methods.passes import EagerPasses
from fewshot.models.functional import FunctionalBackbone, Weights


class NearestCentroid(Learner):
    def __init__(self, backbone: FunctionalBackbone, way: int) -> None:
        super().__init__(backbone)
        self.way = way  # one-hot by a fixed width: no host read of the labels, so vmap batches it

    def query_logits(
        self,
        weights: Weights,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        training: bool,
        passes: EagerPasses | None = None,
    ) -> Tensor:
        passes = passes or EagerPasses(self.backbone)
        support = passes.embedding(weights, support_x)  # [n, features]
        query = passes.embedding(weights, query_x)  # [q, features]
        classes = torch.arange(self.way, device=support_y.device)
        members = (support_y[:, None] == classes).to(support.dtype)  # [n, way], one-hot
        centroids = members.T @ support / members.sum(0)[:, None]  # [way, features]
        return -(query[:, None] - centroids[None]).pow(2).sum(-1)  # [q, way]
