import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import Tensor, nn

from fewshot.build import learner_from
from fewshot.data.episodes import ClassImages, Episodes
from fewshot.data.omniglot import load_omniglot
from fewshot.learners import EpisodeResults, Learner, TaskLoop, run_tasks
from fewshot.learners.tasks import Backward, TaskScorer
from fewshot.models.conv4 import Conv4
from fewshot.models.functional import Statistics, Weights

torch.set_num_threads(1)  # 2 threads on 2 vCPUs is erratic (see README); 1 is stable

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
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


def compose_train(*overrides: str):
    """train.py's config, composed as Hydra composes it for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def make_learner(name: str, backbone: nn.Module, **settings) -> Learner:
    """A learner as train.py builds it from conf/algo/<name>.yaml, with `settings` changed."""
    algo = OmegaConf.merge(OmegaConf.load(CONF / "algo" / f"{name}.yaml"), settings)
    return learner_from(algo, backbone)


def small_backbone(image_size: int = 12, classes: int = 3) -> Conv4:
    return Conv4(1, image_size, classes, channels=4, padding=1, stride=1, pool=True, blocks=2)


TRANSDUCTIVE = {"batch_norm_train": "transductive", "batch_norm_test": "transductive"}
# Per learner: small settings, and how many weights its `adapt` yields at evaluation.
SMALL = {
    "maml": ({"base_lr": 0.5, "inner_steps": 2, "inner_steps_test": 3}, 1 + 3),
    "metalstm": ({"inner_epochs": 2, "inner_batch_size": 4}, 1 + 2 * 2),  # 6 support images
}
LEARNER_NAMES = list(SMALL)


def small(name: str, **settings) -> tuple[Learner, int]:
    """A small learner on 12 px images, and the number of weights its `adapt` yields at
    evaluation."""
    torch.manual_seed(0)
    defaults, yields = SMALL[name]
    return make_learner(name, small_backbone(), **{**defaults, **TRANSDUCTIVE, **settings}), yields


def meta_batch(
    learner: Learner | TaskScorer,
    batch: Episodes,
    training: bool,
    track_steps: bool = False,
    backward: Backward | None = None,
) -> EpisodeResults:
    """`run_tasks` on a learner (in a loop) or a task scorer."""
    tasks = learner if isinstance(learner, TaskScorer) else TaskLoop(learner)
    return run_tasks(tasks, batch, training, track_steps, backward)


class FunctionalLinear(nn.Linear):
    """A linear backbone without batch norm, for meta-gradients derived by hand."""

    def forward_with(
        self, weights: Weights, x: Tensor, statistics: Statistics | None = None
    ) -> Tensor:
        return F.linear(x, weights["weight"], weights.get("bias"))

    def statistics(self, weights: Weights, x: Tensor) -> Statistics:
        return {}
