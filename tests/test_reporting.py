"""The row model every report is made of: its cells, its order, and the columns of overrides."""

from fewshot.experiments.runs import Run
from fewshot.reporting.tables import (
    Row,
    common_overrides_line,
    markdown,
    mean_std_percent,
    override_columns,
    seed_groups,
)


def result(episodes, acc, ci95):
    """One of evaluate.py's results, as Row.evaluated takes it."""
    protocol = {"algorithm": "maml", "base_lr": 0.4, "inner_steps_test": 3, "batch_norm": "support"}
    return {
        "test/acc": acc,
        "test/acc_ci95": ci95,
        "episodes": episodes,
        "checkpoint": "/runs/a/checkpoints/best.ckpt",
        "trained_steps": 400,
        "val/acc_best": 0.6,
        "protocol": {**protocol, "batch_norm_train": "transductive"},
    }


def test_an_evaluated_row_formats_its_cells_as_every_report_shows_them():
    row = Row.evaluated("a", {"way": "5"}, [result(100, 0.9312, 0.0041), result(600, 0.93, 0.008)])
    assert (row.status, row.val_acc_percent, row.step) == ("evaluated", "60.00", 400)
    assert row.test_acc(100) == "93.12 ± 0.41" and row.test_acc(250) is None
    assert row.batch_norm == "transductive/support"
    assert row.inner_loop == "base_lr=0.4 inner_steps_test=3"
    assert row.checkpoint == "/runs/a/checkpoints/best.ckpt"
    empty = Row("b", status="failed", error="boom")
    assert (empty.batch_norm, empty.inner_loop, empty.test_acc(100)) == (None, None, None)


def test_a_recorded_row_is_what_the_runs_folder_holds(tmp_path):
    run = Run(tmp_path)
    assert Row.recorded(run, "0") == Row("0", status="incomplete")
    run.write_result({"status": "completed", "val/acc": 0.5, "step": 4, "config": "ab"})
    assert Row.recorded(run, "0") == Row("0", status="completed", val_acc=0.5, step=4)


def test_rows_rank_best_validation_first_and_rows_without_one_last():
    rows = [Row("none"), Row("low", val_acc=0.2), Row("high", val_acc=0.9), Row("zero", val_acc=0)]
    assert [r.name for r in sorted(rows, key=Row.rank)] == ["high", "low", "zero", "none"]


def test_overrides_that_vary_are_columns_and_shared_ones_one_line_above():
    rows = [Row("0", {"lr": "0.1", "steps": "9"}), Row("1", {"lr": "0.2", "steps": "9", "x": ""})]
    varying, common = override_columns(rows)
    assert varying == ["lr", "x"] and common == {"steps": "9"}
    assert common_overrides_line(common, "job") == "Overrides of every job: `steps=9`\n"
    assert common_overrides_line({}, "job") == ""
    assert override_columns(rows[:1]) == (["lr", "steps"], {})  # one row: nothing is "shared"


def test_markdown_cells_stay_on_one_line_and_escape_pipes():
    text = markdown(["a", "b"], [{"a": "x|y", "b": None}, {"a": "two\nlines"}])
    assert text.splitlines() == ["| a | b |", "|---|---|", r"| x\|y |  |", "| two lines |  |"]


def test_runs_that_differ_only_by_seed_pool_into_mean_and_sample_std():
    rows = [
        Row(str(seed), {"algo.meta_lr": "0.1", "seed": str(seed)}, "completed", val, results=r)
        for seed, val, r in (
            (0, 0.5, {600: result(600, 0.4, 0.01)}),
            (1, 0.7, {600: result(600, 0.6, 0.01)}),
        )
    ]
    rows.append(Row("2", {"algo.meta_lr": "0.2", "seed": "0"}, "failed"))
    first, second = seed_groups(rows)
    assert first.overrides == {"algo.meta_lr": "0.1"} and first.seeds == ["0", "1"]
    mean, std, n = first.val_acc()
    assert (round(mean, 9), round(std, 9), n) == (0.6, round(0.02**0.5, 9), 2)
    assert mean_std_percent(first.test_acc(600)) == "50.00 ± 14.14 (n=2)"
    assert second.val_acc() == (None, None, 0) and mean_std_percent(second.val_acc()) is None
    assert seed_groups(rows[:1]) == []  # no seed axis, nothing to pool
