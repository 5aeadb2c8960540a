"""TeacherEnsemble: class mapping into the union, hooks, teacher interface, synthesizers driven by it."""
import pytest
import torch
from torch import nn

from dfkd.core.bn import BNStatisticsHook, member_sample_masks
from dfkd.core.taps import fc_input_tap, penultimate_tap
from dfkd.multi.ensemble import EnsembleError, TeacherEnsemble
from teachers import NormalizedModel, build_manifest, build_model, save_checkpoint

SHAPE = (1, 32, 32)


def member(name, classes, dataset="digits", shape=SHAPE, arch="lenet5_bn", seed=0, mean=(0.3,), std=(0.35,)):
    """A randomly initialised member with non-trivial BatchNorm statistics, and its meta."""
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), shape[0], shape[1], mean * shape[0] if len(mean) == 1 else mean,
                        std * shape[0] if len(std) == 1 else std)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, *shape))
    meta = {"dataset": dataset, "classes": list(classes), "class_names": [f"c{c}" for c in classes],
            "mean": list(model.mean.flatten().tolist()), "std": list(model.std.flatten().tolist()),
            "image_shape": list(shape), "test_accuracy": 0.9, "seed": seed}
    return name, model.eval(), meta


def test_disjoint_members_map_into_the_sorted_union():
    ens = TeacherEnsemble([member("b", [5, 6, 7, 8, 9], seed=1), member("a", [0, 1, 2, 3, 4])], combine="concat")
    assert ens.classes == list(range(10)) and ens.num_classes == 10
    assert ens.class_names == [f"c{c}" for c in range(10)]
    assert ens.index(0).tolist() == [5, 6, 7, 8, 9] and ens.index(1).tolist() == [0, 1, 2, 3, 4]
    assert ens.mask.sum(1).tolist() == [5, 5] and not bool((ens.mask[0] & ens.mask[1]).any())
    x = torch.rand(3, *SHAPE)
    out = ens.forward_all(x)
    zb, za = ens.members[0](x), ens.members[1](x)
    assert torch.allclose(out.logits[0], zb) and torch.allclose(out.logits[1], za)
    assert torch.allclose(out.union_logits[0, :, 5:], zb) and bool((out.union_logits[0, :, :5] == 0).all())
    assert torch.allclose(out.merged, torch.cat([za, zb], dim=1))  # concat, in union order
    assert torch.allclose(ens(x), out.merged)
    assert out.features["a"].shape == (3, 84) and out.features["b"].shape == (3, 84)


def test_overlapping_members_share_classes_in_any_output_order():
    ens = TeacherEnsemble([member("a", [3, 1, 7]), member("b", [7, 9], seed=1)], combine="mean_logits")
    assert ens.classes == [1, 3, 7, 9]
    assert ens.index(0).tolist() == [1, 0, 2] and ens.index(1).tolist() == [2, 3]
    assert ens.mask.tolist() == [[True, True, True, False], [False, False, True, True]]
    x = torch.rand(2, *SHAPE)
    za, zb = ens.members[0](x), ens.members[1](x)
    merged = ens(x)
    assert torch.allclose(merged[:, 0], za[:, 1]) and torch.allclose(merged[:, 1], za[:, 0])
    assert torch.allclose(merged[:, 2], (za[:, 2] + zb[:, 0]) / 2) and torch.allclose(merged[:, 3], zb[:, 1])


def test_a_combiner_that_cannot_merge_the_class_sets_is_refused_when_built():
    with pytest.raises(EnsembleError, match=r"concat needs disjoint class sets, but union classes \[2\]"):
        TeacherEnsemble([member("a", [1, 3, 7]), member("b", [7, 9], seed=1)], combine="concat")


def test_different_data_sets_need_an_explicit_mapping():
    a, b = member("a", [0, 1, 2]), member("b", [0, 1], dataset="mnist", seed=1)
    with pytest.raises(EnsembleError, match=r"different data sets: a \(digits\), b \(mnist\)"):
        TeacherEnsemble([a, b])
    ens = TeacherEnsemble([a, b], class_map={"b": [5, 1]})
    assert ens.classes == [0, 1, 2, 5] and ens.index(1).tolist() == [3, 1]
    with pytest.raises(EnsembleError, match="member 'b': class_map gives 3 union ids for its 2 classes"):
        TeacherEnsemble([a, b], class_map={"b": [5, 6, 7]})
    with pytest.raises(EnsembleError, match="unknown members"):
        TeacherEnsemble([a, b], class_map={"c": [1]})
    mixed = TeacherEnsemble([a, b], allow_mixed=True)
    assert mixed.classes == [0, 1, 2, 3, 4] and mixed.class_names[3] == "mnist:c0"
    assert mixed.meta()["dataset"] == "digits+mnist"


