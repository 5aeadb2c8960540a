"""The run-directory contract: what a dfkd run directory holds, and what it guarantees after a crash.

Files, in the order a run writes them (each one atomically, by :mod:`teachers.files`)::

    config.yaml      the resolved config, written before the first step
    state.pt         everything needed to resume (also the resolved config), rewritten at
                     round ends every checkpoint_seconds (default 300) and/or every
                     checkpoint_every steps, at the last step, and on Ctrl-C
    synthesizer.pt   the synthesizer's state, written with state.pt (state.pt is the one resumed from)
    metrics.csv      the evaluations so far, rewritten at each evaluation
    student.pt       the final student (a teachers checkpoint), once training ends
    samples.pt       synthetic samples for the analysis, then the plots (*.png)
    summary.json     the final numbers, once the analysis is done
    report.md        written last: its presence means the run finished

Guarantees, whatever kills the process (kill -9, Ctrl-C, a full disk, a power cut once the
file system has synced):

- every file present is complete: the old version or the new one, never half of one; a
  killed writer may leave a hidden ``.<name>.<8 random characters>.tmp`` file, which :class:`RunLock`
  deletes when the next process takes the directory;
- no file comes from another run: one process at a time holds a directory (:class:`RunLock`),
  a new run refuses a directory that holds a run (unless ``--overwrite``, which first deletes
  :data:`OWNED_FILES`), and ``--resume`` refuses a ``config.yaml`` that differs from the config
  saved in ``state.pt`` (:func:`config_changes`);
- nothing is saved from a non-finite step: the engine checks the losses and the weights
  before every save;
- ``--resume DIR`` completes whatever is missing, ending with the student an uninterrupted
  run gives (bit-identical on the same machine where the method is deterministic).

:func:`run_status` tells the state from the files alone:

    missing   no directory
    empty     a directory without config.yaml (other files are ignored)
    started   config.yaml, no state.pt: nothing to resume; --resume restarts from config.yaml
    training  state.pt but no finished student (student.pt + summary.json): --resume continues
    trained   student.pt and summary.json, no report.md: --resume redoes the analysis and report
    finished  report.md exists; --resume refuses

:class:`RunLock` keeps two dfkd processes out of one directory; the OS drops the lock when
its holder dies, however it dies. Imports only the standard library and ``teachers.files``.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from teachers.files import atomic_write, make_dirs, remove_stale_temp_files, write_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "CONFIG", "STATE", "SYNTHESIZER", "METRICS", "STUDENT", "SUMMARY", "SAMPLES", "REPORT", "LOCK", "LOG",
    "RUN_FILES", "PLOTS", "OWNED_FILES", "STATUSES", "RESUME_FREE_KEYS", "RunDirBusyError", "RunLock", "run_status",
    "clear_run_files", "config_changes", "remove_stale_temps", "ResumeError", "check_resume_config",
    "DeferredInterrupt",
]

CONFIG = "config.yaml"
STATE = "state.pt"
SYNTHESIZER = "synthesizer.pt"
METRICS = "metrics.csv"
STUDENT = "student.pt"
SUMMARY = "summary.json"
SAMPLES = "samples.pt"
REPORT = "report.md"
LOCK = ".lock"
LOG = "run.log"
#: The files of a run, in the order a run writes them.
RUN_FILES = (CONFIG, STATE, SYNTHESIZER, METRICS, STUDENT, SUMMARY, SAMPLES, REPORT)
#: The figures the analysis draws (dfkd.reporting.analysis).
PLOTS = ("samples.png", "classes.png", "embedding.png", "confusion.png", "curves.png")
#: Every file a run writes: what ``--overwrite`` deletes before a new run starts.
OWNED_FILES = RUN_FILES + (LOG,) + PLOTS
STATUSES = ("missing", "empty", "started", "training", "trained", "finished")
#: Config keys ``--resume`` lets differ from the saved config: where things are and how often
#: to log or save, none of which changes the student.
RESUME_FREE_KEYS = ("out", "device", "data_root", "download", "log_every", "checkpoint_every", "checkpoint_seconds",
                    "member_devices")
# temporary files of killed writers: ".<name>.<8 random characters>.tmp" from teachers.files (and the names the reporting
# modules gave their temporary files before they wrote through teachers.files)
_TEMP = re.compile(r"^\..+\.tmp(\d+)?(\.png)?$")


class RunDirBusyError(ValueError):
    """Another dfkd process holds the run directory's lock."""


def run_status(run_dir: str | os.PathLike) -> str:
    """One of :data:`STATUSES`, from the files present (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "missing"
    if (run_dir / REPORT).is_file():
        return "finished"
    if (run_dir / STUDENT).is_file() and (run_dir / SUMMARY).is_file():
        return "trained"
    if (run_dir / STATE).is_file():
        return "training"
    if (run_dir / CONFIG).is_file():
        return "started"
    return "empty"


def clear_run_files(run_dir: str | os.PathLike, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete the :data:`OWNED_FILES` of ``run_dir`` except ``keep``; return the names deleted.
    Hold the directory's :class:`RunLock` while calling it."""
    run_dir, removed = Path(run_dir), []
    for name in OWNED_FILES:
        if name in keep:
            continue
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files killed writers left in ``run_dir`` (see the module
    docstring). Only while holding its :class:`RunLock`."""
    removed = remove_stale_temp_files(run_dir)
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    if isinstance(value, tuple):
        value = list(value)
    return {prefix[:-1]: value}


def config_changes(saved: dict, current: dict, free: tuple[str, ...] = RESUME_FREE_KEYS) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every key (``options.lr`` for nested ones)
    whose value differs between two resolved configs, except the top-level keys in ``free``."""
    a = {k: v for k, v in _flat(saved).items() if k.split(".")[0] not in free}
    b = {k: v for k, v in _flat(current).items() if k.split(".")[0] not in free}
    missing = object()
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


