"""dfkd checkpoints: round trip, atomic writes, refusal of unsafe or broken files."""
import os
import pickle

import pytest
import torch

from teachers import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    UnknownModelError,
    build_model,
    import_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    sha256_file,
)


def _meta(**extra):
    meta = {
        "dataset": "digits",
        "classes": [0, 1, 2, 3],
        "class_names": ["zero", "one", "two", "three"],
        "mean": [0.25],
        "std": [0.5],
        "image_shape": [1, 32, 32],
        "test_accuracy": 0.75,
        "seed": 3,
    }
    meta.update(extra)
    return meta


def _model(arch="lenet5_bn", num_classes=4):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, 1, 32, mean=[0.25], std=[0.5])
    model.train()
    model(torch.rand(8, 1, 32, 32))  # move the BatchNorm running statistics away from init
    return model.eval()


def test_round_trip_same_outputs(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "sub" / "t.pt", model, _meta(config={"epochs": 2, "lr": 1e-3}))
    assert path.exists()
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.arch == "lenet5_bn" and loaded.arch_kwargs["num_classes"] == 4
    x = torch.rand(5, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(loaded.mean, model.mean)
    assert meta["classes"] == [0, 1, 2, 3] and meta["config"] == {"epochs": 2, "lr": 1e-3}
    assert meta["test_accuracy"] == 0.75 and "created" in meta

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert raw["format"] == CHECKPOINT_FORMAT
    assert set(raw) == {"format", "arch", "arch_kwargs", "state_dict", "meta"}
    assert "mean" in raw["state_dict"] and "net.fc2.weight" in raw["state_dict"]
    assert read_checkpoint(path)["arch"] == "lenet5_bn"


def test_atomic_save_leaves_no_temp_files(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "t.pt", model, _meta())
    save_checkpoint(tmp_path / "t.pt", model, _meta(seed=4))  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["t.pt"]
    assert read_checkpoint(tmp_path / "t.pt")["meta"]["seed"] == 4


def test_failed_save_keeps_old_file_and_no_temp(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "t.pt", model, _meta())
    before = sha256_file(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="not a plain value"):
        save_checkpoint(tmp_path / "t.pt", model, _meta(config={"obj": object()}))
    assert sorted(os.listdir(tmp_path)) == ["t.pt"] and sha256_file(tmp_path / "t.pt") == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path, value):
    model = _model()
    save_checkpoint(tmp_path / "t.pt", model, _meta())
    before = sha256_file(tmp_path / "t.pt")
    with torch.no_grad():
        model.net.conv1.weight[0, 0, 0, 0] = value
    with pytest.raises(CheckpointError, match=r"refusing to save .*t\.pt: tensor 'net\.conv1\.weight' holds NaN/inf") as err:
        save_checkpoint(tmp_path / "t.pt", model, _meta())
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["t.pt"] and sha256_file(tmp_path / "t.pt") == before
    with pytest.raises(CheckpointError, match="NaN/inf"):
        save_checkpoint(tmp_path / "new.pt", model, _meta())
    assert not (tmp_path / "new.pt").exists()


def test_missing_meta_keys(tmp_path):
    meta = _meta()
    del meta["classes"], meta["seed"]
    with pytest.raises(CheckpointError, match="classes.*seed"):
        save_checkpoint(tmp_path / "t.pt", _model(), meta)
    with pytest.raises(CheckpointError, match="test_accuracy"):
        save_checkpoint(tmp_path / "t.pt", _model(), _meta(test_accuracy=75.0))
    with pytest.raises(CheckpointError, match="4 outputs"):
        save_checkpoint(tmp_path / "t.pt", _model(), _meta(classes=[0, 1], class_names=["a", "b"]))
    with pytest.raises(CheckpointError, match="meta mean .* differs"):
        save_checkpoint(tmp_path / "t.pt", _model(), _meta(mean=[0.3]))
    assert not (tmp_path / "t.pt").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"format": CHECKPOINT_FORMAT, "arch": "lenet5", "evil": _Payload(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="refused: not a plain tensor checkpoint; dfkd never unpickles code"):
            load(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", _model(), _meta())
    data = path.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        load_checkpoint(tmp_path / "half.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        read_checkpoint(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch file"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_mismatched_state_dict_names_keys_and_shapes(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", _model(), _meta())
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["net.fc2.weight"] = torch.zeros(5, 84)
    del raw["state_dict"]["net.conv1.bias"]
    raw["state_dict"]["net.extra.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "net.fc2.weight: checkpoint (5,84) vs model (4,84)" in msg
    assert "missing keys" in msg and "net.conv1.bias" in msg
    assert "unexpected keys" in msg and "net.extra.weight" in msg


def test_unknown_or_missing_format(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", _model(), _meta())
    raw = torch.load(path, weights_only=True)
    raw["format"] = "someone-else/7"
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'someone-else/7'.*dfkd-checkpoint/1"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain state dict.*dfkd import"):
        load_checkpoint(tmp_path / "plain.pt")


def test_unknown_arch(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", _model(), _meta())
    raw = torch.load(path, weights_only=True)
    raw["arch"] = "lenet99"
    torch.save(raw, tmp_path / "arch.pt")
    with pytest.raises(CheckpointError, match="unknown model 'lenet99'.*lenet5_bn.*tv:") as err:
        load_checkpoint(tmp_path / "arch.pt")
    assert isinstance(err.value.__cause__, UnknownModelError)


def test_import_state_dict_with_module_prefix(tmp_path):
    source = _model("lenet5")
    plain = {f"module.{k}": v for k, v in source.net.state_dict().items()}  # DataParallel-style keys
    torch.save(plain, tmp_path / "foreign.pth")
    dst = import_state_dict(tmp_path / "foreign.pth", tmp_path / "imported.pt", "lenet5", {}, _meta())
    model, meta = load_checkpoint(dst)
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(model(x), source(x))
    assert model.arch_kwargs == {"num_classes": 4, "in_channels": 1, "image_size": 32}

    torch.save({f"net.{k}": v for k, v in source.net.state_dict().items()}, tmp_path / "net.pth")
    import_state_dict(tmp_path / "net.pth", tmp_path / "imported2.pt", "lenet5", {"num_classes": 4}, _meta())

    with pytest.raises(CheckpointError, match="fc2.weight: checkpoint \\(4,84\\) vs model \\(4,42\\)"):
        import_state_dict(tmp_path / "foreign.pth", tmp_path / "x.pt", "lenet5_half", {}, _meta())
    assert not (tmp_path / "x.pt").exists()
