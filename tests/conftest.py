"""The tests' fixtures (the real Omniglot, a SLURM cluster, trained runs shared per session) and
their marks; what tests share besides is in tests/helpers.py.

The suite runs in parallel processes (`python -m pytest -n 2 --dist loadgroup`, pytest-xdist) or
in one (`python -m pytest`). Each worker process has its own session fixtures; the expensive ones
(the Omniglot cache, the trained run) are made once for all the workers (helpers.made_once).
xdist's controller process loads this file too but runs no test, so torch, fewshot and
tests.helpers are imported where they are used, not here: it starts the workers seconds sooner."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    from fewshot.data.episodes import ClassImages


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the processes that run tests: 2 threads on 2 vCPUs is erratic (see
    README); 1 is stable. In parallel processes, only `--dist loadgroup` keeps the groups below
    on one worker."""
    parallel = bool(getattr(config.option, "numprocesses", None))
    if parallel and config.option.dist != "loadgroup":
        raise pytest.UsageError(
            f"--dist {config.option.dist}: run the tests in parallel with --dist loadgroup, "
            "which keeps the SLURM tests (and the tests of one sweep) on one worker in turn"
        )
    if not parallel or hasattr(config, "workerinput"):  # not xdist's controller
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Collect the garbage once, then freeze what is left: pytest's own collections at the end
    (5, which look for unraisable exceptions) and the interpreter's at exit then skip the
    session's long-lived objects (torch's, Lightning's, Hydra's), seconds per process."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the real Omniglot (every train.py run does) are `slow`; `pytest -m "not
    slow"` is the fast tier, which needs no data. Tests on the SLURM cluster are `slurm`.

    Under xdist, groups of tests run on one worker, one after another: the SLURM tests (the
    single-node test cluster has 2 CPUs, and a DDP job needs both; a test that checks nothing
    was submitted would see another's job), and the tests of the shared sweep (one of them runs
    it again)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "omniglot_root" in fixtures:
            item.add_marker(pytest.mark.slow)
        if "slurm_cluster" in fixtures:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif "sweep_with_failures" in fixtures:
            item.add_marker(pytest.mark.xdist_group("sweep"))


def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temporary folder that every xdist worker sees (each worker's own
    getbasetemp() lies inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running SLURM cluster (.ci/slurm-up starts a single-node one as root, or finds it up)."""
    from tests.helpers import REPO

    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: apt-get install -y slurm-wlm munge")
    proc = subprocess.run(
        [str(REPO / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot zips; CI has them, so their absence is a failure, not a skip."""
    from tests.helpers import OMNIGLOT

    assert (OMNIGLOT / "images_background.zip").is_file(), (
        f"Omniglot zips not found in {OMNIGLOT}; set FEWSHOT_OMNIGLOT to their folder"
    )
    return OMNIGLOT


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory, omniglot_root) -> Path:
    """A cache folder filled once per test session (for all workers) from the real zips."""
    from fewshot.data.omniglot import load_omniglot
    from tests.helpers import made_once

    def fill(cache: Path) -> None:
        load_omniglot(omniglot_root, 28, download=False, cache_dir=str(cache))

    return made_once(shared_folder(tmp_path_factory) / "omniglot-cache", fill)


@pytest.fixture(scope="session")
def omniglot(omniglot_root, omniglot_cache) -> ClassImages:
    from fewshot.data.omniglot import load_omniglot

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
def trained_run(quick_overrides, tmp_path_factory) -> Iterator[Path]:
    """A finished run of train.py with quick_overrides (4 steps, validated at steps 2 and 4),
    trained once per test session for every test that only reads it. A test that writes into a
    run (evaluate.py's default result files included) takes copy_of_trained_run; one that
    writes into this one fails at the end of the session."""
    from tests.helpers import made_once, run_script, snapshot

    def train(run_dir: Path) -> None:
        run_script("train.py", *quick_overrides, f"hydra.run.dir={run_dir}")

    run_dir = made_once(shared_folder(tmp_path_factory) / "trained_run", train)
    before = snapshot(run_dir)
    yield run_dir
    assert snapshot(run_dir) == before, (
        f"a test changed the shared trained run {run_dir}: give it copy_of_trained_run"
    )


@pytest.fixture
def copy_of_trained_run(trained_run, tmp_path) -> Path:
    """The trained run copied to tmp_path/"run" for a test that changes it (the files inside
    still name the folder it was trained in, as those of a run moved elsewhere do)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def sweep_with_failures(quick_overrides, tmp_path_factory):
    """A 4-job multirun whose first two jobs fail (no TPU here) and last two train:
    (sweep folder, the finished process). Its tests run on one worker (xdist_group "sweep"),
    in the order collected: tests/test_sweep.py runs it again."""
    from tests.helpers import run_sweep_with_failures

    sweep_dir = tmp_path_factory.mktemp("sweep")
    return sweep_dir, run_sweep_with_failures(sweep_dir, quick_overrides)


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device; skips the test where there is none."""
    import torch

    from tests.helpers import NO_CUDA

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return torch.device("cuda")
