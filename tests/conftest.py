"""The tests' fixtures (the real Omniglot, a SLURM cluster, trained runs shared per session) and
their marks; what tests share besides is in tests/helpers.py."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fewshot.data.episodes import ClassImages
from fewshot.data.omniglot import load_omniglot
from tests.helpers import NO_CUDA, OMNIGLOT, REPO, run_sweep_with_failures

torch.set_num_threads(1)  # 2 threads on 2 vCPUs is erratic (see README); 1 is stable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the real Omniglot (every train.py run does) are `slow`; `pytest -m "not
    slow"` is the fast tier, which needs no data. Tests on the SLURM cluster are `slurm`."""
    for item in items:
        if "omniglot_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running SLURM cluster (.ci/slurm-up starts a single-node one as root, or finds it up)."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: apt-get install -y slurm-wlm munge")
    proc = subprocess.run(
        [str(REPO / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


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
        "threads=1",
        "trainer.enable_progress_bar=false",
        "test_after_training=false",  # 600 test episodes per run; tests/test_first_hour.py has it on
    ]


@pytest.fixture(scope="session")
def sweep_with_failures(quick_overrides, tmp_path_factory):
    """A 4-job multirun whose first two jobs fail (no TPU here) and last two train:
    (sweep folder, the finished process)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    return sweep_dir, run_sweep_with_failures(sweep_dir, quick_overrides)


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device; skips the test where there is none."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device("cuda")
