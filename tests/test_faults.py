"""Fault injection: what a run directory and the command line guarantee when things go wrong.

Hostile and corrupt files, bad configs and flags (every numeric flag at 0), two processes on
one run directory, kill -9 at chosen points (training, checkpoint writing, the student, the
report), Ctrl-C, a full or read-only disk and non-finite losses. Each error is one line on
stderr with its exit status; each kill resumes to the student an uninterrupted run gives
(bit-identical: same machine, one thread, a deterministic method).

Killed runs are forked children of this process (the modules are imported once), patched
to kill themselves at the chosen point; everything else runs in-process through
``dfkd.cli.main``. Tiny settings throughout: a lenet5 teacher trained one epoch on digits,
6 DAFL steps, batch 32, 32 samples, no evaluation.
"""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dfkd.cli import build_parser, main
from dfkd.engine import rundir
from dfkd.engine.rundir import run_status

STEPS = 6
TINY = ["--method", "dafl", "--steps", str(STEPS), "--quiet", "--no-eval", "batch_size=32", "options.ngf=8", "samples=32"]


# --------------------------------------------------------------------------- helpers
def dfkd(capsys, *args):
    """``dfkd args`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, code: int, expected: int, *phrases: str) -> str:
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def distill_args(teacher, out, *extra):
    return ["distill", "--teacher", teacher, *TINY, "--out", out, *extra]


def student_weights(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / rundir.STUDENT, map_location="cpu", weights_only=True)
    return checkpoint["state_dict"]


def assert_same_student(run_dir: Path, reference: dict) -> None:
    weights = student_weights(run_dir)
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != rundir.LOCK)


def assert_files_complete(run_dir: Path) -> None:
    """Every run file present loads (none is partial)."""
    if (run_dir / rundir.CONFIG).exists():
        assert isinstance(yaml.safe_load((run_dir / rundir.CONFIG).read_text()), dict)
    for name in (rundir.STATE, rundir.SYNTHESIZER, rundir.SAMPLES):
        if (run_dir / name).exists():
            torch.load(run_dir / name, map_location="cpu", weights_only=True)
    if (run_dir / rundir.STUDENT).exists():
        from teachers import load_checkpoint

        load_checkpoint(run_dir / rundir.STUDENT)
    if (run_dir / rundir.SUMMARY).exists():
        json.loads((run_dir / rundir.SUMMARY).read_text())


class Child:
    """``dfkd argv`` in a forked child of this process, after ``patch()`` ran in the child."""

    def __init__(self, argv, patch=None, tmp_path=None):
        self.err_path = Path(tmp_path) / f"child-{time.monotonic_ns()}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                fd = os.open(self.err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                sys.stderr = open(2, "w", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                if patch is not None:
                    patch()
                code = main([str(a) for a in argv])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.status = None

    def wait(self, timeout=120) -> int:
        """The child's exit status, or minus the signal that ended it."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"child {self.pid} did not finish in {timeout}s")
            else:
                time.sleep(0.02)
        return self.status

    @property
    def stderr(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""


def wait_for(path: Path, child: Child, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            child.status = os.waitstatus_to_exitcode(status)
            raise AssertionError(f"child ended ({child.status}) before {path.name}: {child.stderr}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout}s"
        time.sleep(0.02)


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(60)  # the signal is on its way


def kill_at_step(step):
    """Patch: kill -9 just before the student step ``step + 1``."""
    def patch():
        from dfkd.engine.run import DistillationRun

        original = DistillationRun._set_lr

        def dying(self):
            if self.step == step:
                die()
            return original(self)

        DistillationRun._set_lr = dying
    return patch


def kill_on_replace(name, nth=1):
    """Patch: kill -9 when the ``nth`` complete temporary file of ``name`` is about to be
    renamed over it (the writer is killed in the middle of writing ``name``)."""
    def patch():
        original = os.replace
        seen = [0]

        def dying(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == name:
                seen[0] += 1
                if seen[0] == nth:
                    die()
            return original(src, dst, *args, **kwargs)

        os.replace = dying
    return patch


def kill_in_report():
    """Patch: kill -9 after training, the student and the summary, before the report."""
    def patch():
        import dfkd.api.runs as runs

        runs.write_report = lambda out: die()
    return patch


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A lenet5 digits teacher trained for one epoch."""
    import dfkd

    path = tmp_path_factory.mktemp("teacher") / "lenet5_digits.pt"
    dfkd.train_teacher(dataset="digits", arch="lenet5", epochs=1, out=str(path), progress=False)
    return path


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """An uninterrupted run with default flags: its directory and its student's weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([str(a) for a in distill_args(teacher, out)]) == 0
    return out, student_weights(out)


# --------------------------------------------------------------------------- 1, 7: flags at 0
_FILE = {"steps": 7, "batch_size": 8, "seed": 5, "eval_every": 3, "log_every": 4, "checkpoint_every": 2,
         "checkpoint_seconds": 60.0, "student_ema": 0.5, "samples": 16, "student_lr": 0.01,
         "student_weight_decay": 0.001, "feature_weight": 2.0, "real_limit": 100, "peers": 3, "peer_weight": 0.5}
_OPTION_FLAGS = {"temperature": 4.0, "generator_lr": 0.1, "bn_weight": 5.0, "iterations": 3}
# flag -> whether 0 is a valid value for it
RUN_FLAGS = {"steps": False, "batch_size": False, "seed": True, "peers": False, "peer_weight": True, "eval_every": True, "log_every": True,
             "checkpoint_every": True, "checkpoint_seconds": True, "student_ema": True, "samples": False,
             "student_lr": False, "student_weight_decay": True, "temperature": False, "generator_lr": False,
             "bn_weight": True, "iterations": False}
AMALGAMATE_FLAGS = {**RUN_FLAGS, "feature_weight": True, "real_limit": True}
TEACHER_FLAGS = {"epochs": False, "batch_size": False, "lr": False, "weight_decay": True, "seed": True,
                 "image_size": False}
_TEACHER_FILE = {"epochs": 3, "batch_size": 16, "lr": 0.01, "weight_decay": 0.001, "seed": 5, "image_size": 16}
CASES = ([("distill", f, ok) for f, ok in RUN_FLAGS.items()] + [("amalgamate", f, ok) for f, ok in AMALGAMATE_FLAGS.items()]
         + [("train-teacher", f, ok) for f, ok in TEACHER_FLAGS.items()])


def _numeric_flags(command) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions if a.type in (int, float)}


def test_every_numeric_flag_is_covered():
    for command, flags in (("distill", RUN_FLAGS), ("amalgamate", AMALGAMATE_FLAGS), ("train-teacher", TEACHER_FLAGS)):
        assert _numeric_flags(command) == set(flags), command


@pytest.mark.parametrize("command,flag,zero_ok", CASES, ids=[f"{c}--{f}" for c, f, _ in CASES])
def test_a_flag_at_zero_is_kept_over_the_config_file(tmp_path, command, flag, zero_ok):
    """``--FLAG 0`` beats the config file's value; where 0 makes no sense the config refuses
    it naming the key (dfkd checks it before any work: see test_zero_steps_...)."""
    from dfkd.cli.amalgamate import amalgamate_config
    from dfkd.cli.distill import config_from_args
    from dfkd.cli.teacher import teacher_config
    from dfkd.config import ConfigError

    option = flag in _OPTION_FLAGS
    if command == "train-teacher":
        file_layer = {flag: _TEACHER_FILE[flag]}
    else:
        file_layer = {"options": {flag: _OPTION_FLAGS[flag]}} if option else {flag: _FILE[flag]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(file_layer))
    argv = [command, "--config", str(tmp_path / "c.yaml"), "--" + flag.replace("_", "-"), "0"]
    if command == "amalgamate":
        argv += ["--zoo", "zoo.yaml"]
    args = build_parser().parse_args(argv)
    build = {"distill": config_from_args, "amalgamate": amalgamate_config, "train-teacher": teacher_config}[command]
    config = build(args)
    value = config.options[flag] if option else getattr(config, flag)
    assert value == 0 and not isinstance(value, bool)
    if zero_ok:
        config.validate()
    else:
        with pytest.raises(ConfigError, match=("options." if option else "") + flag + " must be"):
            config.validate()


@pytest.mark.parametrize("override,phrase", [
    ("steps=0", "steps must be at least 1, got 0"), ("steps=-5", "steps must be at least 1"),
    ("log_every=-1", "log_every must be 0 or more"), ("eval_every=-2", "eval_every must be 0 or more"),
    ("checkpoint_every=-1", "checkpoint_every must be 0 or more"), ("samples=0", "samples must be at least 1"),
    ("student_ema=1", "student_ema must be in [0, 1)"), ("student_ema=-0.1", "student_ema must be in [0, 1)"),
    ("student_lr=0", "student_lr must be above 0"), ("options.temperature=0", "options.temperature must be above 0"),
])
def test_zero_steps_and_other_nonsense_are_refused_before_any_file(teacher, tmp_path, capsys, override, phrase):
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out), override)
    one_line_error(err, code, 2, phrase)
    assert not out.exists()


def test_train_teacher_refuses_lr_zero_before_training(tmp_path, capsys):
    code, _, err = dfkd(capsys, "train-teacher", "--lr", "0", "--epochs", "1", "--quiet", "--out", tmp_path / "t.pt")
    one_line_error(err, code, 2, "lr must be above 0, got 0.0")
    assert not (tmp_path / "t.pt").exists()


def test_seed_zero_beats_the_config_files_seed_end_to_end(teacher, reference, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("seed: 3\n")
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out), "--config", tmp_path / "c.yaml", "--seed", "0")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
    assert_same_student(out, reference[1])  # the reference ran with seed 0


