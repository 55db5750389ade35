"""bench/time_to_accuracy.py and bench/paired_budget.py (methods given the same minutes): the
budgets as Lightning reads them, the commands and the table; no training."""

from pathlib import Path

import pytest

from bench import paired_budget
from bench import time_to_accuracy as tta

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("minutes", "text"), [(2, "00:00:02:00"), (0.25, "00:00:00:15"), (90.5, "00:01:30:30")]
)
def test_budgets_are_lightnings_max_time(minutes, text):
    assert tta.max_time(minutes) == text


def test_the_quick_start_runs_as_a_user_runs_it_stopped_by_its_budget(tmp_path):
    recipe = tta.quickstart_overrides(Path("/omniglot"), tmp_path / "cache")
    command = tta.train_command(recipe, 5, tmp_path / "run", ["a=1"])
    assert command[1] == str(REPO / "train.py") and "experiment=quickstart" in command
    assert (
        "++trainer.max_time=00:00:05:00" in command
        and f"trainer.max_steps={tta.MANY_STEPS}" in command
    )
    assert not any(a.startswith("threads=") for a in command)
    assert command[-2:] == [
        "a=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # overrides after the recipe's
    scored = tta.evaluate_command(tmp_path / "best.ckpt", 600, tmp_path / "o.json", tmp_path / "e")
    assert {"episodes=600", "seed=0", f"output={tmp_path / 'o.json'}"} <= set(scored)


def test_the_table_gives_accuracy_its_interval_and_steps_per_budget():
    results = {
        2.0: {
            "fewshot": {"acc": 0.7304, "ci": 0.009, "steps": 412},
            "reference": {"acc": 0.6, "ci": 0.0111, "steps": 150},
        },
        0.5: {
            "fewshot": {"acc": None, "ci": None, "steps": 40},
            "reference": {"acc": 0.3, "ci": 0.02, "steps": 30},
        },
    }
    lines = tta.report(results, 600)
    assert lines[1].startswith("    2 min  ")
    assert "73.04 +- 0.90% (412 steps)" in lines[1] and "60.00 +- 1.11% (150 steps)" in lines[1]
    assert "no validation in the budget (40 steps)" in lines[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: --data-root"),
        (["--budgets", "0"], "minutes above 0"),
        (["--episodes", "1"], "at least 2"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "images_background.zip").touch()
    (tmp_path / "images_evaluation.zip").touch()
    root = [] if not argv else ["--data-root", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        tta.parse(root + argv, cores=2)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_paired_budget_trains_both_presets_alike_for_the_budget_then_scores_them_together(
    tmp_path,
):
    runs = paired_budget.contenders(Path("/omniglot"), tmp_path / "cache", processes=2)
    assert runs["quickstart"][0] == "experiment=quickstart"
    assert runs["protonet"][0] == "experiment=protonet_omniglot_5w1s"
    assert "algo.meta_batch_size=2" in runs["protonet"]  # an episode per process
    shared = paired_budget.budget_overrides(val_every=200, val_episodes=100)
    for overrides in runs.values():
        command = tta.train_command(overrides, 10, tmp_path / "run", shared)
        assert "data.root=/omniglot" in command and "++trainer.max_time=00:00:10:00" in command
        assert {"trainer.val_check_interval=200", "val_episodes=100"} <= set(command)
    ckpts = [tmp_path / "a.ckpt", tmp_path / "b.ckpt"]
    scored = paired_budget.paired_command(ckpts, 600, tmp_path / "t.md", tmp_path / "e")
    assert f"ckpt=[{ckpts[0]},{ckpts[1]}]" in scored and "episodes=600" in scored


def test_paired_budget_refuses_a_budget_of_nothing_in_one_line(tmp_path, capsys):
    (tmp_path / "images_background.zip").touch()
    (tmp_path / "images_evaluation.zip").touch()
    with pytest.raises(SystemExit) as exit_:
        paired_budget.parse(["--data-root", str(tmp_path), "--minutes", "0"])
    assert exit_.value.code == 2 and "--minutes: above 0" in capsys.readouterr().err
