"""ResNet-12: the functional forward against its layers, batch-norm statistics, DropBlock's
masks, the size check, and the methods that run on it by configuration alone (the MAML family,
ProtoNet, Meta-LSTM at a narrow width), batched in a loop or by vmap, never grouped."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.checkpoints.format import PAST_TARGETS
from fewshot.checkpoints.reading import load_checkpoint
from fewshot.config import check_config
from fewshot.data.episodes import ClassImages, Episodes
from fewshot.errors import ConfigError
from fewshot.evaluation.protocol import restored_module
from fewshot.methods import plain_backward, task_scorer
from fewshot.models import resnet12
from fewshot.models.resnet12 import ResNet12, dropblock, keyed_uniform
from fewshot.training.build import build_learner, build_module
from tests.helpers import compose_train, conv_episode, meta_batch, small_trainer

NARROW = [4, 8, 8, 8]


def small(drop_rate: float = 0.0, global_pool: bool = True, seed: int = 0) -> ResNet12:
    torch.manual_seed(seed)
    return ResNet12(3, 16, 5, NARROW, drop_rate=drop_rate, global_pool=global_pool)


def block_forward(block, prefix: str, x: torch.Tensor, inputs: dict) -> torch.Tensor:
    """A residual block run as its modules would run it; `inputs` collects what each of its
    batch-norm layers receives."""

    def norm(name: str, h: torch.Tensor) -> torch.Tensor:
        inputs[prefix + name] = h
        return getattr(block, name)(h)

    out = F.leaky_relu(norm("bn1", block.conv1(x)), 0.1)
    out = F.leaky_relu(norm("bn2", block.conv2(out)), 0.1)
    out = norm("bn3", block.conv3(out))
    return F.max_pool2d(F.leaky_relu(out + norm("shortcut_bn", block.shortcut_conv(x)), 0.1), 2)


def layers_forward(net: ResNet12, x: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
    """The net run as its modules would run it (no DropBlock); `inputs` collects what each
    batch-norm layer receives."""
    inputs = {} if inputs is None else inputs
    for i, block in enumerate(net.blocks):
        x = block_forward(block, f"blocks.{i}.", x, inputs)
    return net.head(x.mean((2, 3)) if net.global_pool else x.flatten(1))


def test_full_width_is_metaoptnets_12_million_weights_and_640_features():
    net = ResNet12(3, 84, 5)
    assert sum(p.numel() for p in net.parameters()) == 12_427_525  # 12,424,320 + the 5-way head
    assert net.head.in_features == 640
    assert ResNet12(3, 84, 5, global_pool=False).head.in_features == 640 * 5 * 5  # 84 -> 5 px
    assert list(net.buffers()) == []  # no running statistics


@pytest.mark.parametrize("global_pool", [True, False])
def test_forward_with_runs_the_net_as_its_layers_do_with_batch_statistics(global_pool):
    net = small(global_pool=global_pool)
    x = torch.rand(6, 3, 20, 20)
    logits = net.forward_with(dict(net.named_parameters()), x)
    torch.testing.assert_close(logits, layers_forward(copy.deepcopy(net), x))


def test_statistics_are_each_batch_norm_inputs_mean_and_unbiased_variance():
    net = small()
    x = torch.rand(6, 3, 16, 16)
    inputs = {}
    with torch.no_grad():
        statistics = net.statistics(dict(net.named_parameters()), x)
        layers_forward(net, x, inputs)
    assert list(statistics) == list(inputs) and len(inputs) == 16
    for name, h in inputs.items():
        mean, var = statistics[name]
        torch.testing.assert_close(mean, h.mean((0, 2, 3)), msg=name)
        torch.testing.assert_close(var, h.var((0, 2, 3), correction=1), msg=name)


def test_given_statistics_normalise_every_image_alone():
    net = small()
    weights = dict(net.named_parameters())
    with torch.no_grad():
        statistics = net.statistics(weights, torch.rand(5, 3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    together = net.forward_with(weights, x, statistics)
    alone = torch.cat([net.forward_with(weights, image[None], statistics) for image in x])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(together, net.forward_with(weights, x))


def test_support_statistics_normalise_under_bf16_autocast():
    net = small()
    weights = dict(net.named_parameters())
    support, query = torch.rand(6, 3, 16, 16), torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        exact = net.forward_with(weights, query, net.statistics(weights, support))
        with torch.autocast("cpu", torch.bfloat16):
            mixed = net.forward_with(weights, query, net.statistics(weights, support))
    torch.testing.assert_close(mixed.float(), exact, rtol=0.1, atol=0.1)


def test_module_and_functional_forward_agree_with_dropblock_on_and_drop_only_in_training():
    net = small(drop_rate=0.3)
    x = torch.rand(6, 3, 16, 16)
    weights = dict(net.named_parameters())
    training = net(x)
    torch.testing.assert_close(net.forward_with(weights, x), training)  # the same masks
    torch.testing.assert_close(functional_call(net, weights, (x,)), training)
    assert not torch.allclose(training, net.forward_with(weights, x, drop=0.0))
    net.eval()
    torch.testing.assert_close(net(x), layers_forward(net, x))  # no DropBlock at evaluation
    torch.testing.assert_close(net.forward_with(weights, x, drop=0.3), training)


def test_the_masks_follow_the_images_so_other_images_draw_others():
    net = small(drop_rate=0.3)
    weights = dict(net.named_parameters())
    x = torch.rand(6, 3, 16, 16)
    other = x.clone()
    other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0]  # one pixel
    seen = net.embed_with(weights, other, drop=0.3)[1:]
    plain = net.embed_with(weights, other, drop=0.0)[1:]
    assert not torch.allclose(net.embed_with(weights, x, drop=0.3)[1:], seen)
    assert not torch.allclose(seen, plain)


def test_keyed_uniform_is_uniform_and_a_function_of_key_and_salt():
    key = torch.tensor(12345)
    u = keyed_uniform(key, 0, (100_000,))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert torch.equal(u, keyed_uniform(key.clone(), 0, (100_000,)))
    assert (u != keyed_uniform(key, 1, (100_000,))).float().mean() > 0.99
    assert (u != keyed_uniform(key + 1, 0, (100_000,))).float().mean() > 0.99


@pytest.mark.parametrize("size", [1, 5])
def test_dropblock_drops_whole_squares_about_the_rate_and_keeps_the_sum(size):
    x = torch.ones(64, 16, 10, 10)
    out = dropblock(x, 0.1, size, torch.tensor(7), salt=3)
    dropped = (out == 0).float()
    assert 0.07 < dropped.mean() < 0.11
    # Every dropped position lies in a size x size square that is dropped whole.
    whole = (F.max_pool2d(out, size, stride=1) == 0).float()  # squares of zeros, by corner
    covered = F.max_pool2d(F.pad(whole, (size - 1,) * 4), size, stride=1)
    assert torch.equal(covered, dropped)
    torch.testing.assert_close(out.sum(), torch.tensor(float(x.numel())))


def test_a_block_larger_than_the_map_drops_the_whole_map():
    out = dropblock(torch.ones(256, 8, 2, 2), 0.2, 5, torch.tensor(1), salt=0)
    per_map = out.flatten(2).amax(2) == 0  # [N, C]: the map dropped
    assert torch.equal(per_map, (out.flatten(2) == 0).all(2))
    assert 0.15 < per_map.float().mean() < 0.25


@pytest.mark.parametrize("image_size, fits", [(15, False), (16, True), (84, True)])
def test_images_too_small_for_four_poolings_are_refused_in_one_line(image_size, fits):
    cfg = compose_train("backbone=resnet12", "data=miniimagenet", f"data.image_size={image_size}")
    if fits:
        check_config(cfg)
        return
    with pytest.raises(ConfigError, match=r"data.image_size=15: expected data.image_size >= 16"):
        check_config(cfg)
    try:
        check_config(cfg)
    except ConfigError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize(
    "override, message",
    [
        ("backbone.widths=[4,8,8]", r"backbone.widths=.* a list of 4 integers >= 1"),
        ("backbone.widths=[4,8,0,8]", r"backbone.widths=.* a list of 4 integers >= 1"),
        ("backbone.drop_rate=1.0", r"backbone.drop_rate=1.0 is out of range"),
        ("backbone.dropblock_size=0", r"backbone.dropblock_size=0 is out of range"),
        ("backbone.dropblock_ramp=-1", r"backbone.dropblock_ramp=-1 is out of range"),
    ],
)
def test_out_of_range_settings_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train("backbone=resnet12", "data=miniimagenet", override))


def config(algo: str, *overrides: str):
    """`algo` on a narrow ResNet-12 with DropBlock on, 16 px colour images, 3-way 1-shot."""
    cfg = compose_train(
        f"algo={algo}",
        "backbone=resnet12",
        "data=miniimagenet",
        "data.image_size=16",
        f"backbone.widths=[{','.join(map(str, NARROW))}]",
        "backbone.drop_rate=0.2",
        "way=3",
        "shot=1",
        "query=2",
        *overrides,
    )
    check_config(cfg)
    return cfg


def episodes(tasks: int = 2, way: int = 3, shot: int = 1, query: int = 2) -> Episodes:
    """A meta-batch of random 16 px colour images in [0, 1] with balanced labels."""
    return conv_episode(way, shot, query, tasks, channels=3, size=16)


def meta_gradient(learner) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


CASES = {
    "maml-first-order": ("maml", ["algo.first_order=true", "algo.inner_steps=1"]),
    "maml-second-order": ("maml", ["algo.first_order=false", "algo.inner_steps=1"]),
    "protonet": ("protonet", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_has_a_finite_meta_loss_and_meta_gradient_and_evaluation_runs(case):
    algo, overrides = CASES[case]
    torch.manual_seed(0)
    learner = build_learner(config(algo, *overrides))
    results = meta_batch(learner, episodes(), training=True, backward=plain_backward)
    grads = meta_gradient(learner)
    assert torch.isfinite(results.loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Every weight learns; ProtoNet's head, never used, alone gets nothing.
    unused = {"backbone.head.weight", "backbone.head.bias"} if algo == "protonet" else set()
    assert set(grads) == {n for n, _ in learner.named_parameters()} - unused
    assert all(g.abs().sum() > 0 for g in grads.values())
    learner.eval()
    evaluated = meta_batch(learner, episodes(), training=False)
    assert torch.isfinite(evaluated.loss) and evaluated.accuracy.shape == (2,)


def test_meta_lstm_runs_on_a_narrow_resnet12():
    torch.manual_seed(0)
    cfg = config(
        "metalstm",
        "backbone.widths=[16,32,64,128]",
        "algo.inner_epochs=1",
        "algo.inner_batch_size=25",
    )
    learner = build_learner(cfg)
    assert (
        sum(p.numel() for p in learner.backbone.parameters()) == 501_600 + 128 * 3 + 3
    )  # coordinates: blocks and 3-way head
    results = meta_batch(learner, episodes(tasks=1), training=True, backward=plain_backward)
    grads = meta_gradient(learner)
    assert torch.isfinite(results.loss)
    assert any(n.startswith("rule.") for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_recomputed_inner_steps_draw_the_same_masks():
    """algo.checkpoint_inner reruns each step in backward: the same masks, the same
    meta-gradient."""
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        cfg = config("maml", "algo.inner_steps=2", f"algo.checkpoint_inner={recompute}")
        learner = build_learner(cfg)
        meta_batch(learner, episodes(), training=True, backward=plain_backward)
        grads[recompute] = meta_gradient(learner)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, msg=name)


def test_vmapped_tasks_draw_each_tasks_masks_as_the_loop():
    torch.manual_seed(0)
    learner = build_learner(config("maml", "algo.inner_steps=1"))
    twin = copy.deepcopy(learner)
    loop = meta_batch(learner, episodes(), training=True, backward=plain_backward)
    vmapped = meta_batch(task_scorer(twin, "vmap"), episodes(), True, backward=plain_backward)
    torch.testing.assert_close(vmapped.loss, loop.loss)
    twins = meta_gradient(twin)
    for name, g in meta_gradient(learner).items():
        scale = g.abs().max().item()  # float32 sums in another order
        torch.testing.assert_close(twins[name], g, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_grouped_task_batching_is_refused_in_one_line():
    cfg = config("maml", "algo.task_batching=grouped")
    with pytest.raises(ConfigError, match="forward_tasks .* set algo.task_batching=loop"):
        build_module(cfg)


def colour_classes(num_classes: int, seed: int) -> ClassImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes, 6, 3, 16, 16), generator=g, dtype=torch.uint8)
    return ClassImages(images, [f"class{c}" for c in range(num_classes)])


def test_dropblock_share_ramps_over_meta_iterations_and_dropout_does_not():
    net = ResNet12(3, 16, 5, NARROW, drop_rate=0.2, dropblock_ramp=4)
    shares = []
    for iteration in (0, 1, 4, 9):
        net.at_iteration(iteration)
        shares.append(net.dropped_shares())
    assert shares == pytest.approx([(0.2, 0.0), (0.2, 0.05), (0.2, 0.2), (0.2, 0.2)])
    unramped = ResNet12(3, 16, 5, NARROW, drop_rate=0.2)
    assert unramped.dropped_shares() == (0.2, 0.2)
    # At the ramp's end a pass is the unramped net's; before it, another one.
    unramped.load_state_dict(net.state_dict())
    x = torch.rand(6, 3, 16, 16)
    torch.testing.assert_close(net(x), unramped(x))
    net.at_iteration(1)
    assert not torch.allclose(net(x), unramped(x))


def test_lightning_drops_in_meta_training_steps_only_ramped_by_step_and_a_checkpoint_reloads(
    monkeypatch, tmp_path
):
    """Lightning puts the module in training mode for meta-training steps and out of it for
    validation and test: DropBlock runs in the first alone, its share ramped by the
    meta-iteration it is told. What train.py stores rebuilds."""
    from fewshot.data.datamodule import EpisodeDataModule

    cfg = config("protonet", "algo.meta_batch_size=2", "backbone.dropblock_ramp=2")
    module = build_module(cfg)
    datamodule = EpisodeDataModule(cfg.data, 3, 1, 2, 2, 2, 2, seed=0)
    datamodule.splits = {
        split: colour_classes(5, s) for s, split in enumerate(["train", "val", "test"])
    }
    trainer = small_trainer("cpu", max_steps=3)
    calls = []  # (stage, meta-iteration, share, square side) of each dropping pass

    def recorded(x, drop, block_size, key, salt):
        stage = getattr(trainer.state.stage, "value", None)
        calls.append((stage, trainer.global_step, drop, block_size))
        return dropblock(x, drop, block_size, key, salt)

    monkeypatch.setattr(resnet12, "dropblock", recorded)
    trainer.fit(module, datamodule)
    trainer.test(module, datamodule, verbose=False)
    assert calls and {stage for stage, *_ in calls} == {"train"}
    assert trainer.global_step == 3
    shares = {(step, size): drop for _, step, drop, size in calls}
    # Dropout (side 1) at drop_rate throughout; DropBlock (side 5) from 0 (no call) to 0.2.
    assert shares == pytest.approx(
        {(0, 1): 0.2, (1, 1): 0.2, (2, 1): 0.2, (1, 5): 0.1, (2, 5): 0.2}
    )

    path = tmp_path / "resnet12.ckpt"
    trainer.save_checkpoint(path)
    stored, checkpoint = load_checkpoint(path)
    assert stored.backbone.name == "resnet12" and list(stored.backbone.widths) == NARROW
    assert stored.backbone._target_ == PAST_TARGETS["backbone"]["resnet12"][0]
    restored = restored_module(stored, checkpoint, path)
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


@pytest.mark.parametrize(
    "preset", ["protonet_miniimagenet_resnet12_5w1s", "maml_miniimagenet_resnet12_5w1s"]
)
def test_the_presets_compose_on_resnet12(preset):
    cfg = compose_train(f"experiment={preset}")
    check_config(cfg)
    assert cfg.backbone.name == "resnet12" and list(cfg.backbone.widths) == [64, 160, 320, 640]
    if cfg.algo.name == "maml":
        assert cfg.algo.first_order is True
