"""Every step fewshot runs on an accelerator makes its tensors on the batch's device (#23): each
method, with each task batching fewshot lets it run, trains a step, scores validation and test
episodes and predicts, with its learner and episodes on PyTorch's `meta` device.

Meta tensors have shapes and devices but no values, so these run on any machine in milliseconds;
a tensor made without `device=` lands on the CPU, and an operation that mixes it with the meta
tensors raises, as it would with CUDA tensors. The learner is built on the CPU and moved whole
(`module.to`), as Lightning moves it, so a tensor captured at construction but not registered as
a buffer is caught too. The last test plants such a tensor and sees the same helpers fail.

What this cannot catch: value reads (`.item()`, `.tolist()`, data-dependent shapes such as
`unique`), which meta tensors cannot answer, so Predictor.logits' check of the labels is left
out below (its helper is pinned to the real method on the CPU); a 0-dim CPU tensor, which
PyTorch lets mix with any device (CUDA too, so it is no bug); Lightning's own transfers (the
batch's move, `manual_backward`, gradient clipping, logging); compiled evaluation
(algo.compile: inductor makes no kernels for meta); CUDA-only kernels, their dtypes and
numerics, streams and host syncs. tests/test_gpu.py runs the real thing where CUDA is.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from fewshot.config import check_exclusive
from fewshot.data.episodes import Episodes
from fewshot.errors import ConfigError
from fewshot.evaluation.predict import Predictor
from fewshot.methods import TASK_BATCHING, EpisodeResults, plain_backward, run_tasks
from fewshot.training.module import EpisodicModule
from tests.helpers import LEARNER_NAMES, SMALL, small_module

DEVICE = torch.device("meta")
# small_backbone's tasks: 3-way on 1x12x12 images; 6 support images, so Meta-LSTM's inner batch
# of 4 (helpers.SMALL) takes the mini-batch path (a permutation made on the images' device).
WAY, SHOT, QUERY, TASKS = 3, 2, 2, 2
# MAML++ at meta-iteration 0 with every switch on: the multi-step loss (helpers.SMALL anneals
# it over 5 iterations) and a second-order meta-gradient from the start.
METHOD_SETTINGS = {"mamlpp": {"first_order_iterations": 0}}
# What a step may vary beside the method and the task batching: the statistics batch norm
# normalises the query with (training's and evaluation's own key), and recomputed inner steps.
TRAINING_VARIANTS = {
    "query-norm": {"batch_norm_train": "transductive"},
    "support-norm": {"batch_norm_train": "support"},
    "checkpoint-inner": {"checkpoint_inner": True},
}
# Meta-LSTM has no algo.checkpoint_inner: its meta-gradient is first order, no inner graph.
TRAINING_CASES = [
    (name, batching, variant)
    for name in LEARNER_NAMES
    for batching in TASK_BATCHING
    for variant in TRAINING_VARIANTS
    if not (name == "metalstm" and variant == "checkpoint-inner")
]
# Evaluation's cases: (whether the accuracy after every inner step is tracked, settings).
# Validation tracks it; a test step does only where a logger records it (as validation then),
# so its own case is the one without.
EVALUATION_CASES = {
    "validation-query-norm": (True, {"batch_norm_test": "transductive"}),
    "validation-support-norm": (True, {"batch_norm_test": "support"}),
    "test-unlogged": (False, {}),
}
EVALUATION_NORMS = {"query-norm": "transductive", "support-norm": "support"}
# An operation mixing a CPU tensor with meta ones names both devices.
MIXED_DEVICES = r"(?s)\bcpu\b.*\bmeta\b|\bmeta\b.*\bcpu\b"


def module_on_device(name: str, batching: str, **settings) -> EpisodicModule:
    """helpers.small_module (built on the CPU, as train.py builds it), moved whole to DEVICE;
    a combination fewshot refuses (its config rules, the learner or the task scorer) is skipped
    with fewshot's own reason."""
    settings = {**METHOD_SETTINGS.get(name, {}), **settings}
    try:
        check_exclusive(OmegaConf.create({"algo": {"task_batching": batching, **settings}}))
        module = small_module(name, batching, **settings)
    except ConfigError as refused:
        pytest.skip(f"fewshot refuses algo={name} task_batching={batching}: {refused}")
    return module.to(DEVICE)


