"""Paired comparisons: results scored on the same fixed test episodes compared episode by
episode (the mean difference, its 95% CI, the episodes each won), results of other episodes
refused naming what differs, results written before per-episode accuracies listed unpaired."""

import csv
import hashlib
import json
import math

import pytest
import torch

from fewshot.reporting.comparison import write_evaluation_table
from fewshot.reporting.paired import FIELDS, compared, paired_difference, why_not_paired
from fewshot.reporting.results import results_tables
from fewshot.reporting.tables import Row
from tests.helpers import OLD_CHECKPOINTS, run_script

A = [1.0, 0.8, 0.6, 0.9]
B = [0.8, 0.8, 0.7, 0.5]


def episodes(count: int, **changed) -> dict:
    """What identifies `count` fixed test episodes, as evaluate.py records it."""
    identity = {
        "dataset": "omniglot",
        "split": "background",
        "classes_sha256": "0123456789abcdef",
        "way": 5,
        "shot": 1,
        "query": 15,
        "seed": 0,
        "ids": {"start": 0, "stop": count},
    }
    return {**identity, **changed}


def result(per_episode, algorithm="maml", batch_norm="transductive", val=0.9, **changed) -> dict:
    """A result as evaluate.py writes it; `per_episode=None`: one written before it kept them."""
    n = 4 if per_episode is None else len(per_episode)
    written = {
        "test/acc": 0.8 if per_episode is None else sum(per_episode) / n,
        "test/acc_ci95": 0.1,
        "episodes": n,
        "checkpoint": f"/runs/{algorithm}/checkpoints/best.ckpt",
        "trained_steps": 100,
        "val/acc_best": val,
        "protocol": {
            "dataset": "omniglot",
            "split": "background",
            "way": 5,
            "shot": changed.get("shot", 1),
            "query": 15,
            "algorithm": algorithm,
            "first_order": False,
            "batch_norm": batch_norm,
            "batch_norm_train": "transductive",
            "episode_seed": 0,
        },
    }
    if per_episode is not None:
        written["test/acc_per_episode"] = list(per_episode)
        written["test_episodes"] = episodes(n, **changed)
    return written


def table_rows(text: str, section: str) -> list[dict[str, str]]:
    """The rows of the Markdown table under `### <section>`, as column -> cell."""
    part = next(s for s in text.split("### ")[1:] if s.startswith(section))
    lines = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows]


def test_the_paired_difference_is_the_mean_per_episode_difference_with_its_95_percent_ci():
    differences = [a - b for a, b in zip(A, B)]  # 0.2, 0.0, -0.1, 0.4
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    paired = paired_difference(A, B)
    assert paired.mean == pytest.approx(0.125)
    assert paired.ci95 == pytest.approx(1.96 * sd / math.sqrt(4)) and sd == pytest.approx(
        0.2217, 1e-3
    )
    assert paired.percent() == "+12.50 ± 21.73"
    assert paired_difference(B, A).percent() == "-12.50 ± 21.73"


def test_each_side_s_wins_and_the_ties_are_counted():
    paired = paired_difference(A, B)
    assert (paired.won, paired.lost, paired.tied, paired.episodes) == (2, 1, 1, 4)
    assert paired.counts() == "2/1/1"
    same = paired_difference(A, A)
    assert (same.mean, same.ci95, same.counts()) == (0.0, 0.0, "0/0/4")


def test_methods_checkpoints_and_batch_norm_may_differ_on_the_same_episodes():
    maml = result(B)
    protonet = result(A, algorithm="protonet", batch_norm="support")
    assert why_not_paired(protonet, maml) is None
    assert compared(protonet, maml) == paired_difference(A, B)