def test_classes_that_do_not_fit_name_the_member():
    with pytest.raises(EnsembleError, match=r"member 'b': classes \[11\] do not fit"):
        TeacherEnsemble([member("a", [0, 1]), member("b", [1, 11], seed=1)], classes=range(10))
    name, model, meta = member("a", [0, 1, 2])
    meta["classes"] = [0, 1]
    meta["class_names"] = ["0", "1"]
    with pytest.raises(EnsembleError, match="member 'a': the model has 3 outputs but meta lists 2 classes"):
        TeacherEnsemble([(name, model, meta)])


def test_image_shapes_must_match_unless_mixed_is_allowed():
    a = member("a", [0, 1])
    b = member("b", [2, 3], shape=(3, 28, 28), seed=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(EnsembleError, match=r"different image shapes: a \[1, 32, 32\], b \[3, 28, 28\]"):
        TeacherEnsemble([a, b])
    ens = TeacherEnsemble([a, b], allow_mixed=True)
    x = torch.rand(2, *SHAPE)
    out = ens.forward_all(x)
    resized = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    assert torch.allclose(out.logits[1], ens.members[1](resized), atol=1e-5)


def test_teacher_interface_for_synthesizers_and_hooks():
    ens = TeacherEnsemble([member("a", [0, 1, 2], mean=(0.2,), std=(0.4,)), member("b", [3, 4], seed=1)])
    assert not hasattr(ens, "net") and ens.block_paths == ()
    assert torch.allclose(ens.mean.flatten(), torch.tensor([0.2])) and torch.allclose(ens.std.flatten(), torch.tensor([0.4]))
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ens.modules())
    assert n_bn == 8  # four per lenet5_bn member
    ens.train()
    assert all(not m.training for t in ens.members for m in t.modules()) and not ens.combiner.training
    assert all(not p.requires_grad for p in ens.parameters())
    x = torch.rand(4, *SHAPE, requires_grad=True)
    tap = penultimate_tap(ens)
    dafl_tap = fc_input_tap(ens)  # DAFL's f_T on an ensemble: every member's features
    assert dafl_tap.paths == tap.paths
    dafl_tap.close()
    merged = ens(x)
    assert tap[tap.paths[0]].shape == (4, 84 + 84)
    merged.sum().backward()  # gradients reach the input through frozen members
    assert x.grad is not None and x.grad.abs().sum() > 0
    tap.close()
    hook = BNStatisticsHook(ens)
    ens(torch.rand(4, *SHAPE))
    assert len(hook.layer_losses) == 8
    # target-aware BN matching: member b's layers see only the images targeted at 3-4
    targets = torch.tensor([0, 4, 2, 3])
    masks = member_sample_masks(ens, targets)
    assert len(masks) == 8
    for module in ens.members[0].modules():  # a: classes 0-2
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert masks[id(module)].tolist() == [True, False, True, False]
    for module in ens.members[1].modules():  # b: classes 3-4
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert masks[id(module)].tolist() == [False, True, False, True]
    assert member_sample_masks(ens.members[0], targets) is None
    hook.close()
    meta = ens.meta()
    assert meta["classes"] == [0, 1, 2, 3, 4] and meta["image_shape"] == [1, 32, 32]
    assert meta["mean"] == pytest.approx([0.2]) and [m["name"] for m in meta["members"]] == ["a", "b"]


