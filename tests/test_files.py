"""teachers.files: atomic writes that fail cleanly, bounded YAML loading; readers that refuse
checkpoints and zoo manifests they cannot trust."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from teachers import (
    CheckpointError,
    ZooError,
    build_manifest,
    build_model,
    load_checkpoint,
    load_manifest,
    read_checkpoint,
    save_checkpoint,
    verify_manifest,
)
from teachers.files import (
    MAX_ALIAS_NODES,
    FileWriteError,
    YAMLBombError,
    YAMLFileError,
    atomic_write,
    load_yaml,
    remove_stale_temp_files,
    sha256_file,
    torch_save,
    write_bytes,
    write_json,
    write_text,
    write_yaml,
)

REPO = Path(__file__).resolve().parents[1]


def _old(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old complete file")
    return target


def _assert_untouched(target):
    assert target.read_bytes() == b"old complete file"
    assert sorted(os.listdir(target.parent)) == [target.name], "a temporary file was left behind"


# --------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, exc):
    target = _old(tmp_path)

    def write(f):
        f.write(b"half of the new")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    _assert_untouched(target)


def test_enospc_gives_one_line_file_write_error(tmp_path):
    target = _old(tmp_path)

    def write(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FileWriteError) as err:
        atomic_write(target, write)
    msg = str(err.value)
    assert "\n" not in msg and "no space" in msg and str(target) in msg and "nothing was changed" in msg
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    _assert_untouched(target)


@pytest.mark.parametrize("code, phrase", [
    (errno.EDQUOT, "quota"),
    (errno.EROFS, "read-only or not writable"),
    (errno.EACCES, "read-only or not writable"),
    (errno.EPERM, "read-only or not writable"),
    (errno.EIO, "input/output error"),
])
def test_os_errors_name_cause_and_fix(tmp_path, code, phrase):
    target = _old(tmp_path)

    def write(f):
        raise OSError(code, os.strerror(code))

    with pytest.raises(FileWriteError, match=phrase) as err:
        atomic_write(target, write)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"cannot write {target}: ")
    _assert_untouched(target)


def test_error_wrapped_by_the_writer_is_still_reported(tmp_path):
    """torch.save turns a full disk into RuntimeError('... unexpected pos ...') raised from the OSError."""
    target = _old(tmp_path)

    def write(f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 704 vs 598")

    with pytest.raises(FileWriteError, match="no space"):
        atomic_write(target, write)
    _assert_untouched(target)


def test_path_component_is_a_file_or_target_is_a_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile" / "state.pt", tmp_path / "afile" / "sub" / "state.pt"):
        with pytest.raises(FileWriteError, match="a path component is a file"):
            write_bytes(bad, b"data")
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileWriteError, match="is a directory"):
        write_bytes(tmp_path / "adir", b"data")
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and not os.listdir(tmp_path / "adir")


def test_make_dirs_and_write_error_are_one_line(tmp_path):
    from teachers.files import make_dirs, write_error

    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "run", tmp_path / "afile" / "a" / "b"):
        with pytest.raises(FileWriteError, match=f"cannot write {bad}: a path component is a file") as err:
            make_dirs(bad)
        assert "\n" not in str(err.value) and err.value.path == str(bad)
    assert make_dirs(tmp_path / "x" / "y").is_dir()
    err = write_error(tmp_path / "s.pt", PermissionError(errno.EROFS, "Read-only file system"))
    assert isinstance(err, FileWriteError) and "read-only" in str(err) and err.errno == errno.EROFS
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos")
    except RuntimeError as wrapped:
        assert "no space left" in str(write_error(tmp_path / "s.pt", wrapped))
    assert write_error(tmp_path / "s.pt", ValueError("not a disk problem")) is None
    assert write_error(tmp_path / "s.pt", err) is err


def test_killed_writer_leaves_old_file_and_a_temp_that_is_cleaned(tmp_path):
    target = _old(tmp_path)
    code = ("import os, signal, sys; from teachers.files import atomic_write\n"
            "def write(f):\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(sys.argv[1], write)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO, env=_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old complete file"
    temps = [n for n in os.listdir(tmp_path) if n != "state.pt"]
    assert len(temps) == 1 and temps[0].startswith(".state.pt.") and temps[0].endswith(".tmp")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / temps[0]]
    _assert_untouched(target)


def test_remove_stale_temp_files_only_takes_temp_files(tmp_path):
    for name in (".state.pt.ab_12cd3.tmp", ".summary.json.tmp", "keep.tmp", ".hidden", "student.pt"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".adir.tmp").mkdir()
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".state.pt.ab_12cd3.tmp", ".summary.json.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".adir.tmp", ".hidden", "keep.tmp", "student.pt"]
    assert remove_stale_temp_files(tmp_path / "absent") == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount permission; skipped otherwise); always unmounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk_fails_cleanly(small_tmpfs):
    target = _old(small_tmpfs)
    with pytest.raises(FileWriteError, match="no space left on device") as err:
        write_bytes(target, os.urandom(300_000))
    assert "\n" not in str(err.value)
    _assert_untouched(target)
    with pytest.raises(FileWriteError, match="no space left on device"):  # torch wraps the OSError
        torch_save(target, {"w": torch.zeros(100_000)})
    _assert_untouched(target)
    write_bytes(target, b"small")  # space was given back
    assert target.read_bytes() == b"small" and os.listdir(small_tmpfs) == ["state.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_mode_from_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "pre.json").write_text("{}")
        os.chmod(tmp_path / "pre.json", 0o600)  # an existing file: replaced, and given the usual mode
        paths = [
            write_bytes(tmp_path / "a.bin", b"x"),
            write_text(tmp_path / "b.txt", "x"),
            write_json(tmp_path / "pre.json", {"a": 1}),
            write_yaml(tmp_path / "zoo.yaml", {"a": 1}),
            torch_save(tmp_path / "state.pt", {"a": torch.zeros(1)}),
            save_checkpoint(tmp_path / "t.pt", _model(), _meta()),
        ]
    finally:
        os.umask(old)
    for path in paths:
        assert (path.stat().st_mode & 0o777) == 0o666 & ~umask, path


def test_write_json_refuses_nan_and_inf(tmp_path):
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"loss\.curve\[1\] is NaN or infinite") as err:
            write_json(tmp_path / "summary.json", {"loss": {"curve": [0.5, bad]}})
        assert "\n" not in str(err.value)
    assert not os.listdir(tmp_path)


def test_helpers_round_trip(tmp_path):
    data = {"z": 1, "a": [1.5, None, "x"], "m": {"b": True}}
    write_json(tmp_path / "s.json", data)
    assert json.loads((tmp_path / "s.json").read_text()) == data
    write_yaml(tmp_path / "c.yaml", data)
    assert list(yaml.safe_load((tmp_path / "c.yaml").read_text())) == ["z", "a", "m"]  # order kept
    assert load_yaml(tmp_path / "c.yaml") == data
    write_text(tmp_path / "r.md", "é\n")
    assert (tmp_path / "r.md").read_bytes() == "é\n".encode("utf-8")
    torch_save(tmp_path / "x.pt", {"t": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["t"], torch.arange(3))
    import hashlib

    assert sha256_file(tmp_path / "x.pt") == hashlib.sha256((tmp_path / "x.pt").read_bytes()).hexdigest()
    import teachers.checkpoint as ckpt

    assert ckpt.atomic_write is atomic_write and ckpt.sha256_file is sha256_file  # old import paths work
    with pytest.raises(ValueError, match="mode"):
        atomic_write(tmp_path / "y", lambda f: None, mode="a")


# --------------------------------------------------------------------------- YAML
def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    text = _bomb()
    assert len(text) < 500 and text.count("*") == 72
    (tmp_path / "bomb.yaml").write_text(text)
    started = time.perf_counter()
    with pytest.raises(YAMLBombError) as err:
        load_yaml(tmp_path / "bomb.yaml")
    assert time.perf_counter() - started < 1.0
    msg = str(err.value)
    assert "\n" not in msg and "bomb.yaml" in msg and f"{MAX_ALIAS_NODES:,}" in msg
    assert isinstance(err.value, ValueError)

    (tmp_path / "self.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(YAMLBombError, match="infinite"):
        load_yaml(tmp_path / "self.yaml")


def test_zoo_manifest_bomb_is_refused(tmp_path):
    (tmp_path / "zoo.yaml").write_text("format: dfkd-zoo/1\n" + _bomb())
    with pytest.raises(ZooError, match="zoo manifest .*refused") as err:
        load_manifest(tmp_path / "zoo.yaml")
    assert isinstance(err.value.__cause__, YAMLBombError)


def test_yaml_with_a_few_aliases_and_every_config_load_unchanged(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "base: &opts {lr: 0.1, steps: [1, 2, 3]}\nfast:\n  <<: *opts\n  lr: 0.2\nslow: *opts\nlist: [*opts, *opts]\n"
    )
    cfg = load_yaml(tmp_path / "c.yaml")
    assert cfg["fast"] == {"lr": 0.2, "steps": [1, 2, 3]} and cfg["slow"] == cfg["base"] == cfg["list"][1]
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        assert load_yaml(path) == (yaml.safe_load(path.read_text()) or {}), path


def test_yaml_file_errors(tmp_path):
    with pytest.raises(YAMLFileError, match=r"^config file .*none\.yaml does not exist$"):
        load_yaml(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(YAMLFileError, match=r"bad\.yaml is not valid YAML: .*line 2") as err:
        load_yaml(tmp_path / "bad.yaml", what="zoo manifest")
    assert str(err.value).startswith("zoo manifest ") and "\n" not in str(err.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(YAMLFileError, match="must hold a mapping of key: value, not list"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


# --------------------------------------------------------------------------- readers refuse what they cannot trust
def _meta(classes=(0, 1, 2, 3, 4)):
    return {"dataset": "digits", "classes": list(classes), "class_names": [str(c) for c in classes],
            "mean": [0.5], "std": [0.25], "image_shape": [1, 32, 32], "test_accuracy": 0.5, "seed": 0}


def _model(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return build_model("lenet5", num_classes, 1, 32, mean=[0.5], std=[0.25])


def _resave(path, edit):
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path, value):
    path = save_checkpoint(tmp_path / "t.pt", _model(), _meta())
    _resave(path, lambda raw: raw["state_dict"]["net.fc2.weight"].__setitem__((0, 0), value))
    for load in (load_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError, match="'net.fc2.weight' holds NaN/inf") as err:
            load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_whose_classes_do_not_match_outputs_is_refused_on_load(tmp_path):
    path = save_checkpoint(tmp_path / "t.pt", _model(5), _meta())
    load_checkpoint(path)

    def three_classes(raw):
        raw["meta"]["classes"], raw["meta"]["class_names"] = [0, 1, 2], ["0", "1", "2"]

    _resave(path, three_classes)
    with pytest.raises(CheckpointError, match="5 outputs but meta lists 3 classes") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_zoo_refuses_the_same_file_under_two_names(tmp_path):
    d = tmp_path / "zoo"
    save_checkpoint(d / "a.pt", _model(), _meta())
    save_checkpoint(d / "b.pt", _model(seed=1), _meta())
    digest = sha256_file(d / "a.pt")
    (d / "zoo.yaml").write_text(yaml.safe_dump({"format": "dfkd-zoo/1", "teachers": [
        {"name": "first", "path": "a.pt", "sha256": digest},
        {"name": "b", "path": "b.pt", "sha256": sha256_file(d / "b.pt")},
        {"name": "again", "path": "./a.pt", "sha256": digest},
    ]}))
    for check in (load_manifest, verify_manifest):
        with pytest.raises(ZooError, match="'first' and 'again' are the same file.*would count twice"):
            check(d / "zoo.yaml")
    shutil.copy(d / "a.pt", d / "c.pt")  # an identical copy in the folder
    with pytest.raises(ZooError, match="a.pt and c.pt are the same checkpoint.*would count twice"):
        build_manifest(d, d / "built.yaml")
    assert not (d / "built.yaml").exists()


def test_zoo_mismatch_outside_its_folder_does_not_tell_the_hash(tmp_path):
    d, elsewhere = tmp_path / "zoo", tmp_path / "elsewhere"
    save_checkpoint(d / "a.pt", _model(), _meta())
    secret = elsewhere / "secret.pt"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours to hash")
    claimed = "0" * 64
    for path in ("../elsewhere/secret.pt", str(secret)):
        (d / "zoo.yaml").write_text(yaml.safe_dump({"format": "dfkd-zoo/1", "teachers": [
            {"name": "a", "path": "a.pt", "sha256": sha256_file(d / "a.pt")},
            {"name": "peek", "path": path, "sha256": claimed},
        ]}))
        with pytest.raises(ZooError, match="'peek'.*outside the manifest's folder") as err:
            verify_manifest(d / "zoo.yaml")
        assert sha256_file(secret) not in str(err.value) and "\n" not in str(err.value)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env
