"""data.on_device: the loaders yield indices, the images stay where they were moved once, and
the episodes gathered there are the ones the default path gathers on the CPU, bit for bit."""

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.config import check_config
from fewshot.data.episodes import EpisodeIndices, Episodes
from fewshot.errors import ConfigError
from tests.helpers import DEVICES, compose_train, small_datamodule


def batches(loader, count: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episodes_gathered_on_the_device_equal_the_host_ones(split, device):
    host, on_device = small_datamodule(on_device=False), small_datamodule(on_device=True)
    loader = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
    expected = batches(getattr(host, loader[split])(), 3 if split == "train" else 1)
    got = batches(getattr(on_device, loader[split])(), len(expected))
    for want, indices in zip(expected, got):
        assert isinstance(want, Episodes) and isinstance(indices, EpisodeIndices)
        assert indices.split == split and indices.support.dtype == torch.int64
        moved = indices._replace(**{f: getattr(indices, f).to(device) for f in indices._fields[1:]})
        episodes = on_device.gather(moved)
        assert all(t.device.type == device for t in episodes)
        for field, a, b in zip(Episodes._fields, want, episodes):
            assert a.dtype == b.dtype and torch.equal(a, b.cpu()), field


def test_each_split_is_moved_to_the_device_once():
    datamodule = small_datamodule(on_device=True)
    first, second = batches(datamodule.train_dataloader(), 2)
    datamodule.gather(first)
    images = datamodule.device_images["train"]
    datamodule.gather(second)
    assert datamodule.device_images["train"] is images
    assert images.shape == (10 * 8, 1, 12, 12) and images.dtype == torch.uint8


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", False),
        (True, "cpu", True),
        (False, "cpu", False),
        pytest.param(False, "cuda", False, marks=DEVICES[1].marks),
        pytest.param("auto", "cuda", True, marks=DEVICES[1].marks),  # 20 KB: fits any GPU
    ],
)
def test_auto_keeps_the_images_on_cuda_only(setting, device, expected):
    datamodule = small_datamodule(on_device=setting)
    assert datamodule.images_on_device(torch.device(device)) is expected


def test_a_config_without_the_key_keeps_the_host_path():
    datamodule = small_datamodule()
    datamodule.data = OmegaConf.create({"workers": 0})
    assert not datamodule.images_on_device(torch.device("cpu"))
    assert isinstance(next(iter(datamodule.train_dataloader())), Episodes)


def test_a_bad_on_device_value_names_the_key():
    with pytest.raises(
        ConfigError, match=r"data.on_device='gpu' is out of range: expected true, false or auto"
    ):
        check_config(compose_train("data.on_device=gpu"))
