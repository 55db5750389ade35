"""Sweeps keep their work: failures are recorded and listed, finished jobs are not retrained,
a summary of every job is written, and the Optuna preset runs."""

import importlib.util
import json
import math

import pytest
import yaml
from omegaconf import OmegaConf

from fewshot.errors import ConfigError, TrainingDiverged
from fewshot.experiments.runs import RESULT, Run
from fewshot.experiments.sweep import (
    config_digest,
    recorded_job,
    sweep_summary,
    write_sweep_summary,
)
from tests.helpers import run_script, run_sweep_with_failures


def config(**values):
    return OmegaConf.create({"way": 5, "algo": {"meta_lr": 1e-3}, "skip_finished": True, **values})


def test_a_failure_in_a_multirun_job_is_recorded_and_swallowed(tmp_path):
    with recorded_job(tmp_path, config(), multirun=True) as job:
        raise RuntimeError("CUDA out of\nmemory")
    result = Run(tmp_path).read_result()
    assert result["status"] == "failed"
    assert result["error"] == "RuntimeError: CUDA out of memory"  # one line
    assert "Traceback" in result["traceback"]
    assert job.value is None


def test_a_failure_in_a_single_run_is_recorded_and_raised(tmp_path):
    with pytest.raises(ConfigError), recorded_job(tmp_path, config(), multirun=False):
        raise ConfigError("way=1 is out of range")
    assert Run(tmp_path).read_result()["error"] == "way=1 is out of range"


def test_a_diverged_job_is_recorded_as_the_users_error_in_one_line(tmp_path, caplog):
    with recorded_job(tmp_path, config(), multirun=True):
        raise TrainingDiverged("training diverged at step 2: the meta-loss is nan")
    result = Run(tmp_path).read_result()
    assert result["error"] == "training diverged at step 2: the meta-loss is nan"
    assert "traceback" not in result  # a setting to change, not a crash
    assert [r.exc_info for r in caplog.records] == [None]


def test_a_diverging_job_of_a_sweep_is_summarised_by_its_reason(quick_overrides, tmp_path):
    proc = run_script(
        "train.py",
        "-m",
        *quick_overrides,
        "algo.meta_lr=1e30",
        f"hydra.sweep.dir={tmp_path}",
        expect_ok=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (row,) = sweep_summary(tmp_path)[2]
    assert row.status == "failed"
    assert row.error.startswith("training diverged at step 2: the meta-loss is nan;")
    assert "Traceback" not in (tmp_path / "0" / "train.log").read_text()
    assert f"| failed | {row.error} |" in (tmp_path / "summary.md").read_text()


def test_a_completed_job_records_its_value_and_the_config_it_ran(tmp_path):
    with recorded_job(tmp_path, config(), multirun=True) as job:
        job.completed(0.75, step=40)
    assert job.value == 0.75
    assert Run(tmp_path).read_result() == {
        "status": "completed",
        "val/acc": 0.75,
        "step": 40,
        "config": config_digest(config()),
    }


def test_a_job_that_never_validated_or_diverged_hands_the_sweeper_none(tmp_path):
    for best in (None, float("nan")):
        with recorded_job(tmp_path, config(), multirun=True) as job:
            job.completed(best, step=4)
        assert job.value is None


def test_a_finished_job_is_reused_only_in_a_multirun_with_the_same_config(tmp_path):
    with recorded_job(tmp_path, config(), multirun=True) as job:
        job.completed(0.5, step=10)
    with recorded_job(tmp_path, config(), multirun=True) as job:
        assert job.finished is not None and job.value == 0.5
    with recorded_job(tmp_path, config(), multirun=False) as job:
        assert job.finished is None  # a single run trains when asked to
    with recorded_job(tmp_path, config(way=20), multirun=True) as job:
        assert job.finished is None  # another config in the same folder
    with recorded_job(tmp_path, config(skip_finished=False), multirun=True) as job:
        assert job.finished is None  # asked to retrain


def test_a_failed_job_is_not_reused(tmp_path):
    with recorded_job(tmp_path, config(), multirun=True):
        raise ValueError("boom")
    with recorded_job(tmp_path, config(), multirun=True) as job:
        assert job.finished is None


def fake_job(sweep_dir, name, overrides, result=None):
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (job / RESULT).write_text(json.dumps(result))


def test_summary_lists_jobs_best_first_then_failed_then_unfinished(tmp_path):
    common = ["trainer.max_steps=100"]
    fake_job(tmp_path, "0", ["algo.meta_lr=0.1", *common], {"status": "failed", "error": "boom"})
    fake_job(tmp_path, "1", ["algo.meta_lr=0.01", *common], {"status": "completed", "val/acc": 0.6})
    fake_job(tmp_path, "2", ["algo.meta_lr=0.001", *common])  # killed: no result
    fake_job(
        tmp_path, "10", ["algo.meta_lr=1e-4", *common], {"status": "completed", "val/acc": 0.9}
    )
    varying, common_overrides, rows = sweep_summary(tmp_path)
    assert [r.name for r in rows] == ["10", "1", "0", "2"]
    assert [r.status for r in rows] == ["completed", "completed", "failed", "incomplete"]
    assert varying == ["algo.meta_lr"] and common_overrides == {"trainer.max_steps": "100"}
    md_path, _ = write_sweep_summary(tmp_path)
    text = md_path.read_text()
    assert "| 10 | 1e-4 | 90.00 |" in text and "| failed | boom |" in text
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0] == "job,algo.meta_lr,trainer.max_steps,val/acc,step,status,error"
    assert csv[1] == "10,1e-4,100,0.9,,completed,"


