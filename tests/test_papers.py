"""The papers' numbers live in one table (fewshot.reporting.papers); every preset's comment
names its setting's number from it, so the two cannot drift apart."""

import re

import pytest

from fewshot.data import registry
from fewshot.reporting.papers import PAPERS, key, result_key
from tests.helpers import CONF, compose_train

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TABLE = {result_key(paper, result): (paper, result) for paper in PAPERS for result in paper.results}
# An accuracy as a paper prints it: percent, with its confidence interval where it gives one.
ACCURACY = re.compile(r"^\d+\.\d+( ± \d+\.\d+)?$")
# What a number of a paper looks like in a comment other than its `# paper:` line.
NUMBER = re.compile(r"±|\d%")


def test_each_setting_has_one_number_and_each_number_its_form():
    count = sum(len(paper.results) for paper in PAPERS)
    assert len(TABLE) == count  # no setting reported twice
    algorithms = {p.stem for p in (CONF / "algo").glob("*.yaml")}
    datasets = {name for module in registry.LOADERS for name in module.TITLES}
    for (algorithm, _, dataset, way, shot, _backbone), (paper, result) in TABLE.items():
        assert algorithm in algorithms and dataset in datasets, paper.title
        assert way >= 2 and shot >= 1 and ACCURACY.match(result.accuracy), (paper.title, result)
    assert len({paper.reference for paper in PAPERS}) == len(PAPERS)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_presets_comment_names_the_tables_number_for_its_setting(preset):
    cfg = compose_train(f"experiment={preset}")
    setting = key(
        cfg.algo.name,
        cfg.algo.get("first_order"),
        cfg.data.name,
        cfg.way,
        cfg.shot,
        cfg.backbone.name,
    )
    comments = [
        line for line in (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
        if line.lstrip().startswith("#")
    ]  # fmt: skip
    cited = [line for line in comments if "paper:" in line]
    if setting in TABLE:
        paper, result = TABLE[setting]
        assert cited == [f"# paper: {result.accuracy} ({paper.reference})"]
    else:
        assert cited == [], f"{preset}: no paper in fewshot.reporting.papers reports {setting}"
    assert not [line for line in comments if line not in cited and NUMBER.search(line)]
