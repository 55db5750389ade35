"""Nothing a run wrote is overwritten: a new run into a run's folder is refused, a folder a run is
training in is locked, a resume keeps the best it had wherever its folder now lives, a refused
resume changes nothing, and a sweep's job that starts over sets its earlier attempt aside."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshot.errors import ConfigError
from fewshot.experiments.cluster import requeued_resume
from fewshot.experiments.runs import (
    LOCK,
    Run,
    config_subdir,
    entry_refusal,
    lock_run,
    locked_run,
    made_folder,
    unlock_run,
)
from fewshot.experiments.sweep import Job, recorded_job
from tests.helpers import REPO, run_script, snapshot, start_script, wait_for

RANKS = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def first_process(monkeypatch):
    """As a user's own run: not one of srun's or torchrun's later processes, not requeued."""
    for name in RANKS:
        monkeypatch.delenv(name, raising=False)


# trained_run (tests/conftest.py): a finished 4-step run (validated at steps 2 and 4), shared by
# the session; tests here change only copies of it (copy_of_trained_run, or `copied`).


def copied(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert (proc.stdout + proc.stderr).count(line.removeprefix("error: ")) == 1
    return line


def with_best_score(path: Path, score: float) -> None:
    """Rewrite the best val/acc recorded in checkpoint `path` (its ModelCheckpoint's state)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
    checkpoint["callbacks"][key]["best_model_score"] = torch.tensor(score)
    torch.save(checkpoint, path)


def recorded_best(path: Path) -> tuple[float, str]:
    """The best val/acc and best checkpoint path a checkpoint recorded."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(state["best_model_score"]), state["best_model_path"]


# A new run into a run's folder; the folder a run is training in; a folder under a file


@pytest.mark.parametrize("resumed_from", [None, "best.ckpt"], ids=["new", "from-its-best"])
def test_a_new_run_into_a_finished_runs_folder_is_refused_and_changes_nothing(
    resumed_from, copy_of_trained_run, quick_overrides
):
    run = copy_of_trained_run
    before = snapshot(run)
    ckpt = [f"ckpt_path={run}/checkpoints/{resumed_from}"] if resumed_from else []
    proc = run_script("train.py", *quick_overrides, *ckpt, f"hydra.run.dir={run}", expect_ok=False)
    assert error_line(proc) == (
        f"error: hydra.run.dir={run} already holds a run ({run}/.hydra/config.yaml): a new run "
        "there would overwrite its checkpoints and result and mix its TensorBoard events; resume "
        f"it with ckpt_path={run}/checkpoints/last.ckpt, or choose another hydra.run.dir"
    )
    assert snapshot(run) == before  # Hydra's record of the run and its log included
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]


@pytest.mark.parametrize(
    "sign", [".hydra/config.yaml", "checkpoints", "result.json", "tensorboard"]
)
def test_each_sign_of_a_run_makes_its_folder_one_a_new_run_may_not_enter(
    sign, trained_run, tmp_path
):
    folder = tmp_path / "folder"
    copy = folder / sign
    copy.parent.mkdir(parents=True)
    if (trained_run / sign).is_dir():
        shutil.copytree(trained_run / sign, copy)
    else:
        shutil.copy(trained_run / sign, copy)
    assert Run(folder).record() == (next(copy.glob("events.*")) if sign == "tensorboard" else copy)
    refusal = entry_refusal(folder, None)
    assert refusal.startswith(
        f"hydra.run.dir={folder} already holds a run ({Run(folder).record()})"
    )
    if sign != "checkpoints":  # nothing to resume: the other way out is named alone
        assert refusal.endswith("it has no last.ckpt to resume from: choose another hydra.run.dir")


def test_a_folder_without_a_run_in_it_may_be_entered(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / LOCK).write_text("pid 1 on elsewhere\n")  # a lock alone is no run
    for folder in (tmp_path, tmp_path / "absent"):
        assert Run(folder).record() is None and entry_refusal(folder, None) is None


@pytest.mark.parametrize(
    "who", ["resume", "RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_RESTART_COUNT"]
)
def test_the_runs_own_resume_later_processes_and_requeue_may_enter_its_folder(
    who, trained_run, monkeypatch, tmp_path
):
    ckpt_path = None
    if who == "resume":
        ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    else:
        monkeypatch.setenv(who, "1")
    assert entry_refusal(trained_run, ckpt_path) is None
    if who in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        assert config_subdir(str(trained_run)) is None  # the first process records the config
        with locked_run(tmp_path):  # and holds the lock the others share
            assert not (tmp_path / LOCK).exists()


