"""Every dataset fewshot reads, found by its `data.name` (what configs, checkpoints and result
files record), with what code outside fewshot/data/ may ask of it. Each loader module declares
its own: `TITLES` (the data.name of each dataset it loads -> its name as papers print it) and
`decode_image(file bytes, image_size)` (a user's image file read as the loader reads its own:
uint8 [C, S, S]; raises what PIL raises, decoding.IMAGE_ERRORS). A dataset no loader here
declares (one of one's own, loaded by a `_target_` elsewhere) is read as RGB, titled by its name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from fewshot.data import cifar, miniimagenet, omniglot, tieredimagenet
from fewshot.data.decoding import rgb_image

LOADERS = (omniglot, miniimagenet, tieredimagenet, cifar)


@dataclass(frozen=True)
class Dataset:
    name: str  # data.name
    title: str  # as papers print it: "Mini-ImageNet"
    decode_image: Callable[[bytes, int], Tensor]


def dataset(name: str) -> Dataset:
    """The dataset whose data.name is `name`."""
    for module in LOADERS:
        if name in module.TITLES:
            return Dataset(name, module.TITLES[name], module.decode_image)
    return Dataset(name, name, rgb_image)