@pytest.mark.parametrize(
    "field, value, line",
    [
        ("dataset", "miniimagenet", "the dataset differs: miniimagenet here, omniglot in the reference"),
        ("split", "vinyals", "the split differs: vinyals here, background in the reference"),
        ("classes_sha256", "fedcba9876543210", "the test classes differ (SHA-256 of their names): fedcba9876543210 here, 0123456789abcdef in the reference"),
        ("way", 20, "way differs: 20 here, 5 in the reference"),
        ("shot", 5, "shot differs: 5 here, 1 in the reference"),
        ("query", 5, "query differs: 5 here, 15 in the reference"),
        ("seed", 1, "the episode seed differs: 1 here, 0 in the reference"),
        ("ids", {"start": 4, "stop": 8}, "the episode ids differ: 4..7 here, 0..3 in the reference"),
    ],
)  # fmt: skip
def test_results_of_other_episodes_are_refused_in_one_line_naming_the_field(field, value, line):
    assert set(FIELDS) == set(episodes(4))  # every field is checked
    assert compared(result(A, **{field: value}), result(B)) == line


def test_fewer_episodes_are_refused_naming_the_episode_ids():
    line = compared(result(A[:2]), result(B))
    assert line == "the episode ids differ: 0..1 here, 0..3 in the reference"


def test_the_results_command_pairs_each_result_with_the_first_and_lists_old_ones_unpaired():
    text = results_tables(
        [
            result(None),  # written before per-episode accuracies: never the reference
            result(B),
            result(A, algorithm="protonet", batch_norm="support"),
            result(A, shot=5),
        ],
        ["old.json", "maml.json", "protonet.json", "maml_5shot.json"],
    )
    rows = {row["result"]: row for row in table_rows(text, "Paired comparisons")}
    assert "Paired with the reference, result `maml.json`" in text
    assert rows["maml.json"]["paired"] == "reference"
    protonet = rows["protonet.json"]
    assert protonet["test/acc %"] == "82.50 ± 10.00"  # unpaired, beside the paired numbers
    assert (protonet["Δ % vs reference"], protonet["won/lost/tied"]) == ("+12.50 ± 21.73", "2/1/1")
    assert protonet["paired"] == "paired"
    assert rows["maml_5shot.json"]["paired"] == (
        "not paired: shot differs: 5 here, 1 in the reference"
    )
    assert rows["old.json"]["paired"] == (
        "not paired: no per-episode accuracies (written before evaluate.py kept them)"
    )
    assert rows["old.json"]["Δ % vs reference"] == ""


def test_the_results_command_has_no_paired_section_for_one_result():
    assert "Paired comparisons" not in results_tables([result(A)], ["a.json"])


def test_the_evaluation_table_pairs_each_run_with_the_best_validated_beside_its_accuracy(tmp_path):
    rows = sorted(
        [
            Row.evaluated("protonet", {}, [result(A[:2], "protonet", val=0.8), result(A, "protonet", val=0.8)]),
            Row.evaluated("maml", {}, [result(B[:2], val=0.9), result(B, val=0.9)]),
            Row.evaluated("maml_5shot", {}, [result(A[:2], shot=5, val=0.7), result(A, shot=5, val=0.7)]),
            Row.evaluated("old", {}, [{**result(None, val=0.6), "episodes": 2}, result(None, val=0.6)]),
        ],
        key=Row.rank,
    )  # fmt: skip
    md = write_evaluation_table(tmp_path / "table.md", rows, [2, 4], 0)
    text = md.read_text()
    assert "Paired with the reference, run `maml`" in text
    header = (
        "| test/acc % (2 ep) | test/acc % (4 ep) | Δ % vs reference (2 ep) | won/lost/tied (2 ep) "
    )
    assert header + "| Δ % vs reference (4 ep) | won/lost/tied (4 ep) | paired |" in text
    with open(md.with_suffix(".csv")) as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert table["maml"]["paired"] == "reference"
    protonet = table["protonet"]
    assert protonet["paired"] == "paired"
    assert float(protonet["paired_diff_4"]) == pytest.approx(0.125)
    assert float(protonet["paired_diff_ci95_4"]) == pytest.approx(paired_difference(A, B).ci95)
    assert (protonet["won_4"], protonet["lost_4"], protonet["tied_4"]) == ("2", "1", "1")
    assert float(protonet["paired_diff_2"]) == pytest.approx(0.1)  # the first 2 episodes
    assert table["maml_5shot"]["paired"] == "not paired: shot differs: 5 here, 1 in the reference"
    assert table["maml_5shot"]["paired_diff_4"] == ""
    assert table["old"]["paired"].startswith("not paired: no per-episode accuracies")
    assert "| +12.50 ± 21.73 | 2/1/1 | paired |" in text


