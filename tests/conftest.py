import os
from pathlib import Path

import pytest
import torch

from fewshot.data.episodes import ClassImages
from fewshot.data.omniglot import load_omniglot

torch.set_num_threads(1)  # 2 threads on 2 vCPUs is erratic (see README); 1 is stable

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = Path(os.environ.get("FEWSHOT_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot zips; CI has them, so their absence is a failure, not a skip."""
    assert (OMNIGLOT / "images_background.zip").is_file(), (
        f"Omniglot zips not found in {OMNIGLOT}; set FEWSHOT_OMNIGLOT to their folder"
    )
    return OMNIGLOT


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory, omniglot_root) -> Path:
    """A cache folder filled once per test session from the real zips."""
    cache = tmp_path_factory.mktemp("omniglot-cache")
    load_omniglot(omniglot_root, 28, download=False, cache_dir=str(cache))
    return cache


@pytest.fixture(scope="session")
def omniglot(omniglot_root, omniglot_cache) -> ClassImages:
    return load_omniglot(omniglot_root, 28, download=False, cache_dir=str(omniglot_cache))


def labelled_classes(num_classes: int = 12, per_class: int = 20) -> ClassImages:
    """Images whose pixels spell out (class, index), so a test can tell which image it got."""
    images = torch.zeros(num_classes, per_class, 1, 2, 2, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(num_classes)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(per_class)[None, :]
    return ClassImages(images, [f"class{c}" for c in range(num_classes)])
