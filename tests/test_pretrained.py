"""Pretrained torchvision (and timm) teachers read from the local caches, offline."""
import pytest
import torch
import torchvision

from teachers import load_teacher
from teachers.pretrained import PretrainedError, is_pretrained_spec, load_pretrained


@pytest.fixture
def hub(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(before)


def test_specs_are_told_apart_from_files():
    assert is_pretrained_spec("tv:resnet18:IMAGENET1K_V1") and is_pretrained_spec("timm:resnet18.a1_in1k")
    assert not is_pretrained_spec("tv:resnet18") and not is_pretrained_spec("runs/t.pt")


def test_torchvision_weights_load_from_the_hub_cache_with_their_metadata(hub):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / "resnet18-f37072fd.pth")
    model, meta = load_teacher("tv:resnet18:IMAGENET1K_V1")
    assert torch.equal(model.net.fc.weight, reference.fc.weight)
    assert meta["image_shape"] == [3, 224, 224] and len(meta["classes"]) == 1000
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["class_names"][0] == "tench"
    assert model.head_path == "fc" and model.block_paths == ("layer1", "layer2", "layer3", "layer4")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference.eval()((x - model.mean) / model.std)
        assert torch.allclose(model.eval()(x), expected, atol=1e-5)


def test_offline_errors_name_the_file_expected(hub):
    with pytest.raises(PretrainedError, match=r"expected .*resnet18-f37072fd\.pth"):
        load_pretrained("tv:resnet18:IMAGENET1K_V1")
    with pytest.raises(PretrainedError, match="IMAGENET1K_V1"):
        load_pretrained("tv:resnet18:IMAGENET9K")
    with pytest.raises(PretrainedError, match="no model"):
        load_pretrained("tv:resnet1800:DEFAULT")
    hub.mkdir(parents=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"not weights")
    with pytest.raises(PretrainedError, match="not a readable weights file"):
        load_pretrained("tv:resnet18:DEFAULT")


def test_timm_is_optional():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(PretrainedError, match="pip install timm"):
            load_pretrained("timm:resnet18.a1_in1k")
    else:
        with pytest.raises(PretrainedError, match="no pretrained model of that name"):
            load_pretrained("timm:no_such_model_at_all")


def test_distill_names_the_missing_pretrained_file(hub, tmp_path):
    import dfkd

    with pytest.raises(PretrainedError, match=r"resnet18-f37072fd\.pth"):
        dfkd.distill(teacher="tv:resnet18:IMAGENET1K_V1", out=str(tmp_path / "run"), no_eval=True)
    assert not (tmp_path / "run").exists()
