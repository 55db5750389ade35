"""Where evaluate.py writes: a file of its own for every evaluation that can score differently,
beside a checkpoint that is not in a run, checked writable before any episode is scored; and a
sweep with a damaged checkpoint scored as far as it can be, the damaged one marked."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import fewshot.evaluation.protocol
from fewshot.checkpoints.reading import load_checkpoint
from fewshot.errors import ConfigError
from fewshot.evaluation.protocol import result_paths, score_checkpoint
from fewshot.experiments.runs import eval_result_path
from fewshot.files import unwritable
from tests.helpers import OLD_CHECKPOINTS, run_script

# evaluate.py's overrides, none given (evaluate.run_overrides of its defaults).
NO_OVERRIDES = {
    "data.root": None,
    "algo.inner_steps_test": None,
    "algo.batch_norm_test": None,
    "way": None,
    "shot": None,
    "query": None,
    "algo.compile": None,
    "trainer.precision": None,
}


def run_with_checkpoint(
    run: Path, data_root: Path, cache_dir: Path, old: str = "maml", job: str | None = None
) -> Path:
    """A run folder as train.py leaves it (`.hydra/overrides.yaml`, `checkpoints/best.ckpt`)
    holding a committed old checkpoint that reads its data from `data_root`, its cache from
    `cache_dir`; returns the checkpoint."""
    checkpoint = torch.load(OLD_CHECKPOINTS / f"{old}.ckpt", map_location="cpu", weights_only=True)
    checkpoint["fewshot_config"]["data"].update(root=str(data_root), cache_dir=str(cache_dir))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job or 0}"]))
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    torch.save(checkpoint, ckpt)
    return ckpt


def default_result_name(ckpt: Path, **overrides) -> str:
    """The file evaluate.py, given `overrides`, writes a 4-episode result of `ckpt` to (as
    evaluate_prefixes composes the evaluation's config), named relative to the run folder."""
    own, _ = load_checkpoint(ckpt)
    given = {**NO_OVERRIDES, **overrides}
    cfg = own.copy()
    for key, value in given.items():
        if value is not None:
            OmegaConf.update(cfg, key, value, force_add=True)
    (path,) = result_paths(ckpt, [4], 0, given, cfg, own)
    return str(path.relative_to(ckpt.parent.parent))


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({}, "eval/best_4ep_seed0.json"),
        # each setting that changes the number, set to another value than the run's own
        ({"algo.inner_steps_test": 1}, "eval/best_steps-1_4ep_seed0.json"),
        ({"algo.batch_norm_test": "support"}, "eval/best_bn-support_4ep_seed0.json"),
        ({"shot": 5}, "eval/best_5w5s15q_4ep_seed0.json"),
        ({"query": 5}, "eval/best_5w1s5q_4ep_seed0.json"),
        ({"trainer.precision": "bf16-mixed"}, "eval/best_bf16-mixed_4ep_seed0.json"),
        (
            {
                "algo.inner_steps_test": 5,
                "algo.batch_norm_test": "support",
                "shot": 2,
                "trainer.precision": "bf16-mixed",
            },
            "eval/best_5w2s15q_steps-5_bn-support_bf16-mixed_4ep_seed0.json",
        ),
        # the run's own values restated: the run's own test, its own file
        (
            {
                "algo.inner_steps_test": 3,
                "algo.batch_norm_test": "transductive",
                "way": 5,
                "shot": 1,
                "query": 15,
                "trainer.precision": "32-true",
            },
            "eval/best_4ep_seed0.json",
        ),
        # where the data is and how the passes run do not change what is scored
        ({"data.root": "/elsewhere/omniglot", "algo.compile": True}, "eval/best_4ep_seed0.json"),
    ],
    ids=[
        "none",
        "inner_steps_test",
        "batch_norm_test",
        "shot",
        "query",
        "precision",
        "all_four",
        "run_own_values",
        "root_and_compile",
    ],
)
def test_an_evaluation_file_is_named_by_the_test_settings_that_differ_from_the_runs_own(
    tmp_path, overrides, name
):
    ckpt = run_with_checkpoint(tmp_path / "run", tmp_path / "data", tmp_path / "cache")
    assert default_result_name(ckpt, **overrides) == name


