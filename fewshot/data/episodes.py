"""Episodes: N-way K-shot tasks drawn from a [classes, images, C, H, W] tensor by index.

Every task is a pure function of (seed, split, index), so validation and test episodes are
identical across runs, algorithms and checkpoints, and training resumes on the same stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info


@dataclass
class ClassImages:
    """The images of one class split: `images` is uint8 [classes, per_class, C, H, W]."""

    images: Tensor
    names: list[str]

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]


class Episodes(NamedTuple):
    """A meta-batch of tasks; images stay uint8 until they reach the device.

    support_x [tasks, way*shot, C, H, W], support_y [tasks, way*shot],
    query_x [tasks, way*query, C, H, W], query_y [tasks, way*query]; labels are 0..way-1,
    assigned to classes at random in every task.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def episode_generator(seed: int, *key: object) -> torch.Generator:
    """A generator seeded by a hash of (seed, *key), independent of any other episode."""
    text = "/".join(str(k) for k in (seed, *key))
    return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:15], 16))


def sample_task(
    classes: ClassImages, way: int, shot: int, query: int, generator: torch.Generator
) -> Episodes:
    """One task without a tasks dimension: `way` classes, `shot + query` distinct images each."""
    chosen = torch.randperm(classes.num_classes, generator=generator)[:way]  # position = label
    order = torch.rand(way, classes.per_class, generator=generator).argsort(dim=1)
    images = classes.images[chosen[:, None], order[:, : shot + query]]  # [way, shot+query, C,H,W]
    labels = torch.arange(way)
    return Episodes(
        images[:, :shot].flatten(0, 1),
        labels.repeat_interleave(shot),
        images[:, shot:].flatten(0, 1),
        labels.repeat_interleave(query),
    )


def stack_tasks(tasks: list[Episodes]) -> Episodes:
    return Episodes(*(torch.stack(field) for field in zip(*tasks)))


class MetaBatchStream(IterableDataset):
    """Endless meta-training batches; batch `step` depends only on (seed, step, rank)."""

    def __init__(
        self,
        classes: ClassImages,
        way: int,
        shot: int,
        query: int,
        tasks: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
    ) -> None:
        self.classes, self.way, self.shot, self.query = classes, way, shot, query
        self.tasks, self.seed, self.start, self.rank = tasks, seed, start, rank

    def batch(self, step: int) -> Episodes:
        g = episode_generator(self.seed, "train", self.rank, step)
        return stack_tasks(
            [
                sample_task(self.classes, self.way, self.shot, self.query, g)
                for _ in range(self.tasks)
            ]
        )

    def __iter__(self):
        # With W loader workers, worker w yields steps w, w + W, ...: the loader's round-robin
        # over workers then restores the single-process order.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + worker
        while True:
            yield self.batch(step)
            step += workers


class FixedEpisodes(Dataset):
    """`count` episodes for validation or test; episode i is a function of (seed, split, i)."""

    def __init__(
        self,
        classes: ClassImages,
        split: str,
        way: int,
        shot: int,
        query: int,
        count: int,
        seed: int,
    ) -> None:
        self.classes, self.split, self.way, self.shot, self.query = classes, split, way, shot, query
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Episodes:
        if not 0 <= index < self.count:
            raise IndexError(index)
        g = episode_generator(self.seed, self.split, self.way, self.shot, self.query, index)
        return sample_task(self.classes, self.way, self.shot, self.query, g)