# --------------------------------------------------------------------------- 2: non-finite losses
def test_nan_mid_run_stops_with_exit_3_and_never_saves_a_bad_state(teacher, tmp_path, capsys, monkeypatch):
    """The teacher's weights turn NaN during step 2 (after its synthesis round, so the first
    non-finite loss is step 3's); with a log every 5 steps and a checkpoint every 2, the
    checkpoint of step 4 is refused: state.pt stays at step 2."""
    from dfkd.engine.run import DistillationRun

    original = DistillationRun._set_lr

    def poison(self):
        if self.step == 1:
            with torch.no_grad():
                for p in self.teacher.parameters():
                    p.fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(DistillationRun, "_set_lr", poison)
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--log-every", "5", "--checkpoint-every", "2"))
    one_line_error(err, code, 3, "non-finite at step 3", "last good state (step 2)")
    state = torch.load(out / rundir.STATE, map_location="cpu", weights_only=True)
    assert state["step"] == 2
    tensors = list(state["student"].values()) + [v for v in state["synthesizer"]["generator"].values()
                                                 if isinstance(v, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert not (out / rundir.STUDENT).exists() and run_status(out) == "training"


def test_a_checkpoint_with_nan_weights_is_refused_as_teacher(teacher, tmp_path, capsys):
    raw = torch.load(teacher, weights_only=True)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point() and v.dim() > 1)
    raw["state_dict"][key][0] = float("nan")
    torch.save(raw, tmp_path / "nan.pt")
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, "distill", "--teacher", tmp_path / "nan.pt", *TINY, "--out", out)
    one_line_error(err, code, 2, "holds NaN/inf")
    assert not out.exists()


