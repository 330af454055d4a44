import pytest
import torch

from slim2deploy.base.errors import SlimError
from slim2deploy.model.stats import count_macs, count_params
from slim2deploy.model.zoo import create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_zoo_models_run_at_28_and_32(name, size, channels):
    model = create_model(name, in_channels=channels, num_classes=7, width=0.125).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_paper_sizes_at_full_width():
    # Network Slimming, Table 1 (CIFAR-10): VGG-19 20.04M params, 7.97e8 FLOPs; ResNet-164 1.70M
    vgg = create_model("vgg19", num_classes=10)
    assert count_params(vgg) == pytest.approx(20.04e6, rel=2e-3)
    assert 2 * count_macs(vgg, torch.zeros(1, 3, 32, 32)) == pytest.approx(7.97e8, rel=2e-3)
    assert count_params(create_model("resnet164", num_classes=10)) == pytest.approx(1.70e6, rel=1e-2)


def test_width_scales_channels():
    narrow, wide = (create_model("resnet20", width=w) for w in (0.5, 1.0))
    assert count_params(narrow) < count_params(wide) / 3


def test_unknown_name_lists_what_exists():
    with pytest.raises(SlimError) as err:
        create_model("vgg12")
    assert "vgg11" in str(err.value) and "torchvision:" in str(err.value)


def test_torchvision_and_user_factory():
    tv = create_model("torchvision:resnet18", num_classes=5).eval()
    assert tv(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    user = create_model("slim2deploy.model.nets:DenseNet", depth=10, growth=4, num_classes=3)
    assert user(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(SlimError, match="unknown torchvision"):
        create_model("torchvision:nonexistent")
