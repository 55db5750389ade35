"""What a new user meets first: a training run that ends with a test number, threads that a
neighbouring job cannot make pathological, a config key checked before anything runs."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.config import check_config
from fewshot.errors import ConfigError
from fewshot.training import threads
from fewshot.training.build import process_settings, set_threads
from fewshot.training.threads import physical_cores
from tests.helpers import REPO, compose_train, run_script


@pytest.fixture(scope="module")
def tested_overrides(quick_overrides) -> list[str]:
    """quick_overrides with the final test on (the default; the shared fixture turns it off), on
    a backbone 8 channels wide: its 600 episodes cost a fraction of the default 64's."""
    kept = [o for o in quick_overrides if not o.startswith("test_after_training=")]
    return [*kept, "backbone.channels=8"]


def test_training_ends_by_scoring_best_ckpt_as_evaluate_py_does(tested_overrides, tmp_path):
    run = tmp_path / "run"
    proc = run_script("train.py", *tested_overrides, f"hydra.run.dir={run}")
    written = json.loads((run / "eval" / "best_600ep_seed0.json").read_text())
    assert written["episodes"] == 600 and written["checkpoint"] == str(
        run / "checkpoints" / "best.ckpt"
    )
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("test accuracy")]
    assert f"{100 * written['test/acc']:.2f} ± {100 * written['test/acc_ci95']:.2f}%" in line
    assert "600 episodes" in line
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["test/acc"] == written["test/acc"] and recorded["episodes"] == 600
    # evaluate.py on the same checkpoint: the same protocol, the same number.
    again = tmp_path / "again.json"
    # The same thread count: a barely trained model's near-tied logits flip with the sum order.
    best = run / "checkpoints" / "best.ckpt"
    run_script("evaluate.py", f"ckpt={best}", f"output={again}", "threads=1")
    assert json.loads(again.read_text())["test/acc"] == written["test/acc"]


def test_a_sweep_job_finished_earlier_is_neither_trained_nor_tested_again(
    tested_overrides, tmp_path
):
    sweep = ["-m", *tested_overrides, "seed=0", f"hydra.sweep.dir={tmp_path}"]
    first = run_script("train.py", *sweep)
    assert sum(x.startswith("test accuracy") for x in first.stdout.splitlines()) == 1
    written = tmp_path / "0" / "eval" / "best_600ep_seed0.json"
    mtime = written.stat().st_mtime_ns
    second = run_script("train.py", *sweep)
    assert not any(x.startswith("test accuracy") for x in second.stdout.splitlines())
    assert written.stat().st_mtime_ns == mtime
    # Turning the test off is how to run, not what is trained: the job is still finished.
    third = run_script("train.py", *sweep, "test_after_training=false")
    assert "finished earlier" in third.stderr + third.stdout


def test_a_test_after_training_that_is_not_a_boolean_is_refused_naming_the_key():
    cfg = compose_train("test_after_training=sometimes")
    with pytest.raises(ConfigError, match="test_after_training='sometimes' is out of range"):
        check_config(cfg)


def test_the_quickstart_preset_composes_with_the_papers_test_protocol():
    cfg = compose_train("experiment=quickstart")
    check_config(cfg)
    evaluate = OmegaConf.load(REPO / "conf" / "evaluate.yaml")
    assert (cfg.way, cfg.shot, cfg.query, cfg.data.split) == (5, 1, 15, "vinyals")
    assert cfg.test_after_training and evaluate.episodes == 600


def settled(monkeypatch, cores: int, cuda: bool = False, slurm_cpus: str | None = None, *args):
    """The trainer options train.py gives the default config (and `args`) on a machine of
    `cores` usable physical cores."""
    monkeypatch.setattr(threads, "physical_cores", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if slurm_cpus is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm_cpus)
    cfg = compose_train("algo.meta_batch_size=4", *args)
    return process_settings(cfg, OmegaConf.to_container(cfg.trainer))


@pytest.mark.parametrize("cores, processes", [(2, 2), (3, 3), (16, 4)])  # 4: the meta-batch
def test_the_default_on_cpu_cores_is_a_process_per_core_with_one_thread(
    monkeypatch, cores, processes
):
    options = settled(monkeypatch, cores)
    assert (options["devices"], options["strategy"], options["accelerator"]) == (
        processes,
        "ddp_fork",
        "cpu",
    )
    assert set_threads("auto") == 1