# --------------------------------------------------------------------------- 3: one run per directory
def test_a_second_run_into_a_busy_directory_is_refused_and_nothing_mixes(teacher, reference, tmp_path, capsys):
    out, go, release = tmp_path / "run", tmp_path / "at-step-2", tmp_path / "release"

    def pause_at_step_2():
        from dfkd.engine.run import DistillationRun

        original = DistillationRun._set_lr

        def pausing(self):
            if self.step == 2 and not release.exists():
                go.touch()
                deadline = time.monotonic() + 60
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            return original(self)

        DistillationRun._set_lr = pausing

    first = Child(distill_args(teacher, out, "--checkpoint-every", "1"), pause_at_step_2, tmp_path)
    try:
        wait_for(go, first)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        code, _, err = dfkd(capsys, *distill_args(teacher, out, "--seed", "7"))
        one_line_error(err, code, 2, "is in use by another dfkd process", f"pid {first.pid}")
        code, _, err = dfkd(capsys, *distill_args(teacher, out, "--overwrite"))
        one_line_error(err, code, 2, "is in use by another dfkd process")
        code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
        one_line_error(err, code, 2, "is in use by another dfkd process")
        code, _, err = dfkd(capsys, "plot", "curves", out)
        one_line_error(err, code, 2, "is in use by another dfkd process")
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # not a byte changed
    finally:
        release.touch()
    assert first.wait() == 0, first.stderr
    assert run_status(out) == "finished" and yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
    assert_same_student(out, reference[1])