def test_one_evaluated_run_has_no_paired_columns(tmp_path):
    rows = [Row.evaluated("maml", {}, [result(B)]), Row("failed", status="failed")]
    text = write_evaluation_table(tmp_path / "table.md", rows, [4], 0).read_text()
    assert "paired" not in text and "Δ" not in text


def checkpoint_reading(old: str, folder, omniglot_root, omniglot_cache):
    """A committed old checkpoint (5-way 1-shot on Omniglot's background split), reading the
    real data and the session's cache."""
    checkpoint = torch.load(OLD_CHECKPOINTS / f"{old}.ckpt", map_location="cpu", weights_only=True)
    checkpoint["fewshot_config"]["data"].update(
        root=str(omniglot_root), cache_dir=str(omniglot_cache)
    )
    path = folder / f"{old}.ckpt"
    torch.save(checkpoint, path)
    return path


def test_evaluate_keeps_each_episode_s_accuracy_and_pairs_two_methods_on_the_same_episodes(
    tmp_path, omniglot_root, omniglot_cache, omniglot
):
    maml, metalstm = (
        checkpoint_reading(old, tmp_path, omniglot_root, omniglot_cache)
        for old in ("maml", "metalstm")
    )
    table = tmp_path / "table.md"
    proc = run_script(
        "evaluate.py",
        f"ckpt=[{maml},{metalstm}]",
        "episodes=[3,6]",
        "threads=1",
        f"output={table}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    written = {
        (ckpt, n): json.loads((tmp_path / f"{ckpt.name}_{n}ep_seed0.json").read_text())
        for ckpt in (maml, metalstm)
        for n in (3, 6)
    }
    test_classes = [n for n in omniglot.names if n.startswith("images_evaluation/")]
    digest = hashlib.sha256("\n".join(test_classes).encode()).hexdigest()[:16]
    for (ckpt, n), scored in written.items():
        per_episode = scored["test/acc_per_episode"]
        assert len(per_episode) == n
        # Each, as float32 holds it, is a whole number of the 75 query images right.
        assert all(round(75 * acc) == pytest.approx(75 * acc, abs=1e-5) for acc in per_episode)
        assert sum(per_episode) / n == pytest.approx(scored["test/acc"], abs=1e-7)
        assert 1.96 * torch.tensor(per_episode).double().std().item() / math.sqrt(n) == (
            pytest.approx(scored["test/acc_ci95"], abs=1e-7)
        )
        assert scored["test_episodes"] == episodes(n, classes_sha256=digest)
        assert per_episode == written[ckpt, 6]["test/acc_per_episode"][:n]  # the first n
    with open(table.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["paired"] for row in rows) == ["paired", "reference"]
    (row,) = [row for row in rows if row["paired"] == "paired"]
    (reference,) = [ckpt for ckpt in (maml, metalstm) if str(ckpt) != row["run"]]
    other = maml if reference is metalstm else metalstm
    expected = paired_difference(
        written[other, 6]["test/acc_per_episode"], written[reference, 6]["test/acc_per_episode"]
    )
    assert float(row["paired_diff_6"]) == pytest.approx(expected.mean)
    assert float(row["paired_diff_ci95_6"]) == pytest.approx(expected.ci95)
    assert [int(row[f"{k}_6"]) for k in ("won", "lost", "tied")] == [
        expected.won, expected.lost, expected.tied
    ]  # fmt: skip
    assert "Paired with the reference, run" in proc.stdout
    # Two methods' table: the method a column, its whole settings and test keys not (the
    # inner loop has its column).
    (header,) = [line for line in table.read_text().splitlines() if line.startswith("| run |")]
    columns = {c.strip() for c in header.split("|")}
    assert {"algorithm", "inner loop (test)"} <= columns
    assert not {"settings", "test_keys", "base_lr"} & columns
