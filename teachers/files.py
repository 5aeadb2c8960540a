"""The one place dfkd writes files: atomically, with one-line errors that say what to do.

:func:`atomic_write` writes to a unique ``.<name>.<8 random characters>.tmp`` next to the target,
fsyncs it, ``os.replace``-s it over the target and fsyncs the directory: a reader (or a
resumed run) sees the old file or the complete new one, never a half-written one. Whatever
goes wrong (an exception in the writer, Ctrl-C, a full disk) the temporary file is removed
and the target is untouched. Written files get mode ``0o666 & ~umask``.

:func:`load_yaml` reads YAML safely and refuses alias bombs ("billion laughs").

Imports only the standard library and PyYAML (torch lazily), never ``dfkd``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = [
    "FileWriteError",
    "write_error",
    "make_dirs",
    "YAMLFileError",
    "YAMLBombError",
    "MAX_ALIAS_NODES",
    "BoundedLoader",
    "atomic_write",
    "write_bytes",
    "write_text",
    "write_json",
    "write_yaml",
    "torch_save",
    "remove_stale_temp_files",
    "sha256_file",
    "load_yaml",
]

#: How many nodes YAML aliases may add to a document once expanded.
MAX_ALIAS_NODES = 10_000


class FileWriteError(OSError):
    """A file could not be written; the message names the file, the cause and the fix.

    ``errno`` is the cause's errno, ``path`` the target; the target was left unchanged.
    """

    def __init__(self, message: str, path: str | os.PathLike, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return self.args[0]


class YAMLFileError(ValueError):
    """A YAML file is missing, unreadable, invalid or not a mapping."""


class YAMLBombError(YAMLFileError):
    """A YAML file whose aliases would expand beyond :data:`MAX_ALIAS_NODES` (or forever)."""


# --------------------------------------------------------------------------- writing
_NOT_WRITABLE = "the location is read-only or not writable; check its permissions or choose another --out"
_CAUSES = {
    errno.ENOSPC: "no space left on device; free space or choose another --out",
    errno.EDQUOT: "disk quota exceeded; free space within your quota or choose another --out",
    errno.EROFS: _NOT_WRITABLE,
    errno.EACCES: _NOT_WRITABLE,
    errno.EPERM: _NOT_WRITABLE,
    errno.ENOTDIR: "a path component is a file, not a directory; rename it or choose another --out",
    errno.EISDIR: "the target is a directory; remove it or choose another file name",
}
# causes worth reporting when a writer (e.g. torch.save) wrapped the OSError in another exception
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


def _write_error(path: Path, exc: OSError) -> FileWriteError:
    cause = _CAUSES.get(exc.errno)
    if cause is None:
        what = exc.strerror or str(exc) or type(exc).__name__
        cause = f"{what.rstrip('.').lower()}; check the disk and the path, then retry"
    return FileWriteError(f"cannot write {path}: {cause} (nothing was changed)", path, exc.errno)


def write_error(path: str | os.PathLike, exc: BaseException) -> FileWriteError | None:
    """The one-line :class:`FileWriteError` for ``exc`` raised while writing ``path`` (an
    OSError, or an exception a writer raised from a disk-level OSError), or None when
    ``exc`` is not about the file system. A FileWriteError is returned as it is."""
    if isinstance(exc, FileWriteError):
        return exc
    os_error = _os_error_in(exc)
    return None if os_error is None else _write_error(Path(path), os_error)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a path component that is a file, a read-only or full disk is a
    one-line :class:`FileWriteError` naming ``path``. Returns ``path``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # path or one of its parents is a file
        raise _write_error(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))) from None
    except OSError as exc:
        raise _write_error(path, exc) from None
    return path


def _os_error_in(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, else a disk-level OSError it was raised from, else None."""
    if isinstance(exc, OSError):
        return exc
    seen, link = set(), exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in _DISK_ERRNOS:
            return link
        link = link.__cause__ or link.__context__
    return None


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename durable where the platform allows it
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then move it over ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). Parent directories are created. On any
    exception the temporary file is removed and ``path`` is unchanged; OSErrors (also one
    a writer wrapped, as torch.save does on a full disk) become :class:`FileWriteError`.
    Returns ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # the parent is a file
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from e
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            perms = 0o666 & ~_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(fd, perms)
            else:  # pragma: no cover - Windows
                os.chmod(tmp, perms)
            f = os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except BaseException:
            os.close(fd)
            raise
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        os_error = _os_error_in(exc)
        if os_error is not None and not isinstance(exc, FileWriteError):
            raise _write_error(path, os_error) from exc
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically as UTF-8."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def _non_finite(value: Any, where: str = "") -> str | None:
    """Where the first NaN/inf float in ``value`` is (``a.b[2]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "the value")
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON (indent 2) atomically; NaN/inf is refused with a ValueError."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError:
        where = _non_finite(data) or "a value"
        raise ValueError(
            f"cannot write {path}: {where} is NaN or infinite, which JSON cannot hold; "
            "store null or a finite number (nothing was changed)"
        ) from None
    return write_text(path, text)


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` with ``yaml.safe_dump`` (keys in their order) atomically."""
    text = yaml.safe_dump(data, sort_keys=False)
    return write_text(path, text)


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.*.tmp`` files killed writers left in ``directory`` (not recursive).

    Only call it while no writer is active there (e.g. holding ``dfkd.rundir.RunLock``).
    Returns the removed paths; a missing directory is fine.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and len(entry.name) > 5 \
                and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return sorted(removed)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading YAML
class _AliasBomb(Exception):
    pass


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Raise _AliasBomb if aliases expand ``root`` by more than MAX_ALIAS_NODES or forever."""
    sizes: dict[int, int] = {}  # id(node) -> node count once aliases are expanded
    open_: set[int] = set()  # nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            continue
        if key in sizes:
            continue
        if key in open_:
            raise _AliasBomb("a YAML alias refers to a node that contains it (infinite expansion)")
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    if sizes[id(root)] - len(sizes) > MAX_ALIAS_NODES:
        raise _AliasBomb(
            f"its YAML aliases expand it by more than {MAX_ALIAS_NODES:,} nodes (the limit; an alias bomb?)"
        )


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand by more than
    :data:`MAX_ALIAS_NODES` nodes, or that refer to themselves."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    text = problem or " ".join(str(exc).split())
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    return text


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    """Load a YAML mapping with :class:`BoundedLoader`; an empty file gives ``{}``.

    Raises :class:`YAMLFileError` (one line, starting with ``what`` and the path) for a
    missing or unreadable file, invalid YAML or a top level that is not a mapping, and
    :class:`YAMLBombError` for alias bombs and absurd nesting.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise YAMLFileError(f"{what} {path} is not a file")
        raise YAMLFileError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise YAMLFileError(f"{what} {path} is not valid YAML: it is not UTF-8 text") from None
    except OSError as e:
        raise YAMLFileError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=BoundedLoader)
    except _AliasBomb as e:
        raise YAMLBombError(f"{what} {path} refused: {e}; write the values out instead") from None
    except RecursionError:
        raise YAMLBombError(f"{what} {path} refused: it is nested too deeply to load") from None
    except yaml.YAMLError as e:
        raise YAMLFileError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YAMLFileError(f"{what} {path} must hold a mapping of key: value, not {type(data).__name__}")
    return data