@pytest.mark.parametrize("leave", ["started", "training", "trained"])
def test_a_new_run_into_an_unfinished_run_is_refused_naming_resume_and_overwrite(teacher, reference, tmp_path,
                                                                                   capsys, leave):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    drop = {"started": [rundir.REPORT, rundir.SUMMARY, rundir.STUDENT, rundir.STATE],
            "training": [rundir.REPORT, rundir.SUMMARY], "trained": [rundir.REPORT]}[leave]
    for name in drop:
        (out / name).unlink()
    assert run_status(out) == leave
    listing = sorted(os.listdir(out))
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--seed", "1"))
    one_line_error(err, code, 2, f"holds an unfinished run ({leave})", f"--resume {out}", "--overwrite")
    assert sorted(os.listdir(out)) == listing


def test_overwrite_deletes_every_file_of_the_old_run(teacher, reference, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in rundir.OWNED_FILES:
        (out / name).write_text("old run")
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--overwrite"))
    assert code == 0, err
    for name in os.listdir(out):
        if name in rundir.OWNED_FILES:
            assert (out / name).read_bytes() != b"old run", name
    assert not (out / "embedding.png").exists() and not (out / "confusion.png").exists()  # --no-eval draws neither
    assert (out / "notes.txt").read_text() == "mine"
    assert_same_student(out, reference[1])


# --------------------------------------------------------------------------- 4: disks
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (``mount(options)`` -> its path); skipped where mounting is not allowed."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        if not shutil.which("mount") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_is_one_line_leaves_no_partial_file_and_resumes(teacher, reference, tmp_path, tmpfs, capsys):
    state, synth = (os.path.getsize(reference[0] / name) for name in (rundir.STATE, rundir.SYNTHESIZER))
    # room for config, log and one checkpoint (state.pt + synthesizer.pt), not for the next state.pt next to it
    size_kib = (state + synth + state // 2) // 1024 + 128
    disk = tmpfs(f"size={size_kib}k")
    out = disk / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--checkpoint-every", "2"))
    one_line_error(err, code, 2, "no space left on device", "choose another --out", str(out / rundir.STATE))
    assert temp_files(out) == []
    assert_files_complete(out)
    assert torch.load(out / rundir.STATE, weights_only=True)["step"] == 2
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    assert code == 0, err
    assert run_status(out) == "finished" and temp_files(out) == []
    assert_same_student(out, reference[1])


def test_a_read_only_out_is_one_line(teacher, tmp_path, tmpfs, capsys):
    disk = tmpfs("ro,size=1m")
    code, _, err = dfkd(capsys, *distill_args(teacher, disk / "run"))
    one_line_error(err, code, 2, f"cannot write {disk / 'run'}", "read-only")


def test_an_unwritable_out_leaves_no_folder_behind(teacher, tmp_path, capsys, monkeypatch):
    """(As root chmod cannot make a directory read-only: the writer is refused instead.)"""
    import teachers.files as files

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    out = tmp_path / "new" / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out))
    one_line_error(err, code, 2, f"cannot write {out / 'config.yaml'}", "not writable")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_an_out_that_cannot_be_a_directory_is_one_line(teacher, tmp_path, capsys, where):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out))
    one_line_error(err, code, 2, str(out), "choose another --out")
    assert (tmp_path / "f").read_text() == "a file"


def test_a_disk_error_in_the_report_is_one_line_and_resume_completes(teacher, reference, tmp_path, capsys,
                                                                      monkeypatch):
    import dfkd.api.runs as runs

    def full(out):
        (Path(out) / ".report.md.tmp999").write_text("half a rep")  # what report.py leaves when it dies
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "write_report", full)
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out))
    one_line_error(err, code, 2, f"cannot write {out / 'report.md'}: no space left on device")
    assert run_status(out) == "trained" and temp_files(out) == []
    monkeypatch.undo()
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    assert code == 0 and run_status(out) == "finished", err
    assert_same_student(out, reference[1])