def test_a_run_into_a_folder_under_a_file_is_one_line_naming_the_file(quick_overrides, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a folder\n")
    proc = run_script("train.py", *quick_overrides, f"hydra.run.dir={file}/run", expect_ok=False)
    assert error_line(proc) == (
        f"error: hydra.run.dir={file}/run lies under a file ({file}), not a folder: choose "
        "another hydra.run.dir"
    )
    assert file.read_text() == "not a folder\n"
    with pytest.raises(ConfigError, match=f"hydra.run.dir={file} is a file, not a folder"):
        made_folder(file, "hydra.run.dir")
    with pytest.raises(ConfigError, match=f"hydra.sweep.dir={file}/a/b lies under a file"):
        made_folder(file / "a" / "b", "hydra.sweep.dir")


def test_a_folder_is_locked_by_one_process_and_a_crashed_one_leaves_it_free(tmp_path):
    lock_run(tmp_path)
    try:
        lock_run(tmp_path)  # held by this process already: no second lock to conflict with
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from fewshot.experiments.runs import lock_run; lock_run({str(tmp_path)!r})",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode != 0
        assert f"{tmp_path} is in use: a run is training in it (pid {os.getpid()} on " in (
            other.stderr
        )
    finally:
        unlock_run(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from fewshot.experiments.runs import lock_run; lock_run({str(tmp_path)!r}); "
            "print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            lock_run(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run(tmp_path)  # the kernel released the dead process's lock
    unlock_run(tmp_path)


def test_a_second_run_into_a_folder_a_run_is_training_in_is_refused(
    copy_of_trained_run, quick_overrides, tmp_path
):
    run = copy_of_trained_run
    resume = [*quick_overrides, f"ckpt_path={run}/checkpoints/last.ckpt"]
    first = start_script("train.py", *resume, "trainer.max_steps=100000", log=tmp_path / "log")
    try:
        # Locked, then its own record written (.hydra/resumed_<time>): Hydra writes it after
        # the lock is taken.
        wait_for(
            lambda: (
                f"pid {first.pid} on" in (run / LOCK).read_text()
                and list((run / ".hydra").glob("resumed_*"))
            ),
            lambda: f"the first run to lock its folder: {(tmp_path / 'log').read_text()[-2000:]}",
        )
        hydra_record = sorted(p.name for p in (run / ".hydra").iterdir())
        second = run_script("train.py", *resume, expect_ok=False)
        assert error_line(second).startswith(
            f"error: {run} is in use: a run is training in it (pid {first.pid} on "
        )
        assert sorted(p.name for p in (run / ".hydra").iterdir()) == hydra_record
        assert first.poll() is None  # the first one trains on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# The best a resumed run keeps


def test_a_moved_run_resumed_keeps_its_best_checkpoint_and_score(
    trained_run, quick_overrides, tmp_path
):
    run = copied(trained_run, tmp_path / "moved")
    # A best no later validation of this run can reach: any that replaced it would regress.
    with_best_score(run / "checkpoints" / "last.ckpt", 1.0)
    best = (run / "checkpoints" / "best.ckpt").read_bytes()
    run_script(
        "train.py",
        *quick_overrides,
        "trainer.max_steps=6",
        f"ckpt_path={run}/checkpoints/last.ckpt",
    )
    assert (run / "checkpoints" / "best.ckpt").read_bytes() == best
    result = Run(run).read_result()
    assert result["status"] == "completed" and result["step"] == 6
    assert result["val/acc"] == 1.0
    # Pointed at the folder it now lives in, not where it was trained.
    assert recorded_best(run / "checkpoints" / "last.ckpt") == (
        1.0,
        str(run / "checkpoints" / "best.ckpt"),
    )


def test_a_run_resumed_from_best_ckpt_starts_a_new_folder_with_a_best_of_its_own(
    copy_of_trained_run, quick_overrides, tmp_path
):
    run, fork = copy_of_trained_run, tmp_path / "fork"
    with_best_score(run / "checkpoints" / "best.ckpt", 1.0)
    before = snapshot(run)
    run_script(
        "train.py",
        *quick_overrides,
        "trainer.max_steps=6",
        f"ckpt_path={run}/checkpoints/best.ckpt",
        f"hydra.run.dir={fork}",
    )
    assert snapshot(run) == before
    score, path = recorded_best(fork / "checkpoints" / "last.ckpt")
    assert path == str(fork / "checkpoints" / "best.ckpt") and Path(path).is_file()
    assert Run(fork).read_result()["val/acc"] == score < 1.0  # scored by its own validation


# A refused resume; a sweep's jobs entered again


def test_a_refused_resume_changes_no_checkpoint_result_evaluation_or_event(
    copy_of_trained_run, quick_overrides
):
    run = copy_of_trained_run
    (run / "eval").mkdir()
    (run / "eval" / "best_600ep_seed0.json").write_text('{"test/acc": 0.5}\n')
    kept = ("checkpoints", "result.json", "eval", "tensorboard")
    before = {k: v for k, v in snapshot(run).items() if k.startswith(kept)}
    proc = run_script(
        "train.py",
        *quick_overrides,
        f"ckpt_path={run}/checkpoints/last.ckpt",
        "way=20",
        expect_ok=False,
    )
    assert error_line(proc).startswith(
        f"error: ckpt_path={run}/checkpoints/last.ckpt does not fit this config: way=20 "
        "(checkpoint: 5)"
    )
    assert {k: v for k, v in snapshot(run).items() if k.startswith(kept)} == before
    assert Run(run).read_result()["status"] == "completed"


def config(**values):
    return OmegaConf.create({"way": 5, "ckpt_path": None, "skip_finished": True, **values})


def test_a_failure_before_training_keeps_a_completed_result_so_a_rerun_sweep_reuses_it(tmp_path):
    with recorded_job(tmp_path, config(), multirun=True) as job:
        job.starts_training()
        job.completed(0.75, step=40)
    completed = Run(tmp_path).read_result()
    resume = config(ckpt_path=str(Run(tmp_path).last_ckpt))
    with pytest.raises(ConfigError), recorded_job(tmp_path, resume, multirun=False):
        raise ConfigError("ckpt_path=... does not fit this config")  # a refused resume
    assert Run(tmp_path).read_result() == completed
    with recorded_job(tmp_path, config(skip_finished=False), multirun=True) as job:
        raise ConfigError("data.root=/nowhere holds no Omniglot")  # asked to retrain, could not
    assert Run(tmp_path).read_result() == completed and job.value is None
    with recorded_job(tmp_path, config(), multirun=True) as job:
        assert job.finished == completed  # a rerun sweep does not train it again


def test_a_refused_resume_keeps_even_a_failed_runs_result(tmp_path):
    failed = {"status": "failed", "error": "training diverged at step 9", "config": "x"}
    Run(tmp_path).write_result(failed)
    resume = config(ckpt_path=str(Run(tmp_path).last_ckpt))
    with pytest.raises(ConfigError), recorded_job(tmp_path, resume, multirun=False):
        raise ConfigError("does not fit this config")
    assert Run(tmp_path).read_result() == failed


def test_a_failure_once_training_started_or_in_a_retried_job_is_recorded(tmp_path):
    Run(tmp_path).write_result({"status": "completed", "val/acc": 0.5, "config": "x"})
    resume = config(ckpt_path=str(Run(tmp_path).last_ckpt))
    with recorded_job(tmp_path, resume, multirun=True) as job:
        job.starts_training()
        raise RuntimeError("killed by the OOM killer")
    assert Run(tmp_path).read_result()["status"] == "failed"
    with recorded_job(tmp_path, config(), multirun=True):  # retried, failed again: the newer
        raise ConfigError("data.root=/nowhere holds no Omniglot")
    assert Run(tmp_path).read_result()["error"] == "data.root=/nowhere holds no Omniglot"


def test_a_job_starting_over_sets_its_earlier_attempt_aside_and_a_resume_does_not(
    trained_run, tmp_path
):
    for name, resumes in (("fresh", False), ("resumed", True)):
        run = copied(trained_run, tmp_path / name)
        trained = snapshot(run)
        Job(Run(run), "digest", None, continuing=resumes).starts_training()
        if resumes:
            assert snapshot(run) == trained
            continue
        (aside,) = (run / "earlier").iterdir()
        assert sorted(p.name for p in aside.iterdir()) == [
            "checkpoints",
            "result.json",
            "tensorboard",
        ]
        assert snapshot(aside) == {
            k: v for k, v in trained.items() if k.startswith(("checkpoints", "result", "tensorb"))
        }
        assert Run(run).record() == run / ".hydra" / "config.yaml"  # Hydra's records stay
        assert not (run / "checkpoints").exists() and (run / "train.log").is_file()


def test_a_rerun_sweep_retrains_a_failed_job_with_its_earlier_files_set_aside(
    trained_run, quick_overrides, tmp_path
):
    sweep = tmp_path / "sweep"
    job = copied(trained_run, sweep / "0")
    Run(job).write_result({"status": "failed", "error": "killed", "config": "x"})
    earlier = snapshot(job)
    proc = run_script("train.py", "-m", *quick_overrides, f"hydra.sweep.dir={sweep}")
    (aside,) = (job / "earlier").iterdir()
    assert snapshot(aside) == {
        k: v for k, v in earlier.items() if k.startswith(("checkpoints", "result", "tensorboard"))
    }
    result = Run(job).read_result()
    assert result["status"] == "completed" and result["step"] == 4, proc.stdout[-2000:]
    assert len(list((job / "tensorboard").glob("events.*"))) == 1  # no events mixed in
    assert recorded_best(job / "checkpoints" / "last.ckpt")[1] == str(
        job / "checkpoints" / "best.ckpt"
    )
    assert "set aside in" in (job / "train.log").read_text()


def test_a_requeued_job_started_from_another_checkpoint_continues_from_its_own(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    cfg = OmegaConf.create({"ckpt_path": "/elsewhere/checkpoints/best.ckpt"})
    assert requeued_resume(cfg, tmp_path) is None  # no checkpoint of its own: as it started
    assert cfg.ckpt_path == "/elsewhere/checkpoints/best.ckpt"
    Run(tmp_path).checkpoints.mkdir()
    Run(tmp_path).last_ckpt.touch()
    assert requeued_resume(cfg, tmp_path) is None
    assert cfg.ckpt_path == str(Run(tmp_path).last_ckpt)