@pytest.mark.parametrize(
    "cores, cuda, slurm_cpus, args",
    [
        (1, False, None, ()),  # nothing to share
        (8, True, None, ()),  # a GPU: one process on it
        (8, False, "1", ()),  # SLURM gave the job one CPU
        (8, False, None, ("threads=4",)),  # a thread count asked for: one process
        (8, False, None, ("trainer.devices=1",)),
    ],
    ids=["one-core", "gpu", "slurm-one-cpu", "threads", "devices"],
)
def test_the_default_is_one_process_where_sharing_cannot_pay_or_was_not_asked_for(
    monkeypatch, cores, cuda, slurm_cpus, args
):
    assert settled(monkeypatch, cores, cuda, slurm_cpus, *args)["devices"] == 1


SYS_CPU = "/sys/devices/system/cpu"


def sysfs_under(root: Path):
    """`Path` with the kernel's CPU folder (SYS_CPU) moved to `root`, every other path kept."""

    def path(*parts) -> Path:
        path = str(Path(*parts))
        return (
            root / path.removeprefix(f"{SYS_CPU}/")
            if path.startswith(f"{SYS_CPU}/")
            else Path(path)
        )

    return path


# CPU -> (package, core) as sysfs gives them; None: a machine whose sysfs hides the topology.
HYPERTHREADED = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}  # 2 cores, 2 threads each
TWO_SOCKETS = {0: (0, 0), 1: (1, 0)}  # core ids count from 0 in each package


@pytest.mark.parametrize(
    "topology, allowed, cores",
    [
        (HYPERTHREADED, {0, 1, 2, 3}, 2),
        (HYPERTHREADED, {0, 2}, 1),  # one core's two threads
        (HYPERTHREADED, {1, 2}, 2),
        (TWO_SOCKETS, {0, 1}, 2),
        (None, {0, 1, 2}, 3),  # no topology to read: each CPU counts
    ],
    ids=["hyperthreads", "siblings", "one-thread-of-each", "two-sockets", "hidden"],
)
def test_physical_cores_count_hyperthreads_once(topology, allowed, cores, tmp_path, monkeypatch):
    for cpu, (package, core) in (topology or {}).items():
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(threads, "Path", sysfs_under(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    assert physical_cores() == cores


def test_physical_cores_are_the_cores_lscpu_lists_for_this_process():
    if shutil.which("lscpu") is None:
        pytest.skip("no lscpu here")
    table = subprocess.run(["lscpu", "-p=cpu,core,socket"], capture_output=True, text=True)
    rows = [line.split(",") for line in table.stdout.splitlines() if not line.startswith("#")]
    if table.returncode != 0 or any("" in row for row in rows):
        pytest.skip(f"lscpu lists no cores here: {table.stdout[-500:]}{table.stderr[-500:]}")
    allowed = os.sched_getaffinity(0)
    assert physical_cores() == len({(s, c) for cpu, c, s in rows if int(cpu) in allowed})


# CPU time a process spends while it sleeps after a parallel torch op: OpenMP threads that spin
# instead of sleeping show up here.
SPIN = """
import sys, time
{first}
import torch
torch.set_num_threads(2)
x = torch.ones(4_000_000)
for _ in range(20):
    x.add_(1)
start = time.process_time()
time.sleep(1.0)
print(time.process_time() - start)
"""


def cpu_while_idle(first: str, **env: str) -> float:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run(
        [sys.executable, "-c", SPIN.format(first=first)],
        cwd=REPO,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


def test_the_entry_points_make_openmp_wait_passively_before_torch_loads_it():
    # The measurement sees spinning threads where the policy asks for them ...
    assert cpu_while_idle("", OMP_WAIT_POLICY="ACTIVE") > 0.1  # less than 1 s: shared CPUs
    # ... and none where fewshot.training.threads set the policy before torch loaded OpenMP,
    assert cpu_while_idle("import fewshot.training.threads") < 0.03
    # which every entry point imports first.
    for script in ("train.py", "evaluate.py", "predict.py"):
        tree = ast.parse((REPO / script).read_text())
        first = next(n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
        assert (
            isinstance(first, ast.Import) and first.names[0].name == "fewshot.training.threads"
        ), script
