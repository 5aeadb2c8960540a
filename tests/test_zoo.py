"""Zoo manifests: build, verify, describe, load; tampered and missing files are caught."""
import shutil

import pytest
import torch
import yaml

from teachers import (
    ZooError,
    build_manifest,
    build_model,
    describe_manifest,
    format_table,
    load_manifest,
    load_zoo,
    save_checkpoint,
    sha256_file,
    verify_manifest,
)


def _save(path, arch, classes, acc):
    torch.manual_seed(len(classes))
    model = build_model(arch, len(classes), 1, 32, mean=[0.5], std=[0.25])
    meta = {
        "dataset": "digits",
        "classes": classes,
        "class_names": [str(c) for c in classes],
        "mean": [0.5],
        "std": [0.25],
        "image_shape": [1, 32, 32],
        "test_accuracy": acc,
        "seed": 0,
    }
    save_checkpoint(path, model, meta)
    return model


@pytest.fixture
def zoo(tmp_path):
    d = tmp_path / "zoo"
    models = {
        "b_half": _save(d / "b_half.pt", "lenet5_half", [5, 6, 7, 8, 9], None),
        "a_lenet": _save(d / "a_lenet.pt", "lenet5", [0, 1, 2, 3, 4], 0.9),
    }
    return d, models


def test_build_verify_describe_load(zoo):
    d, models = zoo
    manifest = build_manifest(d, d / "zoo.yaml")
    assert manifest["format"] == "dfkd-zoo/1"
    assert [t["name"] for t in manifest["teachers"]] == ["a_lenet", "b_half"]
    on_disk = yaml.safe_load((d / "zoo.yaml").read_text())
    assert on_disk == manifest
    assert on_disk["teachers"][0]["path"] == "a_lenet.pt"
    assert on_disk["teachers"][0]["sha256"] == sha256_file(d / "a_lenet.pt")

    entries = load_manifest(d / "zoo.yaml")
    assert entries[0].path == (d / "a_lenet.pt").resolve() and entries[0].path.is_absolute()

    verified = verify_manifest(d / "zoo.yaml")
    assert [(e.name, m["classes"]) for e, m in verified] == [("a_lenet", [0, 1, 2, 3, 4]), ("b_half", [5, 6, 7, 8, 9])]

    rows = describe_manifest(d / "zoo.yaml")
    assert rows[0] == {"name": "a_lenet", "arch": "lenet5", "dataset": "digits", "classes": [0, 1, 2, 3, 4],
                       "params": sum(p.numel() for p in models["a_lenet"].parameters()), "accuracy": 0.9}
    assert rows[1]["accuracy"] is None
    table = format_table(rows)
    assert "a_lenet" in table and "lenet5_half" in table and "90.00%" in table and "0-4" in table
    assert len(table.splitlines()) == 4

    loaded = load_zoo(d / "zoo.yaml")
    x = torch.rand(2, 1, 32, 32)
    for name, model, meta in loaded:
        assert not model.training
        torch.testing.assert_close(model(x), models[name].eval()(x))


def test_manifest_relative_paths_survive_a_move(zoo, tmp_path):
    d, _ = zoo
    build_manifest(d, d / "zoo.yaml", names={"a_lenet": "first"})
    moved = shutil.copytree(d, tmp_path / "moved")
    shutil.rmtree(d)
    assert [e.name for e, _ in verify_manifest(moved / "zoo.yaml")] == ["first", "b_half"]


def test_tampered_file_names_entry_and_hashes(zoo):
    d, _ = zoo
    build_manifest(d, d / "zoo.yaml")
    expected = sha256_file(d / "b_half.pt")
    data = bytearray((d / "b_half.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "b_half.pt").write_bytes(bytes(data))
    with pytest.raises(ZooError, match="b_half") as err:
        verify_manifest(d / "zoo.yaml")
    assert expected in str(err.value) and sha256_file(d / "b_half.pt") in str(err.value)
    with pytest.raises(ZooError, match="b_half"):
        load_zoo(d / "zoo.yaml")


def test_missing_file(zoo):
    d, _ = zoo
    build_manifest(d, d / "zoo.yaml")
    (d / "a_lenet.pt").unlink()
    with pytest.raises(ZooError, match="a_lenet.*not found"):
        verify_manifest(d / "zoo.yaml")


def test_bad_manifests(tmp_path, zoo):
    d, _ = zoo
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: dfkd-zoo/1\nteachers: [\n")
    with pytest.raises(ZooError, match="YAML"):
        load_manifest(bad)
    bad.write_text("format: other/2\nteachers: []\n")
    with pytest.raises(ZooError, match="unknown zoo format"):
        load_manifest(bad)
    bad.write_text("format: dfkd-zoo/1\nteachers:\n  - name: x\n    path: a.pt\n")
    with pytest.raises(ZooError, match="sha256"):
        load_manifest(bad)
    with pytest.raises(ZooError, match="not found"):
        load_manifest(tmp_path / "none.yaml")
    (d / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ZooError, match="junk"):
        build_manifest(d, d / "zoo.yaml")
    assert not (d / "zoo.yaml").exists()
