"""A few-shot method written on the learner contract alone, in this one file, for the tests:
each class's centroid is the mean embedding of its support images, and a query's logits are
its negative squared distances to them (ProtoNet's arithmetic, reused). No inner loop: `adapt`
is the contract's own."""

from torch import Tensor

from fewshot.methods import Learner
from fewshot.methods.passes import EagerPasses
from fewshot.methods.protonet import prototypes, squared_distances
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
        return -squared_distances(query, prototypes(support, support_y, self.way))  # [q, way]
