"""Results tables (docs/results-*.md) come from evaluation JSON files, beside the papers' numbers."""

import json
import subprocess
import sys

from fewshot.reporting.papers import PAPERS
from fewshot.reporting.results import results_tables
from tests.helpers import REPO


def evaluation(algorithm, dataset, way, shot, acc, ci95, episodes=600, first_order=False):
    """A result as evaluate.py writes it."""
    return {
        "test/acc": acc,
        "test/acc_ci95": ci95,
        "episodes": episodes,
        "trained_steps": 60000,
        "protocol": {
            "dataset": dataset,
            "split": "vinyals",
            "way": way,
            "shot": shot,
            "query": 15,
            "algorithm": algorithm,
            "first_order": first_order,
            "inner_steps_test": 3,
            "batch_norm": "support",
            "batch_norm_train": "transductive",
            "episode_seed": 0,
        },
    }


def table_rows(text: str, paper_title_start: str) -> list[list[str]]:
    section = next(s for s in text.split("### ")[1:] if s.startswith(paper_title_start))
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_each_result_sits_beside_the_number_the_paper_reports_for_its_setting():
    text = results_tables(
        [
            evaluation("maml", "omniglot", 20, 1, 0.9312, 0.0041),
            evaluation("maml", "omniglot", 20, 1, 0.93, 0.008, episodes=100),
            evaluation("metalstm", "miniimagenet", 5, 5, 0.5812, 0.0071),
        ]
    )
    maml = table_rows(text, "MAML")
    assert len(maml) == len(PAPERS[0].results) + 1  # 20w1s has two result files
    assert maml[2][:8] == [
        "Omniglot 20-way 1-shot", "95.8 ± 0.3", "93.00 ± 0.80", "100", "vinyals",
        "transductive/support", "inner_steps_test=3", "60000",
    ]  # fmt: skip
    assert maml[3][:4] == ["Omniglot 20-way 1-shot", "95.8 ± 0.3", "93.12 ± 0.41", "600"]
    assert maml[0][:3] == ["Omniglot 5-way 1-shot", "98.7 ± 0.4", "not run"]
    metalstm = table_rows(text, "Meta-LSTM")
    assert metalstm[1][:3] == ["Mini-ImageNet 5-way 5-shot", "60.60 ± 0.71", "58.12 ± 0.71"]
    assert metalstm[0][2] == "not run"


def test_a_setting_the_paper_lacks_gets_a_row_of_its_own():
    text = results_tables(
        [
            evaluation("maml", "omniglot", 10, 1, 0.97, 0.01),
            evaluation("maml", "miniimagenet", 5, 1, 0.47, 0.018, first_order=True),
            evaluation("r2d2", "omniglot", 5, 1, 0.98, 0.01),
        ]
    )
    maml = table_rows(text, "MAML")
    assert maml[-1][:3] == ["Omniglot 10-way 1-shot", "—", "97.00 ± 1.00"]
    first_order = next(r for r in maml if r[0] == "Mini-ImageNet 5-way 1-shot (first order)")
    assert first_order[1:3] == ["48.07", "47.00 ± 1.80"]
    assert table_rows(text, "r2d2")[0][:3] == ["Omniglot 5-way 1-shot", "—", "98.00 ± 1.00"]


def test_the_command_reads_json_files_and_refuses_other_files_in_one_line(tmp_path):
    good = tmp_path / "best_600ep_seed0.json"
    good.write_text(json.dumps(evaluation("maml", "omniglot", 5, 1, 0.99, 0.002)))
    out = tmp_path / "results.md"
    command = [sys.executable, "-m", "fewshot.reporting.results", str(good), "--output", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "| Omniglot 5-way 1-shot | 98.7 ± 0.4 | 99.00 ± 0.20 | 600 |" in proc.stdout
    assert out.read_text() == proc.stdout
    bad = tmp_path / "summary.csv"
    bad.write_text("job,val/acc\n")
    proc = subprocess.run(command[:3] + [str(bad)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}")
    assert "Traceback" not in proc.stderr


def test_the_maml_family_results_sit_beside_their_papers_numbers():
    text = results_tables(
        [
            evaluation("metasgd", "omniglot", 5, 1, 0.951, 0.004),
            evaluation("mamlpp", "omniglot", 20, 1, 0.962, 0.003),
            evaluation("anil", "miniimagenet", 5, 5, 0.601, 0.007),
        ]
    )
    rows = {title: table_rows(text, title) for title in ("Meta-SGD", "MAML++", "ANIL")}
    assert rows["Meta-SGD"][0][:3] == ["Omniglot 5-way 1-shot", "99.53 ± 0.26", "95.10 ± 0.40"]
    assert rows["MAML++"][2][:3] == ["Omniglot 20-way 1-shot", "97.65", "96.20 ± 0.30"]
    assert rows["ANIL"][1][:3] == ["Mini-ImageNet 5-way 5-shot", "61.5 ± 0.5", "60.10 ± 0.70"]


def test_results_of_several_training_seeds_get_a_row_of_their_mean_and_std():
    seeds = [
        {**evaluation("maml", "omniglot", 5, 1, acc, 0.004), "train_seed": seed}
        for seed, acc in ((0, 0.95), (1, 0.97))
    ]
    rows = table_rows(results_tables(seeds), "MAML")
    ours = [r for r in rows if r[0] == "Omniglot 5-way 1-shot"]
    assert [r[2] for r in ours] == [
        "95.00 ± 0.40",
        "97.00 ± 0.40",
        "96.00 ± 1.41 over 2 seeds (0, 1)",
    ]
    assert ours[2][3:] == ours[0][3:]  # the same protocol columns


def test_a_method_reported_by_two_papers_sits_beside_each_papers_number():
    text = results_tables(
        [
            evaluation("maml", "cifarfs", 5, 1, 0.55, 0.019),
            evaluation("maml", "fc100", 5, 1, 0.40, 0.02),
        ]
    )
    cifarfs = table_rows(text, "CIFAR-FS's MAML")
    assert cifarfs[0][:3] == ["CIFAR-FS 5-way 1-shot", "58.9 ± 1.9", "55.00 ± 1.90"]
    assert cifarfs[1][:3] == ["CIFAR-FS 5-way 5-shot", "71.5 ± 1.0", "not run"]
    maml = table_rows(text, "MAML")  # settings no paper reports join the method's first paper
    assert maml[-1][:3] == ["FC100 5-way 1-shot", "—", "40.00 ± 2.00"]
    assert not any(row[0].startswith("CIFAR-FS") for row in maml)
