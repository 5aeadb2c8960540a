"""Feature taps by module path and the BatchNorm-statistics hook."""
import pytest
import torch
from torch import nn

from dfkd.core.bn import BNStatisticsHook
from dfkd.core.taps import FeatureTap, FeatureTapError, fc_input_tap, penultimate_tap


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


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def test_bn_hook_first_layer_weight_scales_only_the_first_layer():
    torch.manual_seed(0)
    model = TwoBN().eval()
    x = torch.randn(3, 1, 7, 7)
    plain, weighted = BNStatisticsHook(model), BNStatisticsHook(model, first_layer_weight=10.0)
    model(x)
    first, second = plain.layer_losses
    assert torch.allclose(weighted.layer_losses[0], 10 * first) and torch.allclose(weighted.layer_losses[1], second)
    assert torch.allclose(weighted.loss(), 10 * first + second)


def test_bn_hook_sample_masks_use_only_the_masked_images():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(5, 1, 5, 5)
    hook = BNStatisticsHook(model)
    keep = torch.tensor([True, False, True, True, False])
    hook.set_sample_masks({id(model.bn): keep})
    model(x)
    got = hook.loss()
    hook.set_sample_masks(None)
    model(x[keep])
    assert torch.allclose(got, hook.loss(), atol=1e-5)  # same as the loss on the kept images alone
    hook.set_sample_masks({id(model.bn): torch.zeros(5, dtype=torch.bool)})
    model(x)
    assert hook.loss().item() == 0.0  # a layer with no image of its classes adds nothing


def test_bn_hook_momentum_blends_earlier_rounds_by_hand():
    torch.manual_seed(0)
    model = Tiny().eval()
    m = 0.9
    hook = BNStatisticsHook(model, momentum=m)

    def stats(x):
        h = model.conv(x)
        mean = h.mean(dim=(0, 2, 3))
        return mean, ((h - mean.view(1, 3, 1, 1)) ** 2).mean(dim=(0, 2, 3))

    x1, x2, x3 = (torch.randn(4, 1, 5, 5) for _ in range(3))
    model(x1)
    mean1, var1 = stats(x1)
    first = (mean1 - model.bn.running_mean).norm() + (var1 - model.bn.running_var).norm()
    assert torch.allclose(hook.loss(), first, atol=1e-5)  # nothing to blend with yet
    hook.update_momentum()
    model(x2)
    mean2, var2 = stats(x2)
    blended_mean, blended_var = (1 - m) * mean2 + m * mean1, (1 - m) * var2 + m * var1
    expected = (blended_mean - model.bn.running_mean).norm() + (blended_var - model.bn.running_var).norm()
    assert torch.allclose(hook.loss(), expected, atol=1e-5)
    hook.update_momentum()  # average becomes m * stats1 + (1 - m) * stats2
    model(x3)
    mean3, var3 = stats(x3)
    avg_mean, avg_var = m * mean1 + (1 - m) * mean2, m * var1 + (1 - m) * var2
    expected = (((1 - m) * mean3 + m * avg_mean) - model.bn.running_mean).norm() + (
        ((1 - m) * var3 + m * avg_var) - model.bn.running_var).norm()
    assert torch.allclose(hook.loss(), expected, atol=1e-5)
    # the averages survive a state round trip
    other = BNStatisticsHook(model, momentum=m)
    other.load_state_dict(hook.state_dict())
    assert torch.allclose(other.averages[id(model.bn)][0], avg_mean, atol=1e-6)


def test_momentum_average_ignores_a_pass_where_the_mask_holds_no_image():
    """A member none of whose classes was targeted in a round records no statistics: its
    momentum average must stay as it was, not be pulled towards zero mean and variance."""
    torch.manual_seed(0)
    model = Tiny().eval()
    m = 0.9
    hook = BNStatisticsHook(model, momentum=m)
    x1, x2 = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5) + 3.0
    everyone, no_one = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    with hook.capture({id(model.bn): everyone}):
        model(x1)
    hook.update_momentum()
    mean1, var1, _ = hook.averages[id(model.bn)]
    mean1, var1 = mean1.clone(), var1.clone()
    with hook.capture({id(model.bn): no_one}):
        model(x2)
        assert float(hook.loss().detach()) == 0.0  # an empty mask adds nothing
    hook.update_momentum()
    mean, var, seen = hook.averages[id(model.bn)]
    assert bool(seen)
    assert torch.allclose(mean, mean1) and torch.allclose(var, var1)
    # a first pass with an empty mask leaves nothing to blend with: the next real batch is taken as is
    fresh = BNStatisticsHook(model, momentum=m)
    with fresh.capture({id(model.bn): no_one}):
        model(x1)
    fresh.update_momentum()
    with fresh.capture({id(model.bn): everyone}):
        model(x2)
        with_empty_average = fresh.loss()
    plain = BNStatisticsHook(model, momentum=m)
    with plain.capture({id(model.bn): everyone}):
        model(x2)
        assert torch.allclose(with_empty_average, plain.loss(), atol=1e-6)


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


def test_fc_input_tap_takes_the_features_before_the_fully_connected_layers():
    from teachers.models.lenet import lenet5
    from teachers.models.mlp import mlp
    from teachers.models.resnet import resnet8

    x = torch.rand(3, 1, 32, 32)
    cases = [(lenet5(), "fc1", (3, 120)),  # DAFL's LeNet-5: conv3's 120 features, not fc2's 84
             (resnet8(in_channels=1), resnet8(in_channels=1).head_path, None),  # ResNet: the pooled features
             (mlp(in_channels=1, image_size=32), None, None)]  # no convolution: the penultimate features
    for model, path, shape in cases:
        tap = fc_input_tap(model)
        model.eval()(x)
        expected = path or model.head_path
        assert tap.paths == [expected]
        if shape is not None:
            assert tap[expected].shape == shape
        tap.close()


def test_unknown_path_names_known_ones():
    with pytest.raises(FeatureTapError, match="conv"):
        FeatureTap(Tiny(), ["layer9"])


def test_tap_on_stock_torchvision_model():
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    with FeatureTap(model, ["layer2", "layer4"]) as tap:
        model(torch.randn(1, 3, 64, 64))
        assert tap["layer2"].shape[1] == 128 and tap["layer4"].shape[1] == 512
