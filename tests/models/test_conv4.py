import copy

import pytest
import torch
from torch.func import functional_call

from fewshot.errors import ConfigError
from fewshot.models.conv4 import Conv4


@pytest.mark.parametrize(
    "image_size, padding, stride, pool",
    [(28, 1, 1, True), (28, 1, 2, False), (84, 1, 1, True), (84, 0, 2, False), (28, 2, 2, False)],
)
def test_head_size_is_derived_from_the_layer_settings(image_size, padding, stride, pool):
    net = Conv4(1, image_size, num_classes=5, channels=8, padding=padding, stride=stride, pool=pool)
    assert net(torch.rand(3, 1, image_size, image_size)).shape == (3, 5)


def test_a_backbone_that_shrinks_the_image_to_nothing_names_the_block_and_keys():
    with pytest.raises(ConfigError, match=r"block 3 of 4.*data.image_size=12.*backbone.padding=0"):
        Conv4(1, 12, num_classes=5, channels=8, padding=0, stride=1, pool=True)


def layers_forward(net: Conv4, x: torch.Tensor) -> torch.Tensor:
    """The net run as its modules would run it."""
    return net.head(net.features(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stride, pool", [(1, True), (2, False)])
def test_forward_with_runs_the_net_as_its_layers_do_and_fills_the_buffers_alike(
    training, stride, pool
):
    torch.manual_seed(0)
    net = Conv4(3, 16, num_classes=5, channels=8, padding=1, stride=stride, pool=pool)
    net.train(training)
    reference = copy.deepcopy(net)
    x = torch.rand(6, 3, 16, 16)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    logits = net.forward_with(dict(net.named_parameters()), buffers, x)
    torch.testing.assert_close(logits, layers_forward(reference, x))
    for name, buffer in reference.named_buffers():
        if not name.endswith("num_batches_tracked"):  # a count momentum=1 does not read
            torch.testing.assert_close(buffers[name], buffer, msg=name)


def test_forward_with_no_buffers_normalises_with_the_batch_statistics_even_in_eval_mode():
    net = Conv4(1, 28, num_classes=5, channels=8, padding=1, stride=2, pool=False).eval()
    x = torch.rand(4, 1, 28, 28)
    no_buffers = {n: None for n, _ in net.named_buffers()}
    expected = layers_forward(copy.deepcopy(net).train(), x)
    torch.testing.assert_close(
        net.forward_with(dict(net.named_parameters()), no_buffers, x), expected
    )


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


def test_an_unknown_layout_names_the_key():
    with pytest.raises(ConfigError, match=r"backbone.channels_last='yes'.*true, false or auto"):
        Conv4(1, 28, 5, channels=8, padding=1, stride=1, pool=True, channels_last="yes")
