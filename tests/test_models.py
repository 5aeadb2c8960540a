"""Architectures, the registry, NormalizedModel and freeze."""
import pytest
import torch
import torch.nn as nn

import teachers
from teachers import NormalizedModel, UnknownModelError, build_model, create_model, freeze, list_models

TV_MODELS = ["tv:resnet18", "tv:mobilenet_v3_small"]
ALL_MODELS = list_models() + TV_MODELS


def test_list_models_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    expected = {"lenet5", "lenet5_bn", "lenet5_half", "lenet5_half_bn", "mlp", "resnet8", "resnet20",
                "resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_2"}
    assert expected <= set(names)
    assert not any(n.startswith("tv:") for n in names)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shapes_and_paths(name):
    torch.manual_seed(0)
    for channels, size in ((1, 32), (3, 32), (1, 28)):
        if True:
            net = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
            modules = dict(net.named_modules())
            assert isinstance(modules[net.head_path], nn.Linear)
            assert len(net.block_paths) >= 1
            captured = {}
            hooks = [modules[p].register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o))
                     for p in net.block_paths]
            hooks.append(modules[net.head_path].register_forward_hook(
                lambda m, i, o: captured.__setitem__("penultimate", i[0])))
            with torch.no_grad():
                out = net(torch.rand(2, channels, size, size))
            for h in hooks:
                h.remove()
            assert out.shape == (2, 7), (name, channels, size)
            assert set(captured) == set(net.block_paths) | {"penultimate"}
            assert captured["penultimate"].shape == (2, modules[net.head_path].in_features)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as err:
        create_model("lenet6")
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "lenet6" in msg and "lenet5_bn" in msg and "wrn40_2" in msg and "tv:<torchvision name>" in msg
    with pytest.raises(UnknownModelError, match="mobilenet_v3_small"):
        create_model("tv:not_a_torchvision_model")


def test_register_model_rejects_duplicates_and_tv_prefix():
    with pytest.raises(ValueError):
        teachers.register_model("lenet5")(lambda **kw: nn.Linear(1, 1))
    with pytest.raises(ValueError):
        teachers.register_model("tv:mine")


def _count(net, kind):
    return sum(isinstance(m, kind) for m in net.modules())


def test_lenet5_is_dafl_lenet():
    net = create_model("lenet5", num_classes=10, in_channels=1, image_size=32)
    assert _count(net, nn.modules.batchnorm._BatchNorm) == 0
    assert sum(p.numel() for p in net.parameters()) == 61706  # DAFL's LeNet-5
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 6, (5, 5)), (6, 16, (5, 5)), (16, 120, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in net.modules() if isinstance(lin, nn.Linear)] == [(120, 84), (84, 10)]


def test_lenet5_bn_and_half_widths():
    bn = create_model("lenet5_bn")
    assert _count(bn, nn.BatchNorm2d) == 3 and _count(bn, nn.BatchNorm1d) == 1
    half = create_model("lenet5_half")
    assert _count(half, nn.modules.batchnorm._BatchNorm) == 0
    assert [c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)] == [3, 8, 60]
    assert [lin.out_features for lin in half.modules() if isinstance(lin, nn.Linear)] == [42, 10]
    half_bn = create_model("lenet5_half_bn")
    assert _count(half_bn, nn.BatchNorm2d) == 3


@pytest.mark.parametrize("size", [28, 29, 30, 31, 32])
def test_lenet_conv3_is_1x1_for_28_to_32_px(size):
    net = create_model("lenet5", image_size=size)
    seen = {}
    net.relu3.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    net(torch.rand(2, 1, size, size))
    assert seen["shape"] == (2, 120, 1, 1)


def test_resnet_and_wrn_have_batchnorm():
    for name in ("resnet8", "resnet20", "wrn16_1"):
        assert _count(create_model(name), nn.BatchNorm2d) > 0


def test_input_gradient_through_hooked_model():
    # DeepInversion backpropagates to the input through the teacher while hooks keep features.
    for name in ("lenet5_bn", "resnet8", "wrn16_1"):
        net = freeze(build_model(name, 10, 3, 32, mean=[0.5] * 3, std=[0.25] * 3))
        kept = []
        for p in net.block_paths:
            net.net.get_submodule(p).register_forward_hook(lambda m, i, o: kept.append(o))
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        loss = net(x).logsumexp(1).sum() + sum(f.pow(2).mean() for f in kept)
        loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is None for p in net.parameters())


def test_normalized_model_normalises():
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=5, in_channels=3).eval()
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    model = NormalizedModel(net, mean, std).eval()
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net(manual))
    assert model.head_path == "fc" and model.block_paths == ("layer1", "layer2", "layer3")
    assert "mean" in model.state_dict() and "std" in model.state_dict()


def test_build_model_records_arch_and_broadcasts_stats():
    model = build_model("mlp", 4, 3, 16, mean=0.5, std=0.5, hidden=(8,))
    assert model.arch == "mlp"
    assert model.arch_kwargs == {"num_classes": 4, "in_channels": 3, "image_size": 16, "hidden": (8,)}
    assert model.mean.shape == (1, 3, 1, 1)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError):
        build_model("lenet5", 10, 3, 32, mean=[0.1, 0.2], std=[1.0, 1.0])


def test_freeze_survives_parent_train():
    teacher = freeze(build_model("lenet5_bn", 10, 1, 32, mean=[0.5], std=[0.5]))
    student = create_model("lenet5_half")
    parent = nn.ModuleDict({"teacher": teacher, "student": student})
    parent.train()
    assert student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not teacher.training and not teacher.net.bn1.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teachers.is_frozen(teacher) and not teachers.is_frozen(student)
    # BatchNorm running statistics do not move when the frozen teacher sees data.
    before = teacher.net.bn1.running_mean.clone()
    teacher(torch.rand(4, 1, 32, 32))
    torch.testing.assert_close(teacher.net.bn1.running_mean, before)


def test_freeze_plain_module():
    net = freeze(create_model("resnet8"))
    parent = nn.Sequential(net)
    parent.train()
    assert not net.training and not net.bn1.training
    assert not any(p.requires_grad for p in net.parameters())


def test_tv_resnet_small_image_stem():
    net = create_model("tv:resnet18", num_classes=3, in_channels=1, image_size=32)
    assert (net.conv1.in_channels, net.conv1.kernel_size, net.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(net.maxpool, nn.Identity)
    assert net.head_path == "fc" and net.fc.out_features == 3
    assert net.block_paths == ("layer1", "layer2", "layer3", "layer4")
