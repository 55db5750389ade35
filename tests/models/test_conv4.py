import copy

import pytest
import torch
from torch.func import functional_call

from fewshot.models.conv4 import Conv4


@pytest.mark.parametrize(
    "image_size, padding, stride, pool",
    [(28, 1, 1, True), (28, 1, 2, False), (84, 1, 1, True), (84, 0, 2, False), (28, 2, 2, False)],
)
def test_head_size_is_derived_from_the_layer_settings(image_size, padding, stride, pool):
    net = Conv4(1, image_size, num_classes=5, channels=8, padding=padding, stride=stride, pool=pool)
    assert net(torch.rand(3, 1, image_size, image_size)).shape == (3, 5)


def layers_forward(net: Conv4, x: torch.Tensor) -> torch.Tensor:
    """The net run as its modules would run it."""
    return net.head(net.features(x))


def batch_norm_inputs(net: Conv4, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each batch-norm layer receives when the modules run `x`."""
    return {
        f"features.{i}": net.features[:i](x)
        for i, layer in enumerate(net.features)
        if isinstance(layer, torch.nn.BatchNorm2d)
    }


@pytest.mark.parametrize("stride, pool", [(1, True), (2, False)])
def test_forward_with_runs_the_net_as_its_layers_do_with_batch_statistics(stride, pool):
    torch.manual_seed(0)
    net = Conv4(3, 16, num_classes=5, channels=8, padding=1, stride=stride, pool=pool)
    x = torch.rand(6, 3, 16, 16)
    logits = net.forward_with(dict(net.named_parameters()), x)
    torch.testing.assert_close(logits, layers_forward(copy.deepcopy(net), x))


def test_statistics_are_each_batch_norm_inputs_mean_and_unbiased_variance():
    torch.manual_seed(0)
    net = Conv4(3, 16, num_classes=5, channels=8, padding=1, stride=1, pool=True)
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        statistics = net.statistics(dict(net.named_parameters()), x)
    inputs = batch_norm_inputs(net, x)
    assert list(statistics) == list(inputs) and len(inputs) == 4
    for name, h in inputs.items():
        mean, var = statistics[name]
        torch.testing.assert_close(mean, h.mean((0, 2, 3)), msg=name)
        torch.testing.assert_close(var, h.var((0, 2, 3), correction=1), msg=name)


def test_given_statistics_normalise_every_image_alone():
    torch.manual_seed(0)
    net = Conv4(1, 16, num_classes=5, channels=8, padding=1, stride=1, pool=True)
    weights = dict(net.named_parameters())
    with torch.no_grad():  # as the learners take them: constants
        statistics = net.statistics(weights, torch.rand(5, 1, 16, 16))
    x = torch.rand(4, 1, 16, 16)
    together = net.forward_with(weights, x, statistics)
    alone = torch.cat([net.forward_with(weights, image[None], statistics) for image in x])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(together, net.forward_with(weights, x))


def test_the_backbone_keeps_no_running_statistics():
    net = Conv4(1, 28, num_classes=5, channels=8, padding=1, stride=1, pool=True)
    assert list(net.buffers()) == []


def test_functional_call_on_its_own_parameters_equals_forward():
    net = Conv4(1, 28, num_classes=5, channels=8, padding=1, stride=1, pool=True)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(functional_call(net, dict(net.named_parameters()), (x,)), net(x))


@pytest.mark.parametrize(
    "image_size, stride, pool, expected",
    [(28, 2, False, False), (28, 1, True, True), (84, 1, True, True), (84, 2, False, True)],
)
def test_auto_layout_is_channels_last_for_pooling_nets_and_from_64_pixels(
    image_size, stride, pool, expected
):
    net = Conv4(3, image_size, 5, 8, padding=1, stride=stride, pool=pool, channels_last="auto")
    assert net.channels_last is expected


def test_one_channel_images_reach_batch_norm_and_pooling_channels_last():
    # A [N, 1, H, W] batch is laid out both ways at once; the first conv's output is not,
    # unless converted.
    net = Conv4(1, 28, 5, channels=8, padding=1, stride=1, pool=True, channels_last=True)
    layouts = []
    for layer in net.features:
        if isinstance(layer, torch.nn.MaxPool2d):
            layer.register_forward_hook(
                lambda m, inputs, out: layouts.append(
                    inputs[0].is_contiguous(memory_format=torch.channels_last)
                    and not inputs[0].is_contiguous()
                )
            )
    net(torch.rand(4, 1, 28, 28))
    assert layouts == [True] * 4


def test_channels_last_layout_computes_the_same_logits_and_gradients():
    torch.manual_seed(0)
    nets = {}
    for layout in (False, True):
        torch.manual_seed(0)
        nets[layout] = Conv4(
            3, 20, 5, channels=8, padding=1, stride=1, pool=True, channels_last=layout
        )
    x = torch.rand(6, 3, 20, 20)
    outputs = {layout: net(x) for layout, net in nets.items()}
    for out in outputs.values():
        out.square().sum().backward()
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(nets[False].named_parameters(), nets[True].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)  # float32 sums


def test_support_statistics_normalise_under_bf16_autocast():
    """`algo.batch_norm_test=support` with `trainer.precision=bf16-mixed`: float32 statistics
    given to a bfloat16 activation (the CPU's batch norm refused the mix)."""
    torch.manual_seed(0)
    net = Conv4(1, 16, 3, channels=4, padding=1, stride=1, pool=True)
    weights = dict(net.named_parameters())
    support, query = torch.rand(6, 1, 16, 16), torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        exact = net.forward_with(weights, query, net.statistics(weights, support))
        with torch.autocast("cpu", torch.bfloat16):
            mixed = net.forward_with(weights, query, net.statistics(weights, support))
    torch.testing.assert_close(mixed.float(), exact, rtol=0.1, atol=0.1)
