"""The run-directory contract: what a dfkd run directory holds, and what it guarantees after a crash.

Files, in the order a run writes them (each one atomically, by :mod:`teachers.files`)::

    config.yaml      the resolved config, written before any work
    state.pt         everything needed to resume, rewritten every checkpoint_every steps
    synthesizer.pt   the synthesizer's state, written with state.pt
    metrics.csv      the evaluations so far, rewritten at each evaluation
    student.pt       the final student (a teachers checkpoint), once training ends
    summary.json     the final numbers, right after student.pt (rewritten with the analysis)
    samples.pt       synthetic samples for the analysis
    report.md        written last: its presence means the run finished

After a crash or kill at any point every file present is complete (an old version or the
new one, never half of one); a killed writer may leave a ``.<name>.XXXXXXXX.tmp`` file,
which :class:`RunLock` clears when it takes the directory. :func:`run_status` tells the
state from the files alone:

    missing   no directory
    empty     a directory without config.yaml (other files are ignored)
    started   config.yaml, no state.pt: nothing to resume, start again
    training  state.pt but no finished student (student.pt + summary.json): resume
    trained   student.pt and summary.json, no report.md: the analysis/report is incomplete
    finished  report.md exists

:class:`RunLock` keeps two dfkd processes out of one directory; the OS drops the lock when
its holder dies, however it dies. Imports only the standard library and ``teachers.files``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from teachers.files import remove_stale_temp_files

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "CONFIG", "STATE", "SYNTHESIZER", "METRICS", "STUDENT", "SUMMARY", "SAMPLES", "REPORT", "LOCK",
    "RUN_FILES", "STATUSES", "RunDirBusyError", "RunLock", "run_status",
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
#: The files of a run, in the order a run writes them.
RUN_FILES = (CONFIG, STATE, SYNTHESIZER, METRICS, STUDENT, SUMMARY, SAMPLES, REPORT)
STATUSES = ("missing", "empty", "started", "training", "trained", "finished")


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
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` exclusively (creating the directory).

    Raises :class:`RunDirBusyError` at once if another process holds it. Once held, the
    ``.*.tmp`` files of killed writers are removed (``clean=False`` keeps them; ``removed``
    lists them). Uses ``flock``, which the OS releases when the holder exits or is killed;
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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
            self.removed = remove_stale_temp_files(self.run_dir)
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
