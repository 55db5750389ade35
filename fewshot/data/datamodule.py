"""The LightningDataModule: class splits in memory, episodes sampled from them by index."""

from __future__ import annotations

import importlib
import inspect
from typing import ClassVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from fewshot.data.episodes import (
    ClassImages,
    EpisodeIndices,
    Episodes,
    FixedEpisodes,
    MetaBatchStream,
    gather_episodes,
    share,
    stack_indices,
    stack_tasks,
)
from fewshot.errors import ConfigError, instantiate
from fewshot.settings import BOOLEAN_OR_AUTO, Rule, int_at_least

# `data` keys the backbone (channels), the reports (name) and the datamodule (on_device) read;
# the others are the arguments of the loader `data._target_` names, but `workers` (the episode
# loader's processes), which goes only to a loader that takes it (one that decodes in processes).
NOT_LOADER_KEYS = ("name", "channels", "on_device")
# data.on_device=auto keeps the images on a CUDA device when all splits take at most this share
# of its free memory: the rest is the learner's (second-order MAML's graph is the large part).
ON_DEVICE_SHARE = 0.25


def load_splits(data: DictConfig) -> dict[str, ClassImages]:
    """Meta-train/val/test classes of the dataset the `data` config group names."""
    arguments = {k: v for k, v in data.items() if k not in NOT_LOADER_KEYS}
    if "workers" in arguments and not _takes(data.get("_target_"), "workers"):
        del arguments["workers"]
    return instantiate(arguments, _convert_="all")


def _takes(target: object, argument: str) -> bool:
    """Whether the callable `target` ("module.name") names takes `argument` (True where that
    cannot be told: instantiating it then says what is wrong)."""
    try:
        module, _, name = target.rpartition(".")
        function = getattr(importlib.import_module(module), name)
        return argument in inspect.signature(function).parameters
    except (AttributeError, ImportError, ValueError, TypeError):
        return True


def check_episode_fits(
    num_classes: int,
    per_class: int,
    split: str,
    way: int,
    shot: int,
    query: int,
    keys: tuple[str, str] = ("way", "query"),
) -> None:
    """Raise ConfigError unless a split of `num_classes` classes of `per_class` images holds
    `way` classes and `shot + query` images in each; `keys`: the config keys that set way and
    query (meta-training's may be train_way and train_query)."""
    way_key, query_key = keys
    if way > num_classes:
        raise ConfigError(
            f"{way_key}={way} is out of range: expected 2..{num_classes} "
            f"(the meta-{split} split has {num_classes} classes)"
        )
    if shot + query > per_class:
        raise ConfigError(
            f"shot + {query_key} = {shot} + {query} is out of range: expected at most "
            f"{per_class}, the images per class of the meta-{split} split; lower shot or "
            f"{query_key}"
        )


class EpisodeDataModule(pl.LightningDataModule):
    """Meta-batches for training, fixed episodes for validation and test.

    Meta-training's tasks are `train_way`-way with `train_query` query images per class (None:
    `way` and `query`, the tasks validation and test draw).

    `settings`: the `data` keys every dataset has, and their ranges."""

    settings: ClassVar[dict[str, Rule]] = {
        "image_size": int_at_least(1),
        "workers": int_at_least(0),
        "on_device": BOOLEAN_OR_AUTO,
    }

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
        test_share: range | None = None,
        train_way: int | None = None,
        train_query: int | None = None,
    ) -> None:
        super().__init__()
        self.test_share = test_share  # the test episodes this process scores (None: its share)
        self.data, self.way, self.shot, self.query = data, way, shot, query
        self.train_way = way if train_way is None else train_way
        self.train_query = query if train_query is None else train_query
        self.meta_batch_size, self.seed = meta_batch_size, seed
        self.val_episodes, self.test_episodes = val_episodes, test_episodes
        self.splits: dict[str, ClassImages] | None = None
        self.device_images: dict[str, Tensor] = {}  # split -> [classes * per_class, C, H, W]

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_splits(self.data)
            # Smallest first: the error then names the limit that binds.
            for split, classes in sorted(
                self.splits.items(), key=lambda item: (item[1].num_classes, item[1].per_class)
            ):
                way, query, keys = self.way, self.query, ("way", "query")
                if split == "train":
                    way, query, keys = self.train_way, self.train_query, self._training_keys()
                check_episode_fits(
                    classes.num_classes, classes.per_class, split, way, self.shot, query, keys
                )

    def _training_keys(self) -> tuple[str, str]:
        """The keys that set meta-training's way and query, for a message."""
        return (
            "train_way" if self.train_way != self.way else "way",
            "train_query" if self.train_query != self.query else "query",
        )

    def images_on_device(self, device: torch.device) -> bool:
        """Whether the episodes are gathered on `device` from images moved there once
        (`data.on_device`: true, false, or auto: on CUDA where they fit, see ON_DEVICE_SHARE)
        rather than gathered on the CPU and copied to it every batch."""
        setting = self.data.get("on_device", False)
        if setting != "auto":
            return setting
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(c.images.nbytes for c in self.splits.values())
        return size <= ON_DEVICE_SHARE * free

    def _indices_only(self) -> bool:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        return self.images_on_device(device)

    def gather(self, batch: EpisodeIndices) -> Episodes:
        """The episodes `batch` names, gathered where its indices are (after the transfer to
        the device); each split's images go there on first use, once."""
        images = self.device_images.get(batch.split)
        if images is None or images.device != batch.support.device:
            images = self.splits[batch.split].images.flatten(0, 1).to(batch.support.device)
            self.device_images[batch.split] = images
        return gather_episodes(images, batch)

    def _share(self, count: int) -> range:
        """This process's share of `count` tasks or episodes (all where it runs alone)."""
        trainer = self.trainer
        if trainer and trainer.testing and self.test_share is not None:
            return self.test_share
        return share(count, trainer.global_rank, trainer.world_size) if trainer else range(count)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = MetaBatchStream(
            self.splits["train"],
            self.train_way,
            self.shot,
            self.train_query,
            self.meta_batch_size,
            self.seed,
            # A resumed run continues the stream where it stopped.
            start=trainer.global_step if trainer else 0,
            share=self._share(self.meta_batch_size),
            indices_only=self._indices_only(),
        )
        return DataLoader(stream, batch_size=None, num_workers=self.data.workers)

    def _fixed(self, split: str, count: int) -> DataLoader:
        indices_only = self._indices_only()
        episodes = FixedEpisodes(
            self.splits[split],
            split,
            self.way,
            self.shot,
            self.query,
            count,
            self.seed,
            indices_only=indices_only,
            # Contiguous shares, none repeated (Lightning's distributed sampler would pad them).
            share=self._share(count),
        )
        collate = stack_indices if indices_only else stack_tasks
        return DataLoader(episodes, batch_size=self.meta_batch_size, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.test_episodes)
