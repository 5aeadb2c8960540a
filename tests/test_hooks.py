"""Feature taps by module path and the BatchNorm-statistics hook."""
import pytest
import torch
from torch import nn

from dfkd.hooks import BNStatisticsHook, FeatureTap, FeatureTapError, penultimate_tap


class Tiny(nn.Module):
    head_path = "fc"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


def test_bn_hook_reproduces_statistics_by_hand():
    torch.manual_seed(0)
    model = Tiny().eval()
    model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model.bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    x = torch.randn(4, 1, 5, 5)
    hook = BNStatisticsHook(model)
    model(x)
    got = hook.loss()
    h = model.conv(x)
    mean = h.mean(dim=(0, 2, 3))
    var = ((h - mean.view(1, 3, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    expected = (mean - model.bn.running_mean).norm() + (var - model.bn.running_var).norm()
    assert torch.allclose(got, expected, atol=1e-5)
    hook.close()
    model(x)
    assert hook.layer_losses == []


def test_feature_tap_by_path_and_penultimate():
    model = Tiny()
    x = torch.randn(2, 1, 4, 4)
    with FeatureTap(model, ["bn"]) as tap:
        model(x)
        assert tap["bn"].shape == (2, 3, 4, 4)
    pen = penultimate_tap(model)
    model(x)
    assert pen[pen.paths[0]].shape == (2, 3)
    pen.close()


def test_unknown_path_names_known_ones():
    with pytest.raises(FeatureTapError, match="conv"):
        FeatureTap(Tiny(), ["layer9"])


def test_tap_on_stock_torchvision_model():
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    with FeatureTap(model, ["layer2", "layer4"]) as tap:
        model(torch.randn(1, 3, 64, 64))
        assert tap["layer2"].shape[1] == 128 and tap["layer4"].shape[1] == 512
