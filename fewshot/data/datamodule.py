"""The LightningDataModule: class splits in memory, episodes sampled from them by index."""

from __future__ import annotations

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from fewshot.data.cifar import load_cifarfs, load_fc100
from fewshot.data.episodes import ClassImages, FixedEpisodes, MetaBatchStream, stack_tasks
from fewshot.data.miniimagenet import load_miniimagenet
from fewshot.data.omniglot import load_omniglot, omniglot_splits
from fewshot.data.tieredimagenet import load_tieredimagenet
from fewshot.errors import ConfigError

DATASETS = ("omniglot", "miniimagenet", "tieredimagenet", "cifarfs", "fc100")


def load_splits(data: DictConfig) -> dict[str, ClassImages]:
    """Meta-train/val/test classes of the dataset the `data` config group names."""
    if data.name == "omniglot":
        images = load_omniglot(data.root, data.image_size, data.download, data.cache_dir)
        return omniglot_splits(images, data.split)
    if data.name == "miniimagenet":
        return load_miniimagenet(data.root, data.image_size, data.cache_dir, data.workers)
    if data.name == "tieredimagenet":
        return load_tieredimagenet(data.root, data.image_size, data.cache_dir, data.workers)
    if data.name == "cifarfs":
        return load_cifarfs(data.root, data.image_size, data.download, data.cache_dir)
    if data.name == "fc100":
        return load_fc100(data.root, data.image_size, data.download, data.cache_dir)
    raise ConfigError(f"data.name={data.name!r} is not a dataset; choose one of {DATASETS}")


class EpisodeDataModule(pl.LightningDataModule):
    """Meta-batches for training, fixed episodes for validation and test."""

    def __init__(
        self,
        data: DictConfig,
        way: int,
        shot: int,
        query: int,
        meta_batch_size: int,
        val_episodes: int,
        test_episodes: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.data, self.way, self.shot, self.query = data, way, shot, query
        self.meta_batch_size, self.seed = meta_batch_size, seed
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.splits: dict[str, ClassImages] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_splits(self.data)
            # Smallest first: the error then names the limit that binds.
            for split, classes in sorted(
                self.splits.items(), key=lambda item: (item[1].num_classes, item[1].per_class)
            ):
                check_episode_fits(classes, split, self.way, self.shot, self.query)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = MetaBatchStream(
            self.splits["train"],
            self.way,
            self.shot,
            self.query,
            # Under DDP each rank meta-trains on its share of the tasks, its own ones (by rank).
            self.meta_batch_size // (trainer.world_size if trainer else 1),
            self.seed,
            # A resumed run continues the stream where it stopped.
            start=trainer.global_step if trainer else 0,
            rank=trainer.global_rank if trainer else 0,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.data.workers)

    def _fixed(self, split: str, count: int) -> DataLoader:
        episodes = FixedEpisodes(
            self.splits[split], split, self.way, self.shot, self.query, count, self.seed
        )
        return DataLoader(episodes, batch_size=self.meta_batch_size, collate_fn=stack_tasks)

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.test_episodes)


def check_episode_fits(classes: ClassImages, split: str, way: int, shot: int, query: int) -> None:
    """Raise ConfigError unless the split has `way` classes and `shot + query` images in each."""
    if way > classes.num_classes:
        raise ConfigError(
            f"way={way} is out of range: expected 2..{classes.num_classes} "
            f"(the meta-{split} split has {classes.num_classes} classes)"
        )
    if shot + query > classes.per_class:
        raise ConfigError(
            f"shot + query = {shot} + {query} is out of range: expected at most "
            f"{classes.per_class}, the images per class of the meta-{split} split; lower shot or query"
        )
