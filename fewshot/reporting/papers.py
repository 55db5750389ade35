"""The test accuracies the papers report, in one table: the results table
(`python -m fewshot.reporting.results`) sets ours beside them, and every paper preset in
conf/experiment/ names its setting's number in one comment line, `# paper: <accuracy>
(<reference>)`, which tests/test_papers.py checks against this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    """A test accuracy a paper reports, as printed there (percent ± 95% CI where it gives one)."""

    dataset: str  # data.name
    way: int
    shot: int
    accuracy: str
    first_order: bool = False  # the paper's first-order variant (algo.first_order=true)


@dataclass(frozen=True)
class Paper:
    reference: str  # as a preset's `# paper:` line cites it
    title: str  # the results table's heading
    algorithm: str  # algo.name of the method these numbers are of
    protocol: str  # how the paper's numbers were obtained, to read ours against
    results: tuple[PaperResult, ...]
    backbone: str = "conv4"  # backbone.name of the net the numbers are of


# In the results table's order; a method's results no paper here reports join its first paper.
PAPERS = (
    Paper(
        "Finn et al. 2017",
        "MAML (Finn, Abbeel & Levine, ICML 2017, Tables 1 and 2)",
        "maml",
        "Omniglot: 1200 training characters (`vinyals` split), rotations as classes, 28x28; "
        "transductive batch norm; Mini-ImageNet: 15 query images per class, 10 inner steps at test.",
        (
            PaperResult("omniglot", 5, 1, "98.7 ± 0.4"),
            PaperResult("omniglot", 5, 5, "99.9 ± 0.1"),
            PaperResult("omniglot", 20, 1, "95.8 ± 0.3"),
            PaperResult("omniglot", 20, 5, "98.9 ± 0.2"),
            PaperResult("miniimagenet", 5, 1, "48.70 ± 1.84"),
            PaperResult("miniimagenet", 5, 5, "63.11 ± 0.92"),
            PaperResult("miniimagenet", 5, 1, "48.07", first_order=True),
            PaperResult("miniimagenet", 5, 5, "63.15", first_order=True),
        ),
    ),
    Paper(
        "Ravi & Larochelle 2017",
        "Meta-LSTM (Ravi & Larochelle, ICLR 2017, Table 1)",
        "metalstm",
        "Mini-ImageNet 64/16/20 classes, 84x84; batch norm at test with support-set statistics.",
        (
            PaperResult("miniimagenet", 5, 1, "43.44 ± 0.77"),
            PaperResult("miniimagenet", 5, 5, "60.60 ± 0.71"),
        ),
    ),
    Paper(
        "Li et al. 2017",
        "Meta-SGD (Li, Zhou, Chen & Li, arXiv 2017, Tables 1 and 2)",
        "metasgd",
        "MAML's nets and splits, one inner step, step sizes meta-learned per coordinate.",
        (
            PaperResult("omniglot", 5, 1, "99.53 ± 0.26"),
            PaperResult("omniglot", 20, 1, "95.93 ± 0.38"),
            PaperResult("miniimagenet", 5, 1, "50.47 ± 1.87"),
            PaperResult("miniimagenet", 5, 5, "64.03 ± 0.94"),
        ),
    ),
    Paper(
        "Antoniou et al. 2019",
        "MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, Tables 1 and 2)",
        "mamlpp",
        "5 inner steps, every MAML++ part on; numbers as listed for the paper (Papers with "
        "Code), without the paper's ± (not checked against its table here).",
        (
            PaperResult("omniglot", 5, 1, "99.47"),
            PaperResult("omniglot", 5, 5, "99.85"),
            PaperResult("omniglot", 20, 1, "97.65"),
            PaperResult("omniglot", 20, 5, "99.33"),
            PaperResult("miniimagenet", 5, 1, "52.40"),
            PaperResult("miniimagenet", 5, 5, "67.15"),
        ),
    ),
    Paper(
        "Snell et al. 2017",
        "Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, Tables 1 and 2)",
        "protonet",
        "Conv4 embedding of 64 channels, squared Euclidean distance; trained on more classes per "
        "episode than tested (Omniglot 60-way with 5 query images, Mini-ImageNet 30-way 1-shot "
        "and 20-way 5-shot with 15); batch norm at test with running statistics, which fewshot "
        "does not keep (its `support` mode, the presets' default, is the inductive stand-in); "
        "no interval given for Omniglot.",
        (
            PaperResult("omniglot", 5, 1, "98.8"),
            PaperResult("omniglot", 5, 5, "99.7"),
            PaperResult("omniglot", 20, 1, "96.0"),
            PaperResult("omniglot", 20, 5, "98.9"),
            PaperResult("miniimagenet", 5, 1, "49.42 ± 0.78"),
            PaperResult("miniimagenet", 5, 5, "68.20 ± 0.66"),
        ),
    ),
    Paper(
        "Raghu et al. 2020",
        "ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, Table 2)",
        "anil",
        "MAML's Mini-ImageNet settings, the inner loop adapting the head alone.",
        (
            PaperResult("miniimagenet", 5, 1, "46.7 ± 0.4"),
            PaperResult("miniimagenet", 5, 5, "61.5 ± 0.5"),
        ),
    ),
    Paper(
        "Bertinetto et al. 2019",
        "CIFAR-FS's MAML baseline (Bertinetto, Henriques, Torr & Vedaldi, ICLR 2019, Table 1)",
        "maml",
        "MAML as the authors of CIFAR-FS ran it on their 64/16/20-class split, 32x32; that they "
        "used MAML's Mini-ImageNet settings, as the presets do, is not verified here.",
        (
            PaperResult("cifarfs", 5, 1, "58.9 ± 1.9"),
            PaperResult("cifarfs", 5, 5, "71.5 ± 1.0"),
        ),
    ),
)


def key(
    algorithm: str, first_order: object, dataset: str, way: int, shot: int, backbone: str = "conv4"
) -> tuple[str, bool, str, int, int, str]:
    """What a paper's number is found by: (algo.name, first order or not, data.name, way, shot,
    backbone.name)."""
    return algorithm, bool(first_order), dataset, way, shot, backbone


def result_key(paper: Paper, result: PaperResult) -> tuple[str, bool, str, int, int, str]:
    return key(
        paper.algorithm, result.first_order, result.dataset, result.way, result.shot, paper.backbone
    )
