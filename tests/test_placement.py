"""Ensemble members on devices of their own (dfkd.multi.placement)."""
import pytest
import torch

from dfkd.core.bn import BNStatisticsHook
from dfkd.multi.ensemble import TeacherEnsemble
from dfkd.multi.per_member import MemberTeacher
from dfkd.multi.placement import PlacementError, parse_member_devices


def _member(seed: int, classes):
    from teachers import build_model, freeze

    torch.manual_seed(seed)
    model = build_model("lenet5_bn", len(classes), 1, 32, (0.3,), (0.35,))
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 1, 32, 32))
    meta = {"classes": list(classes), "image_shape": [1, 32, 32], "mean": [0.3], "std": [0.35], "dataset": "digits"}
    return freeze(model), meta


def _ensemble():
    return TeacherEnsemble([("low", *_member(0, range(5))), ("high", *_member(1, range(5, 10)))],
                           combine="calibrated_concat")


def test_member_devices_are_parsed_and_checked():
    assert parse_member_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert parse_member_devices(["cpu"]) == [torch.device("cpu")]
    for bad, message in (("", "give one or more devices"), ("auto", "name each device"),
                         ("gpu7", "--member-devices gpu7: not a device name")):
        with pytest.raises(PlacementError, match=message):
            parse_member_devices(bad)
    if torch.cuda.device_count() < 8:
        with pytest.raises(PlacementError, match="--member-devices cuda:7"):
            parse_member_devices("cuda:7")


def test_placed_members_give_the_same_outputs_and_stay_placed():
    ensemble = _ensemble()
    x = torch.rand(8, 1, 32, 32)
    before = ensemble.forward_all(x)
    ensemble.place_members(["cpu", "cpu"])
    ensemble.place_members(["cpu"])  # placing again replaces the bridges instead of stacking them
    assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in ensemble.members)
    ensemble.to("cpu")
    assert ensemble.placed_devices() == [torch.device("cpu")] * 2
    after = ensemble.forward_all(x)
    assert torch.equal(before.merged, after.merged)
    assert all(torch.equal(before.features[n], after.features[n]) for n in ensemble.names)
    assert MemberTeacher(ensemble, 1, other=False).home == torch.device("cpu")  # per-member synthesis keeps it
    ensemble.place_members(None)
    assert all(not m._forward_pre_hooks for m in ensemble.members)
    assert MemberTeacher(ensemble, 1, other=False).home is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_members_on_cuda_serve_a_cpu_run():
    """Members on cuda:0, everything else on the CPU: outputs come back to the CPU, the BN-statistics
    loss is gathered there and the input's gradient flows back through the bridge."""
    ensemble = _ensemble()
    x = torch.rand(8, 1, 32, 32)
    expected = ensemble.forward_all(x).merged
    hook = BNStatisticsHook(ensemble)
    ensemble.place_members(["cuda:0", "cpu"])
    assert ensemble.placed_devices() == [torch.device("cuda", 0), torch.device("cpu")]
    images = x.clone().requires_grad_(True)
    out = ensemble.forward_all(images)
    assert out.merged.device.type == "cpu" and all(f.device.type == "cpu" for f in out.features.values())
    torch.testing.assert_close(out.merged, expected, atol=1e-4, rtol=1e-4)
    loss = hook.loss(torch.device("cpu"))
    assert loss.device.type == "cpu"
    (loss + out.merged.sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    hook.close()
    MemberTeacher(ensemble, 0, other=False).to("cpu")  # a per-member synthesizer's teacher moved to the run's device
    assert ensemble.placed_devices()[0] == torch.device("cuda", 0)


def test_amalgamate_refuses_a_member_device_the_machine_lacks(tmp_path, capsys):
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    from dfkd.cli import main
    from teachers import build_manifest, save_checkpoint

    for name, seed, classes in (("low", 0, range(5)), ("high", 1, range(5, 10))):
        model, meta = _member(seed, classes)
        save_checkpoint(tmp_path / f"{name}.pt", model,
                        {**meta, "class_names": [str(c) for c in classes], "test_accuracy": None, "seed": seed})
    build_manifest(tmp_path, tmp_path / "zoo.yaml")
    out = tmp_path / "run"
    code = main(["amalgamate", "--zoo", str(tmp_path / "zoo.yaml"), "--method", "dafl", "--steps", "2",
                 "--member-devices", "cpu,cuda:7", "--no-eval", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--member-devices cuda:7" in err[0]
    assert not out.exists()
