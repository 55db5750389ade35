"""The on-disk contract of a run: recorded overrides, result.json, checkpoint and result paths,
the job folders of a sweep, the best score a checkpoint holds, and where a resumed run goes."""

import yaml

from fewshot.checkpoints.reading import load_checkpoint
from fewshot.experiments.runs import (
    Run,
    best_val_acc,
    config_subdir,
    eval_result_path,
    run_dir_of,
    sweep_jobs,
    task_suffix,
)


def recorded_run(folder, overrides):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return Run(folder)


def test_recorded_overrides_read_as_typed_and_as_key_values(tmp_path):
    typed = ["algo.meta_lr=1e-3", "data.root=/data/a=b", "~trainer.compile", "ckpt_path=/x.ckpt"]
    run = recorded_run(tmp_path / "run", typed)
    assert run.overrides() == typed
    assert run.override_values() == {
        "algo.meta_lr": "1e-3",
        "data.root": "/data/a=b",  # split at the first `=` only
        "~trainer.compile": "",
        "ckpt_path": "/x.ckpt",
    }
    unrecorded = Run(tmp_path / "elsewhere")
    assert unrecorded.overrides() is None and unrecorded.override_values() == {}


def test_result_json_round_trips_in_the_format_earlier_runs_wrote(tmp_path):
    run = Run(tmp_path)
    assert run.read_result() is None
    result = {"status": "completed", "val/acc": 0.75, "step": 40, "config": "ab12"}
    run.write_result(result)
    assert run.read_result() == result
    written = (
        '{\n  "status": "completed",\n  "val/acc": 0.75,\n  "step": 40,\n  "config": "ab12"\n}\n'
    )
    assert (tmp_path / "result.json").read_text() == written
    (tmp_path / "result.json").write_text("not json")  # someone else's file: as if unrecorded
    assert run.read_result() is None


def test_sweep_jobs_come_in_job_number_order(tmp_path):
    for name in ("10", "2", "0", "1", "11", "9"):
        recorded_run(tmp_path / name, [f"seed={name}"])
    (tmp_path / "3").mkdir()  # no Hydra record: not a job
    (tmp_path / ".hydra").mkdir()  # the sweep folder itself is not one of its jobs
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    jobs = sweep_jobs(tmp_path)
    assert [job.name_in(tmp_path) for job in jobs] == ["0", "1", "2", "9", "10", "11"]


def test_checkpoints_and_evaluation_results_have_their_places_in_the_run(tmp_path):
    run = Run(tmp_path / "run")
    assert run.best_ckpt == tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert run.last_ckpt == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert Run.of_checkpoint(run.best_ckpt) == run
    protocol = {"way": 20, "shot": 1, "query": 15, "batch_norm": "support"}
    assert task_suffix({"way": None, "algo.batch_norm_test": None}, protocol) == ""
    assert task_suffix({"way": 20}, protocol) == "_20w1s15q"
    assert task_suffix({"algo.batch_norm_test": "support"}, protocol) == "_bn-support"
    assert task_suffix({"way": 20, "algo.batch_norm_test": "support"}, protocol) == (
        "_20w1s15q_bn-support"
    )
    assert eval_result_path(run.best_ckpt, 600, 3) == run.dir / "eval" / "best_600ep_seed3.json"
    path = eval_result_path(run.last_ckpt, 100, 0, "_20w1s15q")
    assert path == run.dir / "eval" / "last_20w1s15q_100ep_seed0.json"


def test_the_best_score_of_a_trained_run_is_read_back_from_its_checkpoints(sweep_with_failures):
    sweep_dir, _ = sweep_with_failures
    trained = [job for job in sweep_jobs(sweep_dir) if job.best_ckpt.is_file()]
    assert len(trained) == 2
    for job in trained:
        recorded = job.read_result()["val/acc"]
        for path in (job.best_ckpt, job.last_ckpt):
            checkpoint = load_checkpoint(path)[1]
            assert best_val_acc(checkpoint) == recorded
    assert best_val_acc({"callbacks": {}}) is None  # written before the first validation


def test_a_checkpoint_of_a_run_resumes_in_that_run_and_keeps_its_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert run_dir_of(None, "outputs/new") == "outputs/new"
    assert run_dir_of(str(run / "checkpoints" / "last.ckpt"), "outputs/new") == "outputs/new"
    assert config_subdir(str(run)) == ".hydra"
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("way: 5\n")
    assert run_dir_of(str(run / "checkpoints" / "last.ckpt"), "outputs/new") == str(run)
    assert config_subdir(str(run)).startswith(".hydra/resumed_")
    # An earlier state forks a new run: the run's later checkpoints and events are kept.
    assert run_dir_of(str(run / "checkpoints" / "best.ckpt"), "outputs/new") == "outputs/new"
    loose = tmp_path / "elsewhere" / "model.ckpt"  # not inside a run: a new run directory
    assert run_dir_of(str(loose), "outputs/new") == "outputs/new"