def episodes_on_device(tasks: int = TASKS) -> Episodes:
    """A meta-batch as the loader yields it, on DEVICE: uint8 images, int64 labels."""

    def empty(*shape: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(*shape, dtype=dtype, device=DEVICE)

    return Episodes(
        empty(tasks, WAY * SHOT, 1, 12, 12, dtype=torch.uint8),
        empty(tasks, WAY * SHOT, dtype=torch.int64),
        empty(tasks, WAY * QUERY, 1, 12, 12, dtype=torch.uint8),
        empty(tasks, WAY * QUERY, dtype=torch.int64),
    )


def training_step(module: EpisodicModule, batch: Episodes) -> EpisodeResults:
    """EpisodicModule.training_step without a Trainer: the module's conversion of the batch,
    the meta-loss and its backward share by share at meta-iteration 0, and Adam's step."""
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer.zero_grad()
    batch = module.on_after_batch_transfer(batch, 0)
    results = run_tasks(module.tasks, batch, True, backward=plain_backward, iteration=0)
    optimizer.step()
    return results


def evaluation_step(module: EpisodicModule, batch: Episodes, track_steps: bool) -> EpisodeResults:
    """A validation or test step's scoring, as EpisodicModule and FirstEpisodeCheck run it: no
    outer graph (the learner enables grad for its inner loop alone)."""
    module.eval()
    batch = module.on_after_batch_transfer(batch, 0)
    with torch.no_grad():
        return run_tasks(module.tasks, batch, training=False, track_steps=track_steps)


def predictor_logits(
    predictor: Predictor, support_x: Tensor, support_y: Tensor, query_x: Tensor
) -> Tensor:
    """Predictor.logits after its check of the labels, which reads their values (`unique`,
    `max`) and so cannot run on meta tensors: the module's conversion of the uint8 images, then
    the learner's test-time adaptation and query logits, with no outer graph (float32: a
    bf16-mixed run's CPU autocast is not this test's)."""
    batch = predictor.module.on_after_batch_transfer(
        Episodes(support_x, support_y, query_x, support_y.new_zeros(len(query_x))), 0
    )
    with torch.no_grad():
        return predictor.module.learner.logits(batch.support_x, batch.support_y, batch.query_x)


def predictor_for(module: EpisodicModule) -> Predictor:
    """A Predictor on `module` (as Predictor.from_checkpoint builds one), for small_backbone."""
    cfg = OmegaConf.create(
        {
            "way": WAY,
            "data": {"name": "omniglot", "image_size": 12},
            "trainer": {"precision": "32-true"},
        }
    )
    return Predictor(module, cfg)


def assert_on_device(results: EpisodeResults, steps: int) -> None:
    """The step's results are on DEVICE, with their shapes (`steps`: inner-step accuracies)."""
    assert results.loss.shape == () and results.loss.device == DEVICE
    assert results.accuracy.shape == (TASKS,) and results.accuracy.device == DEVICE
    assert results.step_accuracy.shape == (steps,) and results.step_accuracy.device == DEVICE


@pytest.mark.parametrize("name, batching, variant", TRAINING_CASES)
def test_a_training_step_makes_no_tensor_off_the_batchs_device(name, batching, variant):
    module = module_on_device(name, batching, **TRAINING_VARIANTS[variant])
    results = training_step(module, episodes_on_device())
    assert_on_device(results, steps=0)
    learned = {n: p for n, p in module.learner.named_parameters() if p.requires_grad}
    assert learned
    for n, p in learned.items():  # every meta-parameter got its meta-gradient there
        assert p.grad is not None and p.grad.device == DEVICE, n


@pytest.mark.parametrize("case", list(EVALUATION_CASES))
@pytest.mark.parametrize("batching", list(TASK_BATCHING))
@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_validation_and_test_scoring_make_no_tensor_off_the_batchs_device(name, batching, case):
    track_steps, settings = EVALUATION_CASES[case]
    module = module_on_device(name, batching, **settings)
    results = evaluation_step(module, episodes_on_device(), track_steps)
    assert_on_device(results, steps=SMALL[name][1] if track_steps else 0)


@pytest.mark.parametrize("norm", list(EVALUATION_NORMS))
@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_a_prediction_makes_no_tensor_off_the_learners_device(name, norm):
    module = module_on_device(name, "loop", batch_norm_test=EVALUATION_NORMS[norm])
    predictor = predictor_for(module)
    task = episodes_on_device(tasks=1)
    logits = predictor_logits(predictor, task.support_x[0], task.support_y[0], task.query_x[0])
    assert logits.shape == (WAY * QUERY, WAY) and logits.device == DEVICE


def test_the_prediction_helper_computes_what_predictor_logits_does():
    """predictor_logits is Predictor.logits less the check of the labels: on the CPU, with
    values, both give the same logits."""
    predictor = predictor_for(small_module("maml"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (WAY * (SHOT + QUERY), 1, 12, 12), generator=generator)
    support_x, query_x = images.to(torch.uint8).split([WAY * SHOT, WAY * QUERY])
    support_y = torch.arange(WAY).repeat_interleave(SHOT)
    expected = predictor.logits(support_x, support_y, query_x)
    assert torch.equal(predictor_logits(predictor, support_x, support_y, query_x), expected)


def plant_cpu_tensor(monkeypatch: pytest.MonkeyPatch, module: EpisodicModule) -> None:
    """Make the learner's query logits add a tensor made without `device=` (on the CPU): the
    bug these tests are for. 1-dim: a 0-dim CPU tensor mixes with any device."""
    query_logits = module.learner.query_logits

    def planted(*args, **kwargs) -> Tensor:
        logits = query_logits(*args, **kwargs)
        return logits + torch.zeros(logits.shape[-1])

    monkeypatch.setattr(module.learner, "query_logits", planted)


@pytest.mark.parametrize(
    "step, batching",
    [
        *((step, b) for step in ("training", "validation", "test") for b in TASK_BATCHING),
        ("prediction", "loop"),
    ],
)
def test_a_tensor_made_on_the_cpu_fails_these_checks(monkeypatch, step, batching):
    module = module_on_device("maml", batching)
    plant_cpu_tensor(monkeypatch, module)
    batch = episodes_on_device()
    with pytest.raises(RuntimeError, match=MIXED_DEVICES):
        if step == "training":
            training_step(module, batch)
        elif step == "prediction":
            predictor_logits(
                predictor_for(module), batch.support_x[0], batch.support_y[0], batch.query_x[0]
            )
        else:
            evaluation_step(module, batch, track_steps=step == "validation")
