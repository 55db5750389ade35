"""Sweeps beyond one process: jobs submitted to a real SLURM cluster (.ci/slurm-up), requeued
mid-run and resumed exactly, trainer=ddp under srun, several jobs at once on this machine, bad
launcher settings refused before anything is submitted."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from fewshot.cli import hydra_error_line
from fewshot.experiments.cluster import claimed_slot, requeued_resume
from fewshot.experiments.runs import RESULT, Run
from fewshot.experiments.sweep import sweep_summary
from tests.helpers import (
    CONF,
    REPO,
    SLURM_LAUNCHER,
    ended,
    job_state,
    logged_past_checkpoint,
    meta_gradients,
    run_script,
    scalars,
    slurm,
    start_requeued,
    start_script,
    submitted_job_id,
    wait_for,
)

STEPS = 12  # long enough to requeue the job between its first checkpoint and its end


def test_each_job_holds_a_slot_no_other_holds_until_it_ends(tmp_path):
    with claimed_slot(tmp_path, 2) as first, claimed_slot(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
    with claimed_slot(tmp_path, 2) as again:
        assert again == 0  # released at the end of its block


def test_a_requeued_job_resumes_from_its_own_last_checkpoint(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"ckpt_path": None})
    assert requeued_resume(cfg, tmp_path) is None and cfg.ckpt_path is None  # not requeued
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_resume(cfg, tmp_path) == 0  # nothing to resume: start over, drop its events
    Run(tmp_path).checkpoints.mkdir()
    Run(tmp_path).last_ckpt.touch()
    assert requeued_resume(cfg, tmp_path) is None
    assert cfg.ckpt_path == str(Run(tmp_path).last_ckpt)


def test_parallel_launcher_runs_each_job_on_its_own_share_of_the_cpus(quick_overrides, tmp_path):
    overrides = [o for o in quick_overrides if not o.startswith("threads=")]
    proc = run_script(
        "train.py",
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        *overrides,
        "algo.meta_lr=1e-3,1e-4",
        f"hydra.sweep.dir={tmp_path}",
    )
    _, _, rows = sweep_summary(tmp_path)
    assert [r.status for r in rows] == ["completed", "completed"], proc.stderr[-2000:]
    logs = [(tmp_path / r.name / "train.log").read_text() for r in rows]
    assert sorted(f"slot {k} of 2" in log for log in logs for k in (0, 1)) == [
        False,
        False,
        True,
        True,
    ]
    # Each on CPUs of its own, the default then running a process per core of its share.
    shares = [set(re.search(r"job on CPUs ([\d,]+)", log)[1].split(",")) for log in logs]
    assert not shares[0] & shares[1]
    cpus = len(os.sched_getaffinity(0))
    assert sorted(map(len, shares)) == sorted([cpus // 2, cpus - cpus // 2])
    if cpus == 2:
        assert all("one process on 1 CPU thread" in log for log in logs)


def test_a_2x2_sweep_on_slurm_lists_every_job_and_pools_the_seeds(
    slurm_cluster, quick_overrides, tmp_path
):
    proc = run_script(
        "train.py",
        "-m",
        *SLURM_LAUNCHER,
        *quick_overrides,
        "algo.meta_lr=1e-3,1e-4",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
    )
    _, _, rows = sweep_summary(tmp_path)
    assert [r.status for r in rows] == ["completed"] * 4 and all(r.step == 4 for r in rows)
    # Each job ran as a task of one SLURM job array, its log in submitit's folder.
    tasks = [p.name.split("_") for p in (tmp_path / ".submitit").glob("[0-9]*_[0-9]*")]
    assert len({array for array, _ in tasks}) == 1 and sorted(t for _, t in tasks) == list("0123")
    summary = (tmp_path / "summary.md").read_text()
    assert "4 jobs: 4 completed" in summary and "## Over seeds" in summary
    assert summary in proc.stdout
    pooled = (tmp_path / "summary_seeds.csv").read_text().splitlines()
    assert pooled[0] == "algo.meta_lr,val/acc mean,val/acc std,n,seeds,failed"
    for line in pooled[1:]:
        meta_lr, mean, _, n, seeds, failed = line.split(",")
        accs = [r.val_acc for r in rows if r.overrides["algo.meta_lr"] == meta_lr]
        assert float(mean) == pytest.approx(sum(accs) / 2) and (n, seeds, failed) == (
            "2",
            "0 1",
            "0",
        )


def test_a_failing_slurm_job_loses_no_other_jobs_result(slurm_cluster, quick_overrides, tmp_path):
    proc = run_script(
        "train.py",
        "-m",
        *SLURM_LAUNCHER,
        *quick_overrides,
        "trainer.accelerator=tpu,cpu",  # no TPU here: job 0 fails
        f"hydra.sweep.dir={tmp_path}",
        expect_ok=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    _, _, rows = sweep_summary(tmp_path)
    assert [(r.name, r.status) for r in rows] == [("1", "completed"), ("0", "failed")]
    assert "torch_xla" in rows[1].error
    assert Run(tmp_path / "1").best_ckpt.is_file()


def test_a_slurm_job_killed_before_it_could_write_its_result_is_listed_failed(
    slurm_cluster, quick_overrides, tmp_path
):
    # SIGKILL (as from the OOM killer) leaves no result file, and this cluster, like many small
    # ones, keeps no accounting for sacct to tell that the job ended: only its controller knows.
    log = tmp_path / "sweep.log"
    proc = start_script(
        "train.py",
        "-m",
        *SLURM_LAUNCHER,
        *quick_overrides,
        f"trainer.max_steps={STEPS}",
        f"hydra.sweep.dir={tmp_path}",
        log=log,
    )
    wait_for(lambda: (tmp_path / "0" / "train.log").is_file(), "the job's start")
    job_id = submitted_job_id(tmp_path)
    slurm("scancel", "--signal=KILL", job_id)
    assert ended(proc, log, tmp_path, timeout=180) == 1, log.read_text()[-3000:]
    _, _, (row,) = sweep_summary(tmp_path)
    assert row.status == "failed"
    assert f"SLURM job {job_id} ended" in row.error and "without writing its result" in row.error


def test_a_slurm_job_requeued_mid_run_resumes_exactly_and_is_not_retrained_once_finished(
    slurm_cluster, quick_overrides, tmp_path
):
    reference, sweep = tmp_path / "reference", tmp_path / "sweep"
    run_script(
        "train.py", *quick_overrides, f"trainer.max_steps={STEPS}", f"hydra.run.dir={reference}"
    )
    log = tmp_path / "sweep.log"
    proc = start_script(
        "train.py",
        "-m",
        *SLURM_LAUNCHER,
        *quick_overrides,
        f"trainer.max_steps={STEPS}",
        f"hydra.sweep.dir={sweep}",
        log=log,
    )
    job = sweep / "0"
    step = wait_for(lambda: logged_past_checkpoint(job), "a checkpoint and a step past it")
    assert step < STEPS
    job_id = submitted_job_id(sweep)
    # USR2 is what submitit's --signal sends before the time limit, and what it handles as
    # preemption: it requeues the job, whose next start resumes from last.ckpt.
    slurm("scancel", "--signal=USR2", job_id)
    assert ended(proc, log, sweep, requeued=job_id) == 0, log.read_text()[-3000:]
    log = (job / "train.log").read_text()
    assert "Requeued job" in log and "resuming from" in log
    assert scalars(job) == scalars(reference)  # every value, before and after, as uninterrupted
    assert len(list((job / "tensorboard").glob("events.out.tfevents.*"))) == 2

    # Requeued again after it finished (a node failure, an admin): it does not train again.
    stamp = (job / RESULT).stat().st_mtime_ns
    # The launcher returns on the job's result file, before SLURM may have recorded its end.
    wait_for(lambda: job_state(job_id)["JobState"] == "COMPLETED", "the job's second end")
    slurm("scontrol", "requeue", job_id)

    def third_end() -> bool:
        state = start_requeued(job_id)
        return state["JobState"] == "COMPLETED" and state["Restarts"] == "2"

    wait_for(third_end, lambda: f"the job's third end: {job_state(job_id)}")
    assert "not training it again" in (job / "train.log").read_text()
    assert (job / RESULT).stat().st_mtime_ns == stamp
    assert json.loads((job / RESULT).read_text())["step"] == STEPS


def test_srun_ddp_with_two_tasks_gives_the_one_process_meta_gradient(
    slurm_cluster, quick_overrides, tmp_path
):
    overrides = [o for o in quick_overrides if not o.startswith("algo.meta_batch_size")]
    proc = subprocess.run(
        [
            "srun",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            sys.executable,
            "train.py",
            *overrides,
            "trainer=ddp",
            "trainer.devices=2",  # processes per node: srun's tasks, which Lightning joins
            "trainer.accelerator=cpu",
            "algo.meta_batch_size=4",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / RESULT).read_text())["status"] == "completed"
    assert not list((tmp_path / ".hydra").glob("resumed_*"))  # rank 1 recorded no config
    ddp, single, rank0 = meta_gradients(tmp_path / "checkpoints" / "last.ckpt", 2)
    for mine, theirs in zip(single, ddp):
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-7)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(rank0, ddp))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "hydra.launcher.partition=nope",
            "hydra.launcher.partition=nope is refused by SLURM: sbatch: error: invalid partition",
        ),
        (
            "hydra.launcher.cpus_per_task=64",  # the test node has 2
            "hydra.launcher.cpus_per_task=64 is refused by SLURM: allocation failure:",
        ),
    ],
)
def test_slurm_settings_the_cluster_refuses_are_named_before_anything_is_submitted(
    slurm_cluster, tmp_path, override, message
):
    before = set(slurm("squeue", "-h", "-o", "%i").split())
    proc = run_script(
        "train.py", "-m", *SLURM_LAUNCHER, override, f"hydra.sweep.dir={tmp_path}", expect_ok=False
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / ".submitit").exists()
    assert set(slurm("squeue", "-h", "-o", "%i").split()) <= before  # nothing submitted


def test_a_slurm_setting_of_the_wrong_type_is_refused_as_the_config_is_composed():
    """Before anything is submitted: nothing is launched before the config composes. The launcher
    takes minutes, as submitit does; its schema refuses other formats. (train.py prints the line
    alone, as for every Hydra error: tests/test_bad_inputs.py.)"""
    with (
        initialize_config_dir(config_dir=str(CONF), version_base="1.3"),
        pytest.raises(HydraException) as caught,
    ):
        compose(
            "train",
            [*SLURM_LAUNCHER, "hydra.launcher.timeout_min=1:00:00"],
            return_hydra_config=True,
        )
    assert hydra_error_line(caught.value) == (
        "Error merging override hydra.launcher.timeout_min=1:00:00; Value '1:00:00' of type "
        "'str' could not be converted to Integer"
    )


def test_the_slurm_launcher_without_sbatch_says_so(tmp_path):
    bin_only = os.path.dirname(sys.executable)  # python, but no SLURM commands
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *SLURM_LAUNCHER, f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO,
        env={**os.environ, "PATH": bin_only},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: hydra/launcher=slurm submits with SLURM's sbatch, which is not on PATH: run the "
        "sweep where SLURM is installed (a login node), or use hydra/launcher=parallel on this "
        "machine"
    )


# train.py with the launcher plugins hidden, as where the `cluster` extra is not installed: run
# once per launcher named on the command line (one process, the imports paid once), each run's
# exit status printed after it.
WITHOUT_PLUGINS = """
import runpy, sys
for name in ("hydra_plugins.hydra_submitit_launcher", "hydra_plugins.hydra_joblib_launcher"):
    sys.modules[name] = None
for launcher in sys.argv[1:]:
    sys.argv = ["train.py", "-m", f"hydra/launcher={launcher}"]
    try:
        runpy.run_path("train.py", run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = exit.code
    print(f"exit status {status}", file=sys.stderr, flush=True)
"""
PLUGINS = {"slurm": "hydra-submitit-launcher", "parallel": "hydra-joblib-launcher"}


def test_a_launcher_without_its_plugin_names_the_install_command():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_PLUGINS, *PLUGINS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stderr.strip().split("exit status ")
    for (launcher, package), before, status in zip(PLUGINS.items(), said, said[1:]):
        assert status.startswith("2"), proc.stderr[-3000:]
        assert before.strip().splitlines()[-1] == (
            f"error: hydra/launcher={launcher} needs {package}, which is not installed: "
            'pip install -e ".[cluster]"'
        )
    assert len(said) == len(PLUGINS) + 1, proc.stderr[-3000:]
