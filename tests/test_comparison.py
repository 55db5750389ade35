"""evaluate.py over many runs: one table of a sweep's jobs or of several checkpoints, with
several episode counts from one pass."""

import csv
import importlib.util
import json

import pytest
from hydra import compose, initialize_config_dir

from fewshot.checkpoints.reading import load_checkpoint
from tests.helpers import CONF, REPO, run_script


@pytest.fixture(scope="module")
def sweep_table(sweep_with_failures):
    sweep_dir, _ = sweep_with_failures
    proc = run_script("evaluate.py", f"run={sweep_dir}", "episodes=[6,4]", "threads=1")
    return sweep_dir, proc


def test_a_sweep_is_evaluated_into_one_table_best_validation_first(sweep_table):
    sweep_dir, proc = sweep_table
    with open(sweep_dir / "evaluation_seed0.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trainer.accelerator"] for r in rows] == ["cpu", "cpu", "tpu", "tpu"]
    evaluated, failed = rows[:2], rows[2:]
    assert float(evaluated[0]["val/acc_best"]) >= float(evaluated[1]["val/acc_best"])
    for row in evaluated:
        summary = json.loads((sweep_dir / row["run"] / "result.json").read_text())
        assert float(row["val/acc_best"]) == pytest.approx(summary["val/acc"])
        best = load_checkpoint(sweep_dir / row["run"] / "checkpoints" / "best.ckpt")[1]
        assert row["steps"] == str(best["global_step"])  # the best validation's step, 2 or 4
        assert row["batch norm (train/test)"] == "transductive/transductive"
        assert (
            row["inner loop (test)"] == "base_lr=0.4 inner_steps_test=3"
            and row["status"] == "evaluated"
        )
        for n in (4, 6):
            written = json.loads(
                (sweep_dir / row["run"] / "eval" / f"best_{n}ep_seed0.json").read_text()
            )
            assert float(row[f"test/acc_{n}"]) == pytest.approx(written["test/acc"])
            assert float(row[f"test/acc_ci95_{n}"]) == pytest.approx(written["test/acc_ci95"])
    for row in failed:
        assert row["status"].startswith("failed: ") and "torch_xla" in row["status"]
        assert row["test/acc_4"] == ""
    table = (sweep_dir / "evaluation_seed0.md").read_text()
    assert (
        "| run | trainer.accelerator | algo.meta_lr | val/acc % | test/acc % (4 ep) | test/acc % (6 ep) |"
        in table
    )
    assert table in proc.stdout


def test_fewer_episodes_are_a_prefix_equal_to_evaluating_them_alone(sweep_table, tmp_path):
    sweep_dir, _ = sweep_table
    job = next(p.parent for p in sorted(sweep_dir.glob("*/checkpoints")))
    prefix = json.loads((job / "eval" / "best_4ep_seed0.json").read_text())
    alone = tmp_path / "alone.json"
    run_script("evaluate.py", f"ckpt={job}/checkpoints/best.ckpt", "episodes=4", f"output={alone}")
    assert json.loads(alone.read_text()) == prefix


def test_a_list_of_checkpoints_is_evaluated_into_one_table(sweep_table, tmp_path):
    sweep_dir, _ = sweep_table
    ckpts = [str(p / "best.ckpt") for p in sorted(sweep_dir.glob("*/checkpoints"))]
    table = tmp_path / "table.md"
    run_script("evaluate.py", f"ckpt=[{','.join(ckpts)}]", "episodes=4", f"output={table}")
    with open(table.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["checkpoint"] for r in rows) == sorted(ckpts)
    assert all(r["status"] == "evaluated" and r["test/acc_4"] for r in rows)


def test_evaluate_without_a_checkpoint_or_run_is_one_line(capsys):
    """evaluate.py's own function on its default config, in this process (as a subprocess, with
    Hydra's console: tests/test_bad_inputs.py)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate")
    with pytest.raises(SystemExit) as exit:
        evaluate.main.__wrapped__(cfg)  # under @hydra.main
    assert exit.value.code == 2
    out, err = capsys.readouterr()  # err: also what Hydra's plugin scan says of pytest's warnings
    assert out == "" and err.count("give ckpt=") == 1
    assert err.splitlines()[-1] == (
        "error: give ckpt=<file> (or a list [a,b]) or run=<run or sweep folder>"
    )