def test_the_runs_own_value_is_read_from_the_checkpoint_not_from_evaluates_defaults(tmp_path):
    # This run tests with support batch norm: transductive is the other mode here.
    ckpt = run_with_checkpoint(tmp_path / "run", tmp_path, tmp_path, old="maml_support_bn")
    assert default_result_name(ckpt, **{"algo.batch_norm_test": "support"}) == (
        "eval/best_4ep_seed0.json"
    )
    assert default_result_name(ckpt, **{"algo.batch_norm_test": "transductive"}) == (
        "eval/best_bn-transductive_4ep_seed0.json"
    )


def test_checkpoints_outside_a_run_write_beside_themselves_by_their_own_file_name(tmp_path):
    a, b = tmp_path / "models" / "a" / "best.ckpt", tmp_path / "models" / "b" / "best.ckpt"
    assert eval_result_path(a, 4, 0) == a.parent / "best.ckpt_4ep_seed0.json"
    assert eval_result_path(b, 4, 0) == b.parent / "best.ckpt_4ep_seed0.json"
    pt = a.parent / "best.pt"  # another file of the same folder, the same stem
    assert eval_result_path(pt, 4, 0) == a.parent / "best.pt_4ep_seed0.json"
    run = tmp_path / "run"
    assert eval_result_path(run / "checkpoints" / "best.ckpt", 600, 0) == (
        run / "eval" / "best_600ep_seed0.json"
    )


def test_writability_is_tested_without_leaving_anything_behind(tmp_path):
    (tmp_path / "file").write_text("x")
    assert unwritable(tmp_path / "new" / "deeper" / "out.json") is None
    assert sorted(tmp_path.iterdir()) == [tmp_path / "file"]  # no folder made, no probe left
    assert unwritable(tmp_path / "file") is None  # replaced whole, as atomic_path does
    assert (
        unwritable(tmp_path / "file" / "out.json") == f"{tmp_path / 'file'} is a file, not a folder"
    )
    assert unwritable(tmp_path) == f"{tmp_path} is a folder"


@pytest.fixture
def nothing_scored(monkeypatch):
    """Fails the test where evaluation gets as far as reading the test episodes."""

    def refuse(*args, **kwargs):
        raise AssertionError("episodes were about to be scored")

    monkeypatch.setattr(fewshot.evaluation.protocol, "build_datamodule", refuse)


def test_a_result_file_that_cannot_be_written_is_refused_before_scoring(tmp_path, nothing_scored):
    ckpt = run_with_checkpoint(tmp_path / "run", tmp_path, tmp_path)
    (tmp_path / "run" / "eval").write_text("a file where the run's eval/ folder goes")
    with pytest.raises(ConfigError) as default:
        score_checkpoint(ckpt, 4, 0, NO_OVERRIDES, progress=None)
    expected = tmp_path / "run" / "eval" / "best_4ep_seed0.json"
    assert f"the result file {expected} (output=null) cannot be written" in str(default.value)
    assert "is a file, not a folder; give output=" in str(default.value)
    output = tmp_path / "run" / "eval" / "mine.json"
    with pytest.raises(ConfigError, match=f"^output={output} cannot be written"):
        score_checkpoint(ckpt, 4, 0, NO_OVERRIDES, output=output, progress=None)