def test_stock_torchvision_members():
    import torchvision

    members = []
    for i, classes in enumerate(([0, 1, 2], [2, 3])):
        torch.manual_seed(i)
        net = torchvision.models.resnet18(weights=None, num_classes=len(classes))
        model = NormalizedModel(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        members.append((f"rn{i}", model, {"dataset": "cifar10", "classes": classes, "image_shape": [3, 32, 32]}))
    ens = TeacherEnsemble(members, combine="entropy_weighted")
    assert ens.member_heads == ["fc", "fc"]  # the last nn.Linear of a stock model
    tap = penultimate_tap(ens)
    out = ens.forward_all(torch.rand(2, 3, 32, 32))
    assert tap[tap.paths[0]].shape == (2, 1024)
    assert torch.allclose(tap[tap.paths[0]], torch.cat([out.features["rn0"], out.features["rn1"]], 1))
    assert out.merged.shape == (2, 4)
    assert torch.allclose(out.merged.exp().sum(1), torch.ones(2), atol=1e-5)
    tap.close()
    hook = BNStatisticsHook(ens)
    assert len(hook) == 2 * 20  # resnet18 has 20 BatchNorm layers
    hook.close()


def test_from_zoo_and_checkpoint_paths(tmp_path):
    for name, model, meta in (member("a", [0, 1, 2]), member("b", [3, 4], seed=1)):
        save_checkpoint(tmp_path / f"{name}.pt", model, meta)
    build_manifest(tmp_path, tmp_path / "zoo.yaml")
    ens = TeacherEnsemble.from_zoo(tmp_path / "zoo.yaml", combine="concat")
    assert ens.names == ["a", "b"] and ens.classes == [0, 1, 2, 3, 4]
    again = TeacherEnsemble([tmp_path / "a.pt", tmp_path / "b.pt"], combine="concat")
    x = torch.rand(2, *SHAPE)
    assert torch.allclose(ens(x), again(x))


# ----------------------------------------------------------------------------- synthesizers
SYNTH_OPTIONS = {
    "dafl": {"batch_size": 16, "ngf": 8},
    "deepinversion": {"batch_size": 8, "synthesis_batch_size": 10, "iterations": 2, "pool_size": 20},
    "zskt": {"batch_size": 8, "ngf": 8},
    "dfad": {"batch_size": 8, "ngf": 8},
    "fast": {"batch_size": 8, "ngf": 8, "nz": 16, "synthesis_batch_size": 10, "warmup_rounds": 1},
    "real": {"batch_size": 8},
}


@pytest.mark.parametrize("method", sorted(SYNTH_OPTIONS))
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "amalgamation"])
def test_an_ensemble_drives_each_synthesizer(method, wrapped):
    import generators.real  # noqa: F401
    from dfkd.multi.synthesizer import AmalgamationSynthesizer
    from generators import create_synthesizer

    ens = TeacherEnsemble([member("a", [0, 1, 2, 3, 4]), member("b", [5, 6, 7, 8, 9], seed=1)], combine="concat")
    torch.manual_seed(2)
    student = build_model("lenet5_half", 10, 1, 32, (0.3,), (0.35,))
    extra = {"images": torch.rand(30, *SHAPE)} if method == "real" else {}
    synth = create_synthesizer(method, ens, image_shape=SHAPE, num_classes=10, device="cpu", seed=0,
                               **SYNTH_OPTIONS[method], **extra)
    if wrapped:
        synth = AmalgamationSynthesizer(synth, ens, combine="uhc", features="hint", layers="relu3:a.relu3,relu3:b.relu3")
    synth.attach_student(student)
    terms = synth.synthesize(student)
    assert all(torch.isfinite(v).all() for v in terms.values())
    batch = synth.sample()
    n = SYNTH_OPTIONS[method]["batch_size"]
    assert batch.images.shape == (n, *SHAPE) and 0 <= batch.images.min() and batch.images.max() <= 1
    losses, s_logits, t_logits = synth.student_losses(student, batch)
    assert s_logits.shape == (n, 10) and t_logits.shape == (n, 10)
    if wrapped:
        assert set(losses) == {"uhc", "hint"} and synth.name == method
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert student.net.conv1.weight.grad is not None and student.net.conv1.weight.grad.abs().sum() > 0


def test_auto_combine_is_chosen_from_the_class_sets():
    disjoint = TeacherEnsemble([member("a", [0, 1, 2]), member("b", [3, 4], seed=1)], combine="auto")
    assert disjoint.combiner.name == "calibrated_concat" and "disjoint" in disjoint.combine_reason
    linked = TeacherEnsemble([member("a", [0, 1, 2]), member("b", [2, 3], seed=1), member("c", [3, 4], seed=2)],
                             combine="auto")
    assert linked.combiner.name == "uhc" and linked.meta()["combine"] == "uhc"
    apart = TeacherEnsemble([member("a", [0, 1]), member("b", [1, 2], seed=1), member("c", [5, 6], seed=2)],
                            combine="auto")
    assert apart.combiner.name == "calibrated_concat" and "a, b | c" in apart.combine_reason
    one = TeacherEnsemble([member("a", [0, 1, 2])], combine="auto")
    assert one.combiner.name == "mean_logits"
    x = torch.rand(2, *SHAPE)
    assert torch.equal(one(x), one.members[0](x))  # one member: its own logits


def test_clashing_class_names_are_a_one_line_error():
    a = member("a", [0, 1, 2])
    b = member("b", [2, 3], seed=1)
    b[2]["class_names"] = ["Coat", "c3"]  # a calls class 2 "c2"
    with pytest.raises(EnsembleError, match=r"class names clash: class 2 is 'c2' for member 'a' but 'Coat' for member 'b'") as err:
        TeacherEnsemble([a, b])
    assert "\n" not in str(err.value)
    b[2]["class_names"] = ["c2", "c1"]  # "c1" is class 1 for a
    with pytest.raises(EnsembleError, match=r"'c1' is class 1 for member 'a' but class 3 for member 'b'"):
        TeacherEnsemble([a, b])
    # a class_map says which classes are the same: no clash
    ens = TeacherEnsemble([a, b], class_map={"b": [2, 3]})
    assert ens.classes == [0, 1, 2, 3]
    # members without class names are not compared
    del b[2]["class_names"]
    assert TeacherEnsemble([a, b]).class_names[:3] == ["c0", "c1", "c2"]


def test_different_image_shapes_are_a_one_line_error():
    with pytest.raises(EnsembleError) as err:
        TeacherEnsemble([member("a", [0, 1]), member("b", [2, 3], shape=(1, 28, 28), seed=1)])
    assert "\n" not in str(err.value) and "allow_mixed" in str(err.value)
