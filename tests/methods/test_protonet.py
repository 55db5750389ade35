"""Prototypical Networks: logits derived by hand, prototypes that are class means, the batch-norm
modes, meta-training on more classes per task than the test, a checkpoint that scores at any
way, prediction, and the task batchings it runs in."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fewshot.checkpoints.reading import check_checkpoint_fits, load_checkpoint
from fewshot.config import check_config
from fewshot.data import datamodule as datamodule_module
from fewshot.data.datamodule import EpisodeDataModule
from fewshot.errors import ConfigError
from fewshot.evaluation.predict import Predictor
from fewshot.evaluation.protocol import protocol, restored_module
from fewshot.methods import TaskLoop, plain_backward, run_tasks, task_scorer
from fewshot.methods.passes import EagerPasses
from fewshot.methods.protonet import ProtoNet, prototypes
from fewshot.methods.tasks import score_task
from fewshot.training.build import build_datamodule, build_module
from fewshot.training.module import EpisodicModule
from tests.helpers import (
    FunctionalLinear,
    compose_train,
    conv_episode,
    meta_batch,
    random_classes,
    small_backbone,
)
from tests.test_device_placement import (
    DEVICE,
    QUERY,
    WAY,
    assert_on_device,
    episodes_on_device,
    evaluation_step,
    predictor_for,
    predictor_logits,
    training_step,
)

MODES = ("transductive", "support")


def protonet(mode: str = "support", way: int = 3, train_way: int | None = None) -> ProtoNet:
    """A ProtoNet on small_backbone (3-way head, unused) with `mode` batch norm in both stages."""
    torch.manual_seed(0)
    return ProtoNet(small_backbone(classes=3), mode, mode, way=way, train_way=train_way)


def test_logits_are_the_negative_squared_distances_to_the_class_means_by_hand():
    # An identity embedding on 2-d points: prototypes (1, 0), (0, 3), (3, 3).
    learner = ProtoNet(FunctionalLinear(2, 3).double(), "support", "support", way=3)
    support_x = torch.tensor([[0, 0], [0, 2], [4, 4], [2, 0], [0, 4], [2, 2]]).double()
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    query_x = torch.tensor([[1, 1], [3, 0]]).double()
    expected = -torch.tensor(
        [
            [1 + 0, 1 + 4, 4 + 4],  # (1, 1) to each prototype
            [4 + 0, 9 + 9, 0 + 9],  # (3, 0)
        ]
    ).double()
    assert torch.equal(learner.logits(support_x, support_y, query_x), expected)


def test_prototypes_are_the_class_means_whatever_the_support_order():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    labels = torch.arange(4).repeat(3)
    means = torch.stack([embeddings[labels == c].mean(0) for c in range(4)])
    order = torch.randperm(12, generator=generator)
    torch.testing.assert_close(prototypes(embeddings, labels, 4), means)
    torch.testing.assert_close(prototypes(embeddings[order], labels[order], 4), means)
    # The whole method too, batch norm included (its statistics ignore the order).
    for mode in MODES:
        learner = protonet(mode).double()
        batch = conv_episode()
        sx, sy, qx = batch.support_x[0].double(), batch.support_y[0], batch.query_x[0].double()
        shuffled = torch.randperm(len(sy), generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(
                learner.logits(sx[shuffled], sy[shuffled], qx), learner.logits(sx, sy, qx)
            )


@pytest.mark.parametrize("mode", MODES)
def test_each_batch_norm_mode_embeds_with_the_statistics_it_names(mode):
    learner = protonet(mode).double()
    batch = conv_episode()
    sx, sy, qx = batch.support_x[0].double(), batch.support_y[0], batch.query_x[0].double()
    weights = dict(learner.backbone.named_parameters())
    embed = learner.backbone.embed_with
    with torch.no_grad():
        if mode == "transductive":  # each set with its own batch statistics
            support, query = embed(weights, sx), embed(weights, qx)
        else:  # both with the support set's
            statistics = learner.backbone.statistics(weights, sx)
            support, query = embed(weights, sx, statistics), embed(weights, qx, statistics)
        centres = torch.stack([support[sy == c].mean(0) for c in range(3)])
        logits = learner.logits(sx, sy, qx)
        alone = learner.logits(sx, sy, qx[:1])  # the first query scored without the others
    torch.testing.assert_close(logits, -(torch.cdist(query, centres) ** 2))
    # Support statistics score each query on its own; the query batch's do not.
    assert torch.allclose(alone, logits[:1]) == (mode == "support")


def test_meta_training_scores_train_way_tasks_and_evaluation_way_tasks():
    learner = protonet(way=3, train_way=5)
    wide, narrow = conv_episode(way=5), conv_episode(way=3)
    weights = dict(learner.backbone.named_parameters())
    logits = learner.query_logits(weights, *(t[0] for t in wide[:3]), training=True)
    assert logits.shape == (5 * 4, 5)
    meta_batch(learner, wide, training=True).loss.backward()  # labels 0..4 fit
    with torch.no_grad():
        assert learner.logits(*(t[0] for t in narrow[:3])).shape == (3 * 4, 3)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_the_meta_gradient_reaches_the_embedding_and_evaluation_builds_no_graph(batching):
    learner = protonet()
    tasks = task_scorer(learner, batching)
    first = next(learner.adapt(*conv_episode()[:2], training=True))
    assert first.keys() == dict(learner.backbone.named_parameters()).keys()
    run_tasks(tasks, conv_episode(), training=True, backward=plain_backward)
    for name, p in learner.named_parameters():
        if name.startswith("backbone.head."):  # never used: no meta-gradient (vmap: zeros)
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    learner.zero_grad(set_to_none=True)
    with torch.no_grad():
        results = run_tasks(tasks, conv_episode(), training=False, track_steps=True)
    assert not results.loss.requires_grad and results.step_accuracy.shape == (1,)
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_vmapped_tasks_give_the_loops_meta_loss_meta_gradient_and_accuracy(mode):
    batch = conv_episode(tasks=3)
    batch = batch._replace(support_x=batch.support_x.double(), query_x=batch.query_x.double())
    loop_learner = protonet(mode).double()
    vmap_learner = copy.deepcopy(loop_learner)
    loop = meta_batch(TaskLoop(loop_learner), batch, True, backward=plain_backward)
    vmapped = meta_batch(task_scorer(vmap_learner, "vmap"), batch, True, backward=plain_backward)
    torch.testing.assert_close(vmapped.loss, loop.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(vmapped.accuracy, loop.accuracy)
    for name, p in loop_learner.named_parameters():
        if p.grad is not None:
            other = dict(vmap_learner.named_parameters())[name].grad
            torch.testing.assert_close(other, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        expected = meta_batch(TaskLoop(loop_learner), batch, training=False)
        got = meta_batch(task_scorer(vmap_learner, "vmap"), batch, training=False)
    torch.testing.assert_close(got.accuracy, expected.accuracy)


def test_grouped_batching_is_refused():
    with pytest.raises(ConfigError, match="algo.task_batching=grouped cannot run ProtoNet"):
        task_scorer(protonet(), "grouped")


def test_the_config_builds_the_papers_training_and_records_its_batch_norm():
    cfg = compose_train("experiment=protonet_omniglot_20w5s")
    check_config(cfg)
    module = build_module(cfg)
    learner = module.learner
    assert isinstance(learner, ProtoNet) and (learner.way, learner.train_way) == (20, 60)
    schedule = module.configure_optimizers()["lr_scheduler"]
    assert type(schedule) is torch.optim.lr_scheduler.StepLR
    assert (schedule.step_size, schedule.gamma, cfg.algo.meta_batch_size) == (2000, 0.5, 1)
    recorded = protocol(cfg)
    assert (recorded["batch_norm"], recorded["batch_norm_train"]) == ("support", "transductive")
    datamodule = build_datamodule(cfg)
    assert (datamodule.train_way, datamodule.train_query) == (60, 5)
    assert (datamodule.way, datamodule.query) == (20, 15)


def small_datamodule(monkeypatch: pytest.MonkeyPatch, **task) -> EpisodeDataModule:
    """3-way 2-shot 2-query tasks for validation and test (`task`: meta-training's train_way,
    train_query) on random 12 px images of 8 per class (10 training classes), set up."""
    splits = {
        "train": random_classes(10, seed=1),
        "val": random_classes(6, seed=2),
        "test": random_classes(6, seed=3),
    }
    monkeypatch.setattr(datamodule_module, "load_splits", lambda data: splits)
    data = OmegaConf.create({"workers": 0, "on_device": False})
    datamodule = EpisodeDataModule(data, 3, 2, 2, 2, 2, 2, seed=0, **task)
    datamodule.setup()
    return datamodule


def test_train_way_and_train_query_shape_the_meta_training_tasks_alone(monkeypatch):
    datamodule = small_datamodule(monkeypatch, train_way=5, train_query=4)
    train = next(iter(datamodule.train_dataloader()))
    assert train.support_x.shape[:2] == (2, 5 * 2) and train.query_x.shape[:2] == (2, 5 * 4)
    assert set(train.support_y.flatten().tolist()) == set(range(5))
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        episodes = next(iter(loader))
        assert episodes.support_x.shape[1] == 3 * 2 and episodes.query_x.shape[1] == 3 * 2
    # null: the test's way and query
    plain = next(iter(small_datamodule(monkeypatch, train_way=None).train_dataloader()))
    assert plain.support_x.shape[1] == 3 * 2 and plain.query_x.shape[1] == 3 * 2


@pytest.mark.parametrize(
    "task, message",
    [
        ({"train_way": 11}, r"^train_way=11 is out of range: expected 2\.\.10 \(the meta-train"),
        ({"train_query": 7}, r"^shot \+ train_query = 2 \+ 7 is out of range: expected at most 8"),
    ],
)
def test_a_training_task_the_train_split_cannot_hold_is_refused_naming_its_key(
    monkeypatch, task, message
):
    with pytest.raises(ConfigError, match=message):
        small_datamodule(monkeypatch, **task)


@pytest.mark.parametrize("algo", ["maml", "metalstm"])
def test_train_way_is_refused_naming_the_key_where_the_head_is_sized_by_the_way(algo):
    with pytest.raises(ConfigError, match=rf"^train_way=10 cannot train algo={algo}, whose head"):
        check_config(compose_train(f"algo={algo}", "train_way=10"))
    check_config(compose_train(f"algo={algo}", "train_way=5", "train_query=5"))  # way's own
    with pytest.raises(ConfigError, match=r"^train_way=1 is out of range: expected null or an"):
        check_config(compose_train("algo=protonet", "train_way=1"))


def checkpoint_of(algo: str, path, *overrides: str):
    """What train.py stores for `algo` (Lightning's keys less the optimiser's), at `path`."""
    module = build_module(compose_train(f"algo={algo}", *overrides))
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_trained_at_one_way_scores_at_another(tmp_path):
    path = checkpoint_of("protonet", tmp_path / "protonet.ckpt", "train_way=10")
    stored, checkpoint = load_checkpoint(path)
    cfg = stored.copy()
    cfg.way = 20  # as evaluate.py way=20 sets it
    check_config(cfg)
    check_checkpoint_fits(cfg, stored, "ckpt", path, "hint")
    learner = restored_module(cfg, checkpoint, path).learner
    assert (learner.way, learner.train_way) == (20, 10)
    torch.manual_seed(0)
    images = torch.rand(20 * 2, 1, 28, 28)
    support_y = torch.arange(20)
    with torch.no_grad():
        logits = learner.logits(images[:20], support_y, images[20:])
    assert logits.shape == (20, 20) and torch.isfinite(logits).all()
    # A head sized by the way: still refused, naming the key.
    path = checkpoint_of("maml", tmp_path / "maml.ckpt")
    stored, _ = load_checkpoint(path)
    cfg = stored.copy()
    cfg.way = 20
    with pytest.raises(ConfigError, match=r"does not fit this config: way=20 \(checkpoint: 5\)"):
        check_checkpoint_fits(cfg, stored, "ckpt", path, "hint")


def scan(c: int, variant: int) -> Image.Image:
    """A black bar on white, class c at its own height, `variant` shifting it a little."""
    pixels = torch.full((105, 105), 255, dtype=torch.uint8)
    row = 10 + 18 * c + 2 * variant
    pixels[row : row + 6, 10 + 20 * (c % 2) : 95] = 0
    return Image.fromarray(pixels.numpy(), mode="L")


def test_a_checkpoint_predicts_as_the_test_protocol_scores(tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint_of("protonet", tmp_path / "p.ckpt"))
    names = ["a", "b", "c", "d", "e"]
    support = {}
    for c, name in enumerate(names):
        scan(c, 0).save(tmp_path / f"{name}.png")
        scan(c, 1).save(tmp_path / f"{name}_query.png")
        support[name] = [tmp_path / f"{name}.png"]
    query = [tmp_path / f"{name}_query.png" for name in names]
    support_x, query_x = (
        predictor.read([f for n in names for f in support[n]]),
        predictor.read(query),
    )
    logits = predictor.logits(support_x, torch.arange(5), query_x)
    learner = predictor.module.learner
    with torch.no_grad():
        _, accuracy, _ = score_task(
            learner,
            EagerPasses(learner.backbone),
            support_x / 255.0,
            torch.arange(5),
            query_x / 255.0,
            torch.arange(5),
            training=False,
            track_steps=False,
        )
    assert (logits.argmax(-1) == torch.arange(5)).float().mean() == accuracy
    assert predictor.predict(support, query) == [names[i] for i in logits.argmax(-1).tolist()]
    # A 5-way checkpoint predicts 3-way tasks too: its learner rebuilt at way 3, as evaluate.py
    # way=3 rebuilds it; one class is refused in one line.
    three = predictor.logits(support_x[:3], torch.arange(3), query_x)
    with torch.no_grad():
        expected = predictor.module_at(3).learner.logits(
            support_x[:3] / 255.0, torch.arange(3), query_x / 255.0
        )
    assert predictor.module_at(3).learner.way == 3
    torch.testing.assert_close(three, expected)
    picked = predictor.predict({n: support[n] for n in names[:3]}, query)
    assert picked == [names[i] for i in three.argmax(-1).tolist()]
    with pytest.raises(ConfigError, match="has 1 class: give 2 classes or more"):
        predictor.predict({"a": support["a"]}, query)
    with pytest.raises(ConfigError, match=r"classes \[0, 2, 3\]: give labels 0..2,"):
        predictor.logits(support_x[:3], torch.tensor([0, 2, 3]), query_x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_training_scoring_and_prediction_make_no_tensor_off_the_batchs_device(batching, mode):
    learner = protonet(mode, way=WAY)
    module = EpisodicModule(learner, task_scorer(learner, batching), 1e-3, None, {}).to(DEVICE)
    assert_on_device(training_step(module, episodes_on_device()), steps=0)
    for name, p in module.learner.named_parameters():
        if not name.startswith("backbone.head."):
            assert p.grad is not None and p.grad.device == DEVICE, name
    assert_on_device(evaluation_step(module, episodes_on_device(), True), steps=1)
    task = episodes_on_device(tasks=1)
    logits = predictor_logits(predictor_for(module), *(t[0] for t in task[:3]))
    assert logits.shape == (WAY * QUERY, WAY) and logits.device == DEVICE