def one_line_error(proc) -> str:
    """The error line of a refused entry point, checked to be its exit 2, alone, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_evaluate_refuses_an_output_under_a_file_in_one_line_before_scoring(
    tmp_path, omniglot_root
):
    # A cache of its own: building it is the first thing scoring does.
    cache = tmp_path / "cache"
    ckpt = run_with_checkpoint(tmp_path / "run", omniglot_root, cache)
    (tmp_path / "file").write_text("x")
    output = tmp_path / "file" / "result.json"
    proc = run_script(
        "evaluate.py",
        f"ckpt={ckpt}",
        "episodes=4",
        f"output={output}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        expect_ok=False,
    )
    line = one_line_error(proc)
    assert line.startswith(f"error: output={output} cannot be written: ")
    assert f"{tmp_path / 'file'} is a file, not a folder" in line
    assert not cache.exists() and "test accuracy" not in proc.stdout


def test_an_override_of_a_test_setting_keeps_the_runs_own_result(
    tmp_path, omniglot_root, omniglot_cache
):
    ckpt = run_with_checkpoint(tmp_path / "run", omniglot_root, omniglot_cache)
    own, own_path = score_checkpoint(ckpt, 4, 0, NO_OVERRIDES, threads=1, progress=None)
    written = own_path.read_text()
    overrides = {**NO_OVERRIDES, "algo.inner_steps_test": 1}
    other, other_path = score_checkpoint(ckpt, 4, 0, overrides, threads=1, progress=None)
    assert own_path == tmp_path / "run" / "eval" / "best_4ep_seed0.json"
    assert other_path == tmp_path / "run" / "eval" / "best_steps-1_4ep_seed0.json"
    assert own_path.read_text() == written  # not overwritten
    assert json.loads(written)["protocol"]["inner_steps_test"] == 3
    assert json.loads(other_path.read_text())["protocol"]["inner_steps_test"] == 1


def sweep(folder: Path, data_root: Path, cache_dir: Path, jobs: int = 3) -> list[Path]:
    """A sweep folder of `jobs` jobs (overrides seed=<job>), each with a best.ckpt."""
    return [
        run_with_checkpoint(folder / str(job), data_root, cache_dir, job=str(job))
        for job in range(jobs)
    ]


def test_a_sweep_scores_every_checkpoint_it_can_marks_the_others_and_exits_non_zero(
    tmp_path, omniglot_root, omniglot_cache
):
    good, damaged, unwritable_eval = sweep(tmp_path / "sweep", omniglot_root, omniglot_cache)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    (unwritable_eval.parent.parent / "eval").write_text("a file where eval/ goes")
    proc = run_script(
        "evaluate.py", f"run={tmp_path / 'sweep'}", "episodes=4", "threads=1", expect_ok=False
    )
    table = tmp_path / "sweep" / "evaluation_seed0.md"
    line = one_line_error(proc)
    assert line == (
        f"error: 2 of 3 checkpoints could not be evaluated: {damaged}, {unwritable_eval}; "
        f"why is in the status column of {table}"
    )
    with open(table.with_suffix(".csv")) as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "evaluated" and rows["0"]["test/acc_4"]
    assert (good.parent.parent / "eval" / "best_4ep_seed0.json").is_file()
    assert rows["1"]["status"].startswith(f"not evaluated: ckpt={damaged} cannot be read")
    assert rows["2"]["status"].startswith("not evaluated: its result file ")
    assert "is a file, not a folder" in rows["2"]["status"]
    assert rows["1"]["test/acc_4"] == rows["2"]["test/acc_4"] == ""
    assert "not evaluated: " in table.read_text()


@pytest.mark.parametrize("given", [True, False], ids=["output", "default"])
def test_a_table_that_cannot_be_written_is_refused_in_one_line_before_scoring(
    tmp_path, omniglot_root, given
):
    cache = tmp_path / "cache"
    sweep(tmp_path / "sweep", omniglot_root, cache, jobs=2)
    if given:
        (tmp_path / "file").write_text("x")
        table = tmp_path / "file" / "table.md"
        overrides = [f"output={table}"]
    else:
        table = tmp_path / "sweep" / "evaluation_seed0.md"
        table.mkdir()
        overrides = []
    proc = run_script(
        "evaluate.py", f"run={tmp_path / 'sweep'}", "episodes=4", *overrides, expect_ok=False
    )
    line = one_line_error(proc)
    where = f"output={table}" if given else f"the result file {table} (output=null)"
    assert line.startswith(f"error: {where} cannot be written: ")
    assert "output=" in line
    assert not cache.exists() and not list((tmp_path / "sweep").glob("*/eval"))