# --------------------------------------------------------------------------- 5, 12: kill -9, then --resume
KILLS = {
    "training": ([], kill_at_step(4), "started"),  # default flags: no state yet, restarts from config.yaml
    "training-after-checkpoint": (["--checkpoint-every", "2"], kill_at_step(5), "training"),
    "checkpoint-write": (["--checkpoint-every", "2"], kill_on_replace(rundir.STATE, 2), "training"),
    "student-write": ([], kill_on_replace(rundir.STUDENT), "training"),
    "plots": ([], kill_on_replace("samples.png"), "training"),
    "before-report": ([], kill_in_report(), "trained"),
    "report-write": ([], kill_on_replace(rundir.REPORT), "trained"),
}
_VARIANTS = ("training-after-checkpoint", "student-write", "before-report")  # the same guarantees again


@pytest.mark.parametrize("point", [pytest.param(p, marks=pytest.mark.slow) if p in _VARIANTS else p for p in KILLS])
def test_kill_9_then_resume_gives_the_uninterrupted_student(teacher, reference, tmp_path, capsys, point):
    flags, patch, status = KILLS[point]
    out = tmp_path / "run"
    child = Child(distill_args(teacher, out, *flags), patch, tmp_path)
    assert child.wait() == -signal.SIGKILL, child.stderr
    assert run_status(out) == status
    assert_files_complete(out)
    if point.endswith("-write") or point == "plots":
        assert temp_files(out), "the killed writer should have left its temporary file"
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    assert code == 0, err
    assert run_status(out) == "finished" and temp_files(out) == []
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert summary["steps"] == STEPS and (out / "samples.png").exists()
    assert_same_student(out, reference[1])
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    one_line_error(err, code, 2, "already finished")


def test_files_of_a_run_share_one_mode(reference):
    modes = {p.name: p.stat().st_mode & 0o777 for p in reference[0].iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a" / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--student", "lenet99"))
    one_line_error(err, code, 2, "lenet99")
    assert not out.exists() and not (tmp_path / "a").exists()
    code, _, err = dfkd(capsys, "distill", "--teacher", tmp_path / "missing.pt", *TINY, "--out", out)
    one_line_error(err, code, 2, "missing.pt")
    assert not (tmp_path / "a").exists()

    from dfkd.engine.run import DistillationRun

    def broken(self):
        raise RuntimeError("a bug before the first step")

    monkeypatch.setattr(DistillationRun, "run", broken)
    code, _, err = dfkd(capsys, *distill_args(teacher, out))
    one_line_error(err, code, 1, "internal error: RuntimeError: a bug before the first step", "DFKD_DEBUG")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    code, _, err = dfkd(capsys, *distill_args(teacher, existing))
    assert code == 1, err
    assert sorted(os.listdir(existing)) == [".lock", "notes.txt"]  # the folder and its files stay; ours are gone


# --------------------------------------------------------------------------- 11: Ctrl-C
def test_ctrl_c_saves_exits_130_naming_the_run_and_resumes_to_the_same_student(teacher, reference, tmp_path,
                                                                               capsys):
    out, at_step, = tmp_path / "run", tmp_path / "at-step-3"

    def wait_for_ctrl_c_at_step_3():
        from dfkd.engine.run import DistillationRun

        original = DistillationRun._set_lr

        def waiting(self):
            if self.step == 3:
                at_step.touch()
                deadline = time.monotonic() + 60
                while not self._interrupt.requested and time.monotonic() < deadline:
                    time.sleep(0.02)
            return original(self)

        DistillationRun._set_lr = waiting

    child = Child(distill_args(teacher, out), wait_for_ctrl_c_at_step_3, tmp_path)
    wait_for(at_step, child)
    os.kill(child.pid, signal.SIGINT)
    assert child.wait() == 130, child.stderr
    last = child.stderr.strip().splitlines()[-1]
    assert last == f"interrupted; resume with dfkd distill --resume {out}" and "Traceback" not in child.stderr
    assert torch.load(out / rundir.STATE, weights_only=True)["step"] == 4  # the round in progress, then saved
    assert run_status(out) == "training"
    code, out_text, err = dfkd(capsys, "distill", "--resume", out)
    assert code == 0, err
    assert "resuming" in out_text and run_status(out) == "finished"
    assert_same_student(out, reference[1])