def test_a_failed_job_is_listed_and_the_others_keep_their_results(sweep_with_failures):
    sweep_dir, proc = sweep_with_failures
    assert proc.returncode == 1, proc.stderr[-3000:]  # after all jobs ran, not at the first failure
    assert "Traceback" not in proc.stderr
    varying, _, rows = sweep_summary(sweep_dir)
    assert varying == ["trainer.accelerator", "algo.meta_lr"]
    assert [r.overrides["trainer.accelerator"] for r in rows] == ["cpu", "cpu", "tpu", "tpu"]
    completed, failed = rows[:2], rows[2:]
    for row in completed:
        assert row.status == "completed" and 0 <= row.val_acc <= 1 and row.step == 4
        assert (sweep_dir / row.name / "checkpoints" / "best.ckpt").is_file()
    assert completed[0].val_acc >= completed[1].val_acc
    for row in failed:
        assert row.status == "failed" and "torch_xla" in row.error
        assert "Traceback" in Run(sweep_dir / row.name).read_result()["traceback"]
    summary = (sweep_dir / "summary.md").read_text()
    assert "4 jobs: 2 completed, 2 failed" in summary
    assert summary in proc.stdout  # printed at the end too


def test_rerunning_a_sweep_skips_finished_jobs_and_retries_failed_ones(
    sweep_with_failures, quick_overrides
):
    sweep_dir, _ = sweep_with_failures
    done = [r.name for r in sweep_summary(sweep_dir)[2] if r.status == "completed"]
    stamps = {job: (sweep_dir / job / RESULT).stat().st_mtime_ns for job in done}
    failed_stamp = (sweep_dir / "0" / RESULT).stat().st_mtime_ns
    proc = run_sweep_with_failures(sweep_dir, quick_overrides)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for job in done:
        assert (sweep_dir / job / RESULT).stat().st_mtime_ns == stamps[job]
        assert len(list((sweep_dir / job / "tensorboard").glob("events.*"))) == 1  # not retrained
        assert "not training it again" in (sweep_dir / job / "train.log").read_text()
    assert (sweep_dir / "0" / RESULT).stat().st_mtime_ns > failed_stamp  # tried again


def test_optuna_preset_runs_two_trials_and_maximises_val_acc(quick_overrides, tmp_path):
    # Part of what the suite tests: CI installs it (pip install -e ".[dev,sweep]").
    assert importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper"), "pip install -e .[sweep]"
    proc = run_script(
        "train.py",
        "-m",
        "sweep=optuna_lr",
        "hydra.sweeper.n_trials=2",
        *quick_overrides,
        f"hydra.sweep.dir={tmp_path}",
    )
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    _, _, rows = sweep_summary(tmp_path)
    assert [r.status for r in rows] == ["completed", "completed"], proc.stdout[-2000:]
    assert best.best_value == max(r.val_acc for r in rows)
    for row in rows:
        meta_lr = float(row.overrides["algo.meta_lr"])
        base_lr = float(row.overrides["algo.base_lr"])
        assert 1e-4 <= meta_lr <= 1e-2 and 1e-2 <= base_lr <= 1.0
    assert math.isclose(best.best_params["algo.meta_lr"], float(rows[0].overrides["algo.meta_lr"]))


def test_jobs_that_differ_only_by_seed_are_pooled_in_the_summary(tmp_path):
    for job, (lr, seed, acc) in enumerate([("0.1", 0, 0.5), ("0.1", 1, 0.7), ("0.2", 0, 0.9)]):
        result = {"status": "completed", "val/acc": acc}
        fake_job(tmp_path, str(job), [f"algo.meta_lr={lr}", f"seed={seed}"], result)
    fake_job(tmp_path, "3", ["algo.meta_lr=0.2", "seed=1"], {"status": "failed", "error": "x"})
    md_path, _ = write_sweep_summary(tmp_path)
    assert "## Over seeds" in md_path.read_text()
    csv = (tmp_path / "summary_seeds.csv").read_text().splitlines()
    assert csv[0] == "algo.meta_lr,val/acc mean,val/acc std,n,seeds,failed"
    assert csv[1].startswith("0.2,0.9,,1,0,1") and csv[2].startswith("0.1,0.6")
    assert csv[2].endswith(",2,0 1,0")


def test_an_optuna_study_continues_toward_n_trials_when_rerun(quick_overrides, tmp_path):
    command = ["train.py", "-m", "sweep=optuna_lr", *quick_overrides, f"hydra.sweep.dir={tmp_path}"]
    run_script(*command, "hydra.sweeper.n_trials=1")
    first = (tmp_path / "0" / RESULT).stat().st_mtime_ns
    proc = run_script(*command, "hydra.sweeper.n_trials=2")
    assert "1 of 2 trials finished, 1 to go" in proc.stderr + proc.stdout
    _, _, rows = sweep_summary(tmp_path)
    assert sorted(r.name for r in rows) == ["0", "1"]  # trial k in folder k
    assert (tmp_path / "0" / RESULT).stat().st_mtime_ns == first  # not run again
    assert (tmp_path / "optuna.db").is_file()
    assert rows[0].overrides["algo.meta_lr"] != rows[1].overrides["algo.meta_lr"]
