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


def test_functional_call_on_its_own_parameters_equals_forward():
    net = Conv4(1, 28, num_classes=5, channels=8, padding=1, stride=1, pool=True)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(functional_call(net, dict(net.named_parameters()), (x,)), net(x))
