"""Each dataset declares what code outside fewshot/data/ asks of it (fewshot.data.registry): its
title, and how a user's image file reads as its own images do; every conf/data/ option is one
a loader declares, and `workers` goes only to a loader that takes it."""

import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshot.data import cifar, datamodule, registry
from fewshot.data import miniimagenet as mi
from fewshot.data import omniglot as og
from fewshot.data import tieredimagenet as ti
from fewshot.data.datamodule import load_splits
from tests.helpers import CONF

OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_data_option_is_declared_by_the_loader_its_target_names(option):
    data = OmegaConf.load(CONF / "data" / f"{option}.yaml")
    declaring = [m for m in registry.LOADERS if data.name in m.TITLES]
    assert [m.__name__ for m in declaring] == [data._target_.rpartition(".")[0]]
    found = registry.dataset(data.name)
    assert found.title == declaring[0].TITLES[data.name]
    assert found.decode_image is declaring[0].decode_image


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_users_image_reads_as_each_loader_reads_its_own(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = png(rgb)
    (tmp_path / "a.png").write_bytes(data)
    as_loader = {
        "miniimagenet": mi._decode_image(tmp_path / "a.png", 12),
        "tieredimagenet": ti._decode(("a.png", data), 12),
    }
    for name, pixels in as_loader.items():
        square = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(12, 12, 3)
        assert torch.equal(registry.dataset(name).decode_image(data, 12), square.permute(2, 0, 1))
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for name in ("cifarfs", "fc100"):
        assert torch.equal(registry.dataset(name).decode_image(data, 12), cifar._resized(chw, 12))
    grey = png(rgb[..., 0])
    assert torch.equal(
        registry.dataset("omniglot").decode_image(grey, 12), og.decode_image(grey, 12)
    )


def test_a_dataset_no_loader_declares_is_rgb_titled_by_its_name():
    data = png(np.zeros((8, 8), dtype=np.uint8))
    found = registry.dataset("my_own")
    assert found.title == "my_own"
    assert found.decode_image(data, 4).shape == (3, 4, 4)


def test_workers_go_only_to_a_loader_that_takes_them(monkeypatch):
    seen = {}

    def takes(root, workers):
        seen["takes"] = workers

    def lacks(root):
        seen["lacks"] = root

    monkeypatch.setattr(datamodule, "_example_takes", takes, raising=False)
    monkeypatch.setattr(datamodule, "_example_lacks", lacks, raising=False)
    for target in ("takes", "lacks"):
        data = {"_target_": f"fewshot.data.datamodule._example_{target}", "root": "r"}
        load_splits(OmegaConf.create({**data, "name": "x", "channels": 3, "workers": 2}))
    assert seen == {"takes": 2, "lacks": "r"}
