"""Members of one architecture in one stacked pass (dfkd.multi.batched)."""
import pytest
import torch

from dfkd.core.bn import BNStatisticsHook
from dfkd.multi.batched import StackedMembers, stack_groups
from dfkd.multi.ensemble import TeacherEnsemble


def _member(seed: int, classes, arch: str):
    from teachers import build_model, freeze

    torch.manual_seed(seed)
    model = build_model(arch, len(classes), 1, 32, (0.3,), (0.35,))
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 1, 32, 32))
    return freeze(model), {"classes": list(classes), "image_shape": [1, 32, 32], "mean": [0.3], "std": [0.35]}


@pytest.fixture
def zoo():
    """Three lenet5_bn members on class pairs and a resnet8 between them."""
    archs = ["lenet5_bn", "resnet8", "lenet5_bn", "lenet5_bn"]
    return TeacherEnsemble([(f"m{i}", *_member(i, [2 * i, 2 * i + 1], arch)) for i, arch in enumerate(archs)],
                           combine="calibrated_concat")


def test_members_are_grouped_by_architecture(zoo):
    assert stack_groups(zoo.members, zoo.member_shapes, zoo.member_heads) == [[0, 2, 3], [1]]


def test_a_stacked_pass_equals_separate_passes(zoo):
    x = torch.rand(16, 1, 32, 32, requires_grad=True)
    zoo.batch_members = False
    separate = zoo.forward_all(x)
    (grad_separate,) = torch.autograd.grad(separate.merged.square().sum(), x)
    zoo.batch_members = True
    stacked = zoo.forward_all(x)
    (grad_stacked,) = torch.autograd.grad(stacked.merged.square().sum(), x)
    torch.testing.assert_close(stacked.union_logits, separate.union_logits, atol=1e-5, rtol=1e-5)
    for name in zoo.names:
        torch.testing.assert_close(stacked.features[name], separate.features[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_stacked, grad_separate, atol=1e-5, rtol=1e-5)  # synthesis gradients as well


def test_stacking_is_used_only_where_asked_and_no_hook_watches(zoo, monkeypatch):
    calls = []
    original = StackedMembers.__call__
    monkeypatch.setattr(StackedMembers, "__call__", lambda self, x: (calls.append(len(self.members)), original(self, x))[1])
    x = torch.rand(8, 1, 32, 32)
    zoo.forward_all(x)  # default: CUDA only
    assert calls == []
    zoo.batch_members = True
    zoo.forward_all(x)
    assert calls == [3]
    hook = BNStatisticsHook(zoo)  # a synthesizer's BN hook must see each member's own activations
    with hook.capture():
        zoo.forward_all(x)
        assert len(hook.layer_losses) == len(hook)
    assert calls == [3]
    hook.enabled = False  # outside its capture the hook is idle: the stacked pass is used again
    zoo.forward_all(x)
    assert calls == [3, 3]
    hook.close()
