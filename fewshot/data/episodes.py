"""Episodes: N-way K-shot tasks drawn from a [classes, images, C, H, W] tensor by index.

Every task is a pure function of (seed, split, index), so validation and test episodes are
identical across runs, algorithms and checkpoints, and training resumes on the same stream.
The indices of a task are drawn on the CPU; its images are gathered there (`Episodes`) or, with
the images kept on the accelerator, after the indices reach it (`EpisodeIndices`).
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


class EpisodeIndices(NamedTuple):
    """A meta-batch of tasks as positions in its split's images flattened to
    [classes * per_class, C, H, W]: `gather_episodes` turns it into `Episodes` where the images
    are. support [tasks, way*shot] and query [tasks, way*query] int64; the labels as in
    `Episodes`. `split` names the images ("train", "val", "test")."""

    split: str
    support: Tensor
    support_y: Tensor
    query: Tensor
    query_y: Tensor


def sample_indices(
    classes: ClassImages, split: str, way: int, shot: int, query: int, generator: torch.Generator
) -> EpisodeIndices:
    """One task's indices without a tasks dimension: `way` classes, `shot + query` distinct
    images each, as flat positions in the split's images."""
    chosen = torch.randperm(classes.num_classes, generator=generator)[:way]  # position = label
    order = torch.rand(way, classes.per_class, generator=generator).argsort(dim=1)
    flat = chosen[:, None] * classes.per_class + order[:, : shot + query]  # [way, shot+query]
    labels = torch.arange(way)
    return EpisodeIndices(
        split,
        flat[:, :shot].flatten(),
        labels.repeat_interleave(shot),
        flat[:, shot:].flatten(),
        labels.repeat_interleave(query),
    )


def gather_episodes(images: Tensor, indices: EpisodeIndices) -> Episodes:
    """The tasks `indices` names, from `images` [classes * per_class, C, H, W] on any device
    (the indices on the same one); a gather, with no sync to the host."""
    return Episodes(
        images[indices.support], indices.support_y, images[indices.query], indices.query_y
    )


def stack_tasks(tasks: list[Episodes]) -> Episodes:
    return Episodes(*(torch.stack(field) for field in zip(*tasks)))


def stack_indices(tasks: list[EpisodeIndices]) -> EpisodeIndices:
    split, *fields = zip(*tasks)
    return EpisodeIndices(split[0], *(torch.stack(field) for field in fields))


def share(count: int, rank: int, world_size: int) -> range:
    """Process `rank`'s contiguous share of `count` items split over `world_size` processes:
    shares differ by one at most where `count` does not divide, and together they are
    range(count) in order."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


class MetaBatchStream(IterableDataset):
    """Endless meta-training batches of `tasks` tasks; batch `step` depends only on (seed,
    step). `share`: the tasks of each batch this process trains on (all of them by default)
    when several processes split the meta-batch, so that together they train on the very
    tasks one process would."""

    def __init__(
        self,
        classes: ClassImages,
        way: int,
        shot: int,
        query: int,
        tasks: int,
        seed: int,
        start: int = 0,
        share: range | None = None,
        indices_only: bool = False,
    ) -> None:
        self.classes, self.way, self.shot, self.query = classes, way, shot, query
        self.tasks, self.seed, self.start = tasks, seed, start
        self.share = range(tasks) if share is None else share
        self.indices_only = indices_only  # yield EpisodeIndices, gathered on the device

    def indices(self, step: int) -> EpisodeIndices:
        # Every task of the batch is drawn (indices only: cheap), so that a share's tasks are
        # those one process draws; the trailing 0 keeps the stream of the versions that drew
        # one stream per DDP rank, rank 0's being the one-process stream.
        g = episode_generator(self.seed, "train", 0, step)
        tasks = [
            sample_indices(self.classes, "train", self.way, self.shot, self.query, g)
            for _ in range(self.share.stop)
        ]
        return stack_indices(tasks[self.share.start :])

    def batch(self, step: int) -> Episodes:
        return gather_episodes(self.classes.images.flatten(0, 1), self.indices(step))

    def __iter__(self):
        # With W loader workers, worker w yields steps w, w + W, ...: the loader's round-robin
        # over workers then restores the single-process order.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + worker
        while True:
            yield self.indices(step) if self.indices_only else self.batch(step)
            step += workers


class FixedEpisodes(Dataset):
    """`count` episodes for validation or test; episode i is a function of (seed, split, way,
    shot, query, i). `share`: the ids this process scores when several split them (all by
    default); item j is then episode share[j]."""

    def __init__(
        self,
        classes: ClassImages,
        split: str,
        way: int,
        shot: int,
        query: int,
        count: int,
        seed: int,
        indices_only: bool = False,
        share: range | None = None,
    ) -> None:
        self.classes, self.split, self.way, self.shot, self.query = classes, split, way, shot, query
        self.count, self.seed = count, seed
        self.ids = range(count) if share is None else share
        self.indices_only = indices_only  # yield EpisodeIndices, gathered on the device

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Episodes | EpisodeIndices:
        if not 0 <= index < len(self.ids):
            raise IndexError(index)
        episode = self.ids[index]
        g = episode_generator(self.seed, self.split, self.way, self.shot, self.query, episode)
        indices = sample_indices(self.classes, self.split, self.way, self.shot, self.query, g)
        if self.indices_only:
            return indices
        return gather_episodes(self.classes.images.flatten(0, 1), indices)
