import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot.data.episodes import ClassImages, Episodes
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


def run_script(script: str, *overrides: str, expect_ok: bool = True):
    """Run train.py or evaluate.py as a user does; fail showing its stderr unless `expect_ok` is False."""
    proc = subprocess.run(
        [sys.executable, script, *overrides],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def quick_overrides(omniglot_root, omniglot_cache) -> list[str]:
    """train.py overrides for a few cheap meta-steps on the real data, logging every step."""
    return [
        f"data.root={omniglot_root}",
        f"data.cache_dir={omniglot_cache}",
        "algo.meta_batch_size=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "val_episodes=4",
        "trainer.threads=1",
        "trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="session")
def sweep_with_failures(quick_overrides, tmp_path_factory):
    """A 4-job multirun whose first two jobs fail (no TPU here) and last two train:
    (sweep folder, the finished process)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    return sweep_dir, run_sweep_with_failures(sweep_dir, quick_overrides)


def run_sweep_with_failures(sweep_dir: Path, quick_overrides: list[str]):
    """Jobs 0 and 1 ask for a TPU (there is none) and fail; jobs 2 and 3 train on the CPU."""
    return run_script(
        "train.py",
        "-m",
        *quick_overrides,
        "trainer.accelerator=tpu,cpu",
        "algo.meta_lr=1e-3,1e-4",
        f"hydra.sweep.dir={sweep_dir}",
        expect_ok=False,
    )


def make_miniimagenet(
    root: Path, layout: str, classes=(4, 2, 2), per_class: int = 20, size: int = 16
) -> Path:
    """A small Mini-ImageNet in `layout` 'folders' ({train,val,test}/<wnid>/*.jpg) or 'csv'
    (images/*.jpg + {train,val,test}.csv). Class c of the whole set is tinted by colour c % 3
    (0 red, 1 green, 2 blue) and the same seed gives byte-identical JPEGs in both layouts."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    c = 0
    for split, count in zip(("train", "val", "test"), classes):
        rows = ["filename,label"]
        for _ in range(count):
            wnid = f"n{c:08d}"
            for i in range(per_class):
                pixels = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
                pixels[..., c % 3] += 180
                name = f"{wnid}{i + 1:08d}.jpg"
                folder = root / "images" if layout == "csv" else root / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.numpy()).save(folder / name, quality=95)
                rows.append(f"{name},{wnid}")
            c += 1
        if layout == "csv":
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def conv_episode(way: int = 3, shot: int = 2, query: int = 4, tasks: int = 2) -> Episodes:
    """A meta-batch of random 12x12 grey images with balanced labels 0..way-1."""
    torch.manual_seed(0)
    x = torch.rand(tasks, way * (shot + query), 1, 12, 12)
    labels = torch.arange(way)
    return Episodes(
        x[:, : way * shot],
        labels.repeat_interleave(shot).expand(tasks, -1),
        x[:, way * shot :],
        labels.repeat_interleave(query).expand(tasks, -1),
    )