class ResumeError(ValueError):
    """A resume that would not continue the saved run (its config.yaml was edited)."""


def check_resume_config(config_path, saved: dict, current: dict, saved_step: int) -> None:
    """Raise :class:`ResumeError` listing the keys (:func:`config_changes`) whose value in
    ``config_path`` (``current``) differs from the config the state was saved with."""
    changes = config_changes(saved, current)
    if not changes:
        return
    if [key for key, _, _ in changes] == ["steps"] and isinstance(changes[0][2], int) and changes[0][2] > changes[0][1]:
        old, new = changes[0][1], changes[0][2]
        raise ResumeError(
            f"{config_path} asks for steps {new} but the run was saved with steps {old} (at step {saved_step}): "
            "extending a run is not supported, because its learning-rate schedule and the synthesizer's plan span "
            f"the saved steps, so the student would differ from a run of {new} steps; restore steps: {old} to "
            f"resume, or start a new run with --config {config_path} steps={new} --out NEW_DIR")
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
    raise ResumeError(
        f"{config_path} differs from the config the run was saved with ({listed}); a resumed run must continue the "
        "same run: undo the edit to resume, or start a new run with --overwrite or another --out")


class DeferredInterrupt:
    """While open, the first Ctrl-C (SIGINT) only sets :attr:`requested` (and says ``note`` on
    stderr), so that a loop can stop where its state is consistent and save it; a second one
    raises KeyboardInterrupt at once. Only in the main thread and only over Python's default
    handler (elsewhere Ctrl-C raises as usual). :meth:`close` restores the handler."""

    def __init__(self, note: str):
        self.note = note
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ninterrupt: {self.note} (Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - os.kill(pid, 0) would send Ctrl-C there
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.windll.kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` exclusively (creating the directory;
    a path that cannot be a directory is a one-line :class:`teachers.files.FileWriteError`).

    Raises :class:`RunDirBusyError` at once if another process holds it. Once held, the
    temporary files of killed writers are removed (:func:`remove_stale_temps`; ``clean=False``
    keeps them; ``removed`` lists them). Uses ``flock``, which the OS releases when the holder exits or is killed;
    without ``fcntl`` (Windows) a best-effort ``O_EXCL`` lock file with the holder's pid,
    taken over when that pid is gone. Processes forked (not exec'd) while the lock is held
    share it until they exit.
    """

    def __init__(self, run_dir: str | os.PathLike, clean: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.clean = clean
        self.removed: list[Path] = []
        self._fd: int | None = None

    def _busy(self, pid: int | None) -> RunDirBusyError:
        who = f"pid {pid}" if pid else "pid unknown"
        return RunDirBusyError(
            f"{self.run_dir} is in use by another dfkd process ({who}); wait for it to finish or choose another --out"
        )

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"RunLock({self.run_dir}) is already held by this object")
        make_dirs(self.run_dir)
        if fcntl is not None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(_read_pid(self.path)) from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        else:  # pragma: no cover - Windows
            fd = self._acquire_exclusive_file()
        self._fd = fd
        if self.clean:
            self.removed = remove_stale_temps(self.run_dir)
        return self

    def _acquire_exclusive_file(self) -> int:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                pid = _read_pid(self.path)
                try:
                    young = time.time() - self.path.stat().st_mtime < 10
                except FileNotFoundError:
                    continue
                if (pid is not None and _pid_alive(pid)) or (pid is None and young):
                    raise self._busy(pid) from None
                self.path.unlink(missing_ok=True)  # stale: its holder is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        raise self._busy(_read_pid(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        else:  # pragma: no cover - Windows
            os.close(fd)
            self.path.unlink(missing_ok=True)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _RunLog(logging.FileHandler):
    """``run.log``; a write it cannot make (a full disk) is dropped without the traceback
    logging would print: the run's own writes report the disk."""

    def handleError(self, record) -> None:
        pass


def open_run_log(run_dir: Path) -> logging.Handler:
    """Log to ``run_dir/run.log`` (and nowhere else); returns the handler (close it at the end)."""
    root = logging.getLogger("dfkd")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = _RunLog(run_dir / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    return handler


def close_run_log(handler: logging.Handler | None) -> None:
    """Detach and close the handler :func:`open_run_log` returned (None: nothing to close)."""
    if handler is not None:
        logging.getLogger("dfkd").removeHandler(handler)
        handler.close()


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """``metrics.csv``: one line per evaluation row, the columns every key any row has, in order of appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]

    def write(handle):
        writer = csv.DictWriter(handle, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)

    atomic_write(Path(run_dir) / METRICS, write, mode="w")
