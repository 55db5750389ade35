"""A trained learner on images fewshot's sampler did not draw (a user's own, a benchmark's fixed
task list): rebuilt from its checkpoint, each image read as its dataset's loader reads one, adapted
to each task with the checkpoint's test-time inner loop and batch-norm mode."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from fewshot.checkpoints.reading import check_checkpoint_fits, load_checkpoint
from fewshot.config import check_config, scores_any_way
from fewshot.data.decoding import IMAGE_ERRORS, image_error
from fewshot.data.episodes import Episodes
from fewshot.data.registry import dataset as dataset_named
from fewshot.errors import ConfigError, DataError
from fewshot.evaluation.protocol import precision, restored_module
from fewshot.training.module import EpisodicModule

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike, dataset: str, image_size: int) -> Tensor:
    """An image file as `dataset`'s loader decodes its own: uint8 [C, S, S] (its loader
    module's `decode_image`, found by fewshot.data.registry)."""
    decode = dataset_named(dataset).decode_image
    try:
        return decode(Path(path).read_bytes(), image_size)
    except IMAGE_ERRORS as err:  # a header claiming a huge size included: one line, no traceback
        raise DataError(f"cannot read image {path}: {image_error(err)}") from err


def images_in(folder: str | os.PathLike, key: str) -> list[Path]:
    """The image files of `folder` (or `folder` itself, a file), by name."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise ConfigError(f"{key}={folder} is neither an image file nor a folder")
    found = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not found:
        raise ConfigError(f"{key}={folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def class_folders(folder: str | os.PathLike, key: str = "support") -> dict[str, list[Path]]:
    """Class name -> its image files: one sub-folder of `folder` per class, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{key}={folder} is not a folder (expected one sub-folder per class)")
    classes = {d.name: images_in(d, key) for d in sorted(folder.iterdir()) if d.is_dir()}
    if not classes:
        raise ConfigError(f"{key}={folder} has no sub-folders: put each class's images in one")
    return classes


class Predictor:
    """A checkpoint's learner, ready to adapt to new tasks of its way, or of any way where no
    weight of it is sized by the way (ProtoNet: `rebuild` gives its module at another way)."""

    def __init__(
        self,
        module: EpisodicModule,
        cfg: DictConfig,
        rebuild: Callable[[int], EpisodicModule] | None = None,
    ) -> None:
        self.module, self.cfg = module.eval(), cfg
        self.way, self.dataset, self.image_size = cfg.way, cfg.data.name, cfg.data.image_size
        self._rebuild = rebuild
        self._modules = {self.way: self.module}

    @property
    def any_way(self) -> bool:
        """Whether it scores tasks of any way (it can rebuild its module at another)."""
        return self._rebuild is not None

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike) -> Predictor:
        """Rebuild the run of a fewshot checkpoint, read as data only."""
        stored, checkpoint = load_checkpoint(ckpt)
        cfg = stored.copy()
        check_config(cfg)
        check_checkpoint_fits(cfg, stored, "ckpt", ckpt, "predict.py uses the run's own model")

        def at_way(way: int) -> EpisodicModule:  # as evaluate.py way=<n> rebuilds it
            other = cfg.copy()
            other.way = way
            return restored_module(other, checkpoint, ckpt)

        rebuild = at_way if scores_any_way(cfg) else None
        return cls(restored_module(cfg, checkpoint, ckpt), cfg, rebuild)

    def module_at(self, way: int) -> EpisodicModule:
        """The module that scores `way`-way tasks: the checkpoint's own at its way, else
        rebuilt (once) where the learner scores any way; ConfigError otherwise."""
        if way not in self._modules:
            if self._rebuild is None:
                raise ConfigError(
                    f"the support set has {way} classes; this checkpoint was meta-trained on "
                    f"{self.way}-way tasks: give {self.way}"
                )
            if way < 2:
                raise ConfigError(f"the support set has {way} class: give 2 classes or more")
            self._modules[way] = self._rebuild(way).eval()
        return self._modules[way]

    def read(self, paths: Sequence[str | os.PathLike]) -> Tensor:
        """Image files as the checkpoint's dataset reads them: uint8 [n, C, S, S]."""
        return torch.stack([read_image(p, self.dataset, self.image_size) for p in paths])

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Adapt on one task's support set as at test time; the query set's logits.

        support_x uint8 [way*shot, C, S, S], support_y [way*shot] in 0..way-1, query_x uint8
        [q, C, S, S] -> [q, way]. Under transductive batch norm (MAML's) the query images
        are normalised together: pass them as one batch, as the test episodes are. A learner
        that scores any way takes labels 0..way-1 of any way; the others, their own way's.
        """
        classes = support_y.unique().numel()
        way = classes if self.any_way else self.way
        if classes != way or int(support_y.max()) >= way:
            trained = (
                "" if self.any_way else f"; this checkpoint was meta-trained on {way}-way tasks"
            )
            raise ConfigError(
                f"the support set has classes {sorted(set(support_y.tolist()))}{trained}: "
                f"give labels 0..{way - 1}, each once or more"
            )
        module = self.module_at(way)
        learner = module.learner
        # Files are read on the CPU: the images go where the module is.
        support_x, support_y, query_x = (
            t.to(module.device) for t in (support_x, support_y, query_x)
        )
        # The module's own conversion of the loader's uint8 images to floats.
        batch = module.on_after_batch_transfer(
            Episodes(support_x, support_y, query_x, support_y.new_zeros(len(query_x))), 0
        )
        bf16 = precision(self.cfg) == "bf16-mixed"
        # As in evaluation: no outer graph; the learner enables grad for its inner loop alone.
        device = module.device
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = learner.logits(batch.support_x, batch.support_y, batch.query_x)
        return logits.float()

    def predict(
        self, support: Mapping[str, Sequence[str | os.PathLike]], query: Sequence[str | os.PathLike]
    ) -> list[str]:
        """The class name (a key of `support`: class -> its image files) of each query file."""
        if len(support) != self.way and not self.any_way:
            raise ConfigError(
                f"support has {len(support)} classes ({', '.join(support)}); this checkpoint "
                f"was meta-trained on {self.way}-way tasks: give {self.way}"
            )
        names = list(support)
        files = [f for name in names for f in support[name]]
        labels = torch.tensor([i for i, name in enumerate(names) for _ in support[name]])
        logits = self.logits(self.read(files), labels, self.read(query))
        return [names[i] for i in logits.argmax(-1).tolist()]
