"""dfkd.engine.rundir: one process per run directory; a run's state from its files alone."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd.engine import rundir
from dfkd.engine.rundir import RunDirBusyError, RunLock, run_status

REPO = Path(__file__).resolve().parents[1]

# try the lock from another process; print OK or BUSY <message>
_TRY = """
import sys
from dfkd.engine.rundir import RunDirBusyError, RunLock
try:
    with RunLock(sys.argv[1]):
        print("OK")
except RunDirBusyError as e:
    print("BUSY", e)
"""
# take the lock, say so, and wait to be killed
_HOLD = """
import sys, time
from dfkd.engine.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
time.sleep(600)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _try_elsewhere(run_dir) -> str:
    proc = subprocess.run([sys.executable, "-c", _TRY, str(run_dir)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_second_process_is_refused_while_held_and_admitted_after(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with RunLock(run_dir) as lock:
        assert lock.held and run_dir.is_dir()
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        out = _try_elsewhere(run_dir)
        assert out == (f"BUSY {run_dir} is in use by another dfkd process (pid {os.getpid()}); "
                       "wait for it to finish or choose another --out")
        with pytest.raises(RunDirBusyError):  # a second lock in the same process is refused too
            RunLock(run_dir).acquire()
    assert not lock.held
    assert _try_elsewhere(run_dir) == "OK"


def test_lock_of_a_killed_holder_is_free(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}\\)"):
            RunLock(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    with RunLock(run_dir) as lock:
        assert lock.held and (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_lock_clears_temp_files_of_killed_writers(tmp_path):
    (tmp_path / ".state.pt.k3j_x9q2.tmp").write_bytes(b"half")
    (tmp_path / "state.pt").write_bytes(b"whole")
    with RunLock(tmp_path) as lock:
        assert [p.name for p in lock.removed] == [".state.pt.k3j_x9q2.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "state.pt"]
    (tmp_path / ".x.tmp").write_bytes(b"")
    with RunLock(tmp_path, clean=False) as lock:
        assert lock.removed == [] and (tmp_path / ".x.tmp").exists()


def test_run_status_for_each_state(tmp_path):
    run = tmp_path / "run"
    assert run_status(run) == "missing"
    run.mkdir()
    assert run_status(run) == "empty"
    with RunLock(run):
        assert run_status(run) == "empty"  # the lock file is not part of a run
    steps = [
        (rundir.CONFIG, "started"),
        (rundir.METRICS, "started"),
        (rundir.STATE, "training"),
        (rundir.SYNTHESIZER, "training"),
        (rundir.STUDENT, "training"),  # student.pt without summary.json: the end was not reached
        (rundir.SUMMARY, "trained"),
        (rundir.SAMPLES, "trained"),
        (rundir.REPORT, "finished"),
    ]
    for name, status in steps:
        (run / name).write_bytes(b"x")
        assert run_status(run) == status, name
    assert set(rundir.RUN_FILES) == {name for name, _ in steps}
    assert [run_status(run)] == [s for s in rundir.STATUSES if s == "finished"]
    (tmp_path / "afile").write_text("x")
    assert run_status(tmp_path / "afile") == "missing"


def test_lock_also_clears_the_temp_files_of_the_reporting_modules(tmp_path):
    names = [".report.md.tmp4242", ".samples.tmp77.png", ".state.pt.ab12cd34.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    for name in ("report.md", ".lock", ".hidden", "notes.tmp", ".tmpfoo"):
        (tmp_path / name).write_bytes(b"keep")
    with RunLock(tmp_path) as lock:
        assert sorted(p.name for p in lock.removed) == sorted(names)
    assert sorted(os.listdir(tmp_path)) == sorted([".hidden", ".lock", ".tmpfoo", "notes.tmp", "report.md"])


def test_lock_on_a_path_that_cannot_be_a_directory_is_one_line(tmp_path):
    from teachers.files import FileWriteError

    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(FileWriteError, match=f"cannot write {bad}: a path component is a file") as err:
            RunLock(bad).acquire()
        assert "\n" not in str(err.value)


def test_clear_run_files_deletes_only_what_a_run_writes(tmp_path):
    for name in rundir.OWNED_FILES + ("notes.txt",):
        (tmp_path / name).write_text("x")
    removed = rundir.clear_run_files(tmp_path, keep=(rundir.CONFIG,))
    assert set(removed) == set(rundir.OWNED_FILES) - {rundir.CONFIG}
    assert sorted(os.listdir(tmp_path)) == [rundir.CONFIG, "notes.txt"]
    assert set(rundir.RUN_FILES) < set(rundir.OWNED_FILES) and rundir.LOG in rundir.OWNED_FILES


def test_config_changes_lists_changed_keys_except_where_and_how_often():
    saved = {"steps": 6, "student": "lenet5_half", "out": "a", "device": "cpu", "checkpoint_every": 0,
             "options": {"lr": 0.1, "sizes": [1, 2]}}
    same = {**saved, "out": "b", "device": "cuda", "checkpoint_every": 5, "options": {"lr": 0.1, "sizes": (1, 2)}}
    assert rundir.config_changes(saved, same) == []
    edited = {**saved, "steps": 12, "options": {"lr": 0.2, "sizes": [1, 2], "new": 1}}
    assert rundir.config_changes(saved, edited) == [("options.lr", 0.1, 0.2), ("options.new", None, 1),
                                                    ("steps", 6, 12)]
    assert rundir.config_changes({"seed": 0}, {"seed": 0.0}) == []