# --------------------------------------------------------------------------- 6, 8: one-line errors, resume checks
def test_device_and_memory_errors_are_one_line_before_any_file(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out, "--device", "foo"))
    one_line_error(err, code, 2, "--device foo")
    started = time.perf_counter()
    code, _, err = dfkd(capsys, *distill_args(teacher, out), "batch_size=1000000000")
    one_line_error(err, code, 2, "GiB of memory", "lower batch_size")
    assert time.perf_counter() - started < 10 and not out.exists()
    code, _, err = dfkd(capsys, "train-teacher", "--device", "foo", "--quiet", "--out", tmp_path / "t.pt")
    one_line_error(err, code, 2, "--device foo")


def _trained_copy(reference, tmp_path) -> Path:
    """The reference run as if killed after training, before the analysis (state.pt at the
    last step and student.pt, no summary.json, no report.md)."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    for name in (rundir.REPORT, rundir.SUMMARY):
        (out / name).unlink()
    return out


@pytest.mark.parametrize("edit,phrases", [
    ({"student": "lenet5"}, ["student 'lenet5_half' -> 'lenet5'", "undo the edit"]),
    ({"seed": 3, "student_lr": 0.5}, ["seed 0 -> 3", "student_lr"]),
    ({"options": {"ngf": 16}}, ["options.ngf 8 -> 16"]),
    ({"steps": 12}, ["extending a run is not supported", "steps=12"]),
    ({"steps": 3}, ["steps 6 -> 3"]),
])
def test_resume_refuses_an_edited_config_listing_the_keys(teacher, reference, tmp_path, capsys, edit, phrases):
    out = _trained_copy(reference, tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    edited = {**saved, **edit}
    if "options" in edit:
        edited["options"] = {**saved["options"], **edit["options"]}
    (out / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != rundir.LOCK}
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    one_line_error(err, code, 2, str(out / "config.yaml"), *phrases)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != rundir.LOCK} == listing


def test_resume_allows_where_and_how_often_to_save(teacher, reference, tmp_path, capsys):
    out = _trained_copy(reference, tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved.update(out="/elsewhere/moved", checkpoint_seconds=10.0, log_every=1)
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, out_text, err = dfkd(capsys, "distill", "--resume", out, "--device", "cpu", "--checkpoint-every", "1")
    assert code == 0, err
    assert "completing" in out_text and run_status(out) == "finished"
    assert_same_student(out, reference[1])


def test_resume_accepts_a_run_saved_before_new_config_keys_existed(teacher, reference, tmp_path, capsys):
    """Keys a newer package added (here peers, peer_arch, peer_weight) are missing from an older run's
    config.yaml and state: they count as their defaults, not as edits."""
    out = _trained_copy(reference, tmp_path)
    new_keys = ("peers", "peer_arch", "peer_weight")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in saved.items() if k not in new_keys}, sort_keys=False))
    state = torch.load(out / rundir.STATE, weights_only=True)
    state["config"] = {k: v for k, v in state["config"].items() if k not in new_keys}
    torch.save(state, out / rundir.STATE)
    code, out_text, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    assert code == 0, err
    assert run_status(out) == "finished"
    assert_same_student(out, reference[1])


@pytest.mark.parametrize("given", [["steps=10"], ["--seed", "1"], ["--bn-weight", "0"], ["--overwrite"],
                                   ["--out", "elsewhere"], ["--student-lr", "0.1", "options.ngf=4"]])
def test_resume_refuses_settings_that_would_not_apply(reference, tmp_path, capsys, given):
    out = _trained_copy(reference, tmp_path)
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet", *given)
    one_line_error(err, code, 2, f"--resume {out} continues the run with its own config.yaml", given[0].split("=")[0])
    assert run_status(out) == "training" and not (out / rundir.SUMMARY).exists()


# --------------------------------------------------------------------------- 9, 10, 13: hostile files
def _bomb() -> str:
    """Billion laughs: 9 ** 9 strings once the aliases are expanded, in 417 bytes."""
    lines = ["---", 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines)


def test_yaml_bombs_are_one_line_and_fast(teacher, tmp_path, capsys):
    from dfkd.config import load_yaml as config_loader
    from teachers.files import load_yaml as bounded_loader

    assert config_loader is bounded_loader
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    assert bomb.stat().st_size == 417
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(_bomb().replace("---", "---\nformat: dfkd-zoo/1"))
    for argv in (distill_args(teacher, tmp_path / "r") + ["--config", bomb],
                 ["amalgamate", "--config", bomb, "--out", tmp_path / "r"],
                 ["train-teacher", "--config", bomb, "--out", tmp_path / "t.pt"],
                 ["amalgamate", "--zoo", manifest, "--out", tmp_path / "r", "--quiet", "--no-eval"],
                 ["zoo", "verify", manifest], ["zoo", "list", manifest]):
        started = time.perf_counter()
        code, _, err = dfkd(capsys, *argv)
        one_line_error(err, code, 2, "refused", "alias")
        assert time.perf_counter() - started < 2.0, argv
    assert not (tmp_path / "r").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(kind, teacher, path: Path, marker: Path) -> Path:
    good = Path(teacher).read_bytes()
    if kind == "pickle-payload":
        with open(path, "wb") as f:
            pickle.dump({"format": "dfkd-checkpoint/1", "evil": _Payload(marker)}, f)
    elif kind == "torch-payload":
        torch.save({"format": "dfkd-checkpoint/1", "evil": _Payload(marker)}, path)
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("arch: lenet5\nthis is not a checkpoint\n")
    elif kind == "nan":
        raw = torch.load(teacher, weights_only=True)
        raw["state_dict"][next(k for k, v in raw["state_dict"].items() if v.is_floating_point())].fill_(float("inf"))
        torch.save(raw, path)
    elif kind == "classes":
        raw = torch.load(teacher, weights_only=True)
        raw["meta"]["classes"], raw["meta"]["class_names"] = raw["meta"]["classes"][:5], raw["meta"]["class_names"][:5]
        torch.save(raw, path)
    return path


HOSTILE = {"pickle-payload": "never unpickles code", "torch-payload": "never unpickles code",
           "truncated": "truncated or not a PyTorch file", "empty": "truncated or not a PyTorch file",
           "text": "truncated or not a PyTorch file", "nan": "holds NaN/inf", "classes": "outputs but meta lists"}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_checkpoints_are_one_line_everywhere(teacher, tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    bad = _hostile(kind, teacher, tmp_path / "bad.pt", marker)
    from teachers.files import sha256_file

    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(yaml.safe_dump({"format": "dfkd-zoo/1", "teachers": [
        {"name": "bad", "path": "bad.pt", "sha256": sha256_file(bad)}]}))
    for argv in (["evaluate", "--model", bad], ["zoo", "verify", manifest],
                 ["distill", "--teacher", bad, *TINY, "--out", tmp_path / "run"]):
        code, _, err = dfkd(capsys, *argv)
        one_line_error(err, code, 2, HOSTILE[kind])
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["truncated", "pickle-payload", "empty"])
def test_a_corrupt_state_is_one_line_on_resume(reference, tmp_path, capsys, kind):
    out = _trained_copy(reference, tmp_path)
    marker = tmp_path / "pwned"
    good = (out / rundir.STATE).read_bytes()
    if kind == "truncated":
        (out / rundir.STATE).write_bytes(good[: len(good) // 3])
    elif kind == "empty":
        (out / rundir.STATE).write_bytes(b"")
    else:
        with open(out / rundir.STATE, "wb") as f:
            pickle.dump({"format": "dfkd-run-state/1", "evil": _Payload(marker)}, f)
    code, _, err = dfkd(capsys, "distill", "--resume", out, "--quiet")
    one_line_error(err, code, 3, f"cannot resume from {out / rundir.STATE}")
    assert not marker.exists() and run_status(out) == "training" and not (out / rundir.REPORT).exists()


@pytest.mark.parametrize("text,phrase", [
    ("stepz: 3\n", "unknown config key 'stepz'"), ("steps: many\n", "steps must be an integer"),
    ("- 1\n- 2\n", "must hold a mapping"), ("steps: [1,\n", "not valid YAML"), (None, "does not exist"),
    ("options: {nope: 1}\n", "does not accept option(s) nope"), ("student_lr: -1\n", "student_lr must be above 0"),
])
def test_bad_config_files_are_one_line_before_any_file(teacher, tmp_path, capsys, text, phrase):
    config = tmp_path / "c.yaml"
    if text is not None:
        config.write_text(text)
    out = tmp_path / "run"
    code, _, err = dfkd(capsys, *distill_args(teacher, out), "--config", config)
    one_line_error(err, code, 2, phrase)
    assert not out.exists()
